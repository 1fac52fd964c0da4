"""Forward+backward time per Flexi-UNet path vs its counted FLOPs and parameters.

Paper shape for 64x64 (channel_mult 1,2,3,4, 2 res blocks, attention at 16 and 8,
SSD levels 8,16,32,64) at a reduced width for CPU. Times are the median of
``--repeats`` steps after one warm-up step, each step = forward in training mode +
MSE loss + backward (torch autograd; this script needs the torch backend).

    KERAS_BACKEND=torch OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_flexi_unet.py
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ssd-run sets it

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from ssd_keras.nn import FlexiUNet  # noqa: E402
from ssd_keras.nn.flops import path_cost  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--levels", type=int, default=4, help="SSD levels (resolutions)")
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--channel-mult", default="1,2,3,4")
    ap.add_argument("--num-res-blocks", type=int, default=2)
    ap.add_argument("--attention", default="16,8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--dtype", default=None, help="Keras dtype policy, e.g. mixed_bfloat16")
    ap.add_argument(
        "--zero-skip-top",
        action="store_true",
        help="full_res_change_via_upsample=False (zero skips on the last change path too)",
    )
    args = ap.parse_args()
    if keras.backend.backend() != "torch":
        raise SystemExit("bench_flexi_unet.py times torch autograd: use KERAS_BACKEND=torch")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    s = args.image_size
    resolutions = [s >> k for k in reversed(range(args.levels))]
    unet = FlexiUNet(
        s,
        resolutions,
        base_channels=args.base_channels,
        channel_mult=tuple(int(c) for c in args.channel_mult.split(",")),
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=tuple(int(a) for a in args.attention.split(",") if a),
        num_heads=4,
        full_res_change_via_upsample=not args.zero_skip_top,
        dtype=args.dtype,
    )
    # non-zero weights so that backward does its full work
    rng = np.random.default_rng(0)
    for v in unet.variables:
        if len(v.shape) >= 2:
            fan_in = int(np.prod(v.shape[:-1]))
            v.assign(rng.normal(0, fan_in**-0.5, tuple(v.shape)).astype("float32"))

    print(
        f"keras {keras.__version__}, torch {torch.__version__}, backend "
        f"{keras.backend.backend()}, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, cpus {os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: {s}x{s}, levels {resolutions}, base {args.base_channels}, mult "
        f"{args.channel_mult}, res blocks {args.num_res_blocks}, attention {args.attention}, "
        f"dtype {unet.dtype_policy.name}, full_res_change_via_upsample "
        f"{unet.full_res_change_via_upsample}, total params {unet.count_params():,}; "
        f"batch {args.batch}, median of {args.repeats} fwd+bwd steps"
    )

    results = {}
    for r_in, r_out in unet.path_keys:
        model = unet.path(r_in, r_out)
        pvars = unet.path_variables(r_in, r_out)
        x = rng.normal(size=(args.batch, r_in, r_in, 3)).astype("float32")
        t = rng.integers(0, 1000, args.batch).astype("float32")
        target = ops.convert_to_tensor(
            rng.normal(size=(args.batch, r_out, r_out, 3)).astype("float32")
        )
        times = []
        for i in range(args.repeats + 1):
            for v in pvars:
                v.value.grad = None
            t0 = time.perf_counter()
            out = model([x, t], training=True)
            loss = ops.mean(ops.square(out - target))
            loss.backward()
            if i:
                times.append(time.perf_counter() - t0)
        results[(r_in, r_out)] = (statistics.median(times), path_cost(unet, r_in, r_out))

    full_t, full_c = results[(s, s)]
    print()
    print(
        f"{'path':>10} {'params':>11} {'params/full':>11} {'GFLOPs/sample':>13} "
        f"{'FLOPs/full':>10} {'time s':>8} {'time/full':>9}"
    )
    for key, (sec, cost) in results.items():
        print(
            f"{str(key):>10} {cost['params']:>11,} {cost['params'] / full_c['params']:>11.3f} "
            f"{cost['flops'] / 1e9:>13.4f} {cost['flops'] / full_c['flops']:>10.3f} "
            f"{sec:>8.3f} {sec / full_t:>9.3f}"
        )


if __name__ == "__main__":
    main()
