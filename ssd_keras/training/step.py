"""One optimisation step on one Flexi-UNet path, and its data-parallel variant.

One job: from a batch ``x0``, its timesteps ``t`` (all on one path ``(r_in, r_out)``) and
noise, compute the path's loss and gradients (``backend.make_loss_and_grads``), apply
them to the path's variables only (``backend.apply_gradients``) and update the EMA
(``update_ema``); a non-finite loss stops the run or skips the step
(``train.on_nonfinite``). Data parallel, the ranks average their gradients first
(``DataParallelStep``, docs/distributed.md).

Class-conditional models: the step also takes the batch's labels; ``drop_labels``
replaces each by the null class with probability ``train.cond_drop_prob`` (classifier-free
guidance's label dropout, from the trainer's RNG) and the path gets them as its third
input. Unconditional models take exactly the inputs they always took.

Every framework call goes through ``ssd_keras.backend``.
"""

from __future__ import annotations

import math
import signal

import numpy as np

from .. import backend, distributed
from ..runs import CHANNELS


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (``train.on_nonfinite = "stop"``)."""


# ---------------------------------------------------------------------- the step's inputs
def draw(process, rng: np.random.Generator, batch: int):
    """``(t, path key, noise)`` of one step: the path follows ``t[0]`` (one per batch)."""
    t = process.sample_training_timesteps(rng, batch)
    return with_timesteps(process, rng, t, batch, check=False)


def with_timesteps(process, rng: np.random.Generator, t, batch: int, check: bool = True):
    """``(t, path key, noise)`` of a step on the given timesteps ``t``: the noise is drawn
    from ``rng`` as for drawn timesteps. ``t`` must be ``batch`` integer timesteps of
    the process, all on one path (``ValueError`` otherwise)."""
    if check:
        t = _checked_timesteps(process, t, batch)
    key = process.path_at(int(t[0]))
    noise = rng.standard_normal((batch, key[0], key[0], CHANNELS)).astype(np.float32)
    return t, key, noise


def _checked_timesteps(process, t, batch: int) -> np.ndarray:
    t = np.asarray(t)
    if t.shape != (batch,) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"t: expected {batch} integer timesteps (one per image of the batch), "
                         f"got an array of shape {t.shape} and dtype {t.dtype}")
    if t.min() < 0 or t.max() >= process.timesteps:
        raise ValueError(f"t: timesteps must be in [0, {process.timesteps - 1}], got "
                         f"{t.min()}..{t.max()}")
    paths = sorted({process.path_at(int(v)) for v in np.unique(t)})
    if len(paths) > 1:
        raise ValueError(f"t: a step trains one path, but these timesteps are on the paths "
                         f"{', '.join(f'{a}->{b}' for a, b in paths)}")
    return t.astype(np.int64, copy=False)


def drop_labels(y, rng: np.random.Generator, prob: float, null_label) -> np.ndarray:
    """The labels ``y`` with each replaced by ``null_label`` with probability ``prob``
    (one uniform draw per image from ``rng``; none when ``prob`` is 0), as int32."""
    y = np.asarray(y).astype(np.int32)
    if prob <= 0:
        return y
    drop = rng.random(y.shape[0]) < prob
    return np.where(drop, np.int32(null_label), y)


# ---------------------------------------------------------------------- loss, EMA
def weighted_mse(prediction, target, weight):
    """The training loss: the per-image mean squared error, weighted, averaged over the batch."""
    from keras import ops

    err = ops.mean(ops.square(ops.cast(prediction, "float32") - target), axis=(1, 2, 3))
    return ops.mean(err * weight)


def update_ema(ema, variables, rate: float) -> list:
    """The new EMA tensors: ``ema * rate + weights * (1 - rate)``, one per variable
    (``backend.ema_update``: in place, one multi-tensor op, on torch)."""
    return backend.ema_update(ema, variables, rate)


def ema_rate(ema_cfg, step: int) -> float:
    """The EMA rate after step ``step``: 0 (a plain copy) until ``ema.start_step``."""
    return ema_cfg.rate if step > ema_cfg.start_step else 0.0


# ---------------------------------------------------------------------- per-path functions
class PathGradients:
    """Per path ``(r_in, r_out)``: its sub-model and its loss-and-gradients function, built
    on first use (jax and tensorflow compile there) and kept."""

    def __init__(self, model, loss_fn, graph: str = "eager"):
        self.model = model
        self.loss_fn = loss_fn
        self.graph = graph  # torch: "trace" replays a traced forward (backend.make_loss_and_grads)
        self._fns: dict = {}
        self._unions: dict = {}

    def __call__(self, key):
        """``(path model, fn(x, t, target, weight[, y]) -> (loss, grads))`` of path ``key``."""
        if key not in self._fns:
            path = self.model.path(*key)
            self._fns[key] = (path, backend.make_loss_and_grads(path, self.loss_fn, self.graph))
        return self._fns[key]

    def union(self, keys):
        """The trainable variables of the paths ``keys``, in the model's order (cached)."""
        k = frozenset(keys)
        if k not in self._unions:
            ids = {id(v) for key in k for v in self(key)[0].trainable_variables}
            self._unions[k] = [v for v in self.model.trainable_variables if id(v) in ids]
        return self._unions[k]


