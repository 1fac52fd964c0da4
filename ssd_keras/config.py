"""Pipeline files (TOML) -> frozen, typed, validated dataclasses.

A pipeline file has one table per section (``[run]``, ``[data]``, ``[process]``,
``[model]``, ``[loss]``, ``[optimizer]``, ``[ema]``, ``[train]``, ``[sampler]``, ``[eval]``). Every
key is optional except ``process.image_size`` and ``process.levels``. The field names of
the section dataclasses equal the keyword arguments of the modules that consume them, so
a section is handed over as ``fn(**dataclasses.asdict(cfg.section))``.

Entry points:

- :func:`load_pipeline` reads a file, applies ``--set section.key=value`` overrides and
  validates; :func:`from_dict` does the same for an already parsed mapping.
- :meth:`PipelineConfig.to_dict` / :meth:`PipelineConfig.to_toml` /
  :meth:`PipelineConfig.save` give the resolved config (saved with every run; loading
  the saved file gives an equal config).
- :func:`incompatible_keys` names the ``section.key`` s that differ between two configs
  in a way that changes the model or the process (used to refuse a resume).

Every problem raises :class:`ConfigError` (a ``ValueError``) whose message names the
file, the key as ``section.key`` and the offending value, e.g.
``pipelines/x.toml: process.levels = 7: must be <= len(model.channel_mult) = 4 ...``.

Resolved defaults that depend on other keys: ``run.name`` defaults to the file's stem,
``sampler.steps`` to ``process.timesteps`` (1000 by default) when not given.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "RunConfig",
    "DataConfig",
    "ProcessConfig",
    "ModelConfig",
    "LossConfig",
    "OptimizerConfig",
    "EMAConfig",
    "TrainConfig",
    "SamplerConfig",
    "EvalConfig",
    "PipelineConfig",
    "SECTIONS",
    "MODEL_FINGERPRINT_KEYS",
    "load_pipeline",
    "from_dict",
    "parse_override",
    "incompatible_keys",
    "feature_resolutions",
]


class ConfigError(ValueError):
    """An invalid pipeline configuration. ``errors`` holds one line per problem."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors) if errors else [message]


# --------------------------------------------------------------------------------------
# Field declarations. Each field's metadata says what a valid value is; the checks run
# in PipelineConfig.__post_init__ so that every construction path is validated.
# --------------------------------------------------------------------------------------


def _opt(default, *, choices=None, gt=None, ge=None, lt=None, le=None, nonempty=False,
         item_gt=None, doc=""):
    meta = {"choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le,
            "nonempty": nonempty, "item_gt": item_gt, "doc": doc}
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=meta)
    return field(default=default, metadata=meta)


def _req(**kw):
    """A required field (no default)."""
    f = _opt(None, **kw)
    return field(metadata=f.metadata)


class _Section:
    """Shared behaviour of the section dataclasses: light normalization only.

    Lists become tuples (hashable, frozen) and ints become floats in float fields.
    Type and range errors are reported by :class:`PipelineConfig` validation.
    """

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "tuple[int, ...]" and isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
            elif f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))


@dataclass(frozen=True)
class RunConfig(_Section):
    name: str = _opt("run", nonempty=True, doc="run directory runs/<name>/ (default: file stem)")
    output_dir: str = _opt("runs", nonempty=True)
    seed: int = _opt(0, ge=0)


@dataclass(frozen=True)
class DataConfig(_Section):
    source: str = _opt("digits", choices=("digits", "folder", "tfds"))
    path: str = _opt("", doc="folder root (source='folder'); relative to the current dir")
    split_file: str = _opt("", doc="optional file listing the images to use (folder)")
    tfds_name: str = _opt("")
    tfds_split: str = _opt("train", nonempty=True)
    tfds_data_dir: str = _opt("")
    image_key: str = _opt("image", nonempty=True)
    random_flip: bool = _opt(True)
    cache: bool = _opt(False)
    on_bad_image: str = _opt("skip", choices=("skip", "error"))
    small_images: str = _opt("upscale", choices=("upscale", "skip", "error"))
    num_workers: int = _opt(2, ge=0)
    limit: int = _opt(0, ge=0, doc="0 = all images")


