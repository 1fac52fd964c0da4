"""ssd_keras against the official SSD code on the same work, in one process, interleaved.

    python benchmarks/bench_vs_official.py --official /path/to/ScaleSpaceDiffusion
    python benchmarks/bench_vs_official.py            # against a plain-torch eager twin

The work (issue 13): a 32 px, 3-level SSD (levels 8/16/32, ConvexDecay-0.5, T = 1000)
with a base-32 UNet (channel_mult 1,2,2, 1 res block, attention at 16 px, 4 heads),
training batches of 32 and sampling 8 images.

- **Training**: one optimisation step per Flexi-UNet path (forward, Min-SNR-5 x0 loss,
  backward, AdamW, EMA): ssd_keras's ``Trainer.train_step`` against the official
  ``training_losses`` + ``torch.optim.AdamW`` + ``update_ema`` on the same timesteps
  (no gradient clipping on either side). Per-path medians over ``--rounds`` interleaved
  rounds, then the expected step of a run: the paths weighted by their share of batches
  under the paper's timestep sampler (``inspection.path_probabilities``).
- **Sampling**: end to end, 8 images with K = 100 and K = 1000 respaced steps:
  ``sample_images`` against the official ``p_sample_loop`` (which draws the
  resolution-change noise with batched Lanczos). ssd_keras runs once with
  ``noise="lanczos"`` (the official method) and once with its default ``"exact"``.

Both networks hold the same weights (copied through ``ssd_keras.official``, the mapping of
``ssd-run import``), and the script checks that they compute the same outputs first.
Without ``--official`` the comparison is a plain-torch eager twin of the same network
(``benchmarks/_torch_twin.py``, sharing ssd_keras's very weight tensors), so the cost of
Keras on top of torch stays visible to every contributor.

Threads: ``--threads`` (default 2) torch threads with ``OMP_WAIT_POLICY=PASSIVE``, as the
`ssd-run` sets it. The official checkout is only read from ``--official``; keep it outside
the repository (docs/design.md, "Speed").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ssd-run sets it

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

PIPELINE = {
    "data": {"source": "digits", "random_flip": False},
    "process": {"image_size": 32, "levels": 3},
    "model": {"base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
              "attention_resolutions": [16], "num_heads": 4, "dropout": 0.0},
    "optimizer": {"lr": 1e-4, "grad_clip": 0.0},
    "ema": {"rate": 0.9999},
    "train": {"batch_size": 32, "steps": 10**8, "log_every": 10**8,
              "checkpoint_every": 10**8, "sample_every": 0},
}


def median_ms(times) -> float:
    return 1e3 * statistics.median(times)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def path_timesteps(process, key, batch: int, rng) -> np.ndarray:
    """A batch of timesteps on path ``key``, as the training sampler draws them."""
    for t in process.change_steps:
        if process.path_at(t) == key:
            return np.full(batch, t, dtype=np.int64)
    pool = [t for t in range(process.timesteps)
            if process.path_at(t) == key and t not in set(process.change_steps)]
    return rng.choice(pool, size=batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, default=None,
                    help="checkout of github prateksha/ScaleSpaceDiffusion (else: plain-torch twin)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of training steps")
    ap.add_argument("--sample-steps", default="100,1000", help="K values for end-to-end sampling")
    ap.add_argument("--sample-rounds", type=int, default=3,
                    help="interleaved sampling rounds per K (medians; one round swings by 20%% on a shared CPU)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("train", "sample"), default=None)
    ap.add_argument("--graph", choices=("auto", "eager", "trace", "compile"), default="auto",
                    help="ssd_keras's train.graph and sampler.graph (docs/design.md "
                         "\"Execution layer\")")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    import keras
    import torch

    if keras.backend.backend() != "torch":
        raise SystemExit("bench_vs_official.py compares torch code: use KERAS_BACKEND=torch")
    torch.set_num_threads(args.threads)

    from ssd_keras.config import from_dict
    from ssd_keras.inspection import path_probabilities
    from ssd_keras.sample import sample_images
    from ssd_keras.train import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_vs_official_")
    pipeline = {**PIPELINE, "train": {**PIPELINE["train"], "graph": args.graph},
                "sampler": {"graph": args.graph}}
    cfg = from_dict({**pipeline, "run": {"name": "bench", "output_dir": tmp, "seed": 0}})
    trainer = Trainer(cfg, progress=False)
    process = trainer.process
    if args.official is not None:
        import _official

        reference_name = "official"
        reference = _official.OfficialTwin(_official.load(args.official), cfg, trainer.model)
    else:
        import _torch_twin

        reference_name = "torch twin"
        reference = _torch_twin.TorchTwin(cfg, trainer.model, process)
    check_same_function(trainer.model, reference)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {trainer.execution}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; reference: {reference_name}")
    rows, record = [], {"reference": reference_name, "threads": args.threads}
    if args.only in (None, "train"):
        rows += bench_training(trainer, reference, process, args, record, path_probabilities)
    if args.only in (None, "sample"):
        rows += bench_sampling(trainer, reference, process, args, record, sample_images)
    trainer.close()

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'work':<{width}} | {reference_name:>10} | {'ssd_keras':>10} | {reference_name} / ours |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 12}|{'-' * (len(reference_name) + 9)}|")
    for name, ref_s, ours_s in rows:
        print(f"| {name:<{width}} | {fmt(ref_s):>10} | {fmt(ours_s):>10} | {ref_s / ours_s:.2f}x |")
    if "sample" in record:
        print(f"(ssd_keras's first sampling call in a process also traces each path once: "
              f"+{record['sample']['first_call_extra_s']:.2f} s, not in the rows above)")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


def fmt(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def check_same_function(model, reference) -> None:
    """Both networks give the same output on every path (else the timings mean nothing)."""
    import keras

    rng = np.random.default_rng(0)
    for key in model.path_keys:
        x = rng.standard_normal((2, key[0], key[0], 3)).astype("float32")
        t = np.array([3.0, 700.0], "float32")
        ours = keras.ops.convert_to_numpy(model.path(*key)([x, t], training=False))
        theirs = reference.path_output(x, t, key)
        err = float(np.abs(ours - theirs).max())
        if not err < 1e-4:
            raise SystemExit(f"error: path {key}: the two networks differ by {err}")


def bench_training(trainer, reference, process, args, record, path_probabilities):
    import torch

    rng = np.random.default_rng(1)
    batch = trainer.cfg.train.batch_size
    x0 = next(trainer.data)
    x0_nchw = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2)))
    probs = path_probabilities(process)
    keys = sorted(probs, key=lambda k: (-k[1], -k[0]))
    ts = {key: path_timesteps(process, key, batch, rng) for key in keys}
    ours = {key: [] for key in keys}
    theirs = {key: [] for key in keys}
    for key in keys:  # warm-up
        for _ in range(2):
            train_step_at(trainer, x0, ts[key])
            reference.train_step(x0_nchw, ts[key])
    for r in range(args.rounds):
        for key in keys:
            first_ours = (r + keys.index(key)) % 2 == 0  # alternate who goes first
            for which in ((0, 1) if first_ours else (1, 0)):
                if which == 0:
                    ours[key].append(timed(lambda: train_step_at(trainer, x0, ts[key])))
                else:
                    theirs[key].append(timed(lambda: reference.train_step(x0_nchw, ts[key])))
        print(f"training round {r + 1}/{args.rounds}", file=sys.stderr)
    rows, record["train"] = [], {}
    for key in keys:
        a, b = median_ms(theirs[key]) / 1e3, median_ms(ours[key]) / 1e3
        record["train"][f"{key[0]}->{key[1]}"] = {"reference_s": a, "ours_s": b, "share": probs[key]}
        rows.append((f"training step, path {key[0]}->{key[1]} px (share {probs[key]:.3f})", a, b))
    exp_ref = sum(probs[k] * median_ms(theirs[k]) for k in keys) / 1e3
    exp_ours = sum(probs[k] * median_ms(ours[k]) for k in keys) / 1e3
    record["train"]["expected"] = {"reference_s": exp_ref, "ours_s": exp_ours}
    rows.append(("expected training step (paths weighted by their share)", exp_ref, exp_ours))
    return rows


def train_step_at(trainer, x0, t):
    """``Trainer.train_step`` on the timesteps ``t`` (their path) instead of drawn ones."""
    return trainer.train_step(x0, t=t)


def bench_sampling(trainer, reference, process, args, record, sample_images):
    model = trainer.ema_model()
    reference.copy_weights_from(model)
    rows, record["sample"] = [], {}
    # warm-up: every path once on both sides; for ssd_keras this is where each path is
    # traced (torch.jit.trace, once per path and batch shape), reported on its own line
    warm = min(10, process.timesteps)
    first = timed(lambda: sample_images(model, process, trainer.objective, num_images=args.images,
                                        steps=warm, batch_size=args.images, progress=False,
                                        execution=trainer.execution))
    again = timed(lambda: sample_images(model, process, trainer.objective, num_images=args.images,
                                        steps=warm, batch_size=args.images, progress=False,
                                        execution=trainer.execution))
    reference.sample(args.images, warm)
    record["sample"]["first_call_extra_s"] = first - again
    print(f"one-time cost of ssd_keras's first sampling call (tracing {len(process.paths)} "
          f"paths): {first - again:.2f} s", file=sys.stderr)
    for k in (int(v) for v in args.sample_steps.split(",")):
        runs = {"reference": [], "lanczos": [], "exact": []}
        for r in range(args.sample_rounds):
            order = ["reference", "lanczos", "exact"] if r % 2 == 0 else ["exact", "lanczos", "reference"]
            for which in order:
                if which == "reference":
                    runs[which].append(timed(lambda: reference.sample(args.images, k, seed=r)))
                else:
                    runs[which].append(timed(lambda: sample_images(
                        model, process, trainer.objective, num_images=args.images, steps=k,
                        batch_size=args.images, noise=which, seed=r, progress=False,
                        execution=trainer.execution)))
            print(f"sampling K={k} round {r + 1}/{args.sample_rounds}: "
                  + ", ".join(f"{w} {runs[w][-1]:.2f} s" for w in order), file=sys.stderr)
        ref_s = statistics.median(runs["reference"])
        lan_s = statistics.median(runs["lanczos"])
        exa_s = statistics.median(runs["exact"])
        record["sample"][str(k)] = {"reference_s": ref_s, "ours_lanczos_s": lan_s, "ours_exact_s": exa_s}
        rows.append((f"sampling {args.images} images, {k} steps (ours: lanczos, as the official)", ref_s, lan_s))
        rows.append((f"sampling {args.images} images, {k} steps (ours: exact, the default)", ref_s, exa_s))
    return rows


if __name__ == "__main__":
    main()
