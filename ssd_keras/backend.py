"""Backend-specific code: the only module that imports torch/jax/tensorflow (besides
``ssd_keras.distributed``, which holds the collectives of data-parallel training).

Everything else in ``ssd_keras`` uses ``keras.ops`` and stays backend-agnostic. What lives
here, each with one branch per Keras backend (torch, jax, tensorflow):

- ``group_norm``: torch's native kernel on torch, a generic ``keras.ops`` version elsewhere;
- ``make_loss_and_grads`` / ``apply_gradients``: one training step on one Flexi-UNet path.
  torch runs eagerly (autograd); jax compiles the gradient (``jax.jit`` of
  ``value_and_grad`` over ``stateless_call``) and the optimizer update (``jax.jit`` of
  ``optimizer.apply`` inside a ``StatelessScope``) once per path; tensorflow traces both
  into ``tf.function`` graphs once per path. Only the path's variables and their optimizer
  slots change: every other variable stays bit-identical on all three backends;
- ``inference_fn``: a compiled ``model([x, t], training=False)`` for the sampler (on the
  CPU under torch, the batch split over single-threaded workers);
- ``no_grad``: a context that records no autograd graph (torch only).

Random numbers: the training and sampling noise of ``ssd_keras`` is drawn with numpy on
the host, so it is identical on every backend. Dropout (``model.dropout > 0``) draws from
Keras's ``SeedGenerator``, whose streams differ between backends; on jax its state is
threaded through ``stateless_call`` explicitly, so each step gets fresh masks.
"""

from __future__ import annotations

import contextlib
import os

import keras
from keras import ops

BACKEND = keras.backend.backend()

if BACKEND == "torch":
    import torch
    import torch.nn.functional as _torch_F
elif BACKEND == "jax":
    import jax
elif BACKEND == "tensorflow":
    import tensorflow as tf


# ---------------------------------------------------------------------------------------
# Group normalization (used by ssd_keras.nn.layers.GroupNorm)
# ---------------------------------------------------------------------------------------


def group_norm(x, groups, gamma, beta, epsilon=1e-5):
    """Group normalization of a channels-last tensor ``x`` (N, ..., C).

    Statistics are taken per sample over all spatial positions and the ``C // groups``
    channels of each group (biased variance), as ``torch.nn.GroupNorm``; then the
    per-channel affine ``gamma``, ``beta`` (shape (C,)) is applied. No dtype casting
    happens here: the caller decides the compute dtype (the GroupNorm layer uses float32).

    On torch, ``torch.nn.functional.group_norm`` runs on the channels-last view of ``x``
    (``movedim`` is free, and torch's channels-last CPU/GPU kernels need no copy); the
    generic ``keras.ops`` version with reshapes and NHWC<->NCHW copies cost ~30% of a
    training step there (docs/design.md). Other backends use the generic version, which
    their compilers fuse.
    """
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        y = _torch_F.group_norm(torch.movedim(x, -1, 1), groups, gamma, beta, epsilon)
        return torch.movedim(y, 1, -1)
    return _group_norm_generic(x, groups, gamma, beta, epsilon)


def conv2d(x, kernel, bias, strides=1, padding=0):
    """2-D convolution of channels-last ``x`` (N, H, W, C_in) with a Keras kernel
    (kh, kw, C_in, C_out), ``padding`` zeros on every side (torch's ``padding=``), plus
    ``bias``; returns (N, H', W', C_out).

    On torch the NHWC tensor *is* a channels-last NCHW tensor: ``permute`` views it so
    without a copy, and oneDNN convolves channels-last natively (faster on CPU than NCHW:
    docs/design.md "Speed") with the bias fused and returns a channels-last result, which
    ``permute`` views back as contiguous NHWC. Keras's own torch convolution copied to
    contiguous NCHW and back around every call and added the bias separately.
    """
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        y = _torch_F.conv2d(torch.permute(x, (0, 3, 1, 2)), _oihw(_torch_value(kernel)),
                            _torch_value(bias), strides, padding)
        return torch.permute(y, (0, 2, 3, 1))
    if padding and strides == 1 and 2 * padding + 1 == kernel.shape[0]:
        y = ops.conv(x, kernel, strides=1, padding="same")
    else:
        if padding:
            x = ops.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        y = ops.conv(x, kernel, strides=strides, padding="valid")
    return y + bias


