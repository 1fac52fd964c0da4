"""The execution layer's modes on this machine (docs/design.md "Execution layer").

    python benchmarks/bench_execution.py                      # eager / trace / compile, 8 and 32 px
    python benchmarks/bench_execution.py --modes eager,trace --paths 8-8,16-16,32-32
    python benchmarks/bench_execution.py --bf16               # Keras mixed_bfloat16 vs torch.autocast

Modes: per path of the ``bench_vs_official`` network (32 px, 3 levels, base 32), through
``backend.Execution``: the first call (tracing or compiling included) and the median warm
call of a training step (batch 32: forward, x0 MSE, backward) and of a sampling forward
(batch 8). ``--bf16``: one forward+backward on the 16 px path at batch 8 in float32,
under Keras's ``mixed_bfloat16`` policy and under ``torch.autocast(bfloat16)``, each
eager and traced: time, and the loss and gradient error against float32 (same weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def build(dtype=None):
    import keras

    from ssd_keras.nn import FlexiUNet

    keras.utils.set_random_seed(0)
    return FlexiUNet(32, [8, 16, 32], base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(16,), num_heads=4, dropout=0.0, dtype=dtype)


def mse(prediction, target, weight):
    from keras import ops

    return ops.mean(ops.mean(ops.square(ops.cast(prediction, "float32") - target), axis=(1, 2, 3)) * weight)


def tensor(a):
    from keras import ops

    return ops.convert_to_tensor(np.asarray(a, np.float32))


def timed(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench_modes(args):
    from ssd_keras.backend import Execution

    model = build()
    rng = np.random.default_rng(0)
    for key in [tuple(map(int, k.split("-"))) for k in args.paths.split(",")]:
        path = model.path(*key)
        bt, bs = args.train_batch, args.sample_batch
        train_in = [tensor(rng.normal(size=(bt, key[0], key[0], 3))), tensor(np.full(bt, 500.0)),
                    tensor(rng.normal(size=(bt, key[1], key[1], 3))), tensor(np.ones(bt))]
        sample_in = [tensor(rng.normal(size=(bs, key[0], key[0], 3))), tensor(np.full(bs, 500.0))]
        for mode in args.modes.split(","):
            execution = Execution(train_graph=mode, sample_graph=mode)
            step = execution.loss_and_grads(path, mse)
            first = timed(lambda: step(*train_in), 1)
            warm = timed(lambda: step(*train_in), args.repeats)
            forward = execution.forward(path)
            sfirst = timed(lambda: forward(*sample_in), 1)
            swarm = timed(lambda: forward(*sample_in), 2 * args.repeats)
            print(f"path {key[0]}->{key[1]} {mode:8s} training step b{bt}: first {first:8.2f} s, "
                  f"warm {1e3 * warm:8.1f} ms | sampling forward b{bs}: first {sfirst:8.2f} s, "
                  f"warm {1e3 * swarm:8.2f} ms", flush=True)


def bench_bf16(args):
    import torch

    from ssd_keras.backend import make_loss_and_grads

    key, n = (16, 16), 8
    ref = build()
    rng = np.random.default_rng(0)
    for v in ref.trainable_variables:  # non-zero everywhere (the last convs start at zero)
        v.assign(v.value + torch.from_numpy(0.05 * rng.normal(size=tuple(v.shape)).astype("float32")))
    policy = build("mixed_bfloat16")
    for a, b in zip(policy.variables, ref.variables):
        a.assign(b.value)
    inputs = [tensor(rng.normal(size=(n, 16, 16, 3))), tensor(np.linspace(400, 600, n)),
              tensor(0.5 * rng.normal(size=(n, 16, 16, 3))), tensor(np.ones(n))]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    cases = {}
    for graph in ("eager", "trace"):
        cases[f"float32 {graph}"] = make_loss_and_grads(ref.path(*key), mse, graph)
        cases[f"Keras mixed_bfloat16 {graph}"] = make_loss_and_grads(policy.path(*key), mse, graph)
        cases[f"torch.autocast bf16 {graph}"] = make_loss_and_grads(ref.path(*key), mse, graph,
                                                                    autocast=autocast)
    base = None
    for name, fn in cases.items():
        loss, grads = fn(*inputs)
        grads = [g.detach().float().clone() for g in grads]
        seconds = timed(lambda: fn(*inputs), args.repeats)
        if base is None:
            base = (float(loss), grads)
        num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(grads, base[1])))
        den = torch.sqrt(sum((b ** 2).sum() for b in base[1]))
        print(f"{name:30s} forward+backward {1e3 * seconds:8.1f} ms, loss rel. error "
              f"{abs(float(loss) - base[0]) / base[0]:.2e}, gradient rel. error {float(num / den):.2e}",
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="eager,trace,compile")
    ap.add_argument("--paths", default="8-8,32-32")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="compare the two bf16 mechanisms instead")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    (bench_bf16 if args.bf16 else bench_modes)(args)


if __name__ == "__main__":
    main()
