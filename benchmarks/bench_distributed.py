"""Data-parallel training throughput: images/s with 1 and 2 torchrun processes on this CPU,
and the communication share of a step (docs/distributed.md).

Each configuration is a real ``torchrun --standalone`` job (gloo on CPU) running
``Trainer.train_step`` on the pipeline's data at the same *global* batch, so 2 processes
each get half of it. 2 processes run twice: with ``train.allreduce_bucket_mb = 0`` (one
all-reduce after the backward pass) and with ``--bucket-mb`` (buckets all-reduced from
gradient hooks while the backward pass runs). Per step, rank 0 times the whole step and
the communication the step waits for: the all-gather of the paths and
``BucketedReduction.finish`` (the buckets not yet launched, waiting for all of them);
that includes waiting for the slower rank, which differs in path and hence in cost
(``--same-path`` puts both ranks on one path per step to take that out). After the
timed steps, the pure cost of one all-reduce of the whole model's gradients is measured
alone (a barrier first, so no rank waits for another).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py                # quickstart
    python benchmarks/bench_distributed.py --steps 40 --set train.batch_size=64 --same-path

Every process runs with ``--threads`` intra-op threads (default 1), so 2 processes use 2
cores where 1 process uses 1: on this 2-core machine the comparison is "same per-process
resources, twice the processes", as with one GPU per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import numpy as np

    from ssd_keras import distributed
    from ssd_keras.config import load_pipeline
    from ssd_keras.train import Trainer

    cfg = load_pipeline(args.pipeline, list(args.set) + [f"run.output_dir={args.out}",
                                                        "run.name=bench",
                                                        f"train.allreduce_bucket_mb={args.bucket}"])
    trainer = Trainer(cfg, resume=False, progress=False)
    dist = trainer.dist
    comm = [0.0]

    def timed(fn):
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                comm[0] += time.perf_counter() - start
        return call

    dist.gather_paths = timed(dist.gather_paths)
    distributed.BucketedReduction.finish = timed(distributed.BucketedReduction.finish)
    steps, comms = [], []
    try:
        for i in range(args.warmup + args.steps):
            comm[0] = 0.0
            x0 = next(trainer.data)
            t = None
            if args.same_path:  # the same timesteps (hence path) on every rank
                t = trainer.process.sample_training_timesteps(np.random.default_rng([7, i]),
                                                              x0.shape[0])
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(x0, t)
            if i >= args.warmup:
                steps.append(time.perf_counter() - start)
                comms.append(comm[0])
        pure = []
        if dist.world_size > 1:
            import torch

            size = sum(int(np.prod(v.shape)) for v in trainer.model.trainable_variables)
            buf = torch.ones(size + 4)
            for _ in range(args.steps):
                dist.barrier()
                start = time.perf_counter()
                torch.distributed.all_reduce(buf)
                pure.append(time.perf_counter() - start)
        if dist.is_main:
            params = sum(int(np.prod(v.shape)) for v in trainer.model.trainable_variables)
            print("RESULT " + json.dumps({
                "world_size": dist.world_size, "batch": cfg.train.batch_size,
                "step_s": float(np.median(steps)), "mean_step_s": float(np.mean(steps)),
                "comm_s": float(np.median(comms)), "mean_comm_s": float(np.mean(comms)),
                "pure_allreduce_s": float(np.median(pure)) if pure else 0.0,
                "params": params,
            }), flush=True)
    finally:
        trainer.close()


def launch(args, nproc: int, bucket: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", __file__, "--worker", "--out", out,
               "--pipeline", str(args.pipeline), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--bucket", str(bucket)]
        if args.same_path:
            cmd.append("--same-path")
        for s in args.set:
            cmd += ["--set", s]
        env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(ROOT))
        env.pop("WORLD_SIZE", None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"torchrun with {nproc} processes failed:\n{proc.stderr[-3000:]}")
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "quickstart.toml")
    p.add_argument("--set", action="append", default=[], help="section.key=value override")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--rounds", type=int, default=2, help="1- and 2-process jobs, interleaved")
    p.add_argument("--bucket-mb", type=float, default=1.0,
                   help="train.allreduce_bucket_mb of the overlapped run (the other: 0)")
    p.add_argument("--same-path", action="store_true",
                   help="every rank trains the same path in each step (no load imbalance)")
    p.add_argument("--bucket", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"CPUs: {os.cpu_count()}, load average: {os.getloadavg()}, threads per process: "
          f"{args.threads}, pipeline: {args.pipeline.name} {' '.join(args.set)}")
    configs = [(1, 0.0), (2, 0.0), (2, args.bucket_mb)]
    results = {c: [] for c in configs}
    for _ in range(args.rounds):  # interleaved: the machine's load changes over time
        for c in configs:
            results[c].append(launch(args, *c))
    base = None
    print(f"{'processes':>9} {'bucket MB':>9} {'batch':>5} {'step ms':>8} {'images/s':>9} "
          f"{'speed-up':>8} {'comm waited':>11} {'share':>6} {'pure all-reduce':>15}")
    for n, bucket in configs:
        r = min(results[n, bucket], key=lambda x: x["step_s"])  # the least disturbed round
        rate = r["batch"] / r["step_s"]
        base = base or rate
        label = "-" if n == 1 else ("0 (after)" if not bucket else f"{bucket:g}")
        print(f"{n:>9} {label:>9} {r['batch']:>5} {1000 * r['step_s']:>8.1f} {rate:>9.1f} "
              f"{rate / base:>8.2f} {1000 * r['comm_s']:>9.1f}ms {r['comm_s'] / r['step_s']:>6.1%} "
              f"{1000 * r['pure_allreduce_s']:>12.2f} ms")
    r = min(results[2, 0.0], key=lambda x: x["step_s"])
    print(f"model: {r['params'] / 1e6:.2f} M parameters = {4 * r['params'] / 1e6:.1f} MB of float32 "
          f"gradients per all-reduce (at most); 'comm waited' includes waiting for the slower "
          f"rank{' (both on one path per step)' if args.same_path else ''}")
    print("JSON " + json.dumps({f"{n}x{b:g}": v for (n, b), v in results.items()}))


if __name__ == "__main__":
    main()
