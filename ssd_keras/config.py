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

How it is checked. The sections are pydantic dataclasses: each field's annotation says
what a valid value is (strict types: no bool for an int, no string for a number; an int
is taken for a float; lists become tuples), pydantic checks every field of a section at
once, and :func:`_explain` turns its errors into this module's one-line messages. The
checks that involve several keys (levels against the UNet's depth, attention
resolutions, ...) are in :func:`_validate`, run by :class:`PipelineConfig` itself, so
every construction path is validated.

Resolved defaults that depend on other keys: ``run.name`` defaults to the file's stem,
``sampler.steps`` to ``process.timesteps`` (1000 by default) when not given.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import pydantic
import pydantic.dataclasses
import tomli_w
from pydantic import AllowInfNan, Field, Strict

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
# Sections. Each field's annotation and Field(...) constraints say what a valid value is.
# --------------------------------------------------------------------------------------

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]  # strict: an int is taken, not "1e-4"
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Ints = tuple[Int, ...]  # a TOML list of integers, stored as a tuple
PositiveInts = tuple[Annotated[int, Strict(), Field(gt=0)], ...]
#: how the network runs on torch (ssd_keras.backend.Execution): "auto" the measured fastest
#: correct mode of the device, "eager" the Keras call, "trace" a replayed torch.jit.trace
#: of each path, "compile" torch.compile; jax and tensorflow compile either way
#: (docs/design.md "Execution layer")
Graph = Literal["auto", "eager", "trace", "compile"]


def _section(cls):
    """A frozen pydantic dataclass whose direct construction raises :class:`ConfigError`."""
    cls = pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as e:
            values = {**dict(zip(_field_names(cls), args)), **kwargs}
            raise _error("<config>", _explain(_section_name(cls), e, values)) from None

    cls.__init__ = __init__
    return cls


@_section
class RunConfig:
    name: Str = Field("run", min_length=1, description="run directory runs/<name>/ (default: file stem)")
    output_dir: Str = Field("runs", min_length=1)
    seed: Int = Field(0, ge=0)


@_section
class DataConfig:
    source: Literal["digits", "folder", "tfds"] = "digits"
    path: Str = Field("", description="folder root (source='folder'); relative to the current dir")
    split_file: Str = Field("", description="optional file listing the images to use (folder)")
    tfds_name: Str = ""
    tfds_split: Str = Field("train", min_length=1)
    tfds_data_dir: Str = ""
    image_key: Str = Field("image", min_length=1)
    random_flip: Bool = True
    cache: Bool = False
    on_bad_image: Literal["skip", "error"] = "skip"
    small_images: Literal["upscale", "skip", "error"] = "upscale"
    num_workers: Int = Field(2, ge=0)
    limit: Int = Field(0, ge=0, description="0 = all images")
    labels: Bool = Field(False, description="class labels for a class-conditional model: the "
                                            "digits' own, a folder's class subfolders (or "
                                            "labels_file), a tfds label_key")
    labels_file: Str = Field("", description="folder: lines `relative/path.png,class` "
                                             "instead of class subfolders")
    label_key: Str = Field("label", min_length=1, description="tfds: the label feature")
    classes: tuple[Annotated[str, Strict(), Field(min_length=1)], ...] = Field(
        (), description="the class names in label order (default: found in the data, sorted)")


