"""``ssd-run import``: an official SSD checkpoint becomes a run directory.

The released checkpoints (``ssd_64res_celeba_4levels_ema_0.9999_1000000.pt`` and
siblings) are EMA weights of the official FlexiUNet as a plain PyTorch state_dict. A
state_dict carries no configuration, and the network's weights do not depend on the
number of SSD levels, so the pipeline is found from the tensor shapes (image size,
widths, blocks, attention) among the bundled pipelines, narrowed by what the file name
says (``64res``, ``4levels``, ``celeba``), or named with ``--pipeline``.

The run directory holds what a trained run holds for sampling and evaluation: the
resolved ``config.toml`` and a checkpoint whose model and EMA weights are the imported
ones, plus ``import.json`` (source file, its SHA-256, the tensors no path runs). It is
written to a temporary directory and renamed into place, so a failure leaves nothing.
See docs/official_checkpoints.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import checkpoint_path, save_checkpoint, variable_names
from .config import ConfigError, PipelineConfig, load_pipeline
from .official import (
    OfficialCheckpointError,
    check_state_dict,
    keras_arrays,
    model_tensor_shapes,
    official_parameter_count,
    read_state_dict,
)

BUNDLED_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
_DATASETS = ("celeba", "imagenet", "cifar")


@dataclass
class ImportReport:
    run_dir: Path
    pipeline: str
    reason: str
    official_parameters: int
    run_parameters: int
    unused: list[str] = field(default_factory=list)
    step: int = 0


def file_name_hints(path: Path) -> dict:
    """What a released checkpoint's name says: ``64res``, ``4levels``, a dataset, a step."""
    name = path.name.lower()
    hints = {}
    if m := re.search(r"(\d+)res", name):
        hints["image_size"] = int(m.group(1))
    if m := re.search(r"(\d+)levels?", name):
        hints["levels"] = int(m.group(1))
    for dataset in _DATASETS:
        if dataset in name:
            hints["dataset"] = dataset
    if m := re.search(r"_(\d+)\.pt[h]?$", name):
        hints["step"] = int(m.group(1))
    return hints


def _shapes_of(cfg: PipelineConfig) -> dict:
    return model_tensor_shapes(cfg.model, cfg.process.image_size)


