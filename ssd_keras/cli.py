"""``ssd-run``: train, sample and inspect Scale Space Diffusion pipelines.

Thin by design: parse the command line, load the config, call the modules that do the
work, and turn every error a user can cause into one clear line and a non-zero exit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__

app = typer.Typer(
    name="ssd-run",
    help=(
        "Scale Space Diffusion in Keras 3.\n\n"
        "Train:   ssd-run PIPELINE.toml [--set section.key=value ...]\n\n"
        "Sample:  ssd-run sample [RUN] --steps 250\n\n"
        "Inspect: ssd-run inspect PIPELINE.toml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_USER_ERROR = 2
SET_HELP = "Override a pipeline key, e.g. --set optimizer.lr=2e-4 (repeatable)."


class UserError(Exception):
    """An error with a message meant for the user (no traceback)."""


# ---------------------------------------------------------------------------- train
@app.command()
def train(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML file (see pipelines/)."),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    steps: Optional[int] = typer.Option(None, help="Train at most this many more steps now."),
    fresh: bool = typer.Option(False, "--fresh", help="Refuse to resume: fail if the run has checkpoints."),
    allow_config_change: bool = typer.Option(
        False, "--allow-config-change", help="Resume even if model/process keys changed."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress bar."),
):
    """Train (or resume) the run of a pipeline: runs/<run.name>/."""
    from .config import load_pipeline
    from .train import Trainer

    cfg = load_pipeline(pipeline, set_)
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be >= 1")
    trainer = Trainer(cfg, resume=not fresh, allow_config_change=allow_config_change, progress=progress)
    try:
        where = (f"resuming {trainer.run_dir} at step {trainer.step} from {trainer.resumed_from.name}"
                 if trainer.resumed_from else f"new run {trainer.run_dir}")
        _say(f"{where}; training to step {cfg.train.steps} (backend {_backend()})")
        summary = trainer.fit(steps)
        rate = summary["steps_run"] / max(summary["seconds"], 1e-9)
        _say(
            f"step {summary['step']}: {summary['steps_run']} steps in {summary['seconds']:.0f} s "
            f"({rate:.2f} steps/s); checkpoints in {trainer.ckpt_dir}"
            + (f"; {summary['skipped']} non-finite steps skipped" if summary["skipped"] else "")
        )
        if summary["step"] >= cfg.train.steps:
            out = trainer.run_dir / "samples" / "final"
            _write_samples(trainer.ema_model(), trainer.process, trainer.objective, cfg, out,
                           progress=progress)
    finally:
        trainer.close()


# ---------------------------------------------------------------------------- sample
@app.command()
def sample(
    run: Optional[str] = typer.Argument(None, help="Run directory or name (default: the most recent run)."),
    steps: Optional[int] = typer.Option(None, help="Respaced sampling steps K (change steps are added)."),
    noise: Optional[str] = typer.Option(None, help="Posterior noise on change steps: exact | lanczos."),
    method: Optional[str] = typer.Option(None, help="ancestral | ddim (docs/sampling.md)."),
    eta: Optional[float] = typer.Option(None, help="ddim noise in [0, 1]: 0 deterministic, 1 ancestral."),
    lanczos_iterations: Optional[int] = typer.Option(None, help="Lanczos iterations (paper: 40)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", help="How many images."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Clip x0 predictions to [-1, 1]."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights."),
    checkpoint: Optional[Path] = typer.Option(None, help="A checkpoint file (default: the run's newest)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: RUN/samples/<settings>)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Where runs live."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Sample from a trained run: grid.png, images/, progression.png."""
    from .config import from_dict
    from .train import load_run

    run_dir = _find_run(run, runs_dir)
    cfg, groups, meta, path = load_run(run_dir, checkpoint)
    overrides = {k: v for k, v in dict(
        steps=steps, noise=noise, lanczos_iterations=lanczos_iterations, num_images=num_images,
        batch_size=batch_size, seed=seed, clip=clip, method=method, eta=eta).items() if v is not None}
    if overrides:
        d = cfg.to_dict()
        d["sampler"].update(overrides)
        cfg = from_dict(d, source=f"{path} (with command-line options)")
    model, process, objective = _sampling_parts(cfg, groups, ema)
    s = cfg.sampler
    out = out or run_dir / "samples" / f"step{meta['step']}_K{s.steps}_{_method_tag(s)}_seed{s.seed}{'' if ema else '_raw'}"
    _say(f"sampling {s.num_images} images from {path} ({'EMA' if ema else 'raw'} weights), "
         f"{len(process.respace(s.steps))} network calls per image")
    _write_samples(model, process, objective, cfg, out, progress=progress)