# ---------------------------------------------------------------------- the step
class Step:
    """One optimisation step of one process on the training state ``state``
    (``training.state.TrainState``): ``step(x0, t, key, noise[, y]) -> (loss, key, t)``
    (``y``: the batch's labels, class-conditional models only)."""

    def __init__(self, state, objective, gradients: PathGradients, cfg, jax_distribution=None):
        self.state = state
        self.objective = objective
        self.gradients = gradients
        self.cfg = cfg
        self.jax_distribution = jax_distribution

    def __call__(self, x0, t, key, noise, y=None):
        from keras import ops

        x_t, target, weight = self.objective.training_example(ops.convert_to_tensor(x0), t, noise)
        path, loss_and_grads = self.gradients(key)
        inputs = (
            x_t,
            ops.convert_to_tensor(t.astype(np.float32)),
            ops.convert_to_tensor(target, dtype="float32"),
            ops.convert_to_tensor(np.asarray(weight, np.float32)),
        )
        if y is not None:  # class-conditional: labels, some dropped to the null class
            y = drop_labels(y, self.state.rng, self.cfg.train.cond_drop_prob,
                            self.state.model.null_label)
            inputs += (ops.convert_to_tensor(y, dtype="int32"),)
        if self.jax_distribution is not None:  # the batch split over the local devices
            inputs = distributed.shard_batch(self.jax_distribution, *inputs)
        loss, grads = loss_and_grads(*inputs)
        return self.finish(loss, grads, key, path, t)

    def finish(self, loss, grads, key, path, t):
        """Apply the gradients of a finite loss, or take the non-finite policy."""
        from keras import ops

        value = float(ops.convert_to_numpy(loss))
        if not math.isfinite(value):
            where = (f"step {self.state.step + 1}, t = {t.min()}..{t.max()}, level {key[0]}px, "
                     f"path {key[0]}->{key[1]}")
            self.stop_or_skip(f"loss is {value} at {where}")
            return value, key, t
        self.apply(grads, path.trainable_variables)
        return value, key, t

    def apply(self, grads, variables) -> None:
        """The optimizer update on ``variables`` (no others), then the EMA."""
        state = self.state
        backend.apply_gradients(state.optimizer, grads, variables)
        state.step += 1
        state.ema = update_ema(state.ema, state.model.trainable_variables,
                               ema_rate(self.cfg.ema, state.step))

    def stop_or_skip(self, what: str) -> None:
        """A non-finite loss: raise (``train.on_nonfinite = "stop"``) or count the step as
        skipped, its update not applied."""
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{what}; stopped without applying it (the last good checkpoint is kept; "
                f"set train.on_nonfinite = \"skip\" to skip such steps)"
            )
        self.state.skipped += 1
        self.state.step += 1


class DataParallelStep(Step):
    """``Step`` across the processes of ``dist``: the gradients are averaged over the
    ranks before they are applied; ``signals`` (``training.signals.StopSignals``) learns
    the stop all ranks agreed on."""

    def __init__(self, state, objective, gradients, cfg, dist, signals, jax_distribution=None):
        super().__init__(state, objective, gradients, cfg, jax_distribution)
        self.dist = dist
        self.signals = signals

    def finish(self, loss, grads, key, path, t):
        """Average the gradients over the ranks and apply them (docs/distributed.md).

        Every rank gathers the ranks' paths, so all agree on the union of their variables
        (in the model's order); a variable off this rank's path contributes zeros. One
        all-reduce carries the gradients, the loss, the non-finite flags and the stop
        requests, so every rank takes the same decision at the same step. The update is
        applied to the union only: a variable on no rank's path stays bit-identical, as in
        a one-process run; weights, EMA and optimizer state stay identical on all ranks.
        """
        from keras import ops

        keys = self.dist.gather_paths(key)
        union = self.gradients.union(keys)
        mine = {id(v): g for v, g in zip(path.trainable_variables, grads)}
        value = float(ops.convert_to_numpy(loss))
        local_bad = not math.isfinite(value)
        stop = self.signals.requested
        extras = [0.0 if local_bad else value, float(local_bad),
                  float(stop == signal.SIGINT), float(stop == signal.SIGTERM)]
        averaged, (loss_sum, bad, sigints, sigterms) = self.dist.reduce_step(
            union, [mine.get(id(v)) for v in union], extras)
        # every rank stops after the step in which any rank had a signal (a signal arriving
        # later on one rank is seen by all in the next step's all-reduce)
        if sigints or sigterms:
            self.signals.agreed = signal.SIGTERM if sigterms else signal.SIGINT
        n = self.dist.world_size
        if bad:
            where = (f"step {self.state.step + 1}, on {int(bad)} of {n} processes (this one: "
                     f"rank {self.dist.rank}, loss {value}, t = {t.min()}..{t.max()}, path "
                     f"{key[0]}->{key[1]})")
            self.stop_or_skip(f"non-finite loss at {where}")
            return float("nan"), key, t
        self.apply(averaged, union)
        return loss_sum / n, key, t
