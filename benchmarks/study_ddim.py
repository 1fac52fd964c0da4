"""Sample quality versus number of steps: ancestral and DDIM-style sampling (docs/sampling.md).

Two models:

* ``--run RUN``: a trained run (e.g. the quickstart, ``ssd-run pipelines/quickstart.toml``),
  compared with its own training images.
* ``--gaussian``: a generated dataset, a stationary Gaussian random field at 16x16x3 with
  correlated colours, and its *exact* denoiser (the conditional mean of ``D_{1:s} x0`` given
  ``x_t``, in closed form). No training and no network error: what remains is the error
  of the sampler alone. Runs through the same ``sample_images`` loop as a network.

Metric: FD-pix8 and KID-pix8 of ``ssd_keras.metrics`` (weights-free), samples against
held-out data, at equal sample counts; the "data" rows give the floor (two disjoint data
sets of the same size). Writes ``results.json`` and the plot.

Example (the commands behind docs/sampling_study.png; the second adds the first's rows):

    python benchmarks/study_ddim.py --gaussian --gaussian-num-images 500 \\
        --out docs/study/gaussian.png
    python benchmarks/study_ddim.py --run runs/quickstart --num-images 256 \\
        --include docs/study/gaussian.json --out docs/sampling_study.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

METHODS = {  # label -> sample_images keywords
    "ancestral": dict(method="ancestral", noise="exact"),
    "ddim eta=0": dict(method="ddim", eta=0.0),
    "ddim eta=0, posterior on changes": dict(method="ddim", eta=0.0, change_eta=1.0),
}


# ----------------------------------------------------------------------------- models
def trained_run(run_dir: str, num_data: int):
    """``(name, model, process, objective, clip, data)`` of a run's newest checkpoint (EMA)."""
    from ssd_keras.builders import build_model, build_process
    from ssd_keras.metrics import draw_data_images
    from ssd_keras.objectives import make_objective
    from ssd_keras.runs import CHANNELS, load_run

    cfg, groups, meta, path = load_run(run_dir)
    model = build_model(cfg, precision="float32", channels=CHANNELS)
    for v, a in zip(model.trainable_variables, groups["ema"]):
        v.assign(a)
    process = build_process(cfg)
    objective = make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma)
    data = draw_data_images(cfg, num_data)
    name = f"{Path(run_dir).name} (step {meta['step']}, {cfg.process.levels} levels)"
    return name, model, process, objective, cfg.sampler.clip, data