def dense(x, kernel, bias):
    """``x @ kernel + bias`` over the last axis: one ``addmm`` on torch, which reads the
    Keras kernel (in, out) as it is stored (``F.linear`` wants (out, in) and copied its
    output back for 3-D inputs)."""
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        kernel = _torch_value(kernel)
        y = torch.addmm(_torch_value(bias), x.reshape(-1, x.shape[-1]), kernel)
        return y.reshape(*x.shape[:-1], kernel.shape[-1])
    return ops.matmul(x, kernel) + bias


def upsample_nearest_2x(x):
    """Nearest-neighbour 2x upsampling of channels-last ``x`` (one pass on torch)."""
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        y = _torch_F.interpolate(torch.permute(x, (0, 3, 1, 2)), scale_factor=2.0, mode="nearest")
        return torch.permute(y, (0, 2, 3, 1))
    return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)


def scale_shift(h, scale, shift):
    """``h * (1 + scale) + shift`` (ADM's scale-shift norm); one ``addcmul`` on torch."""
    if BACKEND == "torch" and isinstance(h, torch.Tensor):
        return torch.addcmul(shift, h, 1.0 + scale)
    return h * (1.0 + scale) + shift


def attention_legacy_qkv(qkv, scale):
    """Multi-head attention from a (B, L, heads, 3, ch) tensor of ``[q|k|v]`` per head
    (ADM's legacy layout); returns (B, L, heads, ch).

    On torch ``scaled_dot_product_attention`` reads q, k and v as strided views of
    ``qkv``, so no per-head copy is made (``ops.dot_product_attention`` made q, k and v
    contiguous first); elsewhere ``ops.dot_product_attention``.
    """
    if BACKEND == "torch" and isinstance(qkv, torch.Tensor):
        q, k, v = (torch.select(qkv, 3, i).transpose(1, 2) for i in range(3))  # (B, heads, L, ch)
        return _torch_F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    q, k, v = qkv[:, :, :, 0, :], qkv[:, :, :, 1, :], qkv[:, :, :, 2, :]
    return ops.dot_product_attention(q, k, v, scale=scale)


def _oihw(kernel):
    """A Keras conv kernel (kh, kw, in, out) as the (out, in, kh, kw) weight torch wants.

    A permuted view would do, but for a channels-last input the convolution copies the
    weight to channels-last memory on every call, and each such copy wakes the OpenMP
    threads (~0.1 ms under PASSIVE, up to 30 times per forward of a small path). Without
    autograd (sampling) that copy is made once per weight value and kept on the tensor
    until the weight changes (its ``_version``); with autograd the view is passed, as the
    copy must then be part of the differentiated graph anyway.
    """
    view = torch.permute(kernel, (3, 2, 0, 1))
    if torch.is_grad_enabled() and kernel.requires_grad:
        return view
    hit = getattr(kernel, "_ssd_oihw", None)  # kept on the tensor: it dies with it
    if hit is not None and hit[0] == kernel._version:
        return hit[1]
    weight = view.detach().contiguous(memory_format=torch.channels_last)
    kernel._ssd_oihw = (kernel._version, weight)
    return weight


def _torch_value(v):
    """The torch tensor behind a Keras variable (read through ``.value``, so autocast
    applies under mixed precision), or ``v`` itself."""
    return v.value if hasattr(v, "value") and not isinstance(v, torch.Tensor) else v