def find_pipeline(tensors: dict, checkpoint: Path, directory: Path = BUNDLED_PIPELINES):
    """``(cfg, reason)``: the one bundled pipeline whose network has exactly these tensor
    shapes and that fits the file name's hints; a clear error when none or several do."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    fitting = []
    for path in sorted(directory.glob("*.toml")):
        try:
            cfg = load_pipeline(path)
        except ConfigError:
            continue
        if _shapes_of(cfg) == shapes:
            fitting.append((path, cfg))
    if not fitting:
        raise OfficialCheckpointError(
            f"{checkpoint}: no pipeline in {directory} describes a network with these "
            f"{len(tensors)} tensors; name one with --pipeline FILE (its mismatch is then "
            f"reported key by key)"
        )
    hints = file_name_hints(checkpoint)
    narrowed = [
        (path, cfg) for path, cfg in fitting
        if hints.get("image_size", cfg.process.image_size) == cfg.process.image_size
        and hints.get("levels", cfg.process.levels) == cfg.process.levels
        and hints.get("dataset", "") in path.stem
    ]
    if len(narrowed) == 1:
        path, cfg = narrowed[0]
        said = ", ".join(f"{k} {v}" for k, v in hints.items() if k != "step")
        return cfg, f"{path.name}: the tensor shapes" + (f" and the file name ({said})" if said else "")
    names = ", ".join(p.name for p, _ in (narrowed or fitting))
    raise OfficialCheckpointError(
        f"{checkpoint}: the network fits several pipelines ({names}); the number of "
        f"levels is not in the weights, so name one with --pipeline FILE"
    )


def class_conditional(cfg: PipelineConfig, tensors: dict, checkpoint: Path) -> PipelineConfig:
    """``cfg`` fitted to a class-conditional official file (one with ``label_emb.weight``):
    ``model.num_classes`` from its rows, ``model.null_class = false`` (ADM's embedding has
    no "no class" row, so guidance is refused: ``sampler.guidance = 1``,
    ``train.cond_drop_prob = 0``). An unconditional file leaves ``cfg`` as it is."""
    emb = tensors.get("label_emb.weight")
    if emb is None:
        return cfg
    rows = int(emb.shape[0])
    if cfg.model.num_classes not in (0, rows):
        raise OfficialCheckpointError(
            f"{checkpoint}: label_emb.weight has {rows} classes, the pipeline's "
            f"model.num_classes = {cfg.model.num_classes}")
    return cfg.replace(model={"num_classes": rows, "null_class": False},
                       train={"cond_drop_prob": 0.0}, sampler={"guidance": 1.0},
                       source=f"{cfg.source} (class-conditional: {checkpoint.name})")


def import_checkpoint(checkpoint, *, pipeline=None, name: str | None = None,
                      runs_dir=Path("runs")) -> ImportReport:
    """Turn an official state_dict into ``runs_dir/<name>/`` (see the module docstring)."""
    from .builders import build_model
    from .runs import CHANNELS

    checkpoint = Path(checkpoint)
    if checkpoint.suffix.lower() == ".safetensors":  # an ssd-run export: it names its pipeline
        return import_safetensors(checkpoint, pipeline=pipeline, name=name, runs_dir=runs_dir)
    tensors = read_state_dict(checkpoint)
    if pipeline is not None:
        cfg = class_conditional(load_pipeline(pipeline), tensors, checkpoint)
        reason = f"{Path(pipeline).name}: named with --pipeline"
        check_state_dict(tensors, _shapes_of(cfg), source=str(checkpoint), pipeline=str(pipeline))
    else:
        cfg, reason = find_pipeline(tensors, checkpoint)
        cfg = class_conditional(cfg, tensors, checkpoint)
    cfg, run_dir = _new_run(cfg, name or checkpoint.stem, runs_dir)

    model = build_model(cfg, precision="float32", channels=CHANNELS)
    arrays, unused = keras_arrays(model, tensors, source=str(checkpoint))
    for variable, array in zip(model.trainable_variables, arrays):
        variable.assign(array)
    step = file_name_hints(checkpoint).get("step", 0)
    official_count = official_parameter_count({k: tuple(v.shape) for k, v in tensors.items()})
    record = {
        "source": str(checkpoint.resolve()),
        "sha256": _sha256(checkpoint),
        "pipeline": reason,
        "official_parameters": official_count,
        "run_parameters": int(model.count_params()),
        "never_run": unused,
    }
    write_run(model, cfg, step, record, run_dir, header=f"imported from {checkpoint.name} ({reason})")
    return ImportReport(run_dir, reason.split(":")[0], reason, official_count,
                        int(model.count_params()), unused, step)


def _new_run(cfg, run_name: str, runs_dir):
    """``(cfg named run_name in runs_dir, its run directory)``, refused if that exists."""
    cfg = cfg.replace(run={"name": run_name, "output_dir": str(runs_dir)})
    run_dir = Path(runs_dir) / run_name
    if run_dir.exists():
        raise OfficialCheckpointError(
            f"{run_dir} already exists; choose another name with --name (nothing was changed)"
        )
    return cfg, run_dir


def write_run(model, cfg: PipelineConfig, step: int, record: dict, run_dir: Path, *,
              header: str) -> None:
    """Write ``run_dir`` (``config.toml``, ``import.json``, one checkpoint whose model and
    EMA weights are ``model``'s) through a temporary directory renamed into place."""
    from keras import ops

    groups = {
        "model": [ops.convert_to_numpy(v.value) for v in model.variables],
        "ema": [ops.convert_to_numpy(v.value) for v in model.trainable_variables],
    }
    meta = {"config": cfg.to_dict(), "imported_from": record}
    names = {"model": variable_names(model.variables),
             "ema": variable_names(model.trainable_variables)}
    runs_dir, run_name = run_dir.parent, run_dir.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    staging = runs_dir / f".tmp-import-{run_name}-{os.getpid()}"
    try:
        (staging / "checkpoints").mkdir(parents=True)
        (staging / "config.toml").write_text(cfg.to_toml(header=header))
        (staging / "import.json").write_text(json.dumps(record, indent=2) + "\n")
        save_checkpoint(staging / "checkpoints", step, groups, meta, names)
        os.rename(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    assert checkpoint_path(run_dir / "checkpoints", step).is_file()


def import_safetensors(path: Path, *, pipeline=None, name: str | None = None,
                       runs_dir=Path("runs")) -> ImportReport:
    """A safetensors file written by ``ssd-run export`` becomes a run: its metadata holds
    the pipeline (``--pipeline`` may name another that fits), its tensors are keyed by
    our variable paths and must fit them exactly (the first one at fault is named)."""
    from .builders import build_model
    from .export import pipeline_of, read_safetensors
    from .finetune import match_named
    from .runs import CHANNELS

    tensors, meta = read_safetensors(path)
    if pipeline is not None:
        cfg, reason = load_pipeline(pipeline), f"{Path(pipeline).name}: named with --pipeline"
    else:
        cfg, reason = pipeline_of(meta, str(path)), f"{path.name}: the pipeline in its metadata"
    cfg, run_dir = _new_run(cfg, name or path.stem, runs_dir)
    model = build_model(cfg, precision="float32", channels=CHANNELS)
    arrays, _, _ = match_named(model.trainable_variables, tensors, strict=True, source=str(path),
                              hint=False)
    for variable, array in zip(model.trainable_variables, arrays):
        variable.assign(array)
    step = int(meta.get("step") or 0)
    record = {"source": str(path.resolve()), "sha256": _sha256(path), "pipeline": reason,
              "weights": meta.get("weights", ""),
              "official_parameters": official_parameter_count(_shapes_of(cfg)),
              "run_parameters": int(model.count_params()), "never_run": []}
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    write_run(model, cfg, step, record, run_dir, header=f"imported from {path.name} ({reason})")
    return ImportReport(run_dir, reason.split(":")[0], reason, record["official_parameters"],
                        int(model.count_params()), [], step)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def summarize_unused(unused: list[str]) -> str:
    """``output_blocks.17.0 (12 tensors), adapters_in.8 (2 tensors)``: by module."""
    groups: dict[str, int] = {}
    for key in unused:
        parts = key.split(".")
        module = ".".join(parts[:3]) if parts[0] in ("input_blocks", "output_blocks") else ".".join(parts[:2])
        groups[module] = groups.get(module, 0) + 1
    return ", ".join(f"{m} ({n} tensor{'s' if n > 1 else ''})" for m, n in groups.items())