@_section
class ProcessConfig:
    image_size: Annotated[Int, Field(gt=0)]
    levels: Annotated[Int, Field(ge=1, description="1 = DDPM")]
    timesteps: Int = Field(1000, ge=2)
    noise_schedule: Literal["linear", "cosine"] = "linear"
    resolution_schedule: Str = Field("ConvexDecay-0.5", min_length=1)

    @property
    def resolutions(self) -> list[int]:
        """Ascending level resolutions ``[image_size / 2^(levels-1), ..., image_size]``."""
        return [self.image_size // 2 ** i for i in reversed(range(self.levels))]

    @property
    def r_min(self) -> int:
        return self.image_size // 2 ** (self.levels - 1)


@_section
class ModelConfig:
    base_channels: Int = Field(128, gt=0)
    channel_mult: PositiveInts = Field((1, 2, 3, 4), min_length=1)
    num_res_blocks: Int = Field(2, ge=1)
    attention_resolutions: PositiveInts = (16, 8)
    num_heads: Int = Field(4, ge=1)
    num_head_channels: Int = Field(-1, description="-1 = use num_heads; else channels per head")
    dropout: Float = Field(0.1, ge=0.0, lt=1.0)
    full_res_change_via_upsample: Bool = True
    num_classes: Int = Field(0, ge=0, description="class-conditional with this many classes "
                                                  "(ADM's label_emb); 0 = unconditional")
    null_class: Bool = Field(True, description="one more learned 'no class' row for "
                                               "classifier-free guidance (official "
                                               "checkpoints have none)")


@_section
class LossConfig:
    target: Literal["x0", "eps"] = "x0"
    min_snr_gamma: Float = Field(5.0, ge=0.0, description="weight min(SNR, gamma); 0 = plain L_simple")


@_section
class OptimizerConfig:
    lr: Float = Field(1e-4, gt=0.0)
    weight_decay: Float = Field(0.0, ge=0.0)
    beta1: Float = Field(0.9, ge=0.0, lt=1.0)
    beta2: Float = Field(0.999, ge=0.0, lt=1.0)
    epsilon: Float = Field(1e-8, gt=0.0)
    grad_clip: Float = Field(1.0, ge=0.0, description="global-norm clipping; 0 = off")


@_section
class EMAConfig:
    rate: Float = Field(0.9999, ge=0.0, lt=1.0)
    start_step: Int = Field(0, ge=0)


@_section
class TrainConfig:
    batch_size: Int = Field(128, gt=0)
    steps: Int = Field(500000, gt=0)
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    log_every: Int = Field(50, gt=0)
    checkpoint_every: Int = Field(5000, gt=0)
    sample_every: Int = Field(10000, ge=0, description="0 = never")
    keep_checkpoints: Int = Field(3, ge=1)
    milestones: PositiveInts = Field((), description="steps whose checkpoints are kept")
    on_nonfinite: Literal["stop", "skip"] = "stop"
    loss_scale_init: Float = Field(65536.0, gt=0.0, description="mixed_float16: the initial "
                                                                "dynamic loss scale, a power of 2")
    loss_scale_growth_interval: Int = Field(2000, ge=1, description="mixed_float16: clean steps "
                                                                    "before the scale doubles")
    allreduce_bucket_mb: Float = Field(25.0, ge=0.0, description="data parallel: gradient "
                                       "all-reduce buckets started during the backward pass; "
                                       "0 = one all-reduce after it")
    graph: Graph = Field("auto", description="torch: auto | eager | trace | compile; auto = "
                                            "trace on CPU, compile on CUDA (docs/design.md "
                                            "\"Execution layer\"); never trace with dropout")
    # fine-tuning (docs/finetune.md): the weights a fresh run starts from
    init_from: Str = Field("", description="a run (directory or name), one of its checkpoint "
                                           "files, an official .pt or an exported .safetensors; "
                                           "read once, when the run starts (not on resume)")
    init_weights: Literal["ema", "raw"] = Field("ema", description="which weights of the source")
    init_strict: Bool = Field(True, description="false: load every tensor that fits and list "
                                                "the rest")
    cond_drop_prob: Float = Field(0.1, ge=0.0, lt=1.0, description="class-conditional: "
                                  "share of labels replaced by the null class (guidance)")


@_section
class SamplerConfig:
    steps: Int = Field(1000, ge=2, description="respaced K (docs/math.md section 7); "
                                               "default: process.timesteps")
    noise: Literal["exact", "lanczos"] = "exact"
    lanczos_iterations: Int = Field(40, ge=1)
    clip: Bool = True
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small"
    method: Literal["ancestral", "ddim"] = Field(
        "ancestral", description="ddim: marginal-preserving few-step sampler (docs/sampling.md)")
    eta: Float = Field(0.0, ge=0.0, le=1.0, description="ddim only: 0 = deterministic where "
                                                        "possible, 1 = the ancestral posterior")
    num_images: Int = Field(16, gt=0)
    batch_size: Int = Field(16, gt=0)
    seed: Int = Field(0, ge=0)
    graph: Graph = Field("auto", description="torch: auto | eager | trace | compile; auto = "
                                            "trace on CPU, compile with CUDA graphs on CUDA")
    guidance: Float = Field(1.0, ge=0.0, description="class-conditional: classifier-free "
                            "guidance scale w (1 = the conditional model, 0 = unconditional)")


@_section
class EvalConfig:
    """``ssd-run evaluate`` (docs/evaluation.md)."""

    num_samples: Int = Field(1000, ge=2, description="samples to draw (the paper's FIDs: 50000)")
    inception_weights: Str = Field("", description="weights-inception-2015-12-05-6726825d.pth: "
                                                   "adds FID, KID, precision/recall")
    reference: Str = Field("", description="reference statistics .npz (mu, sigma[, features]); "
                                           "default: the run's data, computed once and cached")
    reference_images: Int = Field(50000, ge=2, description="data images in the reference (at most all)")
    chunk_size: Int = Field(0, ge=0, description="samples per resumable chunk, a multiple of "
                                                 "sampler.batch_size; 0 = about 500")
    cache_dir: Str = Field("", description="reference cache; default: $XDG_CACHE_HOME/ssd_keras")


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
        return {name: {k: _plain(v) for k, v in dataclasses.asdict(sec).items()}
                for name, sec in self.sections().items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>", *,
                  overrides: Iterable[str] = (), default_name: str | None = None
                  ) -> "PipelineConfig":
        return from_dict(d, source, overrides=overrides, default_name=default_name)

    def to_toml(self, header: str | None = None) -> str:
        """The resolved config as TOML text (every key written explicitly)."""
        if header is None:
            header = f"Resolved pipeline config of run '{self.run.name}' (written by ssd_keras)."
        comment = "".join(f"# {h}".rstrip() + "\n" for h in header.splitlines())
        return comment + "\n" + tomli_w.dumps(self.to_dict())

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

    def replace(self, *, source: str | None = None, **sections: Any) -> "PipelineConfig":
        """This config with some keys changed, validated as a whole like a loaded file::

            cfg.replace(train={"steps": 10}, sampler={"steps": 20})

        A section is given as a mapping of its changed keys (or as a whole section object).
        Errors name ``source``, which the new config keeps (default: this config's).
        """
        source = self.source if source is None else source
        new, errors = {}, []
        for name, change in sections.items():
            if name not in SECTIONS:
                errors.append(_unknown_section_msg(name))
            elif isinstance(change, Mapping):
                values = {**dataclasses.asdict(getattr(self, name)), **change}
                new[name] = _build(name, values, errors)
            else:
                new[name] = change
        if errors:
            raise _error(source, errors)
        return dataclasses.replace(self, **new, source=source)


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
        elif not isinstance(table, Mapping):
            errors.append(f"{name} = {_fmt(table)}: must be a table [{name}], "
                          f"not {_a(_type_name(table))}")
        else:
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
        if not isinstance(value, str) and _is_text(SECTIONS[section], key):
            value = text.split("=", 1)[1].strip()  # e.g. run.name=2024 stays a string
        raw.setdefault(section, {})[key] = value
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"

    raw.setdefault("run", {}).setdefault("name", default_name)
    timesteps = raw.get("process", {}).get("timesteps")
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        raw.setdefault("sampler", {}).setdefault("steps", timesteps)

    sections = {name: _build(name, raw.get(name, {}), errors) for name in SECTIONS}
    if errors:
        raise _error(source, errors)
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
# Validation: one section (pydantic, translated by _explain), then across keys (_validate)
# --------------------------------------------------------------------------------------


def _build(name: str, values: Mapping[str, Any], errors: list[str]):
    """Section ``name`` made from ``values``, or None with its problems appended to ``errors``."""
    cls = SECTIONS[name]
    try:
        return cls.__pydantic_validator__.validate_python(dict(values))
    except pydantic.ValidationError as e:
        errors.extend(_explain(name, e, values))
        return None


def _explain(section: str, exc: pydantic.ValidationError, values: Mapping[str, Any]) -> list[str]:
    """pydantic's errors of one section as lines ``section.key = value: reason``, one per key
    in field order (the first problem of each key), unknown keys last."""
    cls, found = SECTIONS[section], {}
    names = _field_names(cls)
    for err in exc.errors(include_url=False):
        key = err["loc"][0] if err["loc"] else ""
        key = names[key] if isinstance(key, int) and key < len(names) else str(key)  # positional
        if key not in found:
            found[key] = _message(section, cls, key, err, values)
    order = {k: i for i, k in enumerate(names)}
    return [found[k] for k in sorted(found, key=lambda k: order.get(k, len(order)))]


def _message(section: str, cls, key: str, err: dict, values: Mapping[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return _unknown_key_msg(section, key, values.get(key, err["input"]))
    if kind == "missing":
        return f"{section}.{key}: required key is missing (add `{key} = ...` under [{section}])"
    value = values.get(key, err["input"])
    annotation = cls.__pydantic_fields__[key].annotation if key in cls.__pydantic_fields__ else None
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # shown as it is stored
    got = _a(_type_name(err["input"]))
    if len(err["loc"]) > 1:  # an entry of a list
        item = err["input"]
        reason = (f"every entry must be > {ctx['gt']} (got {item})" if kind == "greater_than" else
                  f"expected a list of integers, got an item {_fmt(item)} ({_type_name(item)})")
    elif kind == "literal_error":
        reason = ("must be one of " + ", ".join(_fmt(c) for c in get_args(annotation))
                  if isinstance(value, str) else f"expected a string, got {got}")
    else:
        bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                  "less_than_equal": "<="}
        reasons = {"int_type": f"expected an integer, got {got}",
                   "float_type": f"expected a number, got {got}",
                   "bool_type": f"expected true or false, got {got}",
                   "string_type": f"expected a string, got {got}",
                   "tuple_type": f"expected a list of integers, got {got}",
                   "finite_number": "must be a finite number",
                   "too_short": "must not be empty", "string_too_short": "must not be empty"}
        if kind in bounds:
            bound = next(iter(ctx.values()))
            reason = f"must be {bounds[kind]} {bound}"
        else:
            reason = reasons.get(kind, err["msg"])
    return f"{section}.{key} = {_fmt(value)}: {reason}"


def _validate(cfg: PipelineConfig) -> list[str]:
    """The checks across keys (each section's own fields are valid by construction)."""
    errors = [f"[{name}]: expected {cls.__name__}, got {type(getattr(cfg, name)).__name__}"
              for name, cls in SECTIONS.items() if not isinstance(getattr(cfg, name), cls)]
    if errors:
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
    for key, owner in (("path", "folder"), ("split_file", "folder"), ("tfds_name", "tfds"),
                       ("tfds_data_dir", "tfds")):
        if getattr(data, key) and data.source != owner:
            err(f"data.{key}", f'is only used with data.source = "{owner}" (data.source = '
                               f'"{data.source}"): remove it, or set the source')

    if data.labels_file and data.source != "folder":
        err("data.labels_file", f'is only used with data.source = "folder" (data.source = '
                                f'"{data.source}")')
    if data.labels_file and not data.labels:
        err("data.labels_file", "needs data.labels = true")
    if data.classes and len(set(data.classes)) != len(data.classes):
        err("data.classes", "names a class twice")
    if data.labels and not m.num_classes:
        err("data.labels", "labels train a class-conditional model: set model.num_classes")
    if data.classes and m.num_classes and len(data.classes) != m.num_classes:
        err("data.classes", f"lists {len(data.classes)} classes, model.num_classes = "
                            f"{m.num_classes}")
    if cfg.train.cond_drop_prob > 0 and m.num_classes and not m.null_class:
        err("train.cond_drop_prob", "label dropout needs the null class (model.null_class = "
                                    "true); set it to 0")
    if sampler.guidance != 1.0 and not m.num_classes:
        err("sampler.guidance", "guidance needs a class-conditional model (model.num_classes)")
    if sampler.guidance != 1.0 and m.num_classes and not m.null_class:
        err("sampler.guidance", "this model has no null-class row (model.null_class = false, "
                                "e.g. an official checkpoint): only guidance 1 is defined")

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

    # [train]
    scale = cfg.train.loss_scale_init
    if math.frexp(scale)[0] != 0.5 or scale < 1.0:
        err("train.loss_scale_init", "must be a power of 2 >= 1 (e.g. 65536 = 2^16), so that "
                                     "scaling and unscaling the gradients is exact")

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


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def _error(source: str, errors: list[str]) -> ConfigError:
    lines = [f"{source}: {e}" for e in errors]
    return ConfigError("\n".join(lines), lines)


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_name(cls) -> str:
    return next(name for name, c in SECTIONS.items() if c is cls)


def _is_text(cls, key: str) -> bool:
    """Whether ``key`` of section ``cls`` holds a string (free text or one of some words)."""
    annotation = cls.__pydantic_fields__[key].annotation
    return annotation is str or get_origin(annotation) is Literal


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
    """A value as it is written in TOML (for messages): ``"text"``, ``[1, 2]``, ``true``, ``nan``."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # nan, inf, -inf
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    try:
        return json.dumps(v, ensure_ascii=False)  # JSON's strings, numbers, booleans are TOML's
    except (TypeError, ValueError):
        return repr(v)
