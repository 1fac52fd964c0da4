"""Evaluation time per 1000 images, split into sampling, Inception features and statistics.

What is timed (the stages of ``ssd-run evaluate``, docs/evaluation.md):

- **sampling**: ``evaluation.sample_to_folder`` on a model of the given pipeline (default:
  the quickstart's; untrained weights, which cost the same) with ``--steps`` respaced steps,
  PNG writing included; ``--num`` images, scaled to 1000.
- **features**: ``inception.folder_features`` (torch-fidelity's Inception at 299x299) on
  those PNGs; scaled to 1000. ``--inception-weights`` or a random-weights file of the same
  network (the cost is the same).
- **statistics** at N = 1000 samples and 1000 reference images (random 2048-d features; the
  cost depends on N and the dimension only): FID statistics (mean, covariance) and the
  Frechet distance, KID (100 subsets of 1000), precision/recall (k = 3). The Frechet
  distance's matrix square root is not linear in N: its cost is the same at 50k images.
  ``--compare-sqrtm`` also times scipy's ``sqrtm`` route that evaluate used before.

    KERAS_BACKEND=torch OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_evaluate.py --num 32 --steps 100
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "quickstart.toml"))
    ap.add_argument("--num", type=int, default=32, help="images sampled and featurized")
    ap.add_argument("--steps", type=int, default=100, help="respaced sampling steps K")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--inception-weights", default="", help="the real file (default: random weights)")
    ap.add_argument("--stats-n", type=int, default=1000, help="N for the statistics stage")
    ap.add_argument("--compare-sqrtm", action="store_true", help="also time scipy sqrtm at 2048-d")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import torch

    from ssd_keras import evaluation, inception
    from ssd_keras.builders import build_model, build_process
    from ssd_keras.config import from_dict, load_pipeline
    from ssd_keras.objectives import make_objective

    cfg = load_pipeline(args.pipeline)
    d = cfg.to_dict()
    d["sampler"].update(steps=args.steps, batch_size=args.batch_size)
    d["eval"].update(chunk_size=args.batch_size * max(1, 256 // args.batch_size))
    cfg = from_dict(d, source=args.pipeline)
    load = os.getloadavg()
    print(f"# bench_evaluate: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {load[0]:.2f} {load[1]:.2f}, keras {keras.__version__} ({keras.backend.backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"torch-fidelity {inception.library_version()}")
    print(f"# pipeline {Path(args.pipeline).name}: {cfg.process.image_size} px, {cfg.process.levels} levels, "
          f"K = {args.steps}, batch {args.batch_size}; {args.num} images, scaled to 1000")

    def parts():
        model = build_model(cfg, precision="float32")
        process = build_process(cfg)
        return model, process, make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timing = evaluation.sample_to_folder(parts, cfg, tmp / "eval", num_samples=args.num,
                                             identity={"bench": True}, progress=False, say=lambda m: None)
        rows.append(("sampling", timing["sampling_seconds"] / args.num * 1000))

        weights = args.inception_weights or inception.save_random_weights(tmp / "random.pth")
        extractor = inception.load_extractor(weights)
        inception.folder_features(tmp / "eval" / "images", extractor, progress=False)  # warm-up
        t0 = time.perf_counter()
        inception.folder_features(tmp / "eval" / "images", extractor, progress=False)
        rows.append((f"features ({'cuda' if next(extractor.parameters()).is_cuda else 'cpu'})",
                     (time.perf_counter() - t0) / args.num * 1000))

    rng = np.random.default_rng(0)
    n = args.stats_n
    fs = rng.gamma(2.0, 0.3, (n, 2048)).astype(np.float32)  # non-negative, like pool features
    fr = rng.gamma(2.0, 0.3, (n, 2048)).astype(np.float32)
    t0 = time.perf_counter()
    stats_s, stats_r = inception.fid_statistics(fs), inception.fid_statistics(fr)
    t_cov = time.perf_counter() - t0
    t0 = time.perf_counter()
    value = inception.fid(stats_s, stats_r)
    t_fd = time.perf_counter() - t0
    t0 = time.perf_counter()
    inception.kid(fs, fr, **inception.kid_settings(n, n, 0))
    t_kid = time.perf_counter() - t0
    t0 = time.perf_counter()
    inception.precision_recall(fs, fr)
    t_prc = time.perf_counter() - t0
    scale = 1000 / n
    rows += [(f"statistics: mean+covariance x2 (N={n})", t_cov * scale),
             ("statistics: Frechet distance (eigvals, fixed cost)", t_fd),
             (f"statistics: KID 100 subsets (N={n})", t_kid),
             (f"statistics: precision/recall k=3 (N={n}, O(N^2))", t_prc)]
    if args.compare_sqrtm:
        from scipy import linalg

        t0 = time.perf_counter()
        covmean = linalg.sqrtm(stats_s["sigma"] @ stats_r["sigma"])
        t_sqrtm = time.perf_counter() - t0
        d = stats_s["mu"].astype(np.float64) - stats_r["mu"]
        old = float(d @ d + np.trace(stats_s["sigma"]) + np.trace(stats_r["sigma"]) - 2 * np.trace(covmean.real))
        rows.append(("(before) Frechet distance via scipy sqrtm", t_sqrtm))
        print(f"# FID eigvals {value:.6f} vs sqrtm {old:.6f}")

    width = max(len(a) for a, _ in rows)
    print(f"{'stage':<{width}}  seconds per 1000 images")
    for a, b in rows:
        print(f"{a:<{width}}  {b:10.2f}")


if __name__ == "__main__":
    main()
