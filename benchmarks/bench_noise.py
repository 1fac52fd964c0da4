"""Cost of the posterior noise on SSD's resolution-change steps: exact vs Lanczos samplers.

    KERAS_BACKEND=torch OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_noise.py \
        [--batch 64] [--repeats 3] [--iterations 40] [--sizes 64,128,256]

On a change step ``t -> s`` (``r(t) = r(s)/2``) the posterior noise has covariance
``sigma_s^2 (I - rho c^2 D^T D)``. For each posterior resolution ``r(s)`` in ``--sizes`` this
times, on one batch ``xi ~ N(0, I)`` of shape ``(batch, r, r, 3)``:

1. ``exact``:   ``ScaleSpaceProcess.posterior_noise(method="exact")`` (per-axis eigenbases);
2. ``batched``: ``posterior_noise(method="lanczos")`` (all samples and channels in lockstep);
3. ``loop``:    a per-sample Lanczos loop as in the official PyTorch code: a Python loop over
   the samples, each running ``--iterations`` Lanczos steps on the whole ``(H, W, C)`` vector
   of one sample (batch of 1, the same matrix-free ``_apply_a`` products, no
   reorthogonalization, ``f(T)`` from a small ``eigh``).

All paths are warmed up once (the Lanczos ones with 2 iterations: the same kernels on the
same shapes). Then up to ``--repeats`` rounds run exact and batched interleaved (exact around
each), so they see the same share of a busy CPU; no new round starts once their runs of a size
have taken ``--budget`` seconds. The per-sample loop runs once, in the first round, timed
sample by sample; when it passes ``--loop-limit`` seconds it stops and its time is
extrapolated linearly to the full batch (marked ``*``). Times are medians (the loop's: the
one run), reported as ratios to ``exact`` measured in the same run. The max abs differences
of (2) and (3) against (1) use the same ``xi`` (the loop's on the samples it ran).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np


def lanczos_sqrt_one(apply_a, x, iterations: int = 40):
    """``sqrt(A) x`` for ONE sample ``x`` of shape ``(1, H, W, C)``, taken as one vector.

    The per-sample baseline that the batched ``lanczos_sqrt`` replaces: ``iterations`` plain
    Lanczos steps on the whole ``(H, W, C)`` vector (three-term recurrence, no
    reorthogonalization, no breakdown guard), then ``||x|| V_m f(T_m) e1`` with ``f = sqrt``
    from an ``eigh`` of the ``m x m`` tridiagonal on the host.
    """
    from keras import ops

    norm0 = ops.sqrt(ops.sum(x * x))
    q = x / norm0
    q_prev = ops.zeros_like(x)
    beta_prev = 0.0
    basis, alphas, betas = [], [], []
    for j in range(iterations):
        basis.append(q)
        w = apply_a(q) - beta_prev * q_prev
        alpha = ops.sum(w * q)
        w = w - alpha * q
        alphas.append(alpha)
        if j == iterations - 1:
            break
        beta = ops.sqrt(ops.sum(w * w))
        q_prev, q = q, w / beta
        beta_prev = beta
        betas.append(beta)
    a = ops.convert_to_numpy(ops.stack(alphas)).astype(np.float64)
    b = ops.convert_to_numpy(ops.stack(betas)).astype(np.float64) if betas else np.zeros(0)
    lam, vec = np.linalg.eigh(np.diag(a) + np.diag(b, 1) + np.diag(b, -1))
    coeff = float(ops.convert_to_numpy(norm0)) * (
        vec @ (np.sqrt(np.clip(lam, 0.0, None)) * vec[0, :]))
    out = ops.zeros_like(x)
    for j, v in enumerate(basis):
        out = out + float(coeff[j]) * v
    return out


def lanczos_sqrt_per_sample(apply_a, xi, iterations: int = 40):
    """The official code's loop: ``lanczos_sqrt_one`` on each sample of the batch in turn."""
    from keras import ops

    return ops.concatenate(
        [lanczos_sqrt_one(apply_a, xi[b : b + 1], iterations) for b in range(xi.shape[0])],
        axis=0)


