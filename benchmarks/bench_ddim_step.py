"""Per-step arithmetic of the two samplers, without the network: ancestral (posterior mean +
exact noise) vs the DDIM-style step (docs/sampling.md), interleaved, median of repeats.

    python benchmarks/bench_ddim_step.py [--size 64 --levels 4 --batch 16]
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    from keras import ops

    from ssd_keras.process import ScaleSpaceProcess

    p = ScaleSpaceProcess(args.size, args.levels)
    rng = np.random.default_rng(0)
    kept = p.respace(25)
    pairs = [(10, 9)] + [(t, t - 1) for t in p.change_steps] + [
        (t, s) for t, s in p.reverse_steps(25) if p.r[t] == p.r[s]][:1]
    print(f"load {os.getloadavg()[0]:.1f}; {args.size} px, {args.levels} levels, batch {args.batch}; "
          f"respaced K=25 keeps {len(kept)} steps")
    for t, s in pairs:
        def tensor(r):
            return ops.convert_to_tensor(rng.standard_normal((args.batch, r, r, 3)), dtype="float32")

        x0, xt, xi = tensor(int(p.r[s])), tensor(int(p.r[t])), tensor(int(p.r[s]))
        runs = {
            "ancestral": lambda: p.posterior_mean(x0, xt, t, s) + p.posterior_noise(xi, t, s),
            "ddim eta=0": lambda: p.ddim_step(x0, xt, xi, t, s, eta=0.0),
            "ddim eta=0.5": lambda: p.ddim_step(x0, xt, xi, t, s, eta=0.5),
        }
        times = {k: [] for k in runs}
        for f in runs.values():
            ops.convert_to_numpy(f())  # constants built once
        for _ in range(args.repeats):
            for k, f in runs.items():
                t0 = time.perf_counter()
                ops.convert_to_numpy(f())
                times[k].append(time.perf_counter() - t0)
        base = np.median(times["ancestral"])
        cells = ", ".join(f"{k} {np.median(v) * 1e3:.3f} ms ({np.median(v) / base:.2f}x)"
                          for k, v in times.items())
        kind = "change" if p.r[t] != p.r[s] else "plain"
        print(f"{kind:6s} t={t:4d} -> s={s:4d} ({p.r[t]}->{p.r[s]} px): {cells}")


if __name__ == "__main__":
    main()
