"""One training step per Flexi-UNet path under torch, jax and tensorflow, as ratios to torch.

Each backend runs in its own subprocess (Keras picks its backend once per process) and
times the step ``ssd_keras.train.Trainer`` runs: ``backend.make_loss_and_grads`` (forward
in training mode, the x0 MSE loss, backward) plus ``backend.apply_gradients`` (AdamW on
the path's variables), for every path of a pipeline's model. The first calls of a path
compile it on jax and tensorflow; that time is reported separately ("first call") and
the steady step is the median of ``--repeats`` calls after ``--warmup`` warm-up calls.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_backends.py                # quickstart
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_backends.py --pipeline pipelines/cifar10_3L.toml \\
        --set model.base_channels=32 --batch 16

Backends that are not installed are reported as such. The numbers depend on the machine
and on what else runs on it: the script prints the CPU count, the OpenMP wait policy and
the thread settings it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "jax", "tensorflow")


def child(args) -> dict:
    """Runs inside a subprocess with KERAS_BACKEND set: time every path, return a dict."""
    import keras
    import numpy as np
    from keras import ops

    from ssd_keras import backend
    from ssd_keras.builders import build_model, build_optimizer
    from ssd_keras.config import load_pipeline

    cfg = load_pipeline(args.pipeline, args.set)
    batch = args.batch or cfg.train.batch_size
    keras.utils.set_random_seed(0)
    model = build_model(cfg, channels=3)
    optimizer = build_optimizer(cfg)
    optimizer.build(model.trainable_variables)

    def loss_fn(prediction, target, weight):
        err = ops.mean(ops.square(ops.cast(prediction, "float32") - target), axis=(1, 2, 3))
        return ops.mean(err * weight)

    rng = np.random.default_rng(0)
    rows = []
    for r_in, r_out in model.path_keys:
        path = model.path(r_in, r_out)
        step = backend.make_loss_and_grads(path, loss_fn)
        x = ops.convert_to_tensor(rng.normal(size=(batch, r_in, r_in, 3)).astype("float32"))
        t = ops.convert_to_tensor(rng.integers(0, 1000, batch).astype("float32"))
        target = ops.convert_to_tensor(rng.normal(size=(batch, r_out, r_out, 3)).astype("float32"))
        weight = ops.convert_to_tensor(np.ones(batch, "float32"))

        def one():
            loss, grads = step(x, t, target, weight)
            float(ops.convert_to_numpy(loss))  # the trainer reads the loss every step
            backend.apply_gradients(optimizer, grads, path.trainable_variables)
            ops.convert_to_numpy(path.trainable_variables[-1].value)  # wait for the update

        start = time.perf_counter()
        one()
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            one()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            one()
            times.append(time.perf_counter() - start)
        rows.append({"path": [r_in, r_out], "first": first, "step": float(np.median(times)),
                     "min": float(np.min(times))})
    threads = ""
    if backend.BACKEND == "torch":
        import torch

        threads = f"torch threads {torch.get_num_threads()}"
    return {"backend": keras.backend.backend(), "batch": batch, "rows": rows, "threads": threads,
            "keras": keras.__version__}


def run_backend(name: str, argv: list[str]) -> dict:
    env = dict(os.environ, KERAS_BACKEND=name, TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"backend": name, "error": tail}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "quickstart.toml"))
    ap.add_argument("--set", action="append", default=[], help="config override a.b=c (repeatable)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: the pipeline's)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    forwarded = ["--pipeline", args.pipeline, "--batch", str(args.batch), "--warmup", str(args.warmup),
                 "--repeats", str(args.repeats)]
    for s in args.set:
        forwarded += ["--set", s]
    results = {}
    for name in args.backends.split(","):
        started = time.perf_counter()
        results[name] = run_backend(name, forwarded)
        results[name]["wall"] = time.perf_counter() - started
        print(f"# {name}: done in {results[name]['wall']:.0f} s", file=sys.stderr, flush=True)

    ok = {k: v for k, v in results.items() if "error" not in v}
    print(f"pipeline {args.pipeline} {' '.join('--set ' + s for s in args.set)}".rstrip())
    any_ok = next(iter(ok.values()), None)
    print(f"batch {any_ok['batch'] if any_ok else '?'}, median of {args.repeats} steps after "
          f"{args.warmup} warm-up; {os.cpu_count()} CPUs, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, keras {any_ok['keras'] if any_ok else '?'}"
          f"{', ' + ok['torch']['threads'] if 'torch' in ok else ''}")
    for name, res in results.items():
        if "error" in res:
            print(f"{name}: not run ({res['error']})")
    names = list(ok)
    header = ["path"] + [f"{n} ms" for n in names] + [f"{n}/torch" for n in names if n != "torch" and "torch" in ok]
    header += [f"{n} first call s" for n in names]
    lines = [header]
    paths = [tuple(r["path"]) for r in ok[names[0]]["rows"]] if names else []
    for i, key in enumerate(paths):
        row = [f"{key[0]}->{key[1]}"]
        row += [f"{ok[n]['rows'][i]['step'] * 1e3:.1f}" for n in names]
        if "torch" in ok:
            base = ok["torch"]["rows"][i]["step"]
            row += [f"{ok[n]['rows'][i]['step'] / base:.2f}x" for n in names if n != "torch"]
        row += [f"{ok[n]['rows'][i]['first']:.1f}" for n in names]
        lines.append(row)
    widths = [max(len(r[j]) for r in lines) for j in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in lines[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