def _group_norm_generic(x, groups, gamma, beta, epsilon=1e-5):
    shape = ops.shape(x)
    channels = shape[-1]
    grouped = ops.reshape(x, (shape[0], -1, groups, channels // groups))
    mean, var = ops.moments(grouped, axes=(1, 3), keepdims=True)
    y = (grouped - mean) * ops.rsqrt(var + epsilon)
    y = ops.reshape(y, shape)
    return y * gamma + beta


# ---------------------------------------------------------------------------------------
# Gradient steps (used by ssd_keras.train)
# ---------------------------------------------------------------------------------------


def no_grad():
    """A context in which tensor arithmetic records no autograd graph (torch only)."""
    if BACKEND == "torch":
        return torch.no_grad()
    return contextlib.nullcontext()


def make_loss_and_grads(path_model, loss_fn, graph: str = "eager"):
    """``fn(x, t, target, weight, *cond) -> (loss, grads)`` for one Flexi-UNet path.

    ``cond`` is empty for an unconditional path and ``(y,)``, the int32 labels, for a
    class-conditional one (its inputs are ``[x, t, y]``).

    ``grads`` are in the order of ``path_model.trainable_variables`` (exactly the path's
    variables); ``loss_fn(prediction, target, weight)`` returns a scalar. Non-trainable
    state the path updates (dropout seed states) is written back to its variables, so
    consecutive calls draw fresh dropout masks on every backend. Shapes are static per
    path, so jax and tensorflow compile once per path (on the first call).

    torch with ``graph="trace"``: the forward pass replays a ``torch.jit.trace`` of the
    path in training mode (autograd records the replayed ops as it records eager ones),
    traced per input shape and checked against the eager forward on first use
    (``_traced_call``). Only for paths without dropout: a trace would freeze the masks.
    """
    variables = path_model.trainable_variables

    if BACKEND == "torch":
        forward = (_traced_call(path_model, training=True) if graph == "trace"
                   else lambda *inputs: path_model(list(inputs), training=True))

        def loss_and_grads(x, t, target, weight, *cond):
            for v in variables:
                v.value.grad = None
            loss = loss_fn(forward(x, t, *cond), target, weight)
            loss.backward()
            return loss.detach(), [v.value.grad for v in variables]

        return loss_and_grads

    if BACKEND == "tensorflow":

        @tf.function
        def loss_and_grads(x, t, target, weight, *cond):
            with tf.GradientTape() as tape:
                loss = loss_fn(path_model([x, t, *cond], training=True), target, weight)
            return loss, tape.gradient(loss, variables)

        return loss_and_grads

    if BACKEND == "jax":
        state_vars = path_model.non_trainable_variables

        def pure(trainable, state, x, t, target, weight, *cond):
            pred, new_state = path_model.stateless_call(trainable, state, [x, t, *cond],
                                                        training=True)
            return loss_fn(pred, target, weight), new_state

        grad_fn = jax.jit(jax.value_and_grad(pure, has_aux=True))

        def loss_and_grads(x, t, target, weight, *cond):
            (loss, new_state), grads = grad_fn(
                [v.value for v in variables], [v.value for v in state_vars], x, t, target, weight,
                *cond
            )
            for v, value in zip(state_vars, new_state):
                v.assign(value)
            return loss, grads

        return loss_and_grads

    raise NotImplementedError(f"training is not supported on the {BACKEND!r} backend")


def ema_update(ema, variables, rate: float) -> list:
    """``ema * rate + weights * (1 - rate)`` for every (EMA tensor, variable) pair; returns
    the new EMA tensors.

    torch: one in-place multi-tensor ``lerp`` over all pairs (``torch._foreach_lerp_``,
    the kernel ``torch.optim`` uses), instead of three tensor ops per variable: at the
    quickstart's size the per-variable version cost ~10 ms a step (docs/design.md "Speed").
    ``lerp`` with weight ``1 - rate`` is the same average up to rounding, and equals the
    weights exactly at ``rate = 0``. Other backends return new tensors.
    """
    if BACKEND == "torch":
        with torch.no_grad():
            torch._foreach_lerp_(list(ema), [v.value for v in variables], 1.0 - float(rate))
        return ema
    return [e * rate + ops.stop_gradient(v.value) * (1.0 - rate) for e, v in zip(ema, variables)]


def apply_gradients(optimizer, grads, variables):
    """``optimizer.apply(grads, variables)`` on the given variables only.

    Every other model variable and every optimizer slot of another variable stays
    bit-identical (weight decay included); the optimizer's step counter advances. On jax
    and tensorflow the update is compiled once per variable subset (i.e. per path).
    """
    variables = list(variables)
    if BACKEND == "torch":
        with torch.no_grad():
            optimizer.apply(grads, variables)
        return
    if BACKEND not in ("jax", "tensorflow"):
        optimizer.apply(grads, variables)
        return
    # {tuple of variable ids: compiled update}, kept on the optimizer (it dies with it)
    cache = optimizer.__dict__.get("_ssd_apply_fns")
    if cache is None:
        cache = {}
        object.__setattr__(optimizer, "_ssd_apply_fns", cache)  # bypass Keras tracking
    key = tuple(id(v) for v in variables)
    if key not in cache:
        make = _jax_apply_fn if BACKEND == "jax" else _tf_apply_fn
        cache[key] = make(optimizer, variables)
    cache[key](list(grads))


def _tf_apply_fn(optimizer, variables):
    @tf.function
    def apply(grads):
        optimizer.apply(grads, variables)

    return apply


def _jax_apply_fn(optimizer, variables):
    """A jitted ``optimizer.apply`` on ``variables`` run statelessly.

    The function takes the current values of the path's variables and of all optimizer
    variables and returns the new path values and the optimizer variables the update
    changed (found while tracing: the others come back as the very input tracer), so
    off-path optimizer slots are neither copied nor written.
    """
    opt_vars = list(optimizer.variables)
    changed: list[int] = []  # indices into opt_vars, filled while tracing

    def pure(values, opt_values, grads):
        mapping = list(zip(variables, values)) + list(zip(opt_vars, opt_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            old_opt = [scope.get_current_value(v) for v in opt_vars]
            optimizer.apply(grads, variables)
        new_values = [scope.get_current_value(v) for v in variables]
        new_opt = [scope.get_current_value(v) for v in opt_vars]
        changed[:] = [i for i, (new, old) in enumerate(zip(new_opt, old_opt)) if new is not old]
        return new_values, [new_opt[i] for i in changed]

    jitted = jax.jit(pure)

    def apply(grads):
        new_values, new_opt = jitted(
            [v.value for v in variables], [v.value for v in opt_vars], grads
        )
        for v, value in zip(variables, new_values):
            v.assign(value)
        for i, value in zip(changed, new_opt):
            opt_vars[i].assign(value)

    return apply


# ---------------------------------------------------------------------------------------
# Inference (used by ssd_keras.sample)
# ---------------------------------------------------------------------------------------


INFERENCE_GRAPHS = ("trace", "eager")


def inference_fn(model, graph: str = "trace"):
    """``fn(x, t, *cond) -> model([x, t, *cond], training=False)``, compiled where that
    pays (``cond``: ``(y,)`` int32 labels for a class-conditional path, else empty).

    torch: with ``graph="trace"`` (the default) a ``torch.jit.trace`` of the path per input
    shape (``_traced_call``), replayed on the CPU one chunk of the batch per torch thread
    (``_batch_parallel``); with ``"eager"`` an eager call without autograd.
    jax: ``jax.jit`` of ``stateless_call`` with the model's current variable values passed
    in on each call (later ``assign``s are seen). tensorflow: a ``tf.function`` graph
    (variables are captured by reference). Each distinct input shape compiles once.
    """
    if BACKEND == "jax":
        trainable = model.trainable_variables
        state = model.non_trainable_variables

        @jax.jit
        def pure(trainable_values, state_values, *inputs):
            out, _ = model.stateless_call(trainable_values, state_values, list(inputs),
                                          training=False)
            return out

        def call(*inputs):
            return pure([v.value for v in trainable], [v.value for v in state], *inputs)

        return call

    if BACKEND == "tensorflow":

        @tf.function
        def call(*inputs):
            return model(list(inputs), training=False)

        return call

    if graph == "trace":  # one per model, kept on it: its traces outlive a sampling call
        fn = model.__dict__.get("_ssd_traced_inference")
        if fn is None:
            traced = _traced_call(model, training=False)

            def replay(*inputs):
                with torch.no_grad():  # grad mode is per thread: set it where the call runs
                    return traced(*inputs)

            def fn(*inputs):
                with torch.no_grad():  # the grad mode needs_tracing keys on
                    return _batch_parallel(replay, traced.needs_tracing, *inputs)

            object.__setattr__(model, "_ssd_traced_inference", fn)  # bypass Keras tracking
        return fn

    def call(*inputs):
        with no_grad():
            return model(list(inputs), training=False)

    return call


def _batch_parallel(fn, needs_tracing, x, *rest):
    """``fn(x, *rest)`` (``rest``: t, and y for a class-conditional path) for a batch on the CPU, split over torch's threads (inter-op parallelism).

    Under ``OMP_WAIT_POLICY=PASSIVE`` every multi-threaded op of a small batch pays for
    waking the other thread, which cost as much as the second thread saved (a 32 px path at
    batch 8: 44 ms on one thread, 43 ms on two). Splitting the batch into one chunk per
    thread, each run single-threaded by ``_CpuWorkers``, keeps every core busy without
    those wake-ups: 1.45x faster per path here (docs/design.md "Speed"). Each image's
    computation is independent of the others', so the result is the unsplit one up to
    float rounding (oneDNN may choose another kernel for another batch size; a given
    batch and thread count always gives the same result). Chunks whose shape is not
    traced yet (``needs_tracing``) run here, in order, so that tracing and its eager
    check stay on the calling thread; GPU tensors and single images are not split.
    """
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return fn(x, *rest)
    k = min(torch.get_num_threads(), int(x.shape[0]))
    if k < 2:
        return fn(x, *rest)
    chunks = list(zip(*(torch.tensor_split(v, k) for v in (x, *rest))))
    if any(needs_tracing(*c) for c in chunks):
        return torch.cat([fn(*c) for c in chunks])
    return torch.cat(list(_CpuWorkers.get(k).map(fn, *zip(*chunks))))


class _CpuWorkers:
    """``k`` threads that each run torch ops single-threaded, shared by every model (a
    forked child starts its own: it has none of its parent's threads)."""

    _pools: dict = {}

    @classmethod
    def get(cls, k: int):
        if k not in cls._pools:
            cls._pools[k] = cls._start(k)
        return cls._pools[k]

    @staticmethod
    def _start(k: int):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        started = threading.Barrier(k + 1)

        def single_threaded():
            # torch sets a thread's counts on its first parallel op from a process-wide
            # value (which the caller gets back below): take that first, then go to one
            torch.get_num_threads()
            torch.set_num_threads(1)  # this thread's OpenMP and MKL thread counts
            started.wait()

        pool = ThreadPoolExecutor(k, thread_name_prefix="ssd-inference", initializer=single_threaded)
        waiting = [pool.submit(lambda: None) for _ in range(k)]  # start all k threads now
        started.wait()
        for f in waiting:
            f.result()
        # torch.set_num_threads also sets the count that threads started later begin
        # with: give that back to the caller's
        torch.set_num_threads(threads)
        return pool


if BACKEND == "torch":
    os.register_at_fork(after_in_child=_CpuWorkers._pools.clear)


def _traced_call(model, training: bool = False):
    """torch: ``model([x, t, *cond], training=training)`` replayed from a ``torch.jit.trace`` per
    input shape, with no Python (Keras's per-layer bookkeeping) between the kernels.

    A trace replays the ops of one call. That is sound for the Flexi-UNet's paths, whose
    control flow depends on shapes and configuration only (never on tensor values), as
    long as no dropout is active (its masks would be frozen). Each distinct input shape
    gets its own trace. Without autograd a trace holds the convolution weights as they
    were (``_oihw``'s cached copies), so every call compares the parameters' ``_version``
    counters with those at tracing time and traces anew after an ``assign`` (e.g. fresh
    EMA weights); with autograd it reads the parameters themselves. The first call of
    each shape also runs the model eagerly and keeps the trace only if both agree within
    1e-5; otherwise (an op the tracer froze or could not record) it warns and that shape
    stays eager.
    """
    import warnings

    class _Forward(torch.nn.Module):
        def __init__(self, keras_model):
            super().__init__()
            self.keras_model = keras_model

        def forward(self, *inputs):
            return self.keras_model(list(inputs), training=training)

    wrapper = _Forward(model)
    traces: dict = {}
    params = [v.value for v in model.variables]
    traced_at: list = [None]  # the parameters' versions the traces were made with

    def key_of(*inputs):
        grad = torch.is_grad_enabled()
        if not grad:
            versions = tuple(p._version for p in params)
            if versions != traced_at[0]:
                traces.clear()
                traced_at[0] = versions
        return (*((tuple(v.shape), v.dtype) for v in inputs), grad)

    def call(*inputs):
        key = key_of(*inputs)
        # optimized_execution(False): TorchScript's profiling executor would re-specialise
        # and fuse the graph on its first calls, which cost seconds per call here (the
        # plain interpreter runs a 32 px path at half the eager time from the 2nd call)
        with torch.jit.optimized_execution(False):
            fn = traces.get(key)
            if fn is not None:
                return fn(*inputs)
            eager = wrapper(*inputs)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(wrapper, tuple(inputs), check_trace=False)
                with torch.no_grad():
                    ok = bool(torch.allclose(traced(*inputs), eager.detach(), rtol=0.0, atol=1e-5))
            except Exception as exc:  # an op the tracer cannot record
                traced, ok = None, False
                why = f"{type(exc).__name__}: {exc}"
            else:
                why = "the trace's output differs from the eager one"
            if not ok:
                warnings.warn(f"running {model.name} eagerly for inputs {key[0]}: tracing "
                              f"failed ({why.splitlines()[0][:200]})", stacklevel=2)
            traces[key] = traced if ok else wrapper
            return eager

    def needs_tracing(*inputs) -> bool:
        """Whether the next call with inputs shaped as these (under the current grad
        mode) traces, or runs eagerly because tracing failed for that shape."""
        return traces.get(key_of(*inputs), wrapper) is wrapper

    call.needs_tracing = needs_tracing
    return call


# ------------------------------------------------------------------ official checkpoints
def load_torch_file(path):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers
    only, no code is unpickled. The official SSD checkpoints are torch files whatever the
    Keras backend; torch is a core dependency. Exceptions propagate unchanged."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def torch_tensor_to_numpy(value):
    """A float32 numpy copy of a torch tensor, or ``None`` if ``value`` is no tensor."""
    import torch

    if not torch.is_tensor(value):
        return None
    return value.detach().to(torch.float32).numpy()
