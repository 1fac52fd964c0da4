"""``ssd-run export``: a run's weights in files other tools read (docs/finetune.md).

- ``official``: a PyTorch state_dict that the official FlexiUNet loads with
  ``load_state_dict(strict=True)``: every tensor of ``official_tensor_shapes`` in its
  order and layout. What ssd_keras does not build is filled in: a shared adapter is
  written under every resolution the official state_dict lists it (copies of one
  tensor, as the official network's own state_dict holds them); the top level's last
  decoder block, which no path runs, is zeros. ``fill`` in the report lists both.
- ``safetensors``: our trainable variables keyed by their paths
  (``input_blocks_1_0/in_layers_2/kernel``), in Keras layout, with the resolved pipeline
  TOML, the step and the weights (EMA or raw) in the file's metadata, so that
  ``ssd-run import FILE.safetensors`` rebuilds the run.

Both write a short model card (``<out stem>.md``) beside the weights: pipeline, training
steps, data source, provenance, and the evaluation numbers of the run's ``metrics.json``
files, if any. Files are written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, atomic_write, atomic_write_text

FORMATS = ("official", "safetensors")
SAFETENSORS_FORMAT = "ssd_keras"  # metadata["format"] of our exports


class ExportError(CheckpointError):
    """A run that cannot be exported as asked, or a file that is not one of our exports."""


@dataclass
class ExportReport:
    out: Path
    card: Path
    format: str
    weights: str  # "ema" | "raw"
    step: int
    tensors: int
    fill: dict = field(default_factory=dict)  # official: {"copied": {key: from}, "zeros": [keys]}


# ------------------------------------------------------------------ official
def official_state(model, cfg) -> tuple[dict[str, np.ndarray], dict]:
    """``(state_dict as numpy arrays in official layout and order, fill)`` of ``model``'s
    trainable weights; ``fill`` says how the tensors we do not build were made."""
    from .official import from_keras_array, model_tensor_shapes, official_names

    shapes = model_tensor_shapes(cfg.model, cfg.process.image_size)
    names = official_names(model)
    state, copies, zeros = {}, {}, []
    for v in model.trainable_variables:
        array = np.asarray(_numpy(v))
        keys = names[v.path]
        for key in keys:  # a shared adapter: one copy per resolution the official lists
            state[key] = from_keras_array(array, shapes[key])
        if len(keys) > 1:
            copies.update({key: keys[0] for key in keys[1:]})
    for key, shape in shapes.items():  # what no path runs: the top level's last block
        if key not in state:
            state[key] = np.zeros(shape, np.float32)
            zeros.append(key)
    state = {key: state[key] for key in shapes}  # the official order
    for key, array in state.items():
        if tuple(array.shape) != tuple(shapes[key]):  # a bug, not a user error
            raise AssertionError(f"{key}: built {array.shape}, official {shapes[key]}")
    return state, {"copied": copies, "zeros": zeros}


# ------------------------------------------------------------------ safetensors
def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of one of our safetensors exports; an ``ExportError``
    names the file when it is unreadable or not ours."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file: one line, the file named
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"{path}: not a readable safetensors file ({first})") from None
    if meta.get("format") != SAFETENSORS_FORMAT or "pipeline" not in meta:
        raise ExportError(f"{path}: a safetensors file without ssd_keras's metadata (format, "
                          f"pipeline); only files written by ssd-run export can be imported")
    return tensors, meta


def pipeline_of(meta: dict, source: str):
    """The ``PipelineConfig`` a safetensors export carries."""
    import sys

    from .config import ConfigError, from_dict

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(meta["pipeline"])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: the pipeline in its metadata is no TOML ({exc})") from None
    return from_dict(data, f"{source} (metadata)")


# ------------------------------------------------------------------ the command
def export_run(run_dir, fmt: str, out, *, ema: bool = True, checkpoint=None) -> ExportReport:
    """Write the EMA (or raw) weights of ``run_dir``'s newest checkpoint (or ``checkpoint``)
    to ``out`` as ``fmt``, and the model card beside it."""
    from .runs import load_run, model_with_weights

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    cfg, groups, meta, path = load_run(run_dir, checkpoint)
    model = model_with_weights(cfg, groups, meta, ema=ema, where=f"checkpoint {path}")
    step = int(meta["step"])
    weights = "ema" if ema else "raw"
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist")
    fill = {}
    if fmt == "official":
        from .backend import save_torch_state_dict

        state, fill = official_state(model, cfg)
        atomic_write(out, lambda f: save_torch_state_dict(state, f))
        count = len(state)
    else:
        tensors = {v.path: np.asarray(_numpy(v)) for v in model.trainable_variables}
        metadata = {"format": SAFETENSORS_FORMAT, "format_version": "1", "weights": weights,
                    "step": str(step), "run": run_dir.name, "pipeline": cfg.to_toml()}
        data = safetensors_bytes(tensors, metadata)
        atomic_write(out, lambda f: f.write(data))
        count = len(tensors)
    card = out.with_suffix(".md")
    atomic_write_text(card, model_card(cfg, run_dir, meta, path, fmt=fmt, weights=weights,
                                       out=out, tensors=count, fill=fill))
    return ExportReport(out, card, fmt, weights, step, count, fill)


def model_card(cfg, run_dir: Path, meta: dict, checkpoint: Path, *, fmt: str, weights: str,
               out: Path, tensors: int, fill: dict) -> str:
    """A short markdown card: what the weights are, how they were trained, how they score."""
    d, p, m = cfg.data, cfg.process, cfg.model
    data = {"digits": "scikit-learn's handwritten digits (bundled)",
            "folder": f"image folder `{d.path}`" + (f" (split file `{d.split_file}`)" if d.split_file else ""),
            "tfds": f"tensorflow-datasets `{d.tfds_name}` split `{d.tfds_split}`"}.get(d.source, d.source)
    if d.limit:
        data += f", first {d.limit} images"
    lines = [
        f"# {run_dir.name}: Scale Space Diffusion weights ({weights.upper() if weights == 'ema' else 'raw'})",
        "",
        f"- file: `{out.name}` ({'PyTorch state_dict of the official FlexiUNet' if fmt == 'official' else 'safetensors, keys = ssd_keras variable paths, Keras layout'}), {tensors} tensors",
        f"- written by ssd_keras from `{checkpoint}` (step {meta['step']} of train.steps = {cfg.train.steps})",
        f"- process: {p.image_size} px, {p.levels} levels {cfg.resolutions}, T = {p.timesteps}, "
        f"{p.noise_schedule} noise, {p.resolution_schedule}, target {cfg.loss.target}",
        f"- network: base {m.base_channels}, channel_mult {list(m.channel_mult)}, "
        f"{m.num_res_blocks} res blocks, attention at {list(m.attention_resolutions)}",
        f"- data: {data}",
        f"- training: batch {cfg.train.batch_size}, lr {cfg.optimizer.lr:g}, EMA rate {cfg.ema.rate:g}, "
        f"seed {cfg.run.seed}",
    ]
    init = meta.get("init_from") or _imported(run_dir)
    if init:
        lines.append(f"- started from `{init.get('source')}` (SHA-256 {init.get('sha256', '?')[:16]}...)")
    if fill.get("zeros") or fill.get("copied"):
        lines += ["", f"Official layout: {len(fill.get('copied', {}))} tensors are copies of a "
                  "shared adapter (listed once per resolution, as the official state_dict does); "
                  f"{len(fill.get('zeros', []))} tensors of the top level's last decoder block, "
                  "which no path runs, are zeros (docs/finetune.md)."]
    evals = sorted((run_dir / "eval").glob("*/metrics.json")) if (run_dir / "eval").is_dir() else []
    if evals:
        lines += ["", "## Evaluation", "", "| settings | samples | FID | FD-pix8 | KID-pix8 |",
                  "| --- | --- | --- | --- | --- |"]
        for f in evals:
            try:
                r = json.loads(f.read_text())
                mm = r.get("metrics", {})
                free = mm.get("weights_free", {})
                fid = f"{mm['fid']:.2f}" if "fid" in mm else "-"
                kid = free.get("kid_pix8", {}).get("mean")
                lines.append(f"| {f.parent.name} | {r.get('num_samples', '?')} | {fid} | "
                             f"{free.get('fd_pix8', float('nan')):.4f} | "
                             f"{'-' if kid is None else f'{kid:.5f}'} |")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                lines.append(f"| {f.parent.name} | unreadable metrics.json | | | |")
    else:
        lines += ["", "No evaluation yet (`ssd-run evaluate RUN` writes metrics.json)."]
    lines += ["", "## Pipeline", "", "```toml", cfg.to_toml().strip(), "```", ""]
    return "\n".join(lines)


def _imported(run_dir: Path):
    try:
        return json.loads((run_dir / "import.json").read_text())
    except (OSError, ValueError):
        return None


def _numpy(variable):
    from keras import ops

    return ops.convert_to_numpy(variable.value)