# ---------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    run: Optional[str] = typer.Argument(None, help="Run directory or name (default: the most recent run)."),
    num_images: Optional[int] = typer.Option(
        None, "--num-images", "-n",
        help="Samples to draw and real images to compare with (default 1000; with --samples-dir: all found)."),
    steps: Optional[int] = typer.Option(None, help="Respaced sampling steps K (change steps are added)."),
    noise: Optional[str] = typer.Option(None, help="Posterior noise on change steps: exact | lanczos."),
    method: Optional[str] = typer.Option(None, help="ancestral | ddim (docs/sampling.md)."),
    eta: Optional[float] = typer.Option(None, help="ddim noise in [0, 1]: 0 deterministic, 1 ancestral."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (also seeds the KID subsets)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per sampling batch."),
    inception_weights: Optional[Path] = typer.Option(
        None, help="Local Keras InceptionV3 no-top weights file: adds FID and KID (comparable only "
                   "within this tool, not with published FIDs)."),
    samples_dir: Optional[Path] = typer.Option(
        None, help="Evaluate the PNGs in this folder (or its images/) instead of sampling."),
    out: Optional[Path] = typer.Option(
        None, help="Output folder for metrics.json (and samples) (default: RUN/eval/<settings>, "
                   "or --samples-dir)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Where runs live."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Sample quality: FD-pix8, KID-pix8, channel stats, nearest-neighbour ratio (+ FID/KID)."""
    from .config import from_dict
    from .metrics import (
        draw_data_images, evaluate_images, format_table, inception_model, load_image_folder,
        quantize, save_json,
    )
    from .train import load_run

    if num_images is not None and num_images < 2:
        raise UserError(f"--num-images {num_images}: must be >= 2")
    if inception_weights is not None and not inception_weights.is_file():
        raise UserError(f"--inception-weights {inception_weights}: no such file")
    run_dir = _find_run(run, runs_dir)
    cfg, groups, meta, path = load_run(run_dir)
    overrides = {k: v for k, v in dict(
        steps=steps, noise=noise, num_images=num_images or 1000, batch_size=batch_size,
        seed=seed, method=method, eta=eta).items() if v is not None}
    d = cfg.to_dict()
    d["sampler"].update(overrides)
    cfg = from_dict(d, source=f"{path} (with command-line options)")
    s = cfg.sampler
    info = {"run": str(run_dir), "checkpoint": str(path), "step": meta["step"]}
    if samples_dir is not None:
        try:
            samples = load_image_folder(samples_dir, image_size=cfg.process.image_size, limit=num_images)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        out = out or samples_dir
        info["samples_dir"] = str(samples_dir)
    else:
        from .images import save_grid, save_image, to_uint8
        from .sample import sample_images

        model, process, objective = _sampling_parts(cfg, groups, ema=True)
        out = out or run_dir / "eval" / f"step{meta['step']}_K{s.steps}_{_method_tag(s)}_seed{s.seed}_n{s.num_images}"
        _say(f"sampling {s.num_images} images from {path} (EMA weights), "
             f"{len(process.respace(s.steps))} network calls per image")
        start = time.perf_counter()
        result = sample_images(
            model, process, objective, num_images=s.num_images, steps=s.steps, noise=s.noise,
            lanczos_iterations=s.lanczos_iterations, clip=s.clip, variance=s.variance, seed=s.seed,
            method=s.method, eta=s.eta,
            batch_size=s.batch_size, progress=progress,
        )
        info["sampling_seconds"] = round(time.perf_counter() - start, 3)
        info["sampler"] = {k: getattr(s, k) for k in (
            "steps", "method", "eta", "noise", "lanczos_iterations", "clip", "variance", "seed",
            "batch_size")}
        samples = quantize(result.images)
        save_grid(samples[:64], out / "grid.png")
        for i, img in enumerate(to_uint8(samples)):
            save_image(img, out / "images" / f"{i:05d}.png")
    data = quantize(draw_data_images(cfg, len(samples)))
    if len(data) < len(samples):
        _say(f"note: the dataset has only {len(data)} images; comparing with all of them")
    feature_model = None
    if inception_weights is not None:
        try:
            feature_model = inception_model(inception_weights)
        except ValueError as exc:  # a file Keras cannot read as InceptionV3 weights
            raise UserError(f"--inception-weights {inception_weights}: {exc}") from None
    result = evaluate_images(samples, data, feature_model=feature_model, seed=s.seed)
    result.update(info)
    _say(format_table(result))
    _say(f"wrote {save_json(result, out / 'metrics.json')}")


def _sampling_parts(cfg, groups: dict, ema: bool = True):
    """``(model, process, objective)`` of a checkpoint, with its EMA (or raw) weights."""
    from .builders import build_model, build_process
    from .objectives import make_objective
    from .train import CHANNELS

    model = build_model(cfg, precision="float32", channels=CHANNELS)
    weights = groups["ema"] if ema else [a for a, v in zip(groups["model"], model.variables) if v.trainable]
    for v, a in zip(model.trainable_variables, weights):
        v.assign(a)
    process = build_process(cfg)
    return model, process, make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma)


def _write_samples(model, process, objective, cfg, out: Path, progress: bool = True) -> None:
    from .images import save_grid, save_image, save_progression, to_uint8
    from .sample import sample_images

    s = cfg.sampler
    start = time.perf_counter()
    result = sample_images(
        model, process, objective, num_images=s.num_images, steps=s.steps, noise=s.noise,
        lanczos_iterations=s.lanczos_iterations, clip=s.clip, variance=s.variance, seed=s.seed,
        method=s.method, eta=s.eta,
        batch_size=s.batch_size, record_progression=True, progress=progress,
    )
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    save_grid(result.images, out / "grid.png")
    for i, img in enumerate(to_uint8(result.images)):
        save_image(img, out / "images" / f"{i:05d}.png")
    save_progression(result.frames, out / "progression.png", process.image_size)
    _say(f"wrote {len(result.images)} samples in {seconds:.1f} s "
         f"({seconds / len(result.images):.2f} s/image): {out / 'grid.png'}, {out / 'progression.png'}")


def _method_tag(s) -> str:
    """Sampler part of an output folder name: the noise method, or ddim and its eta."""
    return s.noise if s.method == "ancestral" else f"ddim{s.eta:g}"


def _find_run(run: Optional[str], runs_dir: Path) -> Path:
    if run:
        for candidate in (Path(run), runs_dir / run):
            if (candidate / "checkpoints").is_dir():
                return candidate
        raise UserError(f"no run {run!r}: neither {run} nor {runs_dir / run} holds a checkpoints/ folder")
    runs = [p.parent.parent for p in runs_dir.glob("*/checkpoints/ckpt_*.npz")]
    if not runs:
        raise UserError(f"no runs with checkpoints under {runs_dir}/; train one first: ssd-run PIPELINE.toml")
    newest = max(runs, key=lambda r: max(p.stat().st_mtime for p in (r / "checkpoints").glob("ckpt_*.npz")))
    return newest


# ---------------------------------------------------------------------------- runs
@app.command()
def runs(runs_dir: Path = typer.Option(Path("runs"), help="Where runs live.")):
    """List runs with their newest checkpoint."""
    from .checkpoint import list_checkpoints

    found = sorted(p for p in runs_dir.glob("*") if (p / "config.toml").is_file())
    if not found:
        _say(f"no runs under {runs_dir}/")
        return
    for r in found:
        ckpts = list_checkpoints(r / "checkpoints")
        last = f"step {ckpts[-1][0]}" if ckpts else "no checkpoint"
        _say(f"{r.name:30s} {last}")


# ---------------------------------------------------------------------------- inspect
@app.command()
def inspect(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML file."),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    plot: Optional[Path] = typer.Option(None, help="Save r(t) and the per-step cost as an image here."),
    steps: List[int] = typer.Option([], "--steps", help="Sampling steps K to cost (repeatable; default: T and 250)."),
):
    """Levels, r(t), parameters, FLOPs per path, costs relative to DDPM, training memory."""
    from .config import load_pipeline
    from .inspection import describe_pipeline, plot_schedule

    cfg = load_pipeline(pipeline, set_)
    bad = [k for k in steps if not 2 <= k <= cfg.process.timesteps]
    if bad:
        raise UserError(f"--steps {bad[0]}: must lie in [2, {cfg.process.timesteps}] (process.timesteps)")
    report = describe_pipeline(cfg, steps=steps or (cfg.process.timesteps, 250))
    _say(report.text)
    if plot:
        _say(f"wrote {plot_schedule(report, plot)}")


# ---------------------------------------------------------------------------- main
def _say(message: str) -> None:
    typer.echo(message)


def _backend() -> str:
    import keras

    return keras.backend.backend()


COMMANDS = {"train", "sample", "evaluate", "inspect", "runs"}


def main(argv: Optional[list] = None) -> int:
    """Entry point: ``ssd-run PIPELINE.toml`` means ``ssd-run train PIPELINE.toml``."""
    from .checkpoint import CheckpointError
    from .config import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and not args[0].startswith("-"):
        args.insert(0, "train")
    if args[:1] == ["--version"]:
        typer.echo(f"ssd_keras {__version__}")
        return 0
    import warnings

    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        from .train import Interrupted, NonFiniteLossError, RunDirError, Stopped

        try:
            code = app(args=args, prog_name="ssd-run", standalone_mode=False)
        except Interrupted as exc:  # a second SIGINT/SIGTERM during training
            typer.echo(f"error: {exc}", err=True)
            return 128 + exc.signum
        if isinstance(code, int) and code:  # Typer's exit code for Ctrl-C (130), or an Exit
            if code == 130:
                typer.echo("interrupted", err=True)
            return code
    except Stopped as exc:
        typer.echo(str(exc), err=True)
        return 128 + exc.signum if getattr(exc, "signum", None) else 1
    except (ConfigError, CheckpointError, UserError, NonFiniteLossError, RunDirError) as exc:
        _error(str(exc))
        return EXIT_USER_ERROR
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
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    finally:
        warnings.showwarning = previous_showwarning
    return 0


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
