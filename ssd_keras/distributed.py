"""Data-parallel training across processes: the small interface ``ssd_keras.train`` uses.

One process per device, started by ``torchrun`` (docs/distributed.md). The collectives are
``torch.distributed``'s (NCCL on GPUs, gloo on CPUs); nothing here is home-made beyond
packing a step's gradients into one flat buffer. This module and ``ssd_keras.backend``
are the only ones that import a backend:

- ``context(cfg)``: the process's ``Context`` -- ``Single`` (one process: every method is
  the identity, nothing is imported) unless torchrun's ``WORLD_SIZE`` is above 1, then
  ``TorchContext`` (the process group is created once, from torchrun's environment, with
  a timeout so that a crashed or stuck rank makes the others fail within bounded time).
- ``Context.gather_paths(key)``: every rank's Flexi-UNet path of this step.
- ``Context.reduce_step(variables, grads, extras)``: sum ``extras`` (loss, stop and
  non-finite flags) and average the gradients of ``variables`` over the ranks in one
  all-reduce; a variable with no gradient on a rank counts as zeros there.
- ``Context.gather_object`` / ``barrier`` / ``close``.

Every collective failure becomes a ``DistributedError`` naming the rank, the cause and
the ranks that did not answer: a rank whose collective fails reports so through the
process group's key-value store and waits a short grace period for the others' reports;
a rank that sends none (stopped, hung in a file system, dead) is named. The collectives
time out after ``SSD_DIST_TIMEOUT`` minus that grace, so the error comes within
``SSD_DIST_TIMEOUT`` (docs/distributed.md, "A crashed or stuck rank").

jax runs data parallelism within one process instead: ``jax_data_parallel`` sets a
``keras.distribution.DataParallel`` over the local devices, and ``shard_batch`` lays a
batch out over them (XLA then all-reduces the gradients inside the compiled step).
"""

from __future__ import annotations

import datetime
import os
import time

import numpy as np

TIMEOUT_ENV = "SSD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_FAILED_KEY = "ssd_keras/collective_failed/"


def grace_s(timeout_s: float) -> float:
    """How long a rank whose collective failed waits for the others' reports: a fifth of
    ``SSD_DIST_TIMEOUT``, at most 10 s (the collectives get the rest)."""
    return min(10.0, 0.2 * timeout_s)


class DistributedError(RuntimeError):
    """A collective failed: another process crashed, was killed, or did not answer."""


