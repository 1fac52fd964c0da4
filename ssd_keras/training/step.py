"""One optimisation step on one Flexi-UNet path, and its data-parallel variant.

One job: from a batch ``x0``, its timesteps ``t`` (all on one path ``(r_in, r_out)``) and
noise, compute the path's loss and gradients (``backend.Execution.loss_and_grads``), apply
them to the path's variables only (``backend.Execution.apply_gradients``) and update the EMA
(``update_ema``); a non-finite loss or gradient stops the run or skips the step
(``train.on_nonfinite``), a float16 overflow backs off the loss scale
(``training.loss_scale``). Data parallel, the ranks average their gradients first
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
from .loss_scale import APPLY, OVERFLOW


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN or infinite (``train.on_nonfinite = "stop"``)."""


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
    on first use by ``execution`` (``backend.Execution``: eager, traced or compiled) and
    kept."""

    def __init__(self, model, loss_fn, execution):
        self.model = model
        self.loss_fn = loss_fn
        self.execution = execution
        self._fns: dict = {}
        self._unions: dict = {}

    def __call__(self, key):
        """``(path model, fn(x, t[, y], target, weight) -> (loss, grads))`` of path ``key``."""
        if key not in self._fns:
            path = self.model.path(*key)
            self._fns[key] = (path, self.execution.loss_and_grads(path, self.loss_fn))
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
    (``y``: the batch's labels, class-conditional models only).

    The loss is scaled by the state's loss scale (``training.loss_scale``: 1 unless
    ``mixed_float16``) through the per-image weights; the gradients are unscaled and
    checked for inf/NaN in one pass, and that flag comes back to the host with the loss in
    one transfer. A non-finite loss or gradient never reaches the optimizer or the EMA.
    """

    def __init__(self, state, objective, gradients: PathGradients, cfg, jax_distribution=None):
        self.state = state
        self.objective = objective
        self.gradients = gradients
        self.execution = gradients.execution  # how the optimizer update runs here
        self.cfg = cfg
        self.jax_distribution = jax_distribution

    def __call__(self, x0, t, key, noise, y=None):
        path, loss_and_grads = self.gradients(key)
        inputs = self.inputs(x0, t, noise, y)
        loss, grads = loss_and_grads(*inputs)
        return self.finish(loss, grads, key, path, t)

    def inputs(self, x0, t, noise, y=None):
        """``(x_t, t[, y], target, weight)``: the path model's inputs, then the target and
        the per-image weight, for the loss-and-gradients function (``y``: the labels of a
        class-conditional model, some dropped to the null class); ``weight`` is multiplied
        by the loss scale (exact: the scale is a power of 2)."""
        from keras import ops

        x_t, target, weight = self.objective.training_example(ops.convert_to_tensor(x0), t, noise)
        weight = np.asarray(weight, np.float32) * np.float32(self.state.loss_scale.scale)
        inputs = (x_t, ops.convert_to_tensor(t.astype(np.float32)))
        if y is not None:  # class-conditional: labels, some dropped to the null class
            y = drop_labels(y, self.state.rng, self.cfg.train.cond_drop_prob,
                            self.state.model.null_label)
            inputs += (ops.convert_to_tensor(y, dtype="int32"),)
        inputs += (ops.convert_to_tensor(target, dtype="float32"), ops.convert_to_tensor(weight))
        if self.jax_distribution is not None:  # the batch split over the local devices
            inputs = distributed.shard_batch(self.jax_distribution, *inputs)
        return inputs

    def finish(self, loss, grads, key, path, t):
        """Unscale and check the gradients; apply them if the loss and they are finite,
        else back off the loss scale or take the non-finite policy."""
        scale = self.state.loss_scale.scale
        grads, found = backend.unscale_and_check(grads, 1.0 / scale)
        value, found = backend.to_host([loss, found])  # the step's one transfer
        value /= scale
        verdict = self.state.loss_scale.verdict(math.isfinite(value), not found)
        if verdict == APPLY:
            self.apply(grads, path.trainable_variables)
            return value, key, t
        where = (f"step {self.state.step + 1}, t = {t.min()}..{t.max()}, level {key[0]}px, "
                 f"path {key[0]}->{key[1]}")
        if verdict == OVERFLOW:
            self.skip()
            return value, key, t
        what = (f"loss is {value}" if not math.isfinite(value)
                else f"gradients are non-finite (inf or NaN; loss {value})")
        self.stop_or_skip(f"{what} at {where}")
        return value, key, t

    def apply(self, grads, variables) -> None:
        """The optimizer update on ``variables`` (no others), then the EMA."""
        state = self.state
        self.execution.apply_gradients(state.optimizer, grads, variables)
        state.step += 1
        state.ema = update_ema(state.ema, state.model.trainable_variables,
                               ema_rate(self.cfg.ema, state.step))

    def skip(self) -> None:
        """A step whose update is not applied (weights, optimizer state and EMA untouched):
        counted in ``skipped``."""
        self.state.skipped += 1
        self.state.step += 1

    def stop_or_skip(self, what: str) -> None:
        """A non-finite loss or gradient: raise (``train.on_nonfinite = "stop"``) or count
        the step as skipped, its update not applied."""
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{what}; stopped without applying it (the last good checkpoint is kept; "
                f"set train.on_nonfinite = \"skip\" to skip such steps)"
            )
        self.skip()


