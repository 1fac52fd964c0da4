"""Backend-specific code: the only package that imports torch/jax/tensorflow (besides
``ssd_keras.distributed``, which holds the collectives of data-parallel training, and
``ssd_keras.inception``). Everything else in ``ssd_keras`` uses ``keras.ops`` and stays
backend-agnostic. One job per module:

- ``kernels``    the Flexi-UNet's layer kernels (torch's own ops where they pay);
- ``steps``      one training step's framework calls: loss and gradients, the optimizer
  update on one path's variables, the EMA;
- ``graphs``     torch: eager, traced (``torch.jit.trace``) and compiled
  (``torch.compile``) calls of a model, and the CPU workers of batch splitting;
- ``inference``  a model's inference call per backend;
- ``execution``  ``Execution``: how a path runs on this device (mode, ``"auto"``,
  precision, TF32, caches) — what the trainer, the sampler and evaluation use;
- ``numerics``   gradient finiteness, loss-scale unscaling, a step's scalars to the host;
- ``io``         reading and writing torch files (official checkpoints, exports).
"""

from ._active import BACKEND
from .execution import AUTO, GRAPHS, Execution, default_device, resolve_graph
from .inference import INFERENCE_GRAPHS, inference_fn
from .io import load_torch_file, save_torch_state_dict, torch_tensor_to_numpy
from .numerics import float16_unsupported, to_host, unscale_and_check
from .kernels import (attention_legacy_qkv, conv2d, dense, group_norm, scale_shift,
                      upsample_nearest_2x)
from .steps import apply_gradients, ema_update, make_loss_and_grads, no_grad

__all__ = [
    "BACKEND", "AUTO", "GRAPHS", "Execution", "default_device", "resolve_graph",
    "INFERENCE_GRAPHS", "inference_fn", "load_torch_file", "save_torch_state_dict",
    "torch_tensor_to_numpy", "float16_unsupported", "to_host", "unscale_and_check",
    "attention_legacy_qkv", "conv2d", "dense", "group_norm", "scale_shift",
    "upsample_nearest_2x", "apply_gradients", "ema_update", "make_loss_and_grads", "no_grad",
]
