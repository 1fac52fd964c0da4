"""Test helper: one rank of a data-parallel run, started by torchrun from tests/test_distributed.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/_dist_worker.py MODE PIPELINE OUT``

- ``state``: ``Trainer.fit(STEPS)`` with each rank drawing its own paths; every rank
  records the paths it drew and every write it attempted, and dumps its weights, EMA and
  optimizer state to ``OUT/rank{r}.npz``.
- ``same_path``: ``STEPS`` steps on fixed batches (``fixed_step``) where both ranks use the
  same path: rank r trains on its half of the batch; dumps as above, plus the loss and
  the gradients applied in the first step (``loss0``, ``g<index>``, see ``record_first_step``).
- ``nan_grad``: ``STEPS`` steps in which rank 1's gradients are NaN at step 2, its loss
  finite (``poisoned_loss_fn``, ``zero_weight_at``); every rank records a digest of its
  weights, EMA and optimizer state after each step, and the non-finite error if it stopped.
"""

import builtins
import json
import os
import sys

import numpy as np


def fixed_step(process, step: int, batch: int):
    """``(x0, t, noise)`` of step ``step`` for a global batch: one path for the batch."""
    rng = np.random.default_rng([123, step])
    x0 = rng.uniform(-1, 1, (batch, process.image_size, process.image_size, 3)).astype(np.float32)
    t = process.sample_training_timesteps(rng, batch)
    key = process.path_at(int(t[0]))
    assert all(process.path_at(int(v)) == key for v in t)
    noise = rng.standard_normal((batch, key[0], key[0], 3)).astype(np.float32)
    return x0, t, noise


def poisoned_loss_fn(original):
    """A loss function whose gradient is NaN, with the loss finite and unchanged, in the
    steps whose batch has an image of loss weight 0 (``zero_weight_at``). Data-dependent,
    so compiled gradient functions (jax, tensorflow) see it too: the added term
    ``sqrt(mean|p - p| + e) - sqrt(e)`` is exactly 0; its gradient is exactly 0 when
    ``e = min(weight) > 0``, and NaN (inf * 0) when ``e = 0``."""
    from keras import ops

    def loss_fn(self, prediction, target, weight):
        p = ops.cast(prediction, "float32")
        e = ops.min(weight)
        return (original(self, prediction, target, weight)
                + (ops.sqrt(ops.mean(ops.abs(p - p)) + e) - ops.sqrt(e)))

    return loss_fn


def zero_weight_at(trainer, steps):
    """The first image of the batch gets loss weight 0 at the given (1-based) steps."""
    objective = trainer.objective
    original = objective.training_example

    def training_example(x0, t, noise):
        x_t, target, weight = original(x0, t, noise)
        if trainer.step + 1 in steps:
            weight = np.array(weight, np.float32)
            weight[0] = 0.0
        return x_t, target, weight

    objective.training_example = training_example


def digest(trainer) -> str:
    """sha256 of the weights, the EMA and the optimizer state."""
    import hashlib

    from keras import ops

    h = hashlib.sha256()
    for v in list(trainer.model.variables) + list(trainer.optimizer.variables):
        h.update(ops.convert_to_numpy(v.value).tobytes())
    for e in trainer.ema:
        h.update(ops.convert_to_numpy(e).tobytes())
    return h.hexdigest()


def record_first_step(trainer) -> dict:
    """Record the gradients the trainer applies in its first step, keyed ``g<index>`` by the
    variable's index in ``model.trainable_variables`` (the ones off the path are absent).
    These are what data parallelism must get right: after an AdamW step, rounding-level
    gradient differences can grow to ``lr`` (tests/_tolerance.py)."""
    from keras import ops

    recorded = {}
    index = {id(v): i for i, v in enumerate(trainer.model.trainable_variables)}
    real_apply = trainer._step_fn.apply

    def recording_apply(grads, variables):
        if not recorded:
            for v, g in zip(variables, grads):
                recorded[f"g{index[id(v)]:04d}"] = ops.convert_to_numpy(g)
        return real_apply(grads, variables)

    trainer._step_fn.apply = recording_apply
    return recorded


def dump(trainer, path, extra=None):
    from keras import ops

    arrays = dict(extra or {})
    for i, v in enumerate(trainer.model.trainable_variables):
        arrays[f"w{i:04d}"] = ops.convert_to_numpy(v.value)
    for i, e in enumerate(trainer.ema):
        arrays[f"e{i:04d}"] = ops.convert_to_numpy(e)
    for i, v in enumerate(trainer.optimizer.variables):
        arrays[f"o{i:04d}"] = ops.convert_to_numpy(v.value)
    np.savez(path, **arrays)


def main(mode, pipeline, out, steps):
    from ssd_keras import checkpoint
    from ssd_keras.config import load_pipeline
    from ssd_keras.train import Trainer

    rank = int(os.environ["RANK"])
    writes = []
    if rank != 0:  # record every file this rank opens for writing
        real_open, real_atomic = builtins.open, checkpoint.atomic_write

        def spy_open(file, mode="r", *a, **k):
            if any(c in str(mode) for c in "wax+"):
                writes.append(str(file))
            return real_open(file, mode, *a, **k)

        def spy_atomic(path, write):
            writes.append(str(path))
            return real_atomic(path, write)

        builtins.open, checkpoint.atomic_write = spy_open, spy_atomic
    from ssd_keras import distributed

    early = []  # per step: the buckets launched during the backward pass (before finish)
    finish = distributed.BucketedReduction.finish

    def recording_finish(self, *a, **k):
        early.append(len(self.works))
        return finish(self, *a, **k)

    distributed.BucketedReduction.finish = recording_finish
    cfg = load_pipeline(pipeline)
    if mode == "nan_grad":
        Trainer._loss_fn = poisoned_loss_fn(Trainer._loss_fn)
    trainer = Trainer(cfg, progress=False)
    paths, digests, error = [], [], None
    first_step = {}
    try:
        if mode == "state":
            draw = trainer._draw

            def recording_draw(batch):
                t, key, noise = draw(batch)
                paths.append(list(key))
                return t, key, noise

            trainer._draw = recording_draw
            trainer.fit(steps)
        elif mode == "nan_grad":
            from ssd_keras.train import NonFiniteLossError

            if rank == 1:
                zero_weight_at(trainer, {2})
            try:
                for _ in range(steps):
                    trainer.train_step()
                    digests.append(digest(trainer))
            except NonFiniteLossError as exc:
                error = str(exc)
        else:
            b, n = cfg.train.batch_size, trainer.dist.world_size
            half = slice(rank * b // n, (rank + 1) * b // n)
            first_step = record_first_step(trainer)
            for s in range(steps):
                x0, t, noise = fixed_step(trainer.process, s, b)
                key = trainer.process.path_at(int(t[0]))
                trainer._draw = lambda batch, t=t, key=key, noise=noise: (t[half], key, noise[half])
                loss, _, _ = trainer.train_step(x0[half])
                if s == 0:
                    first_step["loss0"] = np.float64(loss)
        if rank != 0:
            builtins.open = real_open
        dump(trainer, os.path.join(out, f"rank{rank}.npz"), first_step)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"paths": paths, "writes": writes, "step": trainer.step,
                       "world_size": trainer.dist.world_size, "digests": digests,
                       "error": error, "skipped": trainer.skipped, "early": early}, f)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