class GaussianField:
    """``x0 ~ N(m, C (x) K)``: a 16x16 stationary field (covariance ``C``, spectrum
    ``~ 1/(1 + (f/f0)^2)``) with a 3x3 colour covariance ``K`` and a colour mean ``m``.

    ``path(r_in, r_out)`` returns the exact x0 predictor of that path:
    ``E[y | x_t] = B m + B S A^T a_t (a_t^2 A S A^T + sigma_t^2 I)^{-1} (x_t - a_t A m)``
    per decorrelated colour channel (``S = c_k C``), with ``A = D_{1:t}``, ``B = D_{1:s}``.
    """

    def __init__(self, process, size: int = 16, seed: int = 123):
        from ssd_keras.operators import resize_matrix

        self.process, self.size = process, size
        freqs = np.fft.fftfreq(size) * size
        f2 = freqs[:, None] ** 2 + freqs[None, :] ** 2
        spectrum = 1.0 / (1.0 + f2 / 2.0**2)
        # stationary (periodic) covariance from the spectrum, as a dense matrix
        eye = np.eye(size * size).reshape(-1, size, size)
        cov = np.real(np.fft.ifft2(spectrum * np.fft.fft2(eye))).reshape(size * size, -1)
        self.cov = 0.12 * (cov + cov.T) / 2 / np.mean(np.diag(cov))
        self.cov_eig, self.cov_vec = np.linalg.eigh(self.cov)
        rng = np.random.default_rng(seed)
        mix = np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
        self.colour_cov = mix
        self.mean = np.array([0.2, -0.1, -0.3])
        self.c_eig, self.c_vec = np.linalg.eigh(mix)  # decorrelated colours
        self._rng = rng

        def chain(r):
            m, n = np.eye(size), size
            while n > r:
                m = resize_matrix(n, n // 2) @ m
                n //= 2
            return np.kron(m, m)

        self._chain = {r: chain(r) for r in process.resolutions}

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        root = np.linalg.cholesky(self.cov + 1e-10 * np.eye(len(self.cov)))
        w = rng.standard_normal((n, len(self.cov), 3))
        z = np.einsum("ij,bjk->bik", root, w) * np.sqrt(self.c_eig)  # decorrelated
        x = np.einsum("bik,lk->bil", z, self.c_vec) + self.mean
        return x.reshape(n, self.size, self.size, 3).astype(np.float32)

    def predict(self, x_t: np.ndarray, t: int) -> np.ndarray:
        p = self.process
        s = p.output_step(t)
        a_op, b_op = self._chain[int(p.r[t])], self._chain[int(p.r[s])]
        a_t, sig_t = p.signal[t], p.noise_std[t]
        n, r_t = x_t.shape[0], x_t.shape[1]
        r_s = int(p.r[s])
        xt = (x_t.reshape(n, r_t * r_t, 3) - a_t * (a_op.sum(1)[None, :, None] * self.mean)) @ self.c_vec
        out = np.empty((n, r_s * r_s, 3))
        for k in range(3):
            if r_t == self.size:  # A = B = I: diagonal in the eigenbasis of C (a Wiener filter)
                lam = self.c_eig[k] * self.cov_eig
                gain = a_t * lam / (a_t**2 * lam + sig_t**2)
                out[:, :, k] = ((xt[:, :, k] @ self.cov_vec) * gain) @ self.cov_vec.T
                continue
            cov = self.c_eig[k] * self.cov
            gram = a_t**2 * a_op @ cov @ a_op.T + sig_t**2 * np.eye(len(a_op))
            gain = a_t * b_op @ cov @ a_op.T
            out[:, :, k] = np.linalg.solve(gram, xt[:, :, k].T).T @ gain.T
        out = out @ self.c_vec.T + b_op.sum(1)[None, :, None] * self.mean
        return out.reshape(n, r_s, r_s, 3)

    # the model interface sample_images uses: model.path(r_in, r_out)([x, t]) -> x0_hat
    def path(self, r_in, r_out):
        field = self

        class Path_:
            def __call__(self, inputs, training=False):
                from keras import ops

                x, t_vec = inputs
                t = int(round(float(ops.convert_to_numpy(t_vec)[0])))
                pred = field.predict(np.asarray(ops.convert_to_numpy(x), np.float64), t)
                return ops.convert_to_tensor(pred.astype(np.float32))

        return Path_()


def gaussian_model(num_data: int):
    from ssd_keras.objectives import X0Objective
    from ssd_keras.process import ScaleSpaceProcess

    process = ScaleSpaceProcess(16, 3, timesteps=1000, resolution_schedule="ConvexDecay-0.5")
    field = GaussianField(process)
    data = field.draw(2 * num_data, seed=999)
    return ("Gaussian field 16x16x3 (exact denoiser, 3 levels)", field, process,
            X0Objective(process), False, data)


# ----------------------------------------------------------------------------- study
def metrics(samples, data):
    from ssd_keras.metrics import (
        frechet_distance_features, kernel_inception_distance, pixel_features,
    )

    ps, pd = pixel_features(samples), pixel_features(data)
    kid, _ = kernel_inception_distance(ps, pd, seed=0)
    return frechet_distance_features(ps, pd), kid


def study(models, steps, seeds, batch_size, methods, max_k_for):
    from ssd_keras.sample import sample_images

    rows = []
    for name, model, process, objective, clip, data, num_images in models:
        if len(data) < 2 * num_images:
            sys.exit(f"{name}: needs {2 * num_images} data images, has {len(data)}")
        ref, held = data[:num_images], data[num_images:2 * num_images]
        fd, kid = metrics(held, ref)
        rows.append(dict(model=name, method="data", steps=0, seed=0, fd_pix8=fd, kid_pix8=kid,
                         seconds=0.0, network_calls=0))
        print(f"[{name}] data vs data: FD-pix8 {fd:.4f}  KID-pix8 {kid:.5f}", flush=True)
        jobs = [(label, k, seed) for label in methods for k in steps for seed in seeds
                if k <= max_k_for.get(label, max(steps))]
        start = time.perf_counter()
        calls_done, calls_total = 0, sum(len(process.respace(k)) for _, k, _ in jobs)
        for label, k, seed in jobs:
            t0 = time.perf_counter()
            result = sample_images(model, process, objective, num_images=num_images, steps=k,
                                   clip=clip, seed=1000 + seed, batch_size=batch_size,
                                   progress=False, **METHODS[label])
            seconds = time.perf_counter() - t0
            fd, kid = metrics(result.images, ref)
            rows.append(dict(model=name, method=label, steps=k, seed=seed, fd_pix8=fd,
                             kid_pix8=kid, seconds=seconds, network_calls=result.network_calls))
            calls_done += len(process.respace(k))
            elapsed = time.perf_counter() - start
            eta = elapsed / calls_done * (calls_total - calls_done)
            print(f"[{name}] {label:34s} K={k:4d} seed {seed}: FD-pix8 {fd:.4f} KID {kid:.5f} "
                  f"{seconds:6.1f} s ({result.network_calls} calls) | ETA {eta / 60:.1f} min",
                  flush=True)
    return rows


def summarize(rows):
    """Mean and std over seeds per (model, method, K)."""
    keys = sorted({(r["model"], r["method"], r["steps"]) for r in rows},
                  key=lambda k: (k[0], k[1] != "data", k[1], k[2]))
    out = []
    for key in keys:
        sel = [r for r in rows if (r["model"], r["method"], r["steps"]) == key]
        fd = np.array([r["fd_pix8"] for r in sel])
        kid = np.array([r["kid_pix8"] for r in sel])
        sec = np.array([r["seconds"] for r in sel])
        out.append(dict(model=key[0], method=key[1], steps=key[2], seeds=len(sel),
                        fd_mean=float(fd.mean()), fd_std=float(fd.std()),
                        kid_mean=float(kid.mean()), kid_std=float(kid.std()),
                        seconds=float(sec.mean()), network_calls=sel[0]["network_calls"]))
    return out


def table(summary) -> str:
    lines = ["| model | method | K | network calls | FD-pix8 (mean ± std) | KID-pix8 | "
             "vs ancestral K=1000 | seconds |", "|---|---|---|---|---|---|---|---|"]
    ref = {s["model"]: s["fd_mean"] for s in summary
           if s["method"] == "ancestral" and s["steps"] == 1000}
    for s in summary:
        rel = (f"{100 * (s['fd_mean'] / ref[s['model']] - 1):+.0f}%"
               if s["model"] in ref and s["method"] != "data" else "")
        k = "-" if s["method"] == "data" else s["steps"]
        lines.append(f"| {s['model']} | {s['method']} | {k} | {s['network_calls']} | "
                     f"{s['fd_mean']:.4f} ± {s['fd_std']:.4f} | {s['kid_mean']:.5f} | {rel} | "
                     f"{s['seconds']:.1f} |")
    return "\n".join(lines)


def plot(summary, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(s["model"] for s in summary))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, name in enumerate(models):
        sel = [s for s in summary if s["model"] == name]
        ax, ax_t = axes[0, col], axes[1, col]
        for label in [m for m in METHODS if any(s["method"] == m for s in sel)]:
            pts = sorted((s for s in sel if s["method"] == label), key=lambda s: s["steps"])
            k = [s["steps"] for s in pts]
            ax.errorbar(k, [s["fd_mean"] for s in pts], yerr=[s["fd_std"] for s in pts],
                        marker="o", capsize=3, label=label)
            ax_t.plot(k, [s["seconds"] for s in pts], marker="o", label=label)
        ref = [s for s in sel if s["method"] == "ancestral" and s["steps"] == 1000]
        if ref:
            v = ref[0]["fd_mean"]
            ax.axhspan(0.9 * v, 1.1 * v, color="grey", alpha=0.2, label="ancestral K=1000 ± 10%")
        floor = [s for s in sel if s["method"] == "data"]
        if floor:
            ax.axhline(floor[0]["fd_mean"], color="k", ls=":", label="data vs data")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("sampling steps K")
        ax.set_ylabel("FD-pix8 (lower is better)")
        ax.legend(fontsize=8)
        ax_t.set_xscale("log")
        ax_t.set_yscale("log")
        ax_t.set_xlabel("sampling steps K")
        ax_t.set_ylabel("sampling time (s)")
        ax_t.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", default=[], help="trained run directory (repeatable)")
    ap.add_argument("--gaussian", action="store_true", help="add the generated Gaussian field")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 250, 1000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--gaussian-num-images", type=int, default=1000,
                    help="samples per run for the Gaussian field (its denoiser is cheap)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--variant-max-steps", type=int, default=250,
                    help="largest K for the 'posterior on changes' variant (saves time)")
    ap.add_argument("--include", type=Path, action="append", default=[],
                    help="results .json of an earlier invocation to add to the table and plot")
    ap.add_argument("--out", type=Path, default=Path("docs/sampling_study.png"))
    args = ap.parse_args(argv)
    if not args.run and not args.gaussian and not args.include:
        ap.error("give --run RUN, --gaussian and/or --include RESULTS.json")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import keras

    print(f"backend {keras.backend.backend()}; load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    models = [trained_run(r, 2 * args.num_images) + (args.num_images,) for r in args.run]
    if args.gaussian:
        models.append(gaussian_model(args.gaussian_num_images) + (args.gaussian_num_images,))
    max_k = {"ddim eta=0, posterior on changes": args.variant_max_steps}
    rows = study(models, args.steps, args.seeds, args.batch_size, args.methods, max_k)
    commands = [" ".join(sys.argv)]
    for earlier in args.include:
        previous = json.loads(earlier.read_text())
        rows = previous["rows"] + rows
        commands = previous.get("commands", []) + commands
    summary = summarize(rows)
    results = args.out.with_suffix(".json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(dict(commands=commands, rows=rows, summary=summary,
                                       load=os.getloadavg()), indent=1))
    plot(summary, args.out)
    print(table(summary))
    print(f"wrote {args.out} and {results}")


if __name__ == "__main__":
    main()
