"""Sampling time per image: SSD against DDPM-x0 of the same network, next to FLOPs ratios.

Configurations: SSD with 2, 3 and 4 levels at 64 px (a reduced-width ADM UNet, flags
below) and the quickstart pipeline's size, levels and model; each against the one-level
DDPM-x0 of the very same network (``levels = 1``), for 1000 and 250 respaced steps.

Method (printed in the header): a sampling run calls the network once per kept step of
``process.respace(K)`` on path ``process.path_at(t)`` and then updates the state with
the posterior mean and noise. For each path, one such reverse step (network call at
batch B + posterior mean + posterior noise) is timed ``--reps`` times after
``--warmup`` untimed ones, and its median is used; a run's time is the sum over its
network calls of their path's step time, divided by B. So a run is *extrapolated* from
the step counts per path, not run end to end; ``--validate K`` also runs real
``sample_images`` loops with K steps and prints measured against extrapolated time.

    KERAS_BACKEND=torch OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="2,3,4", help="SSD levels at 64 px (comma list)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--channel-mult", default="1,2,3,4")
    ap.add_argument("--num-res-blocks", type=int, default=1)
    ap.add_argument("--attention", default="16,8", help="attention feature resolutions")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--no-quickstart", action="store_true", help="skip the quickstart config")
    ap.add_argument("--steps", default="1000,250", help="respaced step counts K")
    ap.add_argument("--batch", type=int, default=4, help="images per network call")
    ap.add_argument("--reps", type=int, default=10, help="timed reverse steps per path")
    ap.add_argument("--warmup", type=int, default=3, help="untimed reverse steps per path")
    ap.add_argument("--noise", default="exact", choices=("exact", "lanczos"))
    ap.add_argument("--validate", type=int, default=0, metavar="K",
                    help="also time real sample_images loops with K steps (0: off)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return ap.parse_args(argv)


def ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def configurations(args):
    """``[(label, image_size, levels, model kwargs)]``."""
    model = dict(base_channels=args.base_channels, channel_mult=tuple(ints(args.channel_mult)),
                 num_res_blocks=args.num_res_blocks,
                 attention_resolutions=tuple(ints(args.attention)), num_heads=args.heads,
                 dropout=0.0)
    out = [(f"{args.image_size}px {L}L", args.image_size, L, model) for L in ints(args.levels)]
    if not args.no_quickstart:
        from ssd_keras.config import load_pipeline

        q = load_pipeline(ROOT / "pipelines" / "quickstart.toml")
        m = q.model
        qm = dict(base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                  num_res_blocks=m.num_res_blocks,
                  attention_resolutions=tuple(m.attention_resolutions), num_heads=m.num_heads,
                  dropout=0.0)
        out.append((f"quickstart {q.process.image_size}px {q.process.levels}L",
                    q.process.image_size, q.process.levels, qm))
    return out


def build(size, levels, model_kwargs):
    from ssd_keras.nn import FlexiUNet
    from ssd_keras.process import ScaleSpaceProcess

    process = ScaleSpaceProcess(size, levels)
    model = FlexiUNet(size, process.resolutions, **model_kwargs)
    return process, model


def representative_step(process, key):
    """A reverse step ``(t, s = t-1)`` that uses path ``key``."""
    for t in range(process.timesteps - 1, 0, -1):
        if process.path_at(t) == key:
            return t, t - 1
    return 0, None  # only t = 0 (the last call): network only


def step_closures(process, model, args, rng):
    """``{path: callable}`` doing one reverse step (network + posterior update) on it."""
    from keras import ops

    from ssd_keras import backend
    from ssd_keras.objectives import make_objective

    objective = make_objective(process, "x0", 5.0)
    out = {}
    for key in process.paths:
        t, s = representative_step(process, key)
        b = args.batch
        x = ops.convert_to_tensor(rng.standard_normal((b, key[0], key[0], 3)), "float32")

        def step(path=model.path(*key), x=x, t=t, s=s, t_vec=ops.full((b,), float(t), "float32")):
            with backend.no_grad():
                pred = path([x, t_vec], training=False)
                x0 = ops.clip(objective.to_x0(pred, x, t), -1.0, 1.0)
                if s is None:
                    return ops.convert_to_numpy(x0)
                xi = rng.standard_normal((b, int(process.r[s]), int(process.r[s]), 3))
                y = process.posterior_mean(x0, x, t, s) + process.posterior_noise(
                    ops.convert_to_tensor(xi, "float32"), t, s, method=args.noise,
                    variance="fixed_small")
                return ops.convert_to_numpy(y)  # waits for the result

        out[key] = step
    return out


def time_paths(models, args):
    """Median seconds of one reverse step per path, for each ``(process, model)`` in
    ``models``; the timed steps of all paths of all models are interleaved round by round,
    so that load from other processes on the machine spreads over them alike."""
    rng = np.random.default_rng(0)
    steps = [step_closures(process, model, args, rng) for process, model in models]
    flat = [(i, key, fn) for i, d in enumerate(steps) for key, fn in d.items()]
    for _ in range(args.warmup):
        for _, _, fn in flat:
            fn()
    times = {(i, key): [] for i, key, _ in flat}
    for _ in range(args.reps):
        for i, key, fn in flat:
            start = time.perf_counter()
            fn()
            times[(i, key)].append(time.perf_counter() - start)
    return [{key: statistics.median(times[(i, key)]) for key in d} for i, d in enumerate(steps)]


def run_seconds(process, step_time, k, batch):
    """Extrapolated seconds per image of a K-step run: one step per kept timestep."""
    return sum(step_time[process.path_at(t)] for t in process.respace(k)) / batch


def measured_seconds(process, model, k, args):
    from ssd_keras.objectives import make_objective
    from ssd_keras.sample import sample_images

    objective = make_objective(process, "x0", 5.0)
    start = time.perf_counter()
    sample_images(model, process, objective, num_images=args.batch, batch_size=args.batch,
                  steps=k, noise=args.noise, progress=False)
    return (time.perf_counter() - start) / args.batch


def header(args):
    import keras

    lines = ["# bench_sampling: sampling time per image, SSD vs DDPM-x0 of the same network"]
    backend = keras.backend.backend()
    threads = "n/a"
    if backend == "torch":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        threads = torch.get_num_threads()
    lines.append(f"# keras {keras.__version__}, backend {backend}, torch threads {threads}, "
                 f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
                 f"{os.cpu_count()} CPUs visible, {platform.processor() or platform.machine()}")
    lines.append(f"# network at 64px: base {args.base_channels}, channel_mult [{args.channel_mult}], "
                 f"{args.num_res_blocks} res block(s), attention at [{args.attention}], "
                 f"{args.heads} heads; quickstart: its own model")
    lines.append(f"# method: per path, median of {args.reps} timed reverse steps (network call at "
                 f"batch {args.batch} + posterior mean + {args.noise} posterior noise) after "
                 f"{args.warmup} warm-up steps,")
    lines.append("#   interleaved round-robin over the SSD and DDPM paths of a config;")
    lines.append("#   a K-step run is EXTRAPOLATED: sum over the kept steps of process.respace(K) "
                 "of their path's step time, / batch")
    lines.append("#   (not an end-to-end loop; --validate K compares with real sample_images loops). "
                 "FLOPs ratios: ssd_keras.inspection.")
    lines.append("#   speedup = DDPM time / SSD time at the same K; '@K vs DDPM@1000': SSD with K "
                 "steps against DDPM with 1000 (the paper's 4.80x for 2L at 250).")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from ssd_keras.inspection import sampling_flops
    from ssd_keras.nn.flops import cost_table

    print(header(args), flush=True)
    steps = ints(args.steps)
    rows, validation = [], []
    t0 = time.perf_counter()
    for label, size, levels, model_kwargs in configurations(args):
        process, model = build(size, levels, model_kwargs)
        d_process, d_model = build(size, 1, model_kwargs)
        step_time, d_time = time_paths([(process, model), (d_process, d_model)], args)
        path_flops = {row["path"]: row["flops"] for row in cost_table(model)}
        full = path_flops[(size, size)]
        ddpm_ref_time = run_seconds(d_process, d_time, 1000, args.batch)
        for k in steps:
            calls, flops = sampling_flops(process, path_flops, k)
            ssd_s = run_seconds(process, step_time, k, args.batch)
            ddpm_s = run_seconds(d_process, d_time, k, args.batch)
            rows.append((label, k, calls, ssd_s, ddpm_s, ddpm_s / ssd_s, k * full / flops,
                         ddpm_ref_time / ssd_s, 1000 * full / flops))
        if args.validate:
            k = args.validate
            validation.append((label, k, measured_seconds(process, model, k, args),
                               run_seconds(process, step_time, k, args.batch),
                               measured_seconds(d_process, d_model, k, args),
                               run_seconds(d_process, d_time, k, args.batch)))
        print(f"# {label}: per-step ms (batch {args.batch}): " + ", ".join(
            f"{a}->{b} {1e3 * v:.1f}" for (a, b), v in step_time.items())
            + f"; DDPM {1e3 * d_time[(size, size)]:.1f}", flush=True)

    print()
    print(f"| {'config':<18} | {'K':>4} | {'SSD calls':>9} | {'SSD s/img':>9} | {'DDPM s/img':>10} "
          f"| {'time speedup':>12} | {'FLOPs speedup':>13} | {'time @K vs DDPM@1000':>20} "
          f"| {'FLOPs @K vs DDPM@1000':>21} |")
    print(f"|{'-' * 20}|{'-' * 6}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 14}|{'-' * 15}|"
          f"{'-' * 22}|{'-' * 23}|")
    for label, k, calls, ssd_s, ddpm_s, sp, fsp, sp_ref, fsp_ref in rows:
        print(f"| {label:<18} | {k:>4} | {calls:>9} | {ssd_s:>9.3f} | {ddpm_s:>10.3f} | "
              f"{sp:>11.2f}x | {fsp:>12.2f}x | {sp_ref:>19.2f}x | {fsp_ref:>20.2f}x |")
    if validation:
        print()
        print("| config | K | SSD measured s/img | SSD extrapolated | DDPM measured | DDPM extrapolated |")
        print("|---|---|---|---|---|---|")
        for label, k, ms, es, md, ed in validation:
            print(f"| {label} | {k} | {ms:.3f} | {es:.3f} | {md:.3f} | {ed:.3f} |")
    print(f"\n# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
