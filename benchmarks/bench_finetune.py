"""Fine-tuning vs training from scratch on a subset of the bundled digits (docs/finetune.md).

The base is the quickstart's run (``ssd-run pipelines/quickstart.toml``: all ten digits,
1500 steps). The task: generate only some digit classes (default 0, 1, 2), from an image
folder of those digits that this script writes (scikit-learn's 8x8 digits, scaled to
0..255 exactly as the bundled source does; upscaled to 16 px by the data pipeline).

For each seed, two runs of the quickstart pipeline on that folder, ``--steps`` steps each
(default 300), equal in everything but the start:

- ``finetune``: ``train.init_from = <base run>`` (its EMA weights, a fresh optimizer);
- ``scratch``: the fresh initialization of ``run.seed``.

Each run (and the base itself, 0 steps) is evaluated with ``ssd-run evaluate`` on
``--num-samples`` samples (K = 100, exact noise, sampler seed 0) against the subset:
weights-free FD-pix8 (ssd_keras/metrics.py; lower is better, not FID) and the
nearest-neighbour ratio. Printed: per run, and mean +- sample std over the seeds.

    python benchmarks/bench_finetune.py --base runs/quickstart [--steps 300] [--seeds 0 1 2]

Measured (2 shared CPU cores; see the report in docs/finetune.md):
filled in by the run that produced docs/finetune.md's table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_subset(folder: Path, digits: list[int]) -> int:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, (image, label) in enumerate(zip(images, d.target)):
        if int(label) in digits:
            Image.fromarray(image, "L").save(folder / f"{label}_{i:04d}.png")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=ROOT / "runs" / "quickstart")
    ap.add_argument("--digits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-samples", type=int, default=360)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_finetune")
    args = ap.parse_args()

    from ssd_keras.cli import main as ssd_run

    out = args.out.resolve()
    data = out / "data" / ("digits_" + "".join(map(str, args.digits)))
    n_images = write_subset(data, args.digits)
    print(f"subset: digits {args.digits}, {n_images} images in {data}", flush=True)
    pipeline = ROOT / "pipelines" / "quickstart.toml"
    common = ["--set", "data.source=folder", "--set", f"data.path={data}",
              "--set", "data.small_images=upscale", "--set", f"run.output_dir={out / 'runs'}",
              "--set", f"train.steps={args.steps}", "--set", f"train.checkpoint_every={args.steps}",
              "--set", "train.sample_every=0", "--no-progress"]
    evaluate = ["--num-samples", str(args.num_samples), "--cache-dir", str(out / "cache"),
                "--no-progress"]

    def fd_of(run_dir: Path, extra=()) -> dict:
        code = ssd_run(["evaluate", str(run_dir), *evaluate, *extra])
        if code:
            raise SystemExit(f"evaluate {run_dir} failed ({code})")
        found = sorted((run_dir / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
        m = json.loads(found[-1].read_text())["metrics"]["weights_free"]
        return {"fd_pix8": m["fd_pix8"], "nn_ratio": m["nearest_neighbour"]["ratio"]}

    results = {"finetune": [], "scratch": []}
    rows = []
    # the base on the subset: its data reference is the subset, its samples are all digits
    base_copy = out / "runs" / "base_on_subset"
    if not base_copy.exists():
        code = ssd_run(["export", str(args.base), "--format", "safetensors",
                        "--out", str(out / "base.safetensors")])
        assert code == 0
        base_toml = out / "base_subset.toml"
        from ssd_keras.config import load_pipeline

        cfg = load_pipeline(args.base / "config.toml").replace(
            data={"source": "folder", "path": str(data), "small_images": "upscale"})
        base_toml.write_text(cfg.to_toml())
        assert ssd_run(["import", str(out / "base.safetensors"), "--pipeline", str(base_toml),
                        "--name", "base_on_subset", "--runs-dir", str(out / "runs")]) == 0
    base = fd_of(base_copy)
    rows.append(("base (0 steps)", "-", base, 0.0))
    print(f"base: {base}", flush=True)
    for seed in args.seeds:
        for kind in ("finetune", "scratch"):
            name = f"{kind}_s{seed}"
            extra = ["--set", f"run.name={name}", "--set", f"run.seed={seed}"]
            if kind == "finetune":
                extra += ["--init-from", str(args.base.resolve())]
            t0 = time.perf_counter()
            assert ssd_run([str(pipeline), *common, *extra]) == 0
            seconds = time.perf_counter() - t0
            r = fd_of(out / "runs" / name)
            results[kind].append(r)
            rows.append((kind, seed, r, seconds))
            print(f"{name}: {r} (train {seconds:.0f} s)", flush=True)

    print(f"\n{args.steps} steps on digits {args.digits} ({n_images} images), "
          f"{args.num_samples} samples each, FD-pix8 (lower is better)")
    print(f"{'run':16s} {'seed':>4s} {'FD-pix8':>9s} {'NN ratio':>9s} {'train s':>8s}")
    for kind, seed, r, seconds in rows:
        print(f"{kind:16s} {seed!s:>4s} {r['fd_pix8']:9.4f} {r['nn_ratio']:9.3f} {seconds:8.0f}")
    for kind, rs in results.items():
        fd = np.array([r["fd_pix8"] for r in rs])
        nn = np.array([r["nn_ratio"] for r in rs])
        sd = fd.std(ddof=1) if len(fd) > 1 else float("nan")
        print(f"{kind:16s} mean FD-pix8 {fd.mean():.4f} +- {sd:.4f} (sample std over "
              f"{len(fd)} seeds; min {fd.min():.4f}, max {fd.max():.4f}); NN ratio {nn.mean():.3f}")
    (out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": [
            {"run": k, "seed": s, **r, "train_seconds": sec} for k, s, r, sec in rows]}, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
