"""``train.init_from``: a fresh run starts from weights trained elsewhere (docs/finetune.md).

One job: read the source once, match its tensors to the new run's trainable variables,
and assign them. The source may be

- a run (its directory, or its name under ``run.output_dir``): its newest good checkpoint;
- one of our checkpoint files (``ckpt_*.npz``);
- an official PyTorch state_dict (``.pt``/``.pth``), read and checked as ``ssd-run import``
  reads it (``official.py``);
- a ``.safetensors`` file written by ``ssd-run export --format safetensors``.

Our files hold the EMA and the raw weights (``train.init_weights`` picks one; an official
file or an export holds one set, which serves for both); tensors are matched by variable
path (``input_blocks_1_0/in_layers_2/kernel``), official ones through the official names.
The model and its EMA both start from the chosen weights; the optimizer, the step (0),
the data position and the RNG are a fresh run's. Strict (``train.init_strict``, the
default): every trainable variable must get a tensor of its shape and every tensor of
the source must find its variable, else ``InitError`` names the first one at fault with
both shapes. Not strict: what fits is loaded, the rest is listed (``InitReport``).

The record (resolved path, SHA-256, kind, weights, what was not loaded) goes into every
checkpoint's metadata and ``init_from.json`` in the run directory; a resumed run restores
its checkpoint and never reads the source again.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, latest_good_checkpoint, load_checkpoint

KINDS = ("run", "checkpoint", "official", "safetensors")
_SEED_STATE = "seed_generator_state/"


class InitError(CheckpointError):
    """``train.init_from`` names no usable source, or its tensors do not fit the network."""


@dataclass
class InitReport:
    """What ``init_from`` did: JSON-able (``asdict``), stored with the run."""

    source: str  # the resolved file (a run: its checkpoint)
    sha256: str
    kind: str  # one of KINDS
    weights: str  # "ema" | "raw" (what was asked for; official/safetensors hold one set)
    strict: bool
    step: int | None  # the source's training step, if it says
    loaded: int = 0  # variables set from the source
    kept: list[str] = field(default_factory=list)  # "path: why" (not strict only)
    ignored: list[str] = field(default_factory=list)  # source tensors no variable takes

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"initialized from {self.source} ({self.kind}, {self.weights} weights"
                + (f", step {self.step}" if self.step is not None else "")
                + f"): {self.loaded} tensors loaded")
        if self.kept:
            text += f"; {len(self.kept)} kept from initialization: " + "; ".join(self.kept[:6])
            text += " ..." if len(self.kept) > 6 else ""
        if self.ignored:
            text += f"; {len(self.ignored)} source tensors ignored: " + ", ".join(self.ignored[:6])
            text += " ..." if len(self.ignored) > 6 else ""
        return text


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ the source
def resolve_source(spec: str, runs_dir: str | Path) -> tuple[Path, str]:
    """``(file, kind)`` of ``train.init_from = spec``: a run resolves to its newest good
    checkpoint. An ``InitError`` names the value when nothing usable is there."""
    where = f"train.init_from = {spec!r}"
    path = Path(spec).expanduser()
    if not path.exists() and not Path(spec).is_absolute() and (Path(runs_dir) / spec).is_dir():
        path = Path(runs_dir) / spec  # a run name
    if path.is_dir():
        ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else None
        found = latest_good_checkpoint(ckpts) if ckpts else None
        if found is None:
            raise InitError(f"{where}: {path} is no run with a readable checkpoint "
                            f"(no {path / 'checkpoints'}/ckpt_*.npz)")
        return found[0].resolve(), "run"
    if not path.is_file():
        raise InitError(f"{where}: no such file, run directory or run under {runs_dir}/")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return path.resolve(), "checkpoint"
    if suffix in (".pt", ".pth"):
        return path.resolve(), "official"
    if suffix == ".safetensors":
        return path.resolve(), "safetensors"
    raise InitError(f"{where}: {path.name} is none of a run, a checkpoint (.npz), an official "
                    f"state_dict (.pt, .pth) or an export (.safetensors)")


def read_named_weights(path: Path, kind: str, weights: str) -> tuple[dict, int | None]:
    """``({variable path: array}, step)`` of one of our files (checkpoint or export)."""
    if kind == "safetensors":
        from .export import read_safetensors

        tensors, meta = read_safetensors(path)
        step = meta.get("step")
        return tensors, int(step) if step not in (None, "") else None
    groups, meta = load_checkpoint(path)
    group = "ema" if weights == "ema" else "model"
    names = meta.get("names", {}).get(group)
    if group not in groups or names is None:
        raise InitError(f"{path}: holds no {group} weights")
    tensors = {n: a for n, a in zip(names, groups[group]) if not n.startswith(_SEED_STATE)}
    return tensors, int(meta["step"]) if "step" in meta else None


# ------------------------------------------------------------------ matching
def match_named(variables, tensors: dict, *, strict: bool, source: str, hint: bool = True):
    """``(arrays, kept, ignored)``: per variable the source array or None (kept at its
    initial value), the variables kept with why, the source tensors nothing took.
    ``hint``: strict errors mention ``train.init_strict``."""
    arrays, kept = [], []
    taken = set()
    for v in variables:
        shape = tuple(v.shape)
        a = tensors.get(v.path)
        if a is None:
            why = f"{v.path} {shape}: not in the source"
        elif tuple(a.shape) != shape:
            why = f"{v.path}: the source's has shape {tuple(a.shape)}, this network's {shape}"
            taken.add(v.path)
        else:
            arrays.append(np.asarray(a, dtype=np.float32))
            taken.add(v.path)
            continue
        if strict:
            raise InitError(f"{source}: tensor {why}" + (
                " (train.init_strict = false loads every tensor that fits and lists the rest)"
                if hint else ""))
        arrays.append(None)
        kept.append(why)
    ignored = [k for k in tensors if k not in taken]
    if strict and ignored:
        raise InitError(f"{source}: tensor {ignored[0]} {tuple(tensors[ignored[0]].shape)} "
                        f"is not part of this network ({len(ignored)} such tensor(s)"
                        + ("; train.init_strict = false ignores them)" if hint else ")"))
    return arrays, kept, ignored


def match_official(unet, cfg, tensors: dict, *, strict: bool, source: str):
    """``match_named`` for an official state_dict: strict runs the importer's checks
    (every key and shape of the pipeline's official network, shared adapters equal);
    otherwise each variable takes its official tensor if the shape fits."""
    from .official import (check_state_dict, keras_arrays, model_tensor_shapes, official_names,
                           to_keras_array)

    if strict:
        try:
            check_state_dict(tensors, model_tensor_shapes(cfg.model, cfg.process.image_size),
                             source=source, pipeline="this pipeline")
        except CheckpointError as exc:
            raise InitError(f"{exc} (train.init_strict = false loads every tensor that fits "
                            f"and lists the rest)") from None
        arrays, unused = keras_arrays(unet, tensors, source=source)
        return arrays, [], []  # unused: tensors no path runs, expected in an official file
    names = official_names(unet)
    expected = model_tensor_shapes(cfg.model, cfg.process.image_size)
    arrays, kept, taken = [], [], set()
    for v in unet.model.trainable_variables:
        keys = names[v.path]
        a = tensors.get(keys[0])
        want = expected.get(keys[0])
        if a is None:
            kept.append(f"{v.path} {tuple(v.shape)}: not in the source ({keys[0]})")
            arrays.append(None)
            continue
        taken.update(k for k in keys if k in tensors)
        converted = to_keras_array(a, tuple(v.shape))
        if want is not None and tuple(a.shape) != tuple(want) or converted.shape != tuple(v.shape):
            kept.append(f"{v.path}: the source's {keys[0]} has shape {tuple(a.shape)}, this "
                        f"network's {tuple(want) if want else tuple(v.shape)}")
            arrays.append(None)
            continue
        arrays.append(converted.astype(np.float32, copy=False))
    # official tensors that no path runs are expected; others are listed
    ignored = [k for k in tensors if k not in taken and k not in expected]
    return arrays, kept, ignored


# ------------------------------------------------------------------ the whole thing
def initialize(model, cfg) -> tuple[list, InitReport]:
    """Read ``cfg.train.init_from`` and assign its weights to ``model``'s trainable
    variables; returns ``(assigned flags, report)``. Raises ``InitError`` (nothing
    assigned) when the source is unusable or, strict, does not fit."""
    t = cfg.train
    path, kind = resolve_source(t.init_from, cfg.run.output_dir)
    source = str(path)
    if kind == "official":
        from .importer import file_name_hints
        from .official import read_state_dict

        try:
            tensors = read_state_dict(path)
        except CheckpointError as exc:
            raise InitError(f"train.init_from: {exc}") from None
        arrays, kept, ignored = match_official(model, cfg, tensors, strict=t.init_strict,
                                               source=source)
        step = file_name_hints(path).get("step")
    else:
        try:
            tensors, step = read_named_weights(path, kind, t.init_weights)
        except CheckpointError as exc:
            raise InitError(f"train.init_from: {exc}") from None
        arrays, kept, ignored = match_named(model.trainable_variables, tensors,
                                            strict=t.init_strict, source=source)
    for v, a in zip(model.trainable_variables, arrays):
        if a is not None:
            v.assign(a)
    report = InitReport(source=source, sha256=sha256_of(path), kind=kind,
                        weights=t.init_weights, strict=t.init_strict, step=step,
                        loaded=sum(a is not None for a in arrays), kept=kept, ignored=ignored)
    return [a is not None for a in arrays], report