def timed_loop(fn, count: int, limit: float):
    """Run ``fn(b)`` for ``b = 0, 1, ...`` timing each, until ``count`` samples are done or
    ``limit`` seconds have passed. Returns (per-sample seconds, outputs)."""
    times, outputs = [], []
    for b in range(count):
        elapsed, out = _timed(lambda: fn(b))
        times.append(elapsed)
        outputs.append(out)
        if sum(times) > limit:
            break
    return times, outputs


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def change_step_for(process, r_s: int) -> int:
    """The change step ``t`` whose posterior lives at ``r(t-1) = r_s`` with ``r(t) = r_s/2``."""
    for t in process.change_steps:
        if int(process.r[t - 1]) == r_s and int(process.r[t]) == r_s // 2:
            return t
    raise ValueError(f"no change step into {r_s} px; change steps: "
                     + ", ".join(f"t={t} ({process.r[t]}->{process.r[t - 1]})"
                                 for t in process.change_steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=40, help="Lanczos iterations")
    parser.add_argument("--sizes", default="64,128,256", help="posterior resolutions r(s)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--budget", type=float, default=40.0,
                        help="no further round once exact + batched runs of a size have taken "
                             "this many seconds (at least one round)")
    parser.add_argument("--loop-limit", type=float, default=60.0,
                        help="the per-sample loop stops after this many seconds and its time "
                             "is extrapolated linearly to the batch")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras
    import torch
    from keras import backend, ops

    from ssd_keras.process import ScaleSpaceProcess

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = int(round(math.log2(max(sizes) / (min(sizes) // 2)))) + 1  # 64..256 -> 4: 32..256
    process = ScaleSpaceProcess(max(sizes), levels, timesteps=1000)
    rng = np.random.default_rng(args.seed)

    cmd = " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv])
    print(f"# posterior noise on change steps: ScaleSpaceProcess({process.image_size}, "
          f"{process.levels}, timesteps={process.timesteps}), levels {process.resolutions}")
    print(f"# keras {keras.__version__} ({backend.backend()}), torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {os.cpu_count()} CPU(s), "
          f"{platform.processor() or platform.machine()}")
    print(f"# batch {args.batch}, {args.channels} channels, float32, Lanczos iterations "
          f"{args.iterations}; 1 warm-up, then median of up to {args.repeats} interleaved "
          f"rounds (no new round after {args.budget:g}s per size); loop: 1 run, cut at "
          f"{args.loop_limit:g}s")
    print(f"# reproduce: KERAS_BACKEND={backend.backend()} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} {cmd}")
    print(f"# load average at start {_load()} (other processes share the CPU; compare ratios)")
    header = ("| r(t)->r(s) | t   | method  | samples | runs | time (s) | vs exact | "
              "max abs diff vs exact |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    notes = []
    for r_s in sizes:
        t = change_step_for(process, r_s)
        k = process.step_coefficients(t)
        xi_np = rng.standard_normal((args.batch, r_s, r_s, args.channels)).astype(np.float32)
        xi = ops.convert_to_tensor(xi_np, dtype="float32")
        pair = f"{r_s // 2}->{r_s}"

        def exact():
            return process.posterior_noise(xi, t, method="exact")

        def batched(iterations=args.iterations):
            return process.posterior_noise(xi, t, method="lanczos", iterations=iterations)

        def apply_a(v):
            return process._apply_a(v, k)

        def one(b, iterations=args.iterations):
            return k.sigma_s * lanczos_sqrt_one(apply_a, xi[b : b + 1], iterations)

        # warm-up: every code path once (the Lanczos ones with 2 iterations: the same kernels
        # on the same shapes)
        exact(), batched(2), one(0, 2)

        # interleaved rounds, so that the methods see the same share of a busy CPU (exact is
        # cheap and runs around each of the others). The loop runs in the first round only,
        # timed sample by sample and cut after --loop-limit seconds.
        times = {"exact": [], "batched": [], "loop": []}
        spent = 0.0  # seconds of exact + batched runs (the budget of further rounds)
        for round_ in range(args.repeats):
            for name, fn in (("exact", exact), ("batched", batched), ("exact", exact)):
                elapsed, out = _timed(fn)
                times[name].append(elapsed)
                spent += elapsed
                if name == "exact":
                    z_exact = ops.convert_to_numpy(out)
                else:
                    z_batch = ops.convert_to_numpy(out)
            if round_ == 0:
                times["loop"], z_loop = timed_loop(one, args.batch, args.loop_limit)
                elapsed, _ = _timed(exact)
                times["exact"].append(elapsed)
            if spent > args.budget:
                break
        t_exact = statistics.median(times["exact"])
        t_batch = statistics.median(times["batched"])
        n_loop = len(times["loop"])
        if n_loop < args.batch:  # linear extrapolation from the samples that ran
            t_loop = sum(times["loop"]) * args.batch / n_loop
            notes.append(f"{pair}: per-sample loop stopped after {args.loop_limit:g}s, on "
                         f"{n_loop} of {args.batch} samples ({sum(times['loop']):.1f}s); time "
                         f"extrapolated linearly x{args.batch / n_loop:.2f}")
        else:
            t_loop = sum(times["loop"])
        spread = (min(times["loop"]) * args.batch, statistics.median(times["loop"]) * args.batch)
        notes.append(f"{pair}: loop per-sample times x{args.batch}: min {spread[0]:.2f}s, "
                     f"median {spread[1]:.2f}s (sensitivity to CPU contention)")
        z_loop = np.concatenate([ops.convert_to_numpy(z) for z in z_loop], axis=0)
        d_batch = float(np.max(np.abs(z_batch - z_exact)))
        d_loop = float(np.max(np.abs(z_loop - z_exact[:n_loop])))
        loop_samples = str(args.batch) if n_loop == args.batch else f"{n_loop}*"
        n_exact, n_batch, n_runs_loop = len(times["exact"]), len(times["batched"]), 1

        rows = [("exact", str(args.batch), n_exact, t_exact, "-"),
                ("batched", str(args.batch), n_batch, t_batch, f"{d_batch:.2e}"),
                ("loop", loop_samples, n_runs_loop, t_loop, f"{d_loop:.2e}")]
        for name, samples, runs, secs, diff in rows:
            print(f"| {pair:>10} | {t:>3} | {name:<7} | {samples:>7} | {runs:>4} | "
                  f"{secs:>8.3f} | {secs / t_exact:>7.1f}x | {diff:>21} |", flush=True)
    print("# exact: posterior_noise(method='exact'); batched: posterior_noise(method='lanczos',"
          f" iterations={args.iterations}); loop: per-sample Lanczos on the whole (H,W,C) vector,"
          " batch of 1, Python loop over samples")
    print(f"# load average at end {_load()}")
    for note in notes:
        print(f"# * {note}")


if __name__ == "__main__":
    main()
