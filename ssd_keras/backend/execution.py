"""The execution layer: one object, built from the config, that owns how a path runs on
this device.

``Execution`` decides the mode of each use of a path — ``"eager"``, ``"trace"`` (a replayed
``torch.jit.trace``) or ``"compile"`` (``torch.compile``; on CUDA the sampling paths in
its ``"reduce-overhead"`` mode, i.e. CUDA graphs) — resolves ``"auto"`` to the measured
fastest correct mode of the device (``AUTO``, docs/design.md "Execution layer"), applies
the precision (``train.precision``) and TF32, and keeps every function it builds (per
path and loss, per model, per optimizer). The trainer, the sampler and evaluation ask it
for a path's loss-and-gradients function or forward function and know nothing more.

Nothing is attached to torch or Keras objects: the caches live here and die with the
object. jax and tensorflow compile every path themselves (``jax.jit``, ``tf.function``):
their mode is always that, whatever the setting.
"""

from __future__ import annotations

import contextlib

from ._active import BACKEND
from .inference import inference_fn
from .steps import apply_gradients, make_loss_and_grads

if BACKEND == "torch":
    import torch

#: the values of ``train.graph`` and ``sampler.graph``
GRAPHS = ("auto", "eager", "trace", "compile")

#: what ``"auto"`` picks per device type and use on torch (measured: docs/design.md
#: "Execution layer"); another device type (e.g. mps) runs eagerly
AUTO = {
    "cpu": {"train": "trace", "sample": "trace"},
    "cuda": {"train": "compile", "sample": "compile"},
}

#: ``torch.compile``'s mode per device type and use: CUDA graphs for the sampling paths
#: (small batches, fixed shapes, no autograd: the launches dominate), the default mode for
#: the training step (autograd's buffers change every step)
COMPILE_MODES = {"cuda": {"train": None, "sample": "reduce-overhead"}}


def default_device() -> str:
    """The device type the Keras backend computes on: ``"cuda"`` or ``"cpu"`` on torch
    (Keras puts tensors on the GPU when torch sees one); ``"cpu"`` elsewhere."""
    if BACKEND == "torch" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_graph(graph: str, device: str, use: str, dropout: float = 0.0) -> str:
    """The mode a path runs in for ``use`` (``"train"`` or ``"sample"``) on ``device``.

    ``"auto"`` is ``AUTO[device][use]``. A trace replays the ops of one call, so it would
    freeze dropout masks: training with ``dropout > 0`` never traces (eager instead).
    Backends other than torch compile themselves: ``"eager"`` is returned for them and
    means nothing there.
    """
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph mode {graph!r}; valid: {', '.join(GRAPHS)}")
    if BACKEND != "torch":
        return "eager"
    mode = AUTO.get(device, {}).get(use, "eager") if graph == "auto" else graph
    if mode == "trace" and use == "train" and dropout > 0:
        return "eager"
    return mode


class Execution:
    """How the paths of one run execute on this device (see the module docstring).

    ``train_graph``, ``sample_graph``: ``train.graph``, ``sampler.graph`` (``GRAPHS``);
    ``precision``: ``train.precision``; ``dropout``: ``model.dropout`` (a trace would
    freeze its masks); ``device``: ``default_device()`` unless given.
    """

    def __init__(self, *, train_graph: str = "auto", sample_graph: str = "auto",
                 precision: str = "float32", dropout: float = 0.0, device: str | None = None):
        self.device = device or default_device()
        self.precision = precision
        self.train_graph = resolve_graph(train_graph, self.device, "train", dropout)
        self.sample_graph = resolve_graph(sample_graph, self.device, "sample")
        self._grads: dict = {}  # (id(path model), id(loss_fn)) -> (path, loss_fn, fn)
        self._forwards: dict = {}  # id(model) -> (model, fn)
        self._apply: dict = {}  # id(optimizer) -> (optimizer, {variable ids: update})

    @classmethod
    def from_config(cls, cfg, device: str | None = None) -> "Execution":
        """The execution of a pipeline config (``train.graph``, ``sampler.graph``,
        ``train.precision``, ``model.dropout``)."""
        return cls(train_graph=cfg.train.graph, sample_graph=cfg.sampler.graph,
                   precision=cfg.train.precision, dropout=cfg.model.dropout, device=device)

    def __repr__(self) -> str:
        return (f"Execution(device={self.device!r}, train={self.train_graph!r}, "
                f"sample={self.sample_graph!r}, precision={self.precision!r})")

    # ------------------------------------------------------------------ training
    def loss_and_grads(self, path_model, loss_fn):
        """``fn(*inputs, target, weight) -> (loss, grads)`` of one path (``inputs``: the
        path model's inputs, ``x_t, t`` today), built on first use and kept
        (``steps.make_loss_and_grads``). ``target`` and ``weight`` are inputs of every
        call, never constants of a trace or compiled graph."""
        key = (id(path_model), id(loss_fn))
        hit = self._grads.get(key)
        if hit is None:
            forward = None
            if BACKEND == "torch":
                from .graphs import forward_fn

                forward = forward_fn(path_model, self.train_graph, training=True,
                                     compile_mode=self._compile_mode("train"))
            fn = make_loss_and_grads(path_model, loss_fn, forward=forward,
                                     numerics=self._train_context)
            hit = self._grads[key] = (path_model, loss_fn, fn)  # keeps both ids valid
        return hit[2]

    def apply_gradients(self, optimizer, grads, variables) -> None:
        """The optimizer update on ``variables`` only (``steps.apply_gradients``; jax and
        tensorflow compile it once per variable subset, kept here)."""
        hit = self._apply.get(id(optimizer))
        if hit is None:
            hit = self._apply[id(optimizer)] = (optimizer, {})
        apply_gradients(optimizer, grads, variables, cache=hit[1])

    # ------------------------------------------------------------------ sampling
    def forward(self, model):
        """``fn(*inputs) -> model(list(inputs), training=False)`` without autograd, in the
        sampling mode, built on first use and kept: a path's traces or compiled graphs
        outlive one sampling call (``inference.inference_fn``)."""
        hit = self._forwards.get(id(model))
        if hit is None:
            fn = inference_fn(model, self.sample_graph, compile_mode=self._compile_mode("sample"))
            hit = self._forwards[id(model)] = (model, fn)
        return hit[1]

    # ------------------------------------------------------------------ numerics
    def _compile_mode(self, use: str):
        return COMPILE_MODES.get(self.device, {}).get(use)

    @contextlib.contextmanager
    def _train_context(self):
        """Around a training step's forward and backward passes: TF32 matmuls on CUDA (torch's ``"high"``
        float32 matmul precision; cuDNN's TF32 convolutions are torch's default already),
        restored afterwards; nothing on the CPU. Sampling keeps full float32 matmuls, so
        the parity of its outputs with the official code's holds on a GPU too."""
        if BACKEND != "torch" or self.device != "cuda":
            yield
            return
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
