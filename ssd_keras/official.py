"""The official SSD checkpoint format: tensor names, shapes, and their Keras counterparts.

The paper's released checkpoints are plain PyTorch ``state_dict``s of the official
FlexiUNet (docs/official_checkpoints.md). This module knows

- which tensors such a state_dict holds for a network configuration, and their shapes
  (``official_tensor_shapes``), written from the network's structure, not from a file;
- which official tensor feeds each Keras variable of our ``FlexiUNet`` and how its layout
  changes (``official_names``, ``to_keras_array``): torch convolutions are
  ``(out, in, kh, kw)``, Keras ones ``(kh, kw, in, out)``; torch linears ``(out, in)``,
  Keras dense kernels ``(in, out)``; the attention's 1x1 ``conv1d``s ``(out, in, 1)``
  become dense kernels;
- how to read such a file safely (``read_state_dict``: ``torch.load(weights_only=True)``,
  never an arbitrary unpickle) and check it against a configuration
  (``check_state_dict``), naming the first key or shape at fault.

Importing a file into a run directory (the ``ssd-run import`` command) is in
``ssd_keras/importer.py``; this module does no I/O besides ``read_state_dict``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError


class OfficialCheckpointError(CheckpointError):
    """A file that is not an official state_dict, or one that does not fit the pipeline."""


# ------------------------------------------------------------------ expected tensors
def official_tensor_shapes(
    image_size: int,
    base_channels: int,
    channel_mult,
    num_res_blocks: int,
    attention_resolutions,
    in_channels: int = 3,
    out_channels: int = 3,
    num_classes: int = 0,
) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official FlexiUNet's state_dict, in its order, with its shape.

    The official network is ADM's UNet with scale-shift norm (its last decoder block
    included, although no path runs it) plus 1x1 adapters for every UNet resolution below
    the top whose channel count differs from the stem's; an adapter shared by several
    resolutions is listed under each (``adapters_in.<res>``, ``adapters_out.<res>``).
    A class-conditional network (``num_classes``) has ADM's ``label_emb.weight``
    (num_classes, 4 base_channels), with no "no class" row.
    """
    ch = [int(base_channels) * int(m) for m in channel_mult]
    n = len(ch)
    emb = 4 * int(base_channels)
    attention = {int(r) for r in attention_resolutions}
    shapes: dict[str, tuple[int, ...]] = {}

    def affine(prefix, shape_out, shape_in=()):
        shapes[f"{prefix}.weight"] = (shape_out, *shape_in)
        shapes[f"{prefix}.bias"] = (shape_out,)

    def conv(prefix, c_in, c_out, k):
        affine(prefix, c_out, (c_in, k, k))

    def norm(prefix, c):
        affine(prefix, c)

    def resblock(prefix, c_in, c_out):
        norm(f"{prefix}.in_layers.0", c_in)
        conv(f"{prefix}.in_layers.2", c_in, c_out, 3)
        affine(f"{prefix}.emb_layers.1", 2 * c_out, (emb,))
        norm(f"{prefix}.out_layers.0", c_out)
        conv(f"{prefix}.out_layers.3", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{prefix}.skip_connection", c_in, c_out, 1)

    def attention_block(prefix, c):
        norm(f"{prefix}.norm", c)
        affine(f"{prefix}.qkv", 3 * c, (c, 1))
        affine(f"{prefix}.proj_out", c, (c, 1))

    affine("time_embed.0", emb, (int(base_channels),))
    affine("time_embed.2", emb, (emb,))
    if num_classes:
        shapes["label_emb.weight"] = (int(num_classes), emb)
    conv("input_blocks.0.0", int(in_channels), ch[0], 3)
    skips, c, idx = [ch[0]], ch[0], 1
    for k in range(n):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{idx}.0", c, ch[k])
            c = ch[k]
            if image_size >> k in attention:
                attention_block(f"input_blocks.{idx}.1", c)
            skips.append(c)
            idx += 1
        if k != n - 1:
            conv(f"input_blocks.{idx}.0.op", c, c, 3)
            skips.append(c)
            idx += 1
    resblock("middle_block.0", c, c)
    attention_block("middle_block.1", c)
    resblock("middle_block.2", c, c)
    idx = 0
    for k in reversed(range(n)):
        for i in range(num_res_blocks + 1):
            resblock(f"output_blocks.{idx}.0", c + skips.pop(), ch[k])
            c = ch[k]
            sub = 1
            if image_size >> k in attention:
                attention_block(f"output_blocks.{idx}.1", c)
                sub = 2
            if k and i == num_res_blocks:
                conv(f"output_blocks.{idx}.{sub}.conv", c, c, 3)
            idx += 1
    norm("out.0", c)
    conv("out.2", ch[0], int(out_channels), 3)
    for k in range(1, n):
        if ch[k - 1] != ch[0]:
            conv(f"adapters_in.{image_size >> k}", ch[0], ch[k - 1], 1)
    for k in reversed(range(1, n)):  # in the order the decoder reaches the resolutions
        if ch[k] != ch[0]:
            conv(f"adapters_out.{image_size >> k}", ch[k], ch[0], 1)
    return shapes


def official_parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Parameters of the official network: shared adapters count once (as
    ``model.parameters()`` counts them), the never-run blocks count."""
    total, seen = 0, set()
    for key, shape in shapes.items():
        shared = _ADAPTER.match(key)
        if shared:  # one adapter per (side, weight shape), listed at several resolutions
            side, prefix = shared.group(1), key.rsplit(".", 1)[0]
            ident = (side, shapes[f"{prefix}.weight"], shared.group(2))
            if ident in seen:
                continue
            seen.add(ident)
        total += int(np.prod(shape))
    return total


_ADAPTER = re.compile(r"^(adapters_(?:in|out))\.\d+\.(weight|bias)$")


def model_tensor_shapes(model_cfg, image_size: int, in_channels: int = 3) -> dict:
    """``official_tensor_shapes`` of a pipeline's ``[model]`` section."""
    return official_tensor_shapes(
        image_size,
        model_cfg.base_channels,
        model_cfg.channel_mult,
        model_cfg.num_res_blocks,
        model_cfg.attention_resolutions,
        in_channels=in_channels,
        out_channels=in_channels,
        num_classes=getattr(model_cfg, "num_classes", 0),
    )


# ------------------------------------------------------------------ Keras <-> official
_NUMBERED = re.compile(
    r"^(input_blocks|output_blocks|middle_block|in_layers|out_layers|emb_layers|time_embed|out)"
    r"((?:_\d+)+)$"
)
_LEAF = {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias",
         "embeddings": "weight"}


def official_names(unet) -> dict[str, list[str]]:
    """Trainable Keras variable path -> the official keys it takes its value from
    (several for a shared adapter, which the official state_dict lists once per
    resolution)."""
    adapters = {}
    for side, table in (("in", unet.in_adapter), ("out", unet.out_adapter)):
        for level, layer in sorted(table.items()):
            adapters.setdefault(layer.name, []).append(
                f"adapters_{side}.{unet.image_size >> level}"
            )
    names = {}
    for variable in unet.model.trainable_variables:
        parts = variable.path.split("/")
        leaf = _LEAF.get(parts[-1])
        if leaf is None:
            raise OfficialCheckpointError(f"no official counterpart for variable {variable.path}")
        if parts[0] in adapters:
            names[variable.path] = [f"{p}.{leaf}" for p in adapters[parts[0]]]
            continue
        pieces = []
        for part in parts[:-1]:
            m = _NUMBERED.match(part)
            if m and pieces and pieces[-1] == m.group(1):  # "time_embed/time_embed_0"
                pieces[-1] = m.group(1) + m.group(2).replace("_", ".")
            elif m:
                pieces.append(m.group(1) + m.group(2).replace("_", "."))
            else:
                pieces.append(part)
        names[variable.path] = [".".join(pieces + [leaf])]
    return names


def to_keras_array(official: np.ndarray, keras_shape: tuple[int, ...], key: str = "") -> np.ndarray:
    """An official tensor (named ``key``) in the layout of the Keras variable of shape
    ``keras_shape``. An embedding table (``label_emb.weight``) keeps its layout."""
    a = np.asarray(official)
    if key.endswith("label_emb.weight"):
        pass
    elif len(keras_shape) == 4 and a.ndim == 4:  # conv (out, in, kh, kw) -> (kh, kw, in, out)
        a = a.transpose(2, 3, 1, 0)
    elif len(keras_shape) == 2 and a.ndim == 3 and a.shape[-1] == 1:  # conv1d 1x1 -> dense
        a = a[:, :, 0].T
    elif len(keras_shape) == 2 and a.ndim == 2:  # linear (out, in) -> dense (in, out)
        a = a.T
    return np.ascontiguousarray(a)


def from_keras_array(array: np.ndarray, official_shape: tuple[int, ...], key: str = "") -> np.ndarray:
    """The inverse of ``to_keras_array`` (for writing official-format files in tests)."""
    a = np.asarray(array)
    if key.endswith("label_emb.weight"):
        return a
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if a.ndim == 2 and len(official_shape) == 3:
        return np.ascontiguousarray(a.T[:, :, None])
    if a.ndim == 2:
        return np.ascontiguousarray(a.T)
    return a


# ------------------------------------------------------------------ reading and checking
def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of an official checkpoint as float32 numpy arrays, in file order.

    Reads with ``torch.load(weights_only=True)`` (tensors and plain containers only, no
    code runs). Accepts a bare state_dict, one wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``, and DistributedDataParallel's ``module.`` prefixes. Anything else
    is refused with an ``OfficialCheckpointError`` naming the file.
    """
    from .backend import load_torch_file, torch_tensor_to_numpy

    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such file")
    try:
        obj = load_torch_file(path)
    except Exception as exc:  # truncated zip, not a torch file, a pickle of code, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OfficialCheckpointError(
            f"{path}: not a readable PyTorch state_dict ({type(exc).__name__}: {first})"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "ema"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise OfficialCheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of tensor "
            f"names to tensors)"
        )
    tensors = {}
    for key, value in obj.items():
        array = torch_tensor_to_numpy(value)
        if not isinstance(key, str) or array is None:
            raise OfficialCheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; this is "
                f"not a state_dict"
            )
        tensors[key[len("module."):] if key.startswith("module.") else key] = array
    return tensors


def check_state_dict(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple], *,
                     source: str, pipeline: str) -> None:
    """Refuse ``tensors`` unless its keys and shapes are exactly ``expected``'s.

    The message names the first key (in the expected order) that is missing, unexpected
    or of another shape, with both shapes.
    """
    for key, shape in expected.items():
        if key not in tensors:
            extra = [k for k in tensors if k not in expected]
            hint = f"; the file has {extra[0]!r} instead" if extra else ""
            raise OfficialCheckpointError(
                f"{source}: has no tensor {key!r} (shape {shape}), which {pipeline} "
                f"needs{hint}"
            )
        got = tuple(tensors[key].shape)
        if got != tuple(shape):
            raise OfficialCheckpointError(
                f"{source}: tensor {key!r} has shape {got}, {pipeline} needs {tuple(shape)}"
            )
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise OfficialCheckpointError(
            f"{source}: tensor {extra[0]!r} is not part of the network {pipeline} "
            f"describes ({len(extra)} unexpected tensor(s))"
        )


def keras_arrays(unet, tensors: Mapping[str, np.ndarray], *, source: str) -> tuple[list, list]:
    """``(arrays, unused)``: one array per trainable Keras variable of ``unet`` (in their
    order) from a checked state_dict, and the official keys no path of ``unet`` runs."""
    names = official_names(unet)
    arrays, used = [], set()
    for variable in unet.model.trainable_variables:
        keys = names[variable.path]
        first = tensors[keys[0]]
        for other in keys[1:]:  # a shared adapter appears once per resolution
            if not np.array_equal(tensors[other], first):
                raise OfficialCheckpointError(
                    f"{source}: {keys[0]!r} and {other!r} are one shared adapter in the "
                    f"official network but hold different values"
                )
        array = to_keras_array(first, tuple(variable.shape), keys[0])
        if keys[0] == "label_emb.weight" and array.shape[0] + 1 == variable.shape[0]:
            raise OfficialCheckpointError(
                f"{source}: the official label_emb has {array.shape[0]} rows, no null-class "
                f"row; build the model with model.null_class = false to import it")
        if array.shape != tuple(variable.shape):
            raise OfficialCheckpointError(
                f"{source}: tensor {keys[0]!r} of shape {first.shape} does not fit variable "
                f"{variable.path} of shape {tuple(variable.shape)}"
            )
        arrays.append(array)
        used.update(keys)
    unused = [k for k in tensors if k not in used]
    return arrays, unused
