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
- ``Context.begin_step(variables, path_variables)`` before a step's backward pass, then
  ``.finish(grads, loss, flags)`` after it: average the gradients of ``variables`` over
  the ranks and sum the loss, its non-finite flag and the stop flags. The all-reduce runs
  in buckets started from gradient hooks while the backward pass still runs, as DDP does
  (``train.allreduce_bucket_mb``; 0: one all-reduce after it); a variable with no
  gradient on a rank counts as zeros there.
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
DEFAULT_BUCKET_MB = 25.0  # train.allreduce_bucket_mb's default, as DDP's bucket_cap_mb
#: the sums a step's last bucket carries after the gradients: the finite losses, the
#: count of non-finite losses, the SIGINT and SIGTERM requests
N_TOTALS = 4


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

    def begin_step(self, variables, path_variables):
        return _LocalReduction(variables, path_variables)

    def gather_object(self, obj):
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchContext:
    """``torch.distributed`` collectives of a torchrun-launched process."""

    def __init__(self, timeout_s: float, bucket_mb: float = DEFAULT_BUCKET_MB):
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
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self._layouts: dict = {}  # variable ids of a union -> its _BucketLayout
        self._hooked: dict = {}   # id of a parameter -> its gradient hook's handle
        self._reduction = None    # the step whose backward pass is running

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

    def begin_step(self, variables, path_variables):
        """Start this step's gradient all-reduce over ``variables`` (the union of the
        ranks' paths, in the model's order; the same list on every rank) before the
        backward pass of ``path_variables`` (this rank's path) runs; returns the step's
        ``BucketedReduction``, whose ``finish`` completes it."""
        key = tuple(id(v) for v in variables)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _BucketLayout(
                variables, self.bucket_bytes, N_TOTALS, self.device)
        for v in variables:
            param = v.value
            if id(param) not in self._hooked:  # once per parameter, for all steps
                self._hooked[id(param)] = param.register_post_accumulate_grad_hook(self._ready)
        self._reduction = BucketedReduction(self, layout, path_variables)
        return self._reduction

    def _ready(self, param) -> None:
        """Gradient hook: ``param.grad`` is final for this backward pass."""
        reduction = self._reduction
        if reduction is not None:
            reduction.ready(param)

    def _all_reduce(self, buffer):
        return self._call("all_reduce (gradients)", self._dist.all_reduce, buffer, async_op=True)

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
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self._reduction = None
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


def seconds_from_env(name: str, default: float, error=ValueError) -> float:
    """The positive number of seconds in environment variable ``name`` (``default`` if
    unset); anything else raises ``error`` naming the variable and its value."""
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise error(f"{name} = {text!r}: must be a number of seconds > 0")
    return value


def timeout_from_env() -> float:
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, DistributedError)


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
        return TorchContext(timeout_from_env(), cfg.train.allreduce_bucket_mb)
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


# ---------------------------------------------------------------------------------------
# torch: the gradient all-reduce of a step, in buckets overlapped with the backward pass
# ---------------------------------------------------------------------------------------


class _BucketLayout:
    """Where each gradient of a union of variables goes in the flat float32 buffers that
    a step all-reduces: buckets of about ``bucket_bytes`` in reverse model order (the order
    in which the backward pass produces the gradients), the last bucket followed by
    ``n_totals`` slots for the step's sums. ``bucket_bytes = 0``: one bucket. Built once
    per union; the same on every rank, as the union is."""

    def __init__(self, variables, bucket_bytes: int, n_totals: int, device):
        self.variables = list(variables)
        sizes = [int(np.prod(v.shape)) for v in self.variables]
        buckets: list[list[int]] = [[]]  # indices into variables
        filled = 0
        for i in reversed(range(len(self.variables))):
            if bucket_bytes and buckets[-1] and filled + 4 * sizes[i] > bucket_bytes:
                buckets.append([])
                filled = 0
            buckets[-1].append(i)
            filled += 4 * sizes[i]
        self.buckets = buckets
        self.slots = {}  # id of the parameter -> (bucket, offset, size)
        lengths = []
        for b, members in enumerate(buckets):
            offset = 0
            for i in members:
                self.slots[id(self.variables[i].value)] = (b, offset, sizes[i])
                offset += sizes[i]
            lengths.append(offset)
        lengths[-1] += n_totals
        self.n_totals = n_totals
        self.lengths = lengths  # the buffers are allocated per step: layouts of many unions
        self.device = device    # are kept, a union's buffers only while its step runs