class DataParallelStep(Step):
    """``Step`` across the processes of ``dist``: the gradients are averaged over the
    ranks before they are applied; ``signals`` (``training.signals.StopSignals``) learns
    the stop all ranks agreed on."""

    def __init__(self, state, objective, gradients, cfg, dist, signals, jax_distribution=None):
        super().__init__(state, objective, gradients, cfg, jax_distribution)
        self.dist = dist
        self.signals = signals

    def __call__(self, x0, t, key, noise, y=None):
        """One data-parallel step (docs/distributed.md).

        Every rank first gathers the ranks' paths, so all agree on the union of their
        variables (in the model's order); a variable off this rank's path contributes
        zeros. The gradient all-reduce is started in buckets from gradient hooks while the
        backward pass runs (``dist.begin_step``); its last bucket also carries the loss,
        the non-finite flag of the loss and the stop requests, so every rank takes the
        same decision at the same step. The averaged gradients are unscaled and checked
        for inf/NaN on every rank: they are the same bits everywhere, so the verdict is
        too. The update is applied to the union only: a variable on no rank's path stays
        bit-identical, as in a one-process run; weights, EMA and optimizer state stay
        identical on all ranks.
        """
        keys = self.dist.gather_paths(key)
        union = self.gradients.union(keys)
        path, loss_and_grads = self.gradients(key)
        inputs = self.inputs(x0, t, noise, y)
        reduction = self.dist.begin_step(union, path.trainable_variables)
        try:
            loss, grads = loss_and_grads(*inputs)
        except BaseException:
            reduction.abandon()
            raise
        stop = self.signals.requested
        averaged, totals = reduction.finish(
            grads, loss, [float(stop == signal.SIGINT), float(stop == signal.SIGTERM)])
        scale = self.state.loss_scale.scale
        averaged, found = backend.unscale_and_check(averaged, 1.0 / scale)
        loss_sum, bad, sigints, sigterms, found = backend.to_host(list(totals) + [found])
        # every rank stops after the step in which any rank had a signal (a signal arriving
        # later on one rank is seen by all in the next step's all-reduce)
        if sigints or sigterms:
            self.signals.agreed = signal.SIGTERM if sigterms else signal.SIGINT
        n = self.dist.world_size
        value = loss_sum / n / scale
        verdict = self.state.loss_scale.verdict(not bad, not found)
        if verdict == APPLY:
            self.apply(averaged, union)
            return value, key, t
        if verdict == OVERFLOW:
            self.skip()
            return value, key, t
        mine = backend.to_host([loss])[0] / scale  # only on this rare path: a second read
        what = (f"non-finite loss on {int(bad)} of {n} processes" if bad else
                f"non-finite gradients (inf or NaN) after averaging over the {n} processes")
        where = (f"step {self.state.step + 1} (this process: rank {self.dist.rank}, loss "
                 f"{mine}, t = {t.min()}..{t.max()}, path {key[0]}->{key[1]})")
        self.stop_or_skip(f"{what} at {where}")
        return float("nan"), key, t