class Single:
    """One process: the collectives are the identity."""

    rank = 0
    world_size = 1
    local_rank = 0
    is_main = True

    def gather_paths(self, key):
        return [tuple(key)]

    def reduce_step(self, variables, grads, extras):
        return list(grads), [float(e) for e in extras]

    def gather_object(self, obj):
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchContext:
    """``torch.distributed`` collectives of a torchrun-launched process."""

    def __init__(self, timeout_s: float):
        import torch
        import torch.distributed as dist

        self._torch, self._dist = torch, dist
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.is_main = self.rank == 0
        self.timeout_s = timeout_s
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            gpu = torch.cuda.is_available()
            if gpu:  # before any tensor exists: Keras's "cuda" device is the current one
                torch.cuda.set_device(self.local_rank)
            self._call("init_process_group", dist.init_process_group,
                       backend="nccl" if gpu else "gloo",
                       timeout=datetime.timedelta(seconds=timeout_s - grace_s(timeout_s)))
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}"
                                   if torch.cuda.is_available() else "cpu")

    def _call(self, what, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # gloo/NCCL errors are RuntimeErrors of several kinds
            if isinstance(exc, DistributedError):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            silent = self._silent_ranks(what)
            named = (f": rank {', '.join(map(str, silent))} sent no report (stopped, hung or dead)"
                     if silent else "")
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({first}); another "
                f"process crashed, was killed or did not answer within {self.timeout_s:.0f} s "
                f"({TIMEOUT_ENV}){named}; the checkpoints already written are intact"
            ) from exc

    def _silent_ranks(self, what: str) -> list[int]:
        """After a failed collective: report it in the process group's store, wait up to
        ``grace_s`` for every other rank's report, return the ranks that sent none (empty
        if the store itself cannot be reached: its host may be the rank that is gone)."""
        try:
            store = self._dist.distributed_c10d._get_default_store()
            grace = grace_s(self.timeout_s)
            store.set_timeout(datetime.timedelta(seconds=grace))
            store.set(f"{_FAILED_KEY}{self.rank}", what)
            others = [r for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + grace
            while True:
                silent = [r for r in others if not store.check([f"{_FAILED_KEY}{r}"])]
                if not silent or time.monotonic() >= deadline:
                    return silent
                time.sleep(0.05)
        except Exception:  # no store (or private API gone): the error names no rank
            return []

    def gather_paths(self, key):
        t = self._torch.tensor([int(key[0]), int(key[1])], dtype=self._torch.int64,
                               device=self.device)
        out = [self._torch.empty_like(t) for _ in range(self.world_size)]
        self._call("all_gather (paths)", self._dist.all_gather, out, t)
        return [tuple(int(v) for v in o.tolist()) for o in out]

    def reduce_step(self, variables, grads, extras):
        """``(grads averaged over the ranks, extras summed over the ranks)``.

        ``grads[i]`` belongs to ``variables[i]``; ``None`` means "not on this rank's path"
        (zeros). One all-reduce (SUM) of a flat float32 buffer; the sum is divided by the
        world size, so every rank gets the same bits (the reduction's result is broadcast).
        """
        torch = self._torch
        parts = []
        for v, g in zip(variables, grads):
            if g is None:
                parts.append(torch.zeros(int(np.prod(v.shape)), dtype=torch.float32,
                                         device=self.device))
            else:
                parts.append(g.detach().reshape(-1).to(torch.float32))
        parts.append(torch.tensor([float(e) for e in extras], dtype=torch.float32,
                                  device=self.device))
        flat = torch.cat(parts)
        self._call("all_reduce (gradients)", self._dist.all_reduce, flat)
        n = len(extras)
        summed = [float(e) for e in flat[-n:].tolist()] if n else []
        flat = flat[: flat.numel() - n] / self.world_size
        out, offset = [], 0
        for v in variables:
            size = int(np.prod(v.shape))
            out.append(flat[offset: offset + size].view(tuple(v.shape)).to(v.value.dtype))
            offset += size
        return out, summed

    def gather_object(self, obj):
        out = [None] * self.world_size
        self._call("all_gather_object", self._dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        if self._torch.cuda.is_available():
            self._call("barrier", self._dist.barrier, device_ids=[self.local_rank])
        else:
            self._call("barrier", self._dist.barrier)

    def close(self) -> None:
        if self._owns_group and self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except Exception:
                pass
            self._owns_group = False


def world_size_from_env() -> int:
    """torchrun's ``WORLD_SIZE`` (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(text)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE = {text!r}: not an integer") from None
    if n < 1:
        raise DistributedError(f"WORLD_SIZE = {n}: must be >= 1")
    return n


def timeout_from_env() -> float:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV} = {text!r}: must be a number of seconds > 0")
    return value


def context(cfg=None):
    """The process's ``Context``: ``TorchContext`` under torchrun with ``WORLD_SIZE > 1``.

    ``cfg`` (a ``PipelineConfig``) is checked first: ``train.batch_size`` is the global
    batch and must split evenly over the processes.
    """
    n = world_size_from_env()
    if n == 1:
        return Single()
    import keras

    if keras.backend.backend() != "torch":
        raise DistributedError(
            f"WORLD_SIZE = {n} (several processes, e.g. torchrun) needs the torch backend, "
            f"this is {keras.backend.backend()!r}; on jax, run one process: it uses all local "
            f"devices (keras.distribution.DataParallel)")
    if cfg is not None:
        check_batch_split(cfg, n, "processes (WORLD_SIZE)")
    return TorchContext(timeout_from_env())


def check_batch_split(cfg, n: int, what: str) -> None:
    from .config import ConfigError

    b = cfg.train.batch_size
    if b % n:
        raise ConfigError(
            f"{cfg.source}: train.batch_size = {b}: not divisible by the {n} {what}; it is the "
            f"global batch, split evenly (e.g. {b - b % n + n})")


# ---------------------------------------------------------------------------------------
# jax: one process, all local devices (keras.distribution)
# ---------------------------------------------------------------------------------------


def jax_data_parallel(cfg):
    """Set a ``keras.distribution.DataParallel`` over jax's local devices (more than one)
    before the model is built, so its variables are replicated on every device; returns
    the distribution, or ``None`` on one device (nothing changes then)."""
    import jax
    import keras

    devices = jax.local_devices()
    if len(devices) < 2:
        return None
    check_batch_split(cfg, len(devices), "local jax devices")
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    return distribution


def shard_batch(distribution, *tensors):
    """Lay tensors out along their first (batch) axis over the distribution's devices."""
    import keras

    out = []
    for x in tensors:
        layout = distribution.get_data_layout(tuple(x.shape))
        out.append(keras.distribution.distribute_tensor(x, layout))
    return out
