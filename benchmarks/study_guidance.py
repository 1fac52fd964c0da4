"""Classifier-free guidance on the class-conditional digits quickstart (docs/sampling.md).

For each guidance scale w and seed, draws ``--per-class`` samples of every digit from a
trained ``quickstart_classes`` run (EMA weights, the pipeline's sampler settings) and
measures

* **accuracy**: the share of samples that scikit-learn's logistic regression, trained on
  the digits as the model sees them (16x16 grey, the training preprocessing), assigns to
  the requested digit (its own accuracy on held-out digits is reported as the ceiling);
* **diversity**: the mean pairwise RMS distance (pixels in [-1, 1]) between samples of the
  same digit, averaged over digits, next to the same measure on the data.

It also times sampling at w = 1 (one network call per step), w = 2 with both predictions
in one call at double batch, and w = 2 with two calls, interleaved, and saves a figure:
one grid per w (rows: digits 0..9). Writes ``--json`` and ``--figure``.

    ssd-run pipelines/quickstart_classes.toml      # about 5 minutes on 2 cores
    python benchmarks/study_guidance.py --run runs/quickstart_classes \\
        --json docs/study/guidance_digits.json --figure docs/study/guidance_digits.png
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def grey(images: np.ndarray) -> np.ndarray:
    """(N, 16, 16, 3) in [-1, 1] -> (N, 256) grey features."""
    return np.asarray(images, np.float32).mean(axis=-1).reshape(len(images), -1)


def classifier(seed: int = 0):
    """Logistic regression on all digits at 16 px (preprocessed as for training), and its
    accuracy on a held-out fifth when trained on the rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from ssd_keras.data import make_dataset

    ds = make_dataset("digits", 16, 1797, labels=True, random_flip=False, num_workers=0, prefetch=0)
    x, y = next(ds)
    ds.close()
    features = grey(x)
    a, b, ya, yb = train_test_split(features, y, test_size=0.2, random_state=seed, stratify=y)
    held_out = LogisticRegression(max_iter=2000).fit(a, ya).score(b, yb)
    return LogisticRegression(max_iter=2000).fit(features, y), held_out, features, y


def diversity(features: np.ndarray, labels: np.ndarray, classes=range(10), limit: int = 64) -> float:
    """Mean pairwise RMS distance within each class, averaged over classes."""
    out = []
    for c in classes:
        f = features[labels == c][:limit]
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).mean(-1))
        out.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart_classes")
    parser.add_argument("--scales", default="0,1,2,4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=0, help="K (default: the run's sampler.steps)")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--timing-batch", type=int, default=0, help="default: sampler.batch_size")
    parser.add_argument("--json", default="docs/study/guidance_digits.json")
    parser.add_argument("--figure", default="docs/study/guidance_digits.png")
    args = parser.parse_args()

    from ssd_keras.images import grid, to_uint8
    from ssd_keras.runs import load_run, sampling_parts
    from ssd_keras.sample import sample_images

    cfg, groups, meta, path = load_run(args.run)
    model, process, objective = sampling_parts(cfg, groups, meta, path)
    s = cfg.sampler
    steps = args.steps or s.steps
    scales = [float(w) for w in args.scales.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    clf, held_out, data_features, data_labels = classifier()
    labels = np.repeat(np.arange(10, dtype=np.int32), args.per_class)
    common = dict(steps=steps, noise=s.noise, method=s.method, eta=s.eta, clip=s.clip,
                  batch_size=len(labels), progress=False)
    print(f"{path} (step {meta['step']}), K={steps}, {len(labels)} samples per (w, seed); "
          f"classifier held-out accuracy {held_out:.3f}", flush=True)

    rows, figure_grids = [], []
    for w in scales:
        accs, divs, seconds = [], [], []
        for seed in seeds:
            t0 = time.perf_counter()
            images = sample_images(model, process, objective, num_images=len(labels), seed=seed,
                                   labels=labels, guidance=w, **common).images
            seconds.append(time.perf_counter() - t0)
            f = grey(images)
            accs.append(float(np.mean(clf.predict(f) == labels)))
            divs.append(diversity(f, labels))
            if seed == seeds[0]:
                pick = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(10)])
                figure_grids.append((w, grid(to_uint8(images[pick]), columns=8)))
        row = {"guidance": w, "accuracy_per_seed": accs, "accuracy_mean": float(np.mean(accs)),
               "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "diversity_per_seed": divs, "diversity_mean": float(np.mean(divs)),
               "seconds_per_seed": seconds}
        rows.append(row)
        partial = {"run": str(path), "step": meta["step"], "steps": steps, "rows": rows,
                   "classifier_held_out_accuracy": held_out, "partial": True}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(partial, indent=2) + "\n")
        print(f"w={w:g}: accuracy {row['accuracy_mean']:.3f} +- {row['accuracy_std']:.3f} "
              f"(seeds {', '.join(f'{a:.3f}' for a in accs)}), diversity {row['diversity_mean']:.3f}, "
              f"{np.mean(seconds):.1f} s per {len(labels)} samples", flush=True)

    # the cost of guidance: one call per step (w = 1) vs. one call at double batch vs. two calls
    timing = {"w=1 (one call)": [], "w=2, one call at double batch": [], "w=2, two calls": []}
    variants = [("w=1 (one call)", 1.0, True), ("w=2, one call at double batch", 2.0, True),
                ("w=2, two calls", 2.0, False)]
    n = args.timing_batch or s.batch_size
    for repeat in range(args.timing_repeats + 1):  # the first round traces each shape: not timed
        for name, w, batched in variants:  # interleaved: the shared machine's load hits all alike
            t0 = time.perf_counter()
            sample_images(model, process, objective, num_images=n, seed=9, guidance=w,
                          guidance_batch=batched, labels=np.arange(n, dtype=np.int32) % 10,
                          **{**common, "batch_size": n})
            if repeat:
                timing[name].append(time.perf_counter() - t0)
    base = float(np.median(timing["w=1 (one call)"]))
    cost = {name: {"seconds": v, "median": float(np.median(v)),
                   "relative_to_w1": float(np.median(v)) / base} for name, v in timing.items()}
    for name, c in cost.items():
        print(f"{name}: {c['median']:.2f} s for {n} images, x{c['relative_to_w1']:.2f}", flush=True)

    data_div = diversity(data_features, data_labels)
    result = {"run": str(path), "step": meta["step"], "steps": steps, "sampler": s.method,
              "noise": s.noise, "samples_per_class": args.per_class, "seeds": seeds,
              "classifier": "sklearn LogisticRegression(max_iter=2000) on all 1797 digits, "
                            "16x16 grey (training preprocessing)",
              "classifier_held_out_accuracy": held_out, "data_diversity": data_div,
              "rows": rows, "cost_batch": n, "cost": cost,
              "torch_threads": __import__("torch").get_num_threads()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    save_figure(figure_grids, rows, args.figure)
    print(f"data diversity {data_div:.3f}; wrote {args.json}, {args.figure}")


def save_figure(grids, rows, path) -> None:
    from PIL import Image, ImageDraw

    scale, pad, head = 3, 12, 34
    tiles = [Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST)
             for _, g in grids]
    width = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    height = max(t.height for t in tiles) + head + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for (w, _), tile, row in zip(grids, tiles, rows):
        draw.text((x, 4), f"guidance w = {w:g}", fill="black")
        draw.text((x, 18), f"accuracy {row['accuracy_mean']:.0%}, diversity "
                           f"{row['diversity_mean']:.2f}", fill="black")
        canvas.paste(tile, (x, head))
        x += tile.width + pad
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    main()
