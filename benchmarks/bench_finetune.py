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

Measured (2 CPU cores shared by ~7 sessions; base: the quickstart at step 750; 2 seeds,
144 samples, K = 50; the command lines are in docs/finetune.md): FD-pix8 after 300 steps,
finetune 2.77 +- 0.13 (2.86, 2.68) vs scratch 17.34 +- 3.76 (20.00, 14.68); the base
itself 10.57.
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
    ap.add_argument("--base", type=Path, default=ROOT / "runs" / "quickstart",
                    help="the base run, or one of its checkpoint files")
    ap.add_argument("--digits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-samples", type=int, default=360, help="a multiple of 36")
    ap.add_argument("--sampling-steps", type=int, default=100, help="respaced K of the evaluation")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_finetune")
    ap.add_argument("--kinds", nargs="+", default=["finetune", "scratch"],
                    choices=["finetune", "scratch"])
    ap.add_argument("--no-base", action="store_true", help="do not evaluate the base itself")
    ap.add_argument("--report", action="store_true",
                    help="only print the table of what earlier invocations measured")
    args = ap.parse_args()
    out = args.out.resolve()
    if args.report:
        return report(out)

    from ssd_keras.cli import main as ssd_run

    base_run = args.base.parent.parent if args.base.is_file() else args.base
    base_ckpt = ["--checkpoint", str(args.base)] if args.base.is_file() else []
    data = out / "data" / ("digits_" + "".join(map(str, args.digits)))
    n_images = write_subset(data, args.digits)
    print(f"subset: digits {args.digits}, {n_images} images in {data}", flush=True)
    pipeline = ROOT / "pipelines" / "quickstart.toml"
    common = ["--set", "data.source=folder", "--set", f"data.path={data}",
              "--set", "data.small_images=upscale", "--set", f"run.output_dir={out / 'runs'}",
              "--set", f"train.steps={args.steps}", "--set", f"train.checkpoint_every={args.steps}",
              "--set", "train.sample_every=0", "--set", "sampler.num_images=1",
              "--set", "sampler.batch_size=1", "--no-progress"]  # final samples: one image
    evaluate = ["--num-samples", str(args.num_samples), "--cache-dir", str(out / "cache"),
                "--steps", str(args.sampling_steps), "--batch-size", "36", "--no-progress"]

    def fd_of(run_dir: Path, extra=()) -> dict:
        code = ssd_run(["evaluate", str(run_dir), *evaluate, *extra])
        if code:
            raise SystemExit(f"evaluate {run_dir} failed ({code})")
        found = sorted((run_dir / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
        m = json.loads(found[-1].read_text())["metrics"]["weights_free"]
        return {"fd_pix8": m["fd_pix8"], "nn_ratio": m["nearest_neighbour"]["ratio"]}

    def record(kind, seed, r, seconds):
        (out / "results").mkdir(parents=True, exist_ok=True)
        (out / "results" / f"{kind}_{seed}.json").write_text(json.dumps(
            {"run": kind, "seed": seed, **r, "train_seconds": seconds, "steps": args.steps,
             "sampling_steps": args.sampling_steps,
             "digits": args.digits, "num_samples": args.num_samples, "base": str(args.base)}))

    # the base on the subset: its samples are all ten digits, the reference the subset
    base_copy = out / "runs" / "base_on_subset"
    if not args.no_base:
        if not base_copy.exists():
            code = ssd_run(["export", str(base_run), *base_ckpt, "--format", "safetensors",
                            "--out", str(out / "base.safetensors")])
            assert code == 0
            base_toml = out / "base_subset.toml"
            from ssd_keras.config import load_pipeline

            cfg = load_pipeline(base_run / "config.toml").replace(
                data={"source": "folder", "path": str(data), "small_images": "upscale"})
            base_toml.write_text(cfg.to_toml())
            assert ssd_run(["import", str(out / "base.safetensors"), "--pipeline", str(base_toml),
                            "--name", "base_on_subset", "--runs-dir", str(out / "runs")]) == 0
        base = fd_of(base_copy)
        record("base", "-", base, 0.0)
        print(f"base: {base}", flush=True)
    for seed in args.seeds:
        for kind in args.kinds:
            name = f"{kind}_s{seed}"
            extra = ["--set", f"run.name={name}", "--set", f"run.seed={seed}"]
            if kind == "finetune":
                extra += ["--init-from", str(args.base.resolve())]
            t0 = time.perf_counter()
            assert ssd_run([str(pipeline), *common, *extra]) == 0
            seconds = time.perf_counter() - t0
            r = fd_of(out / "runs" / name)
            record(kind, seed, r, seconds)
            print(f"{name}: {r} (train {seconds:.0f} s)", flush=True)
    report(out)


def report(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results under {out / 'results'}")
    first = next((r for r in rows if r["run"] != "base"), rows[0])
    print(f"\n{first['steps']} steps on digits {first['digits']}, {first['num_samples']} "
          f"samples each (K = {first['sampling_steps']}), FD-pix8 vs the subset (lower is better), base {first['base']}")
    print(f"{'run':10s} {'seed':>4s} {'FD-pix8':>9s} {'NN ratio':>9s} {'train s':>8s}")
    order = {"base": 0, "finetune": 1, "scratch": 2}
    for r in sorted(rows, key=lambda r: (order[r["run"]], str(r["seed"]))):
        print(f"{r['run']:10s} {r['seed']!s:>4s} {r['fd_pix8']:9.4f} {r['nn_ratio']:9.3f} "
              f"{r['train_seconds']:8.0f}")
    for kind in ("finetune", "scratch"):
        fd = np.array([r["fd_pix8"] for r in rows if r["run"] == kind])
        nn = np.array([r["nn_ratio"] for r in rows if r["run"] == kind])
        if len(fd):
            sd = fd.std(ddof=1) if len(fd) > 1 else float("nan")
            print(f"{kind:10s} FD-pix8 {fd.mean():.4f} +- {sd:.4f} (mean +- sample std over "
                  f"{len(fd)} seeds; min {fd.min():.4f}, max {fd.max():.4f}); NN ratio "
                  f"{nn.mean():.3f}")

if __name__ == "__main__":
    main()
