"""``ssd-run``: train, sample and inspect Scale Space Diffusion pipelines.

Thin by design: parse the command line, load the config, call the modules that do the
work, and turn every error a user can cause into one clear line and a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from . import __version__

app = typer.Typer(
    name="ssd-run",
    help=(
        "Scale Space Diffusion in Keras 3.\n\n"
        "Train:   ssd-run PIPELINE.toml [--set section.key=value ...]\n\n"
        "Sample:  ssd-run sample [RUN] --steps 250\n\n"
        "Import:  ssd-run import OFFICIAL_CHECKPOINT.pt\n\n"
        "Export:  ssd-run export RUN --format official|safetensors --out FILE\n\n"
        "Inspect: ssd-run inspect PIPELINE.toml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_USER_ERROR = 2
SET_HELP = "Override a pipeline key, e.g. --set optimizer.lr=2e-4 (repeatable)."

def _unset(help: str):
    """An option that is ``None`` unless given (the run's config value then stays)."""
    return typer.Option(None, help=help)


# options that `sample` and `evaluate` share (an OptionInfo can be the default of several)
RUN_ARGUMENT = typer.Argument(None, help="Run directory or name (default: the most recent run).")
STEPS = _unset("Respaced sampling steps K (change steps are added).")
NOISE = _unset("Posterior noise on change steps: exact | lanczos.")
METHOD = _unset("ancestral | ddim (docs/sampling.md).")
ETA = _unset("ddim noise in [0, 1]: 0 deterministic, 1 ancestral.")
GUIDANCE = _unset("Class-conditional runs: classifier-free guidance scale w (1 = conditional, "
                  "0 = unconditional; docs/sampling.md).")
RUNS_DIR = typer.Option(Path("runs"), help="Where runs live.")
PROGRESS = typer.Option(True, "--progress/--no-progress")


class UserError(Exception):
    """An error with a message meant for the user (no traceback)."""


# ---------------------------------------------------------------------------- train
@app.command()
def train(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML file (see pipelines/)."),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    steps: Optional[int] = _unset("Train at most this many more steps now."),
    fresh: bool = typer.Option(False, "--fresh", help="Refuse to resume: fail if the run has checkpoints."),
    allow_config_change: bool = typer.Option(
        False, "--allow-config-change", help="Resume even if model/process keys changed."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress bar."),
    init_from: Optional[str] = _unset(
        "Start a new run from these weights (train.init_from): a run, a checkpoint, an official "
        ".pt or an exported .safetensors (docs/finetune.md)."),
):
    """Train (or resume) the run of a pipeline: runs/<run.name>/."""
    from .config import load_pipeline

    cfg = load_pipeline(pipeline, list(set_) + ([f"train.init_from={init_from}"] if init_from else []))
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be >= 1")
    from .train import Trainer  # Keras and torch: seconds, so after the cheap checks

    trainer = Trainer(cfg, resume=not fresh, allow_config_change=allow_config_change, progress=progress)
    say = _say if trainer.is_main else (lambda message: None)  # data parallel: rank 0 speaks
    try:
        where = (f"resuming {trainer.run_dir} at step {trainer.step} from {trainer.resumed_from.name}"
                 if trainer.resumed_from else f"new run {trainer.run_dir}")
        n = trainer.dist.world_size
        say(f"{where}; training to step {cfg.train.steps} (backend {_backend()}"
            + (f", {n} processes of {cfg.train.batch_size // n} images)" if n > 1 else ")"))
        if trainer.initialized_from is not None:
            say(trainer.initialized_from.summary())
        summary = trainer.fit(steps)
        rate = summary["steps_run"] / max(summary["seconds"], 1e-9)
        say(
            f"step {summary['step']}: {summary['steps_run']} steps in {summary['seconds']:.0f} s "
            f"({rate:.2f} steps/s, {rate * cfg.train.batch_size:.1f} images/s); checkpoints in "
            f"{trainer.ckpt_dir}"
            + (f"; {summary['skipped']} non-finite steps skipped" if summary["skipped"] else "")
        )
        if summary["step"] >= cfg.train.steps and trainer.is_main:
            _write_samples(trainer.ema_model(), trainer.process, trainer.objective, cfg,
                           trainer.run_dir / "samples" / "final", progress)
    finally:
        trainer.close()


# ---------------------------------------------------------------------------- sample
@app.command()
def sample(
    run: Optional[str] = RUN_ARGUMENT,
    steps: Optional[int] = STEPS,
    noise: Optional[str] = NOISE,
    method: Optional[str] = METHOD,
    eta: Optional[float] = ETA,
    lanczos_iterations: Optional[int] = _unset("Lanczos iterations (paper: 40)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", help="How many images."),
    batch_size: Optional[int] = _unset("Images per batch."),
    seed: Optional[int] = _unset("Sampling seed."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Clip x0 predictions to [-1, 1]."),
    class_: List[str] = typer.Option(
        [], "--class", "-c", help="Class-conditional runs: the class(es) to draw, by name or "
                                  "index (repeatable, or 3,5,7); one grid row each (default: all)."),
    guidance: Optional[float] = GUIDANCE,
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights."),
    checkpoint: Optional[Path] = _unset("A checkpoint file (default: the run's newest)."),
    out: Optional[Path] = _unset("Output directory (default: RUN/samples/<settings>)."),
    runs_dir: Path = RUNS_DIR,
    progress: bool = PROGRESS,
):
    """Sample from a trained run: grid.png, images/, progression.png."""
    from .runs import find_run, load_run, read_classes, resolve_classes, sampling_parts, settings_name

    run_dir = find_run(run, runs_dir)
    cfg, groups, meta, path = load_run(run_dir, checkpoint)
    cfg = _with_options(cfg, path, sampler=dict(
        steps=steps, noise=noise, lanczos_iterations=lanczos_iterations, num_images=num_images,
        batch_size=batch_size, seed=seed, clip=clip, method=method, eta=eta, guidance=guidance))
    names, classes = None, None
    if cfg.model.num_classes:
        names = read_classes(run_dir, cfg.model.num_classes)
        try:
            classes = resolve_classes(class_, names) if class_ else None
        except ValueError as exc:
            raise UserError(f"--class: {exc}") from None
    elif class_:
        raise UserError(f"--class {class_[0]}: {run_dir} is an unconditional run "
                        "(model.num_classes = 0)")
    model, process, objective = sampling_parts(cfg, groups, meta, path, ema)
    s = cfg.sampler
    name = settings_name(meta["step"], s)
    if cfg.model.num_classes:
        name += f"_w{s.guidance:g}" + ("" if classes is None else "_c" + "-".join(map(str, classes)))
    out = out or run_dir / "samples" / (name + ("" if ema else "_raw"))
    guided = cfg.model.num_classes and s.guidance not in (0.0, 1.0)
    _say(f"sampling {s.num_images} images from {path} ({'EMA' if ema else 'raw'} weights), "
         f"{len(process.respace(s.steps))} network calls per image"
         + (f", guidance {s.guidance:g}" if cfg.model.num_classes else "")
         + (" (each call at double batch: the class and the null class)" if guided else ""))
    _write_samples(model, process, objective, cfg, out, progress, classes, names)


# ---------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    run: Optional[str] = RUN_ARGUMENT,
    num_samples: Optional[int] = typer.Option(
        None, "--num-samples", "--num-images", "-n",
        help="Samples to draw (eval.num_samples, default 1000; the paper: 50000); with --samples-dir: "
             "the first N found (default all)."),
    steps: Optional[int] = STEPS,
    noise: Optional[str] = NOISE,
    method: Optional[str] = METHOD,
    eta: Optional[float] = ETA,
    guidance: Optional[float] = GUIDANCE,
    seed: Optional[int] = _unset("Sampling seed (also seeds the KID subsets)."),
    batch_size: Optional[int] = _unset("Images per sampling batch."),
    chunk_size: Optional[int] = _unset(
        "Samples per resumable chunk, a multiple of the batch size (eval.chunk_size)."),
    inception_weights: Optional[Path] = _unset(
        "The standard Inception weights file weights-inception-2015-12-05-6726825d.pth "
        "(eval.inception_weights): adds FID, KID, precision/recall (docs/evaluation.md)."),
    reference: Optional[Path] = _unset("Reference statistics .npz (mu, sigma[, features]) "
                                       "instead of the run's data (eval.reference)."),
    cache_dir: Optional[Path] = _unset("Reference cache (eval.cache_dir)."),
    samples_dir: Optional[Path] = _unset("Evaluate the PNGs in this folder (or its images/) "
                                         "instead of sampling."),
    out: Optional[Path] = _unset(
        "Output folder for samples and metrics.json (default: RUN/eval/<settings>, "
        "or --samples-dir); an interrupted evaluation resumes there."),
    runs_dir: Path = RUNS_DIR,
    progress: bool = PROGRESS,
):
    """Sample quality: FID, KID, precision/recall (with the Inception weights) and weights-free measures."""
    from .evaluation import EvaluationError, evaluate as run_evaluation, format_report
    from .inception import InceptionError
    from .runs import find_run, load_run, sampling_parts, settings_name

    run_dir = find_run(run, runs_dir)
    cfg, groups, meta, path = load_run(run_dir)
    cfg = _with_options(
        cfg, path, sampler=dict(steps=steps, noise=noise, batch_size=batch_size, seed=seed, method=method, eta=eta,
                                guidance=guidance),
        eval=dict(num_samples=None if samples_dir else num_samples, chunk_size=chunk_size,
                  inception_weights=inception_weights and str(inception_weights),
                  reference=reference and str(reference), cache_dir=cache_dir and str(cache_dir)))
    e, s = cfg.eval, cfg.sampler
    out = out or samples_dir or run_dir / "eval" / (
        settings_name(meta["step"], s) + (f"_w{s.guidance:g}" if cfg.model.num_classes else ""))
    identity = {"run": str(run_dir), "checkpoint": str(path), "step": meta["step"], "ema": True}
    try:
        result = run_evaluation(
            cfg, out=out, parts=lambda: sampling_parts(cfg, groups, meta, path, ema=True), identity=identity,
            samples_dir=samples_dir, samples_limit=num_samples,
            weights=Path(e.inception_weights) if e.inception_weights else None,
            reference=Path(e.reference) if e.reference else None,
            cache_dir=Path(e.cache_dir) if e.cache_dir else None, progress=progress, say=_say)
    except (EvaluationError, InceptionError) as exc:
        raise UserError(str(exc)) from None
    _say(format_report(result))
    _say(f"wrote {out / 'metrics.json'}")


def _with_options(cfg, path, **sections: dict):
    """``cfg`` with the command line's values for ``section.key`` (None: not given), validated
    as a whole; errors name the checkpoint ``path`` "(with command-line options)"."""
    given = {name: {k: v for k, v in keys.items() if v is not None} for name, keys in sections.items()}
    if not any(given.values()):
        return cfg
    return cfg.replace(**given, source=f"{path} (with command-line options)")


def _write_samples(model, process, objective, cfg, out: Path, progress: bool, classes=None,
                   names=None) -> None:
    from .runs import write_samples

    w = write_samples(model, process, objective, cfg, out, progress=progress, classes=classes,
                      names=names)
    _say(f"wrote {w['images']} samples in {w['seconds']:.1f} s ({w['seconds'] / w['images']:.2f} s/image): "
         f"{w['grid']}, {w['progression']}")


# ---------------------------------------------------------------------------- edits
# super-resolution, variations and interpolation from any run (docs/scale_space_edits.md)
STRENGTH = typer.Option(0.0, help="Where in the input's level the chain starts: 0 its least noisy "
                                  "step (most faithful), 1 its noisiest (most creative).")
CONSISTENCY = typer.Option(True, "--consistency/--no-consistency",
                           help="Replace the part of each state the input determines by its noised "
                                "observation; the result downsamples to the input.")
EDIT_OUT = _unset("Output folder (default: RUN/edits/<command and settings>).")


def _edit_parts(run, runs_dir, checkpoint, ema, **sampler):
    """``(run_dir, cfg, process, sampler keyword arguments, load)`` for an edit; ``load()``
    builds ``(model, process, objective)`` (seconds: after the inputs are checked)."""
    import dataclasses

    from .builders import build_process
    from .runs import find_run, load_run, sampling_parts

    run_dir = find_run(run, runs_dir)
    cfg, groups, meta, path = load_run(run_dir, checkpoint)
    cfg = _with_options(cfg, path, sampler=sampler)
    kwargs = dataclasses.asdict(cfg.sampler)
    kwargs.pop("num_images")
    return run_dir, cfg, build_process(cfg), kwargs, lambda: sampling_parts(cfg, groups, meta, path, ema)


def _edit_errors():
    from .edits import EditError

    return EditError


def _save_rows(rows, path, image_size):
    """A grid with one row per list of [-1, 1] images (each shown at ``image_size``, nearest)."""
    import numpy as np

    from .images import save_grid

    def full(img):
        k = image_size // img.shape[0]
        return np.repeat(np.repeat(img, k, 0), k, 1)

    width = max(len(r) for r in rows)
    cells = [full(img) for r in rows for img in list(r) + [np.ones_like(r[-1])] * (width - len(r))]
    return save_grid(np.stack(cells), path, columns=width)


def _upsample_group(parts, kwargs, items, level, out, strength, num_samples, consistency, progress, names):
    from .edits import upsample as run_upsample
    from .images import save_image, save_progression, to_uint8

    model, process, objective = parts
    import numpy as np
    import time

    y = np.stack([img for _, img in items])
    start = time.perf_counter()
    images, result = run_upsample(model, process, objective, y, num_samples=num_samples, strength=strength,
                                  consistency=consistency, record_progression=True, progress=progress,
                                  **kwargs)
    seconds = time.perf_counter() - start
    for (path, _), samples in zip(items, images):
        stem = names[path]
        for k, img in enumerate(samples):
            save_image(to_uint8(img[None])[0], out / "images" / f"{stem}_{k}.png")
    save_progression(result.frames, out / f"progression_{level}px.png", process.image_size)
    return [[img] + list(samples) for (_, img), samples in zip(items, images)], seconds, images.size


@app.command()
def upsample(
    run: str = typer.Argument(..., help="Run directory or name."),
    inputs: List[Path] = typer.Argument(..., help="Images (or folders of them) at a level of the run "
                                                   "below full resolution."),
    out: Optional[Path] = EDIT_OUT,
    strength: float = STRENGTH,
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Samples per input."),
    consistency: bool = CONSISTENCY,
    steps: Optional[int] = STEPS,
    method: Optional[str] = METHOD,
    eta: Optional[float] = ETA,
    noise: Optional[str] = NOISE,
    seed: Optional[int] = _unset("Sampling seed."),
    batch_size: Optional[int] = _unset("Images per batch."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights."),
    checkpoint: Optional[Path] = _unset("A checkpoint file (default: the run's newest)."),
    runs_dir: Path = RUNS_DIR,
    progress: bool = PROGRESS,
):
    """Super-resolution: full-resolution images consistent with low-resolution inputs."""
    from .edits import input_files, read_observations

    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be >= 1")
    try:
        files = input_files(inputs)
        parts = _edit_parts(run, runs_dir, checkpoint, ema, steps=steps, method=method, eta=eta,
                            noise=noise, seed=seed, batch_size=batch_size)
        run_dir, cfg, process, kwargs, load = parts
        groups = read_observations(files, process)
        for level in groups:
            _start(process, level, strength)
    except _edit_errors() as exc:
        raise UserError(str(exc)) from None
    out = out or run_dir / "edits" / f"upsample_s{strength:g}_{'dc' if consistency else 'free'}_seed{kwargs['seed']}"
    stems = [p.stem for p in files]
    names = {p: (p.stem if stems.count(p.stem) == 1 else f"{i}_{p.stem}") for i, p in enumerate(files)}
    _strength_note(strength, consistency)
    rows, seconds, count = [], 0.0, 0
    parts = load()
    for level in sorted(groups):
        _say(f"upsampling {len(groups[level])} image(s) of {level} px to {process.image_size} px, "
             f"{num_samples} sample(s) each, from step {_start(process, level, strength)} "
             f"({'with' if consistency else 'without'} consistency)")
        r, sec, _ = _upsample_group(parts, kwargs, groups[level], level, out, strength, num_samples, consistency,
                                    progress, names)
        rows += r
        seconds += sec
        count += len(groups[level]) * num_samples
    grid = _save_rows(rows, out / "grid.png", process.image_size)
    _say(f"wrote {count} images in {seconds:.1f} s ({seconds / count:.2f} s/image): {out / 'images'}, {grid}")


def _start(process, level, strength):
    from .edits import start_step

    try:
        return start_step(process, level, strength)
    except _edit_errors() as exc:
        raise UserError(str(exc)) from None


def _strength_note(strength, consistency):
    if consistency and strength > 0:
        import warnings

        warnings.warn(f"--strength {strength:g} changes nothing with consistency on: every state at the "
                      "input's level is replaced by the noised input, so only the time spent there "
                      "grows (docs/scale_space_edits.md section 3); use --no-consistency to let the "
                      "model re-draw the level")


@app.command()
def vary(
    run: str = typer.Argument(..., help="Run directory or name."),
    image: Path = typer.Argument(..., help="A full-resolution image."),
    level: int = typer.Option(..., "--level", "-l", help="Keep the layout down to this resolution (px), "
                                                          "a level of the run below full resolution."),
    strength: float = STRENGTH,
    num_samples: int = typer.Option(4, "--num-samples", "-n", help="How many variations."),
    consistency: bool = CONSISTENCY,
    out: Optional[Path] = EDIT_OUT,
    steps: Optional[int] = STEPS,
    method: Optional[str] = METHOD,
    eta: Optional[float] = ETA,
    seed: Optional[int] = _unset("Sampling seed."),
    batch_size: Optional[int] = _unset("Images per batch."),
    checkpoint: Optional[Path] = _unset("A checkpoint file (default: the run's newest)."),
    runs_dir: Path = RUNS_DIR,
    progress: bool = PROGRESS,
):
    """Variations of an image that keep its layout down to --level: upsample its own downsample."""
    from .edits import input_files, parse_level, read_image

    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be >= 1")
    try:
        path = input_files([image])[0]
        parts = _edit_parts(run, runs_dir, checkpoint, True, steps=steps, method=method, eta=eta,
                            seed=seed, batch_size=batch_size)
        run_dir, cfg, process, kwargs, load = parts
        level = parse_level(level, process)
        img = read_image(path)
        if img.shape[:2] != (process.image_size, process.image_size):
            raise _edit_errors()(f"{path} is {img.shape[1]}x{img.shape[0]}; `vary` takes images of the "
                                 f"run's full resolution, {process.image_size}x{process.image_size} "
                                 f"(smaller ones: `ssd-run upsample`)")
    except _edit_errors() as exc:
        raise UserError(str(exc)) from None
    from keras import ops
    import numpy as np

    y = np.asarray(ops.convert_to_numpy(process.degrade(img[None], level)), dtype=np.float32)[0]
    out = out or run_dir / "edits" / f"vary_{path.stem}_{level}px_s{strength:g}_seed{kwargs['seed']}"
    _say(f"{num_samples} variation(s) of {path} keeping its {level} px layout, from step "
         f"{_start(process, level, strength)} ({'with' if consistency else 'without'} consistency)")
    _strength_note(strength, consistency)
    rows, seconds, _ = _upsample_group(load(), kwargs, [(path, y)], level, out, strength, num_samples, consistency,
                                       progress, {path: path.stem})
    grid = _save_rows([[img] + rows[0]], out / "grid.png", process.image_size)
    _say(f"wrote {num_samples} variations in {seconds:.1f} s: {out / 'images'}, {grid} "
         f"(original, its {level} px downsample, variations)")


@app.command()
def interpolate(
    run: str = typer.Argument(..., help="Run directory or name."),
    seeds: Tuple[int, int] = typer.Option(..., "--seeds", help="The two seeds: A B."),
    frames: int = typer.Option(9, "--frames", help="Frames, ends included (>= 2)."),
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = _unset("Frames per batch."),
    out: Optional[Path] = EDIT_OUT,
    checkpoint: Optional[Path] = _unset("A checkpoint file (default: the run's newest)."),
    runs_dir: Path = RUNS_DIR,
    progress: bool = PROGRESS,
):
    """A smooth path between the ddim (eta 0) samples of two seeds: strip.png, interpolation.gif."""
    from .edits import interpolate as run_interpolate
    from .images import save_gif, save_grid, save_images

    if frames < 2:
        raise UserError(f"--frames {frames}: must be >= 2")
    run_dir, cfg, _, kwargs, load = _edit_parts(
        run, runs_dir, checkpoint, True, steps=steps, batch_size=batch_size, method="ddim", eta=0.0)
    model, process, objective = load()
    for key in ("method", "eta", "seed", "noise", "lanczos_iterations", "variance", "change_eta"):
        kwargs.pop(key, None)
    a, b = seeds
    out = out or run_dir / "edits" / f"interpolate_{a}_{b}_K{cfg.sampler.steps}"
    _say(f"{frames} frames from seed {a} to seed {b} (ddim, eta 0, K={cfg.sampler.steps})")
    result = run_interpolate(model, process, objective, a, b, frames, progress=progress, **kwargs)
    save_images(result.images, out / "frames", digits=3)
    strip = save_grid(result.images, out / "strip.png", columns=frames)
    gif = save_gif(result.images, out / "interpolation.gif")
    _say(f"wrote {strip}, {gif}, {out / 'frames'}")


# ---------------------------------------------------------------------------- import
@app.command("import")
def import_(
    checkpoint: Path = typer.Argument(..., help="An official SSD checkpoint (a PyTorch state_dict .pt), or a .safetensors file of ssd-run export."),
    pipeline: Optional[Path] = _unset(
        "The pipeline it was trained with (default: found from the tensor shapes and file name)."),
    name: Optional[str] = _unset("Run name (default: the checkpoint's file stem)."),
    runs_dir: Path = RUNS_DIR,
):
    """Turn an official (PyTorch) SSD checkpoint into a run: sample and evaluate it."""
    from .importer import import_checkpoint, summarize_unused

    report = import_checkpoint(checkpoint, pipeline=pipeline, name=name, runs_dir=runs_dir)
    _say(f"pipeline {report.reason}")
    if checkpoint.suffix.lower() == ".safetensors":
        _say(f"wrote {report.run_dir} (step {report.step}, {report.run_parameters:,} parameters)")
        return
    _say(f"official network: {report.official_parameters:,} parameters; the paths run "
         f"{report.run_parameters:,} of them")
    if report.unused:
        _say(f"never run by any path, left out ({len(report.unused)} tensors, listed in "
             f"import.json): {summarize_unused(report.unused)}")
    _say(f"wrote {report.run_dir} (step {report.step}); sample it with: "
         f"ssd-run sample {report.run_dir} --steps 250")


# ---------------------------------------------------------------------------- export
@app.command()
def export(
    run: str = typer.Argument(..., help="Run directory or name."),
    format: str = typer.Option(..., "--format", help="official (a PyTorch state_dict of the official "
                               "FlexiUNet) | safetensors (our variable paths, pipeline in the metadata)."),
    out: Path = typer.Option(..., "--out", help="The weights file to write (a model card <stem>.md "
                             "is written beside it)."),
    ema: bool = typer.Option(True, "--ema/--raw", help="The EMA weights (default) or the raw ones."),
    checkpoint: Optional[Path] = _unset("A checkpoint file (default: the run's newest)."),
    runs_dir: Path = RUNS_DIR,
):
    """Write a run's weights for other tools: the official code, or safetensors (docs/finetune.md)."""
    from .export import FORMATS, export_run
    from .runs import find_run

    if format not in FORMATS:
        raise UserError(f"--format {format!r}: must be one of {', '.join(FORMATS)}")
    report = export_run(find_run(run, runs_dir), format, out, ema=ema, checkpoint=checkpoint)
    _say(f"wrote {report.out} ({report.tensors} tensors, {report.weights} weights of step "
         f"{report.step}) and the model card {report.card}")
    if report.fill.get("zeros") or report.fill.get("copied"):
        _say(f"official layout: {len(report.fill['copied'])} copies of shared adapters, "
             f"{len(report.fill['zeros'])} zero tensors of the block no path runs "
             f"({', '.join(sorted({'.'.join(k.split('.')[:2]) for k in report.fill['zeros']}))})")


# ---------------------------------------------------------------------------- runs
@app.command()
def runs(runs_dir: Path = RUNS_DIR):
    """List runs with their newest checkpoint."""
    from .runs import list_runs

    found = list_runs(runs_dir)
    if not found:
        _say(f"no runs under {runs_dir}/")
    for run_dir, step in found:
        _say(f"{run_dir.name:30s} {'no checkpoint' if step is None else f'step {step}'}")


# ---------------------------------------------------------------------------- inspect
@app.command()
def inspect(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML file, or a run directory."),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    plot: Optional[Path] = _unset("Save r(t) and the per-step cost as an image here."),
    steps: List[int] = typer.Option([], "--steps", help="Sampling steps K to cost (repeatable; default: T and 250)."),
):
    """Levels, r(t), parameters, FLOPs per path, costs relative to DDPM, training memory."""
    from .config import load_pipeline
    from .inspection import describe_pipeline, plot_schedule

    imported = None
    if pipeline.is_dir():  # a run: its resolved config (and, if imported, the file's count)
        if (pipeline / "import.json").is_file():
            imported = json.loads((pipeline / "import.json").read_text())
        pipeline = pipeline / "config.toml"
    cfg = load_pipeline(pipeline, set_)
    bad = [k for k in steps if not 2 <= k <= cfg.process.timesteps]
    if bad:
        raise UserError(f"--steps {bad[0]}: must lie in [2, {cfg.process.timesteps}] (process.timesteps)")
    report = describe_pipeline(cfg, steps=steps or (cfg.process.timesteps, 250))
    _say(report.text)
    if imported:
        _say(f"  imported from {imported['source']}: {imported['official_parameters']:,} "
             f"parameters in the checkpoint, {len(imported['never_run'])} of its tensors never run")
    if plot:
        _say(f"wrote {plot_schedule(report, plot)}")


# ---------------------------------------------------------------------------- main
def _say(message: str) -> None:
    typer.echo(message)


def _backend() -> str:
    import keras

    return keras.backend.backend()


def _command_names() -> set[str]:
    return {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}


# The errors Typer reports itself (an unknown option or command, an option without its
# value, a value of the wrong type): click's ``ClickException``, which older typers
# re-export and newer ones vendor (0.27 on at the latest; click is then not installed).
# Found through ``typer.BadParameter``, which every typer exports: no click import.
_TYPER_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _set_thread_environment() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set: the command's setting, not the library's
    (importing ``ssd_keras`` changes no environment). OpenMP's default wait policy made 2
    torch threads 3-5x slower than one on small CPU machines (docs/design.md); ACTIVE
    (spinning) fixed that on an idle machine but was ~6x slower than PASSIVE as soon as
    another process shared the cores. OpenMP reads it when torch is loaded, which the
    commands do after this (the command line is parsed without torch)."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[list] = None) -> int:
    """Entry point: ``ssd-run PIPELINE.toml`` means ``ssd-run train PIPELINE.toml``."""
    _set_thread_environment()
    from .checkpoint import CheckpointError
    from .config import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in _command_names() and not args[0].startswith("-") and _names_a_file(args[0]):
        args.insert(0, "train")
    if args[:1] == ["--version"]:
        typer.echo(f"ssd_keras {__version__}")
        return 0
    import warnings

    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    # the training stack (Keras, torch) is imported by the commands that need it, not here:
    # a typo on the command line is reported at once
    try:
        code = app(args=args, prog_name="ssd-run", standalone_mode=False)
        if isinstance(code, int) and code:  # Typer's exit code for Ctrl-C (130), or an Exit
            if code == 130:
                typer.echo("interrupted", err=True)
            return code
    except _TYPER_ERRORS as exc:  # usage errors: Typer's usage line, hint and message
        _name_the_value(exc)
        exc.show()
        if getattr(exc, "ctx", False) is None:  # a message without them (an option's missing value)
            command = f" {args[0]}" if args and args[0] in _command_names() else ""
            typer.echo(f"Try 'ssd-run{command} -h' for help.", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort as exc:  # older typers turn Ctrl-C into Abort
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            typer.echo("interrupted", err=True)
            return 130
        return 1
    except _errors_of("train", "Stopped") as exc:
        typer.echo(str(exc), err=True)
        return 128 + exc.signum if getattr(exc, "signum", None) else 1
    except (ConfigError, CheckpointError, UserError) + _errors_of(
            "train", "NonFiniteLossError", "RunDirError") + _errors_of(
            "run_lock", "FolderLockedError") as exc:
        _error(str(exc))
        return EXIT_USER_ERROR
    except _errors_of("distributed", "DistributedError") as exc:
        _error(str(exc))
        return 1
    except _data_errors() as exc:
        _error(str(exc))
        return EXIT_USER_ERROR
    except OSError as exc:  # unwritable output, disk full, ...
        _error(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C outside a command (Typer handles it inside)
        typer.echo("interrupted", err=True)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise  # a bug: the traceback is what helps
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        _error(f"out of memory ({first}); reduce train.batch_size (or sampler.batch_size, or "
               f"the model); checkpoints already written are intact")
        return EXIT_USER_ERROR
    finally:
        warnings.showwarning = previous_showwarning
    return 0


# what a value that failed Typer's conversion should have been, by pydantic's error type
_EXPECTED = {"int_parsing": "an integer", "int_from_float": "an integer", "int_type": "an integer",
             "float_parsing": "a number", "float_type": "a number", "finite_number": "a finite number",
             "bool_parsing": "true or false", "bool_type": "true or false"}


def _name_the_value(exc) -> None:
    """Make a bad value's message name the value as typed: ``'abc' is not an integer``.

    Newer typers (0.2x, without click) convert values with pydantic, whose message names
    no value ("Input should be a valid integer"); the value is the ``input`` of the
    pydantic error the message was made from. Click's own messages already name it."""
    cause = getattr(exc, "__cause__", None)
    try:
        error = cause.errors(include_url=False)[0]
        raw = error["input"]
    except (AttributeError, IndexError, KeyError, TypeError):
        return
    if not hasattr(exc, "message") or not isinstance(raw, str):
        return
    expected = _EXPECTED.get(error.get("type"))
    exc.message = f"{raw!r} is not {expected}" if expected else f"{raw!r}: {exc.message}"


def _names_a_file(arg: str) -> bool:
    """Whether a first argument that is no command means ``train ARG``: an existing file, or
    something written as a path (``.toml``, a folder in it). Anything else is left to Typer,
    which reports it as an unknown command."""
    path = Path(arg)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long, a NUL in it: no file
        exists = False
    return exists or path.suffix.lower() == ".toml" or len(path.parts) > 1


def _errors_of(module: str, *names: str) -> tuple:
    """The exception classes ``names`` of ``ssd_keras.<module>``, or none if that module was
    never imported (then none of them can have been raised). ``main`` thus never imports
    the training stack just to sort an error."""
    found = sys.modules.get(f"{__package__}.{module}")
    return tuple(getattr(found, name) for name in names) if found is not None else ()


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text


def _error(message: str) -> None:
    """``error: ...`` on stderr; a message with several problems gets one line each."""
    for line in message.splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (``warning: ...``), without the source line."""
    try:
        (file or sys.stderr).write(f"warning: {message}\n")
    except (OSError, ValueError):
        pass


def _data_errors():
    from .data import DataError

    return (DataError,)