class BucketedReduction:
    """One step's gradient all-reduce (``TorchContext.begin_step``).

    A bucket is ready once every gradient of this rank's path in it has been copied in
    (a gradient hook per parameter); variables off this rank's path stay zero. Buckets
    are launched as asynchronous all-reduces strictly in bucket order (bucket ``k`` only
    after bucket ``k - 1``), so every rank issues the same collectives in the same order
    whatever order its backward pass produces gradients in. The last bucket is launched by
    ``finish``, with the step's sums after its gradients: it holds the first layers,
    whose gradients come last anyway.
    """

    def __init__(self, context, layout: _BucketLayout, path_variables):
        torch = context._torch
        self.context, self.layout = context, layout
        self.torch = torch
        self.flats = [torch.zeros(n, dtype=torch.float32, device=layout.device)
                      for n in layout.lengths]
        path = {id(v.value) for v in path_variables}
        self.pending = [sum(id(layout.variables[i].value) in path for i in members)
                        for members in layout.buckets]
        self.works: list = []
        self._launch_ready()  # buckets holding no variable of this rank's path

    def ready(self, param) -> None:
        slot = self.layout.slots.get(id(param))
        if slot is None or param.grad is None:
            return
        b, offset, size = slot
        with self.torch.no_grad():
            self.flats[b][offset: offset + size].copy_(param.grad.reshape(-1))
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        last = len(self.flats) - 1
        while len(self.works) < last and self.pending[len(self.works)] == 0:
            self.works.append(self.context._all_reduce(self.flats[len(self.works)]))

    def finish(self, grads, loss, flags):
        """``(averaged gradients of the union, sums)``: both on the device, nothing read
        back to the host. ``grads`` are the path's own (unused here: the hooks copied
        them); ``loss`` is this rank's loss tensor; ``flags`` are floats summed over the
        ranks. The sums are ``[finite losses, non-finite losses, *flags]``."""
        torch, layout, flats = self.torch, self.layout, self.flats
        self.context._reduction = None
        tail = flats[-1][-layout.n_totals:]
        with torch.no_grad():
            loss = loss.detach().reshape(()).to(torch.float32)
            bad = ~torch.isfinite(loss)
            tail[0].copy_(torch.where(bad, torch.zeros_like(loss), loss))
            tail[1].copy_(bad.to(torch.float32))
            for i, flag in enumerate(flags):
                tail[2 + i].fill_(float(flag))
        while len(self.works) < len(flats):  # the rest, in bucket order
            self.works.append(self.context._all_reduce(flats[len(self.works)]))
        for work in self.works:
            self.context._call("all_reduce (gradients)", work.wait)
        n = self.context.world_size
        with torch.no_grad():
            torch._foreach_div_(flats[:-1] + [flats[-1][:-layout.n_totals]], float(n))
        averaged = [None] * len(layout.variables)
        for v_index, v in enumerate(layout.variables):
            b, offset, size = layout.slots[id(v.value)]
            averaged[v_index] = flats[b][offset: offset + size].view(tuple(v.shape))
        return averaged, tail

    def abandon(self) -> None:
        """The backward pass failed: no more buckets are launched from its hooks."""
        self.context._reduction = None


class _LocalReduction:
    """One process: ``finish`` returns the path's gradients and the loss's sums as they are."""

    def __init__(self, variables, path_variables):
        self.variables = list(variables)
        self.path_ids = [id(v) for v in path_variables]

    def finish(self, grads, loss, flags):
        from keras import ops

        mine = dict(zip(self.path_ids, grads))
        value = float(ops.convert_to_numpy(loss))
        bad = value != value or value in (float("inf"), float("-inf"))
        totals = [0.0 if bad else value, float(bad), *map(float, flags)]
        return [mine.get(id(v)) for v in self.variables], totals

    def abandon(self) -> None:
        pass