@dataclass(frozen=True)
class ProcessConfig(_Section):
    image_size: int = _req(gt=0)
    levels: int = _req(ge=1, doc="1 = DDPM")
    timesteps: int = _opt(1000, ge=2)
    noise_schedule: str = _opt("linear", choices=("linear", "cosine"))
    resolution_schedule: str = _opt("ConvexDecay-0.5", nonempty=True)

    @property
    def resolutions(self) -> list[int]:
        """Ascending level resolutions ``[image_size / 2^(levels-1), ..., image_size]``."""
        return [self.image_size // 2 ** i for i in reversed(range(self.levels))]

    @property
    def r_min(self) -> int:
        return self.image_size // 2 ** (self.levels - 1)


@dataclass(frozen=True)
class ModelConfig(_Section):
    base_channels: int = _opt(128, gt=0)
    channel_mult: tuple[int, ...] = _opt((1, 2, 3, 4), nonempty=True, item_gt=0)
    num_res_blocks: int = _opt(2, ge=1)
    attention_resolutions: tuple[int, ...] = _opt((16, 8), item_gt=0)
    num_heads: int = _opt(4, ge=1)
    num_head_channels: int = _opt(-1, doc="-1 = use num_heads; else channels per head")
    dropout: float = _opt(0.1, ge=0.0, lt=1.0)
    full_res_change_via_upsample: bool = _opt(True)


@dataclass(frozen=True)
class LossConfig(_Section):
    target: str = _opt("x0", choices=("x0", "eps"))
    min_snr_gamma: float = _opt(5.0, ge=0.0, doc="weight min(SNR, gamma); 0 = plain L_simple")


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    lr: float = _opt(1e-4, gt=0.0)
    weight_decay: float = _opt(0.0, ge=0.0)
    beta1: float = _opt(0.9, ge=0.0, lt=1.0)
    beta2: float = _opt(0.999, ge=0.0, lt=1.0)
    epsilon: float = _opt(1e-8, gt=0.0)
    grad_clip: float = _opt(1.0, ge=0.0, doc="global-norm clipping; 0 = off")


@dataclass(frozen=True)
class EMAConfig(_Section):
    rate: float = _opt(0.9999, ge=0.0, lt=1.0)
    start_step: int = _opt(0, ge=0)


@dataclass(frozen=True)
class TrainConfig(_Section):
    batch_size: int = _opt(128, gt=0)
    steps: int = _opt(500000, gt=0)
    precision: str = _opt("float32", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    log_every: int = _opt(50, gt=0)
    checkpoint_every: int = _opt(5000, gt=0)
    sample_every: int = _opt(10000, ge=0, doc="0 = never")
    keep_checkpoints: int = _opt(3, ge=1)
    milestones: tuple[int, ...] = _opt((), item_gt=0, doc="steps whose checkpoints are kept")
    on_nonfinite: str = _opt("stop", choices=("stop", "skip"))


@dataclass(frozen=True)
class SamplerConfig(_Section):
    steps: int = _opt(1000, ge=2, doc="respaced K (docs/math.md section 7); default: process.timesteps")
    noise: str = _opt("exact", choices=("exact", "lanczos"))
    lanczos_iterations: int = _opt(40, ge=1)
    clip: bool = _opt(True)
    variance: str = _opt("fixed_small", choices=("fixed_small", "fixed_large"))
    method: str = _opt("ancestral", choices=("ancestral", "ddim"),
                       doc="ddim: marginal-preserving few-step sampler (docs/sampling.md)")
    eta: float = _opt(0.0, ge=0.0, le=1.0, doc="ddim only: 0 = deterministic where possible, "
                                              "1 = the ancestral posterior")
    num_images: int = _opt(16, gt=0)
    batch_size: int = _opt(16, gt=0)
    seed: int = _opt(0, ge=0)


@dataclass(frozen=True)
class EvalConfig(_Section):
    """``ssd-run evaluate`` (docs/evaluation.md)."""

    num_samples: int = _opt(1000, ge=2, doc="samples to draw (the paper's FIDs: 50000)")
    inception_weights: str = _opt("", doc="weights-inception-2015-12-05-6726825d.pth: adds FID, "
                                          "KID, precision/recall")
    reference: str = _opt("", doc="reference statistics .npz (mu, sigma[, features]); "
                                  "default: the run's data, computed once and cached")
    reference_images: int = _opt(50000, ge=2, doc="data images in the reference (at most all)")
    chunk_size: int = _opt(0, ge=0, doc="samples per resumable chunk, a multiple of "
                                        "sampler.batch_size; 0 = about 500")
    cache_dir: str = _opt("", doc="reference cache; default: $XDG_CACHE_HOME/ssd_keras")


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "process": ProcessConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "ema": EMAConfig,
    "train": TrainConfig,
    "sampler": SamplerConfig,
    "eval": EvalConfig,
}

#: ``section.key`` s whose change alters the network or the diffusion process; a run
#: must not be resumed with any of them changed.
MODEL_FINGERPRINT_KEYS: tuple[str, ...] = tuple(
    [f"process.{f.name}" for f in dataclasses.fields(ProcessConfig)]
    + [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    + ["loss.target"]
)


def feature_resolutions(image_size: int, channel_mult: Iterable[int]) -> list[int]:
    """Feature-map sizes of the UNet's levels, descending: ``[image_size, /2, ...]``."""
    return [image_size // 2 ** i for i in range(len(tuple(channel_mult)))]


# --------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineConfig:
    process: ProcessConfig
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: where the config came from (for error messages); not part of equality.
    source: str = field(default="<config>", compare=False, repr=False)

    def __post_init__(self):
        errors = _validate(self)
        if errors:
            raise _error(self.source, errors)

    # ---- views -------------------------------------------------------------------
    @property
    def resolutions(self) -> list[int]:
        return self.process.resolutions

    @property
    def feature_resolutions(self) -> list[int]:
        return feature_resolutions(self.process.image_size, self.model.channel_mult)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    def get(self, dotted: str) -> Any:
        """Value of ``"section.key"``."""
        section, _, key = dotted.partition(".")
        return getattr(getattr(self, section), key)

    # ---- serialization -----------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (lists, not tuples) in section order."""
        out = {}
        for name, sec in self.sections().items():
            out[name] = {f.name: _plain(getattr(sec, f.name)) for f in dataclasses.fields(sec)}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>", *,
                  overrides: Iterable[str] = (), default_name: str | None = None
                  ) -> "PipelineConfig":
        return from_dict(d, source, overrides=overrides, default_name=default_name)

    def to_toml(self, header: str | None = None) -> str:
        """The resolved config as TOML text (every key written explicitly)."""
        lines = []
        if header is None:
            header = f"Resolved pipeline config of run '{self.run.name}' (written by ssd_keras)."
        for h in header.splitlines():
            lines.append(f"# {h}".rstrip())
        for name, values in self.to_dict().items():
            lines.append("")
            lines.append(f"[{name}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_toml(), encoding="utf-8")
        return path

    # ---- resume compatibility ----------------------------------------------------
    @staticmethod
    def model_fingerprint_keys() -> list[str]:
        return list(MODEL_FINGERPRINT_KEYS)

    def model_fingerprint(self) -> dict[str, Any]:
        return {k: _plain(self.get(k)) for k in MODEL_FINGERPRINT_KEYS}

    def replace(self, **sections: Any) -> "PipelineConfig":
        """``dataclasses.replace`` that accepts dicts of changed keys per section::

            cfg.replace(train={"steps": 10}, sampler={"steps": 20})
        """
        new = {}
        for name, change in sections.items():
            if name not in SECTIONS:
                raise _error(self.source, [_unknown_section_msg(name)])
            if isinstance(change, Mapping):
                unknown = [k for k in change if k not in _field_names(SECTIONS[name])]
                if unknown:
                    raise _error(self.source, [_unknown_key_msg(name, unknown[0], change[unknown[0]])])
                change = dataclasses.replace(getattr(self, name), **change)
            new[name] = change
        return dataclasses.replace(self, **new)


def incompatible_keys(old: PipelineConfig | Mapping, new: PipelineConfig | Mapping) -> list[str]:
    """The ``section.key`` s (process.*, model.*, loss.target) where ``old`` and ``new``
    differ: a checkpoint of ``old`` cannot be resumed or sampled as ``new``.

    Either argument may be a :class:`PipelineConfig` or its ``to_dict()`` form.
    """
    if not isinstance(old, PipelineConfig):
        old = from_dict(old, "<old config>")
    if not isinstance(new, PipelineConfig):
        new = from_dict(new, "<new config>")
    a, b = old.model_fingerprint(), new.model_fingerprint()
    return [k for k in MODEL_FINGERPRINT_KEYS if a[k] != b[k]]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read, override and validate a pipeline file.

    ``overrides`` are ``"section.key=value"`` strings (the CLI's ``--set``); the value is
    parsed as a TOML value (``2e-4``, ``[1,2]``, ``"lanczos"``); text that is not valid
    TOML, or anything given for a string-valued key, is taken as a plain string.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read pipeline file: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: TOML syntax error: {e}") from None
    return from_dict(data, source, overrides=overrides, default_name=path.stem)


def from_dict(d: Mapping[str, Any], source: str = "<dict>", *, overrides: Iterable[str] = (),
              default_name: str | None = None) -> PipelineConfig:
    """Validate a parsed pipeline mapping ``{section: {key: value}}``.

    ``default_name`` is ``run.name`` when the mapping has none; it defaults to the stem
    of ``source`` when that looks like a file name, else ``"run"``.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, got {type(d).__name__}")
    if default_name is None:
        default_name = "run" if source.startswith("<") else Path(source).stem
    raw: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for name, table in d.items():
        if name not in SECTIONS:
            errors.append(_unknown_section_msg(name))
            continue
        if not isinstance(table, Mapping):
            errors.append(f"{name} = {_fmt(table)}: must be a table [{name}], "
                          f"not {_a(_type_name(table))}")
            continue
        raw[name] = dict(table)

    overrides = list(overrides)
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if section not in SECTIONS:
            raise ConfigError(f"{source}: --set {text}: {_unknown_section_msg(section)}")
        if key not in _field_names(SECTIONS[section]):
            raise ConfigError(f"{source}: --set {text}: {_unknown_key_msg(section, key, value)}")
        if not isinstance(value, str) and _field_type(SECTIONS[section], key) == "str":
            value = text.split("=", 1)[1].strip()  # e.g. run.name=2024 stays a string
        raw.setdefault(section, {})[key] = value
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"

    for name, table in raw.items():
        names = _field_names(SECTIONS[name])
        for key, value in table.items():
            if key not in names:
                errors.append(_unknown_key_msg(name, key, value))

    process = raw.get("process", {})
    for key in ("image_size", "levels"):
        if key not in process:
            errors.append(f"process.{key}: required key is missing "
                          f"(add `{key} = ...` under [process])")
    if errors:
        raise _error(source, errors)

    run = raw.setdefault("run", {})
    if "name" not in run:
        run["name"] = default_name
    sampler = raw.setdefault("sampler", {})
    timesteps = process.get("timesteps")
    if "steps" not in sampler and isinstance(timesteps, int) and not isinstance(timesteps, bool):
        sampler["steps"] = timesteps

    sections = {name: cls(**raw.get(name, {})) for name, cls in SECTIONS.items()}
    return PipelineConfig(**sections, source=source)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> ``(section, key, value)`` with value parsed as TOML.

    A value that is not valid TOML (a bare word such as ``lanczos``) is a string.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value")
    lhs, rhs = text.split("=", 1)
    lhs, rhs = lhs.strip(), rhs.strip()
    section, dot, key = lhs.partition(".")
    if not dot or not section or not key or "." in key:
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. optimizer.lr=2e-4")
    try:
        value = tomllib.loads(f"v = {rhs}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs
    return section, key, value


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _validate(cfg: PipelineConfig) -> list[str]:
    errors: list[str] = []
    for name, cls in SECTIONS.items():
        sec = getattr(cfg, name)
        if not isinstance(sec, cls):
            errors.append(f"[{name}]: expected {cls.__name__}, got {type(sec).__name__}")
            continue
        for f in dataclasses.fields(sec):
            msg = _check_field(f, getattr(sec, f.name))
            if msg:
                errors.append(f"{name}.{f.name} = {_fmt(getattr(sec, f.name))}: {msg}")
    if errors:  # cross-checks assume well-typed fields
        return errors

    run, data, p, m, loss, sampler = (cfg.run, cfg.data, cfg.process, cfg.model, cfg.loss,
                                       cfg.sampler)

    def err(key, msg):
        errors.append(f"{key} = {_fmt(cfg.get(key))}: {msg}")

    # [run]
    if run.name in (".", "..") or "/" in run.name or "\\" in run.name or run.name != run.name.strip():
        err("run.name", "must be a plain directory name (no path separators, no "
                        "leading/trailing spaces, not '.' or '..')")

    # [data]
    if data.source == "folder" and not data.path:
        err("data.path", 'data.source = "folder" needs data.path (the image folder)')
    if data.source == "tfds" and not data.tfds_name:
        err("data.tfds_name", 'data.source = "tfds" needs data.tfds_name '
                              '(e.g. "celeb_a", "imagenet_resized/64x64", "cifar10")')

    # [process] against [model] (docs/math.md section 2: every level is a UNet feature resolution)
    n_unet = len(m.channel_mult)
    feats = cfg.feature_resolutions
    if p.levels > n_unet:
        err("process.levels", f"must be <= len(model.channel_mult) = {n_unet}: every level "
                              f"must be a feature resolution of the UNet {feats}")
    div = 2 ** (n_unet - 1)
    if p.image_size % div:
        err("process.image_size", f"must be divisible by {div} = 2^(len(model.channel_mult)-1) "
                                  f"(model.channel_mult = {_fmt(m.channel_mult)})")
    geometry_ok = not errors  # the checks below assume a consistent UNet geometry
    if geometry_ok:
        from .schedules import parse_resolution_schedule, resolution_schedule

        try:
            parse_resolution_schedule(p.resolution_schedule)
            if p.levels > 1:
                # the invariants of docs/math.md section 2 (every level gets a timestep, r non-increasing)
                resolution_schedule(p.resolution_schedule, p.resolutions, p.timesteps)
        except ValueError as e:
            err("process.resolution_schedule", str(e))

        # [model]
        if m.base_channels % 32:
            # GroupNorm(32) runs on base_channels (output head) and base_channels * mult
            # (every level); a multiple of 32 makes all of them divisible.
            err("model.base_channels", "must be a multiple of 32 (GroupNorm with 32 groups runs "
                                       "on base_channels * each model.channel_mult entry)")
        if m.num_head_channels != -1 and m.num_head_channels <= 0:
            err("model.num_head_channels", "must be -1 (use num_heads) or a positive integer")
        bad = [r for r in m.attention_resolutions if r not in feats]
        if bad:
            err("model.attention_resolutions", f"{bad[0]} is not a feature resolution of the "
                                               f"UNet; valid: {feats}")
        elif m.num_head_channels == -1 or m.num_head_channels > 0:
            # attention runs at the listed resolutions and always in the middle block
            attn = {feats.index(r): r for r in m.attention_resolutions}
            attn[n_unet - 1] = feats[-1]
            for i, r in sorted(attn.items()):
                ch = m.base_channels * m.channel_mult[i]
                if m.num_head_channels > 0 and ch % m.num_head_channels:
                    err("model.num_head_channels", f"the {ch} channels of the attention at "
                                                   f"{r}x{r} are not divisible by it")
                    break
                if m.num_head_channels == -1 and ch % m.num_heads:
                    err("model.num_heads", f"the {ch} channels of the attention at {r}x{r} are "
                                           "not divisible by it")
                    break

    # [loss] / [sampler]
    if loss.target == "eps" and p.levels > 1:
        err("loss.target", f'"eps" is the DDPM baseline and needs process.levels = 1 '
                           f"(got {p.levels}); SSD predicts x0")
    if sampler.variance == "fixed_large" and p.levels > 1:
        err("sampler.variance", f'"fixed_large" is only defined without resolution changes '
                                f"(process.levels = 1, got {p.levels}); use \"fixed_small\"")
    if sampler.steps > p.timesteps:
        err("sampler.steps", f"must be <= process.timesteps = {p.timesteps}")
    if cfg.eval.chunk_size % sampler.batch_size:
        err("eval.chunk_size", f"must be a multiple of sampler.batch_size = {sampler.batch_size} "
                               "(every chunk samples whole batches)")
    return errors


def _check_field(f: dataclasses.Field, v: Any) -> str | None:
    """Type and range check of one value; returns the reason or None."""
    meta, t = f.metadata, f.type
    if t == "bool":
        if not isinstance(v, bool):
            return f"expected true or false, got {_a(_type_name(v))}"
        return None
    if t == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            return f"expected an integer, got {_a(_type_name(v))}"
    elif t == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"expected a number, got {_a(_type_name(v))}"
        if not math.isfinite(v):
            return "must be a finite number"
    elif t == "str":
        if not isinstance(v, str):
            return f"expected a string, got {_a(_type_name(v))}"
    elif t == "tuple[int, ...]":
        if not isinstance(v, (list, tuple)):
            return f"expected a list of integers, got {_a(_type_name(v))}"
        for item in v:
            if isinstance(item, bool) or not isinstance(item, int):
                return f"expected a list of integers, got an item {_fmt(item)} ({_type_name(item)})"
            if meta.get("item_gt") is not None and item <= meta["item_gt"]:
                return f"every entry must be > {meta['item_gt']} (got {item})"
    else:  # pragma: no cover - a declaration error
        raise TypeError(f"unsupported field type {t!r}")
    choices = meta.get("choices")
    if choices and v not in choices:
        return "must be one of " + ", ".join(_fmt(c) for c in choices)
    if meta.get("nonempty") and len(v) == 0:
        return "must not be empty"
    for op, ok, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                         ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
        bound = meta.get(op)
        if bound is not None and not ok(v, bound):
            return f"must be {word} {bound}"
    return None


# --------------------------------------------------------------------------------------
# Messages and TOML writing
# --------------------------------------------------------------------------------------


def _error(source: str, errors: list[str]) -> ConfigError:
    lines = [f"{source}: {e}" for e in errors]
    return ConfigError("\n".join(lines), lines)


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_type(cls, key: str) -> str:
    return {f.name: f.type for f in dataclasses.fields(cls)}[key]


def _unknown_section_msg(name: str) -> str:
    valid = list(SECTIONS)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean [{close[0]}]? " if close else ""
    return f"[{name}]: unknown section; {hint}valid sections: {', '.join(valid)}"


def _unknown_key_msg(section: str, key: str, value: Any) -> str:
    valid = _field_names(SECTIONS[section])
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {section}.{close[0]}? "
    else:
        elsewhere = [s for s, cls in SECTIONS.items() if key in _field_names(cls)]
        hint = f"did you mean {elsewhere[0]}.{key}? " if elsewhere else ""
    return (f"{section}.{key} = {_fmt(value)}: unknown key in [{section}]; {hint}"
            f"valid keys: {', '.join(valid)}")


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, Mapping):
        return "table"
    return type(v).__name__


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _fmt(v: Any) -> str:
    """A value as it would be written in TOML (for messages)."""
    try:
        return _toml_value(v)
    except TypeError:
        return repr(v)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
