"""The cost of checking a step's gradients for inf/NaN (train.on_nonfinite, the float16
loss scale): ``backend.unscale_and_check`` over one step's gradients, plus the
one ``to_host`` transfer of the loss and the flag, against a whole training step.

Per path of the pipeline's model: the gradients of one real step (``Trainer``'s own
functions), then ``--reps`` timed checks and ``--steps`` timed training steps on that
path, interleaved in rounds (the machine's load changes over time); medians.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_nonfinite_check.py
    python benchmarks/bench_nonfinite_check.py --set train.batch_size=32 --steps 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "quickstart.toml")
    p.add_argument("--set", action="append", default=[], help="section.key=value override")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per path and round")
    p.add_argument("--reps", type=int, default=50, help="timed checks per path and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import keras

    from ssd_keras import backend
    from ssd_keras.config import load_pipeline
    from ssd_keras.distributed import Single
    from ssd_keras.train import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_pipeline(args.pipeline, list(args.set) + [f"run.output_dir={out}"])
        trainer = Trainer(cfg, resume=False, progress=False, dist=Single())
        try:
            print(f"backend {keras.backend.backend()}, CPUs {os.cpu_count()}, load average "
                  f"{os.getloadavg()}, pipeline {args.pipeline.name} {' '.join(args.set)}, "
                  f"batch {cfg.train.batch_size}")
            step = trainer._step_fn
            x0 = next(trainer.data)
            keys = sorted(trainer.model.path_keys)
            results = {k: {"check": [], "step": [], "read": []} for k in keys}
            t_of = {}
            for key in keys:  # a batch of timesteps on each path
                t_all = np.arange(trainer.process.timesteps)
                on = [t for t in t_all if trainer.process.path_at(int(t)) == key]
                t_of[key] = np.resize(np.array(on, np.int64), x0.shape[0])
            for _ in range(args.rounds):
                for key in keys:
                    t, key, noise = step_inputs(trainer, t_of[key], x0.shape[0])
                    path, fn = step.gradients(key)
                    loss, grads = fn(*step.inputs(x0, t, noise))
                    for _ in range(args.reps):
                        start = time.perf_counter()
                        grads, found = backend.unscale_and_check(grads, 1.0)
                        backend.to_host([loss, found])
                        results[key]["check"].append(time.perf_counter() - start)
                        start = time.perf_counter()  # what a step read before: the loss
                        float(keras.ops.convert_to_numpy(loss))
                        results[key]["read"].append(time.perf_counter() - start)
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        trainer.train_step(x0, t_of[key])
                        results[key]["step"].append(time.perf_counter() - start)
            params = {k: sum(int(np.prod(v.shape)) for v in trainer.model.path(*k).trainable_variables)
                      for k in keys}
        finally:
            trainer.close()
    print("check: unscale_and_check + one to_host of [loss, flag]; read: float(loss) alone "
          "(the step's only host read before the check)")
    print(f"{'path':>9} {'params':>9} {'step ms':>9} {'check ms':>9} {'read ms':>8} "
          f"{'extra/step':>10}")
    for key in keys:
        s, c, r = (np.median(results[key][x]) for x in ("step", "check", "read"))
        print(f"{key[0]:>4}->{key[1]:<4} {params[key]:>9} {1000 * s:>9.2f} {1000 * c:>9.3f} "
              f"{1000 * r:>8.3f} {(c - r) / s:>10.2%}")


def step_inputs(trainer, t, batch):
    from ssd_keras.training.step import with_timesteps

    return with_timesteps(trainer.process, trainer.rng, t, batch)


if __name__ == "__main__":
    main()
