"""The prepared device check (issue 28): one run on a lent GPU, every part timed, one JSON.

    python benchmarks/device_check.py --out device_check.json [--official PATH] [--images DIR]
    python benchmarks/device_check.py --smoke --out smoke.json   # every part on the CPU, seconds

A GPU is lent to this project for minutes, on one chip, in one prepared run: this script is
that run. It drives ssd_keras through its public API and its config only
(``PipelineConfig.replace`` of ``train.graph``, ``sampler.graph``, ``train.precision``),
so it measures what a user gets. Parts, in this order:

- ``parity/float32``, ``parity/bfloat16``: the official-format fixture
  ``tests/data/official_flexi_unet_16px_3L.{pt,npz}`` imported as ``ssd-run import`` does;
  every path's output on the device against the official code's. float32 must be within
  1e-4 (``pass``), as ``tests/test_official.py`` asks on the CPU; under bf16 (Keras's
  ``mixed_bfloat16`` policy, and ``torch.autocast`` around the float32 model) the error is
  reported.
- ``train/<precision>/<graph>``: ``pipelines/celeba64_4L.toml`` at batch 128, for
  precision in float32, mixed_bfloat16 and graph in eager, auto: ``Trainer.train_step`` on
  each path (warm-up steps, then timed ones; the first step, where a trace or compile
  happens, is reported apart), images/s per path, and the expected step of a run: the paths
  weighted by their share of batches under the paper's sampler
  (``inspection.path_probabilities``).
- ``sample/<graph>/ancestral_K250``, ``sample/<graph>/ddim_K25``: ``sample_images`` of 64
  images in one batch (random weights: speed does not depend on them), after a
  short warm-up call that traces or compiles each path; the images of every graph mode are
  compared with the eager ones (same seed, same host noise).
- ``loader``: ``make_dataset("folder")`` at 64 px and the training batch, for 1, 2 and all
  CPU cores as decoding threads, without and with ``data.cache``, next to the images/s the
  measured training parts consume.
- ``official/float32``, ``official/use_fp16`` (``--official PATH``): the official code on
  the same device and weights, trained as its ``TrainLoop`` does (its
  ``MixedPrecisionTrainer``: float32, or a float16 torso with float32 master weights and a
  dynamic loss scale), per path and expected, plus its sampling at K = 250.

Every part records its wall time and, on CUDA, its peak memory
(``torch.cuda.max_memory_allocated``, reset before each part). A global time budget
(``--budget-s``) is shared among the parts still to run in proportion to their weights;
a part whose minimum no longer fits is recorded as skipped with the reason, a part past its
share stops between steps (what it did not reach is marked), and a part stuck in one call
(a compile) is stopped by a timer and recorded as ``timeout``. A failing part records its
error and the run goes on; a setting the installed ssd_keras rejects (a graph mode it does
not know) is recorded as skipped with the config error. The JSON is rewritten after every
part, so a run killed from outside still leaves what it measured.

``--smoke`` runs every part on the CPU with a tiny model (the quickstart network, batch 4,
one warm-up and two timed steps per path, K = 20 and 5) so that
``tests/test_device_check.py`` keeps the script working before any GPU arrives;
``--official-stand-in`` (smoke only) lets the plain-torch twin of
``benchmarks/_torch_twin.py`` take the official code's place in the official part.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

if "--smoke" in sys.argv[1:]:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every part on the CPU, even on a GPU machine
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

FIXTURE_PT = ROOT / "tests" / "data" / "official_flexi_unet_16px_3L.pt"
FIXTURE_NPZ = ROOT / "tests" / "data" / "official_flexi_unet_16px_3L.npz"
FIXTURE_PIPELINE = ROOT / "tests" / "data" / "official_16px_3L.toml"
PARITY_TOLERANCE = 1e-4  # as tests/test_official.py


@dataclass(frozen=True)
class Settings:
    """The sizes of one mode of the check (full or smoke)."""

    pipeline: Path
    batch: int
    warmup_steps: int  # per path, the first included (trace / compile happen there)
    timed_steps: int  # per path
    sample_batch: int
    sample_steps: dict  # method -> K
    sample_warmup_steps: int
    loader_size: int
    loader_images: int
    loader_seconds: float
    official_sample_steps: int
    min_part_s: dict = field(default_factory=dict)  # part kind -> the least time it needs


FULL = Settings(
    pipeline=ROOT / "pipelines" / "celeba64_4L.toml", batch=128, warmup_steps=2, timed_steps=5,
    sample_batch=64, sample_steps={"ancestral": 250, "ddim": 25}, sample_warmup_steps=20,
    loader_size=64, loader_images=512, loader_seconds=2.0, official_sample_steps=250,
    min_part_s={"parity": 5, "train": 20, "sample": 10, "loader": 10, "official": 20},
)
SMOKE = Settings(
    pipeline=ROOT / "pipelines" / "quickstart.toml", batch=4, warmup_steps=1, timed_steps=2,
    sample_batch=4, sample_steps={"ancestral": 20, "ddim": 5}, sample_warmup_steps=5,
    loader_size=64, loader_images=16, loader_seconds=0.2, official_sample_steps=10,
)
PRECISIONS = ("float32", "mixed_bfloat16")
TRAIN_GRAPHS = ("eager", "auto")
SAMPLE_GRAPHS = ("eager", "auto", "trace")  # eager first: the others are compared with it
WEIGHTS = {"parity": 1.0, "train": 3.0, "sample": 1.0, "loader": 1.0, "official": 2.5}


# ------------------------------------------------------------------------------ parts
class SkipPart(Exception):
    """Raised by a part that cannot run here; the message is the recorded reason."""


class PartTimeout(BaseException):
    """Raised by the part timer (a BaseException, so that no ``except Exception`` in the
    code under test swallows it)."""


@dataclass
class Part:
    name: str
    run: Callable  # run(ctx) -> dict of results
    weight: float = 1.0
    min_s: float = 0.0


class Clock:
    """The time budget of the whole run and of the part now running."""

    def __init__(self, budget_s: float, now: Callable[[], float] = time.monotonic):
        self.now = now
        self.start = now()
        self.deadline = self.start + budget_s
        self.part_deadline = self.deadline

    def left(self) -> float:
        return self.deadline - self.now()

    def part_left(self) -> float:
        return self.part_deadline - self.now()

    def out_of_time(self) -> bool:
        return self.now() >= self.part_deadline


def run_parts(parts: list[Part], ctx, record: dict, clock: Clock, *,
              save: Callable[[], None] = lambda: None, say: Callable = print,
              hard_limits: bool = True, grace_s: float = 10.0) -> dict:
    """Run ``parts`` in order into ``record["parts"]``; one part's failure never stops the run.

    Each part gets a share of the budget left, in proportion to its weight among the parts
    still to run (at least its ``min_s``; time a part leaves unused goes to the later ones).
    A part is skipped when less than its ``min_s`` is left. Its status: ``ok``, ``skipped``
    (``reason``), ``error`` (``error`` and ``traceback``) or ``timeout`` (it was still in
    one call at ``1.5 x share + grace_s``). ``save()`` runs after each part.
    """
    results = record.setdefault("parts", {})
    for i, part in enumerate(parts):
        left = clock.left()
        weights = sum(p.weight for p in parts[i:])
        share = max(left * part.weight / weights, part.min_s)
        entry: dict = {"status": None}
        if left < part.min_s or left <= 0:
            entry.update(status="skipped", reason=(
                f"time budget: {max(left, 0):.0f} s left, the part needs at least {part.min_s:.0f} s"))
            results[part.name] = entry
            say(f"[{part.name}] skipped: {entry['reason']}")
            save()
            continue
        clock.part_deadline = clock.now() + share
        # the timer fires if a single call (a compile, a hung kernel) outlives the share
        hard = min(share * 1.5 + grace_s, left + grace_s)
        say(f"[{part.name}] running (share {share:.0f} s of {left:.0f} s left)")
        started = clock.now()
        armed = hard_limits and _arm_timer(hard)
        try:
            ctx.before_part()
            values = dict(part.run(ctx) or {})
            clash = {"status", "seconds", "reason", "error"} & set(values)
            if clash:
                raise RuntimeError(f"the part returned keys the runner writes: {sorted(clash)}")
            entry.update(status="ok", **values)
        except SkipPart as e:
            entry.update(status="skipped", reason=str(e))
        except PartTimeout:
            entry.update(status="timeout", reason=(
                f"still running {hard:.0f} s after it started (its share was {share:.0f} s): "
                f"stopped by the part timer"), traceback=_tail(traceback.format_exc()))
        except Exception as e:  # noqa: BLE001 - a failing part is a result, not the end
            entry.update(status="error", error=f"{type(e).__name__}: {_first_line(e)}",
                         traceback=_tail(traceback.format_exc()))
        finally:
            if armed:
                _disarm_timer()
        entry["seconds"] = round(clock.now() - started, 3)
        entry.update(ctx.after_part())
        results[part.name] = entry
        status = entry["status"]
        detail = entry.get("reason") or entry.get("error") or ""
        say(f"[{part.name}] {status} in {entry['seconds']:.1f} s" + (f": {detail}" if detail else ""))
        save()
    return record


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:500]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _on_timer(signum, frame):
    raise PartTimeout()


def _arm_timer(seconds: float) -> bool:
    if not hasattr(signal, "setitimer"):
        return False
    signal.signal(signal.SIGALRM, _on_timer)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    return True


def _disarm_timer() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


# ---------------------------------------------------------------------------- context
class Context:
    """What the parts share: the device, the settings, a temporary workspace, caches."""

    def __init__(self, args, settings: Settings, clock: Clock):
        import torch

        self.torch = torch
        self.args = args
        self.settings = settings
        self.clock = clock
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.tmp = Path(tempfile.mkdtemp(prefix="ssd_device_check_"))
        self.record: dict = {}
        self._folder = None
        self._parity_run = None
        self._sampling_model = None
        self.eager_images: dict = {}

    # ---- per part
    def before_part(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def after_part(self) -> dict:
        """The part's peak memory (CUDA); memory still held by caches is freed first."""
        if not self.cuda:
            return {"peak_memory_bytes": None,
                    "memory_note": "CPU run: torch.cuda.max_memory_allocated is CUDA only"}
        torch = self.torch
        try:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            reserved = torch.cuda.max_memory_reserved()
        except Exception as e:  # noqa: BLE001 - a broken context must not end the run
            return {"peak_memory_bytes": None, "memory_note": f"{type(e).__name__}: {_first_line(e)}"}
        gc.collect()
        torch.cuda.empty_cache()
        return {"peak_memory_bytes": int(peak), "peak_memory_gib": round(peak / 2**30, 3),
                "peak_reserved_bytes": int(reserved),
                "allocated_after_bytes": int(torch.cuda.memory_allocated())}

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    # ---- configs
    def config(self, name: str, **sections):
        """The pipeline of the settings, reading the check's JPEG folder, writing to the
        workspace, with ``sections`` changed (``PipelineConfig.replace``). A value the
        installed ssd_keras rejects becomes a ``SkipPart`` naming the config error."""
        from ssd_keras.config import ConfigError, load_pipeline

        cfg = load_pipeline(self.settings.pipeline)
        base = {
            "run": {"name": name, "output_dir": str(self.tmp / "runs")},
            "data": {"source": "folder", "path": str(self.image_folder()), "tfds_name": "",
                     "tfds_data_dir": "", "split_file": "", "random_flip": False},
            "train": {"batch_size": self.settings.batch, "sample_every": 0},
        }
        for section, change in sections.items():
            base[section] = {**base.get(section, {}), **change}
        try:
            return cfg.replace(**base)
        except ConfigError as e:
            raise SkipPart(f"the installed ssd_keras rejects this setting: {_first_line(e)}") from None

    def image_folder(self) -> Path:
        """``--images DIR``, or a folder of CelebA-sized (178x218) JPEGs made once."""
        if self.args.images is not None:
            return Path(self.args.images)
        if self._folder is None:
            from bench_data import write_jpeg_folder

            self._folder = Path(write_jpeg_folder(str(self.tmp / "images"), self.settings.loader_images,
                                                  218, width=178, seed=0))
        return self._folder

    def parity_run(self) -> Path:
        if self._parity_run is None:
            from ssd_keras.importer import import_checkpoint

            report = import_checkpoint(FIXTURE_PT, pipeline=FIXTURE_PIPELINE, runs_dir=self.tmp / "parity")
            self._parity_run = report.run_dir
        return self._parity_run

    def sampling_model(self, cfg):
        """One float32 Flexi-UNet of the pipeline (random weights), shared by the sampling parts."""
        if self._sampling_model is None:
            from ssd_keras.builders import build_model, build_process
            from ssd_keras.objectives import make_objective

            process = build_process(cfg)
            model = build_model(cfg, precision="float32")
            wake_zero_kernels(model)
            self._sampling_model = (model, process,
                                    make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma))
        return self._sampling_model

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def wake_zero_kernels(model, seed: int = 0) -> int:
    """Give the kernels a fresh ADM network initialises to zero (the output convolution,
    each ResBlock's last convolution, attention's projection) random values of scale
    1/sqrt(fan-in), so that outputs compared between implementations or graph modes are
    not all zero; returns how many were set. Speed does not depend on the values."""
    from keras import ops

    rng = np.random.default_rng(seed)
    count = 0
    for v in model.trainable_variables:
        shape = tuple(v.shape)
        if len(shape) >= 2 and not np.any(ops.convert_to_numpy(v.value)):
            fan_in = int(np.prod(shape[:-1]))
            v.assign(rng.normal(0.0, fan_in ** -0.5, shape).astype("float32"))
            count += 1
    return count


# ----------------------------------------------------------------------------- parity
def part_parity(precision: str):
    def run(ctx: Context) -> dict:
        from keras import ops

        from ssd_keras.builders import build_model
        from ssd_keras.config import load_pipeline
        from ssd_keras.runs import load_sampling_model

        fixture = np.load(FIXTURE_NPZ)
        run_dir = ctx.parity_run()
        model, _, _ = load_sampling_model(run_dir)

        def errors(call) -> dict:
            out = {}
            for key in model.path_keys:
                r_in, r_out = key
                x = fixture[f"x_{r_in}_{r_out}"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
                t = fixture[f"t_{r_in}_{r_out}"].astype("float32")
                ref = fixture[f"out_{r_in}_{r_out}"].transpose(0, 2, 3, 1)
                y = ops.convert_to_numpy(ops.cast(call(key, x, t), "float32"))
                err = float(np.abs(y - ref).max())
                out[f"{r_in}->{r_out}"] = {"max_abs_error": err,
                                           "relative_to_max_output": err / float(np.abs(ref).max())}
            return out

        def plain(m):
            return lambda key, x, t: m.path(*key)([x, t], training=False)

        if precision == "float32":
            paths = errors(plain(model))
            worst = max(p["max_abs_error"] for p in paths.values())
            return {"paths": paths, "max_abs_error": worst, "tolerance": PARITY_TOLERANCE,
                    "pass": worst <= PARITY_TOLERANCE,
                    "tf32": _tf32_state(ctx.torch)}
        # Keras's mixed_bfloat16 policy: the same variables (float32), bf16 compute
        cfg = load_pipeline(run_dir / "config.toml").replace(train={"precision": precision})
        mixed = build_model(cfg)
        if [tuple(v.shape) for v in mixed.variables] != [tuple(v.shape) for v in model.variables]:
            raise RuntimeError("the mixed-precision model's variables differ from the float32 model's")
        for target, source in zip(mixed.variables, model.variables):
            target.assign(source.value)
        policy = errors(plain(mixed))
        result = {"keras_policy": {"paths": policy,
                                   "max_abs_error": max(p["max_abs_error"] for p in policy.values())},
                  "note": "bf16 keeps 8 significant bits: relative rounding 2^-8 = 3.9e-3 per op"}
        torch = ctx.torch

        def autocast(key, x, t):
            with torch.autocast(ctx.device, dtype=torch.bfloat16):
                return model.path(*key)([x, t], training=False)

        auto = errors(autocast)
        result["torch_autocast"] = {"paths": auto,
                                    "max_abs_error": max(p["max_abs_error"] for p in auto.values())}
        return result

    return run


def _tf32_state(torch) -> dict:
    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


# ---------------------------------------------------------------------------- training
def _path_name(key) -> str:
    return f"{key[0]}->{key[1]}"


def time_paths(ctx: Context, process, step: Callable, batch: int) -> dict:
    """Per path (largest share first): warm-up steps (the first timed apart), timed steps;
    images/s, and the expected step of a run when every path was reached."""
    from bench_vs_official import path_timesteps

    from ssd_keras.inspection import path_probabilities

    s = ctx.settings
    probs = path_probabilities(process)
    keys = sorted(probs, key=lambda k: (-probs[k], -k[0], -k[1]))
    rng = np.random.default_rng(1)
    paths: dict = {}
    for key in keys:
        name = _path_name(key)
        if ctx.clock.out_of_time():
            paths[name] = {"share": probs[key], "skipped": "the part's share of the time budget ran out"}
            continue
        t = path_timesteps(process, key, batch, rng)
        losses, times = [], []
        try:
            first = ctx.timed(lambda: losses.append(step(t)))
            for _ in range(s.warmup_steps - 1):
                if ctx.clock.out_of_time():
                    break
                step(t)
            for _ in range(s.timed_steps):
                if ctx.clock.out_of_time() and times:
                    break
                times.append(ctx.timed(lambda: losses.append(step(t))))
        except Exception as e:  # noqa: BLE001 - one failing path: the others are still measured
            paths[name] = {"share": probs[key], "error": f"{type(e).__name__}: {_first_line(e)}",
                           "traceback": _tail(traceback.format_exc(), 8)}
            continue
        med = statistics.median(times)
        paths[name] = {"share": probs[key], "first_step_s": first, "step_s": med,
                       "step_s_all": times, "images_per_s": batch / med,
                       "loss_finite": bool(np.all(np.isfinite(losses)))}
    result = {"batch": batch, "paths": paths}
    done = [k for k in keys if "step_s" in paths[_path_name(k)]]
    result["share_measured"] = sum(probs[k] for k in done)
    if len(done) == len(keys):
        expected = sum(probs[k] * paths[_path_name(k)]["step_s"] for k in keys)
        result.update(expected_step_s=expected, expected_images_per_s=batch / expected)
    else:
        failed = [n for n, p in paths.items() if "error" in p]
        result.update(expected_step_s=None, expected_images_per_s=None,
                      expected_note=(f"paths failed: {', '.join(failed)}" if failed else
                                     "not every path was reached within the time budget"))
    return result


def part_train(precision: str, graph: str):
    def run(ctx: Context) -> dict:
        from ssd_keras.train import Trainer

        cfg = ctx.config(f"train_{precision}_{graph}", train={"precision": precision, "graph": graph})
        started = time.perf_counter()
        trainer = Trainer(cfg, progress=False)
        try:
            build_s = time.perf_counter() - started
            x0 = next(trainer.data)

            def step(t):
                loss, _, _ = trainer.train_step(x0, t=t)
                return loss

            result = time_paths(ctx, trainer.process, step, x0.shape[0])
            result.update(pipeline=ctx.settings.pipeline.name, precision=precision, graph=graph,
                          build_s=build_s)
            return result
        finally:
            trainer.close()
            del trainer

    return run


# ---------------------------------------------------------------------------- sampling
def part_sample(graph: str, method: str):
    def run(ctx: Context) -> dict:
        from ssd_keras.sample import sample_images

        s = ctx.settings
        k = s.sample_steps[method]
        cfg = ctx.config("sample", sampler={"graph": graph, "method": method, "steps": k, "eta": 0.0,
                                            "num_images": s.sample_batch, "batch_size": s.sample_batch,
                                            "seed": 0})
        model, process, objective = ctx.sampling_model(cfg)
        accepted = inspect.signature(sample_images).parameters
        settings = {key: value for key, value in dataclasses.asdict(cfg.sampler).items() if key in accepted}
        settings["progress"] = False
        warm = dict(settings, steps=min(s.sample_warmup_steps, k))
        warm_s = ctx.timed(lambda: sample_images(model, process, objective, **warm))
        box = []
        seconds = ctx.timed(lambda: box.append(sample_images(model, process, objective, **settings)))
        result = box[0]
        out = {"graph": graph, "method": method, "steps": k, "batch": s.sample_batch,
               "network_calls": int(result.network_calls), "warmup_call_s": warm_s,
               "warmup_steps": warm["steps"], "sample_s": seconds,
               "images_per_s": s.sample_batch / seconds,
               "ms_per_network_call": 1e3 * seconds / max(result.network_calls, 1),
               "images_finite": bool(np.all(np.isfinite(result.images)))}
        if graph == "eager":
            ctx.eager_images[method] = result.images
        elif method in ctx.eager_images:
            out["max_abs_diff_vs_eager"] = float(np.abs(result.images - ctx.eager_images[method]).max())
        return out

    return run


# ------------------------------------------------------------------------------ loader
def part_loader(ctx: Context) -> dict:
    from bench_data import measure_decode_rate

    s = ctx.settings
    cores = os.cpu_count() or 1
    workers = sorted({1, 2, cores})
    rows = []
    for w in workers:
        for cache in (False, True):
            if ctx.clock.out_of_time() and rows:
                rows.append({"workers": w, "cache": cache, "skipped": "time budget"})
                continue
            rate = measure_decode_rate("folder", s.loader_size, s.batch, path=str(ctx.image_folder()),
                                       num_workers=w, cache=cache, seconds=s.loader_seconds,
                                       warm_epoch=cache, seed=0)
            rows.append({"workers": w, "cache": cache, "images_per_s": rate,
                         "images_per_s_per_worker": rate / w})
    consumed = {name: part["expected_images_per_s"] for name, part in ctx.record.get("parts", {}).items()
                if name.startswith("train/") and part.get("expected_images_per_s")}
    result = {"image_size": s.loader_size, "batch": s.batch, "cpu_count": cores,
              "folder": "--images" if ctx.args.images else "generated 178x218 JPEGs (CelebA's size)",
              "rows": rows, "training_consumes_images_per_s": consumed}
    uncached = [r["images_per_s"] for r in rows if not r["cache"] and "images_per_s" in r]
    if consumed and uncached:
        result["best_uncached_over_fastest_training"] = max(uncached) / max(consumed.values())
    return result


# ---------------------------------------------------------------------------- official
def part_official(use_fp16: bool):
    def run(ctx: Context) -> dict:
        from keras import ops

        from ssd_keras.builders import build_model, build_process

        args = ctx.args
        if args.official is None and not args.official_stand_in:
            raise SkipPart("no --official checkout given")
        if args.official_stand_in and use_fp16:
            raise SkipPart("the stand-in (benchmarks/_torch_twin.py) has no use_fp16")
        torch = ctx.torch
        cfg = ctx.config("official", train={"precision": "float32"})
        started = time.perf_counter()
        model = build_model(cfg, precision="float32")
        woken = wake_zero_kernels(model)  # else both networks output zeros: a vacuous check
        process = build_process(cfg)
        if args.official_stand_in:
            import _torch_twin

            reference, name = _torch_twin.TorchTwin(cfg, model, process), "torch twin (stand-in)"
        else:
            import _official

            reference = _official.OfficialTwin(_official.load(args.official), cfg, model,
                                               device=ctx.device, use_fp16=use_fp16, train_loop=True)
            name = "official"
        build_s = time.perf_counter() - started
        # the same function first (the official torso in float16 with use_fp16: reported)
        rng = np.random.default_rng(0)
        same = {}
        for key in model.path_keys:
            x = rng.standard_normal((2, key[0], key[0], 3)).astype("float32")
            t = np.array([3.0, 700.0], "float32")
            ours = ops.convert_to_numpy(model.path(*key)([x, t], training=False))
            try:
                same[_path_name(key)] = float(np.abs(ours - reference.path_output(x, t, key)).max())
            except Exception as e:  # noqa: BLE001 - reported; the timing below says more
                same[_path_name(key)] = f"{type(e).__name__}: {_first_line(e)}"
        numbers = [v for v in same.values() if isinstance(v, float)]
        worst = max(numbers) if len(numbers) == len(same) else float("nan")
        if not use_fp16 and not worst <= PARITY_TOLERANCE:
            raise RuntimeError(f"the official network and ours differ by {worst:g} (> {PARITY_TOLERANCE})")
        rng = np.random.default_rng(2)
        s = ctx.settings
        x0 = rng.uniform(-1, 1, (s.batch, cfg.process.image_size, cfg.process.image_size, 3))
        device = "cpu" if args.official_stand_in else ctx.device
        x0_nchw = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2), np.float32)).to(device)
        del model
        result = time_paths(ctx, process, lambda t: reference.train_step(x0_nchw, t), s.batch)
        result.update(reference=name, use_fp16=use_fp16, build_s=build_s,
                      max_abs_output_difference_vs_ours=same, zero_kernels_randomised=woken)
        if getattr(reference, "mp_trainer", None) is not None:
            result["lg_loss_scale"] = float(reference.mp_trainer.lg_loss_scale)
        k = s.official_sample_steps
        if ctx.clock.part_left() > 0:
            reference.sample(s.sample_batch, min(s.sample_warmup_steps, k))  # warm-up
            seconds = ctx.timed(lambda: reference.sample(s.sample_batch, k))
            result["sample"] = {"method": "ancestral (the official: Lanczos on change steps)",
                                "steps": k, "batch": s.sample_batch, "seconds": seconds,
                                "images_per_s": s.sample_batch / seconds}
        else:
            result["sample"] = {"skipped": "the part's share of the time budget ran out"}
        return result

    return run


# ------------------------------------------------------------------------------ report
def device_info(ctx: Context) -> dict:
    import keras
    import torch

    info = {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "ssd_keras": _ssd_keras_version(),
        "device": ctx.device,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("KERAS_BACKEND", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "total_memory_bytes": int(props.total_memory),
                       "multi_processor_count": int(props.multi_processor_count),
                       "count": torch.cuda.device_count()}
        info["tf32_at_start"] = _tf32_state(torch)
        info["nvidia_smi"] = _nvidia_smi()
    return info


def _ssd_keras_version() -> dict:
    import ssd_keras

    out = {"version": getattr(ssd_keras, "__version__", None)}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            out.update(commit=head.stdout.strip(), dirty=bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _nvidia_smi() -> dict | str:
    fields = "driver_version,name,memory.total,power.limit,clocks.max.sm,temperature.gpu,utilization.gpu"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi: {type(e).__name__}: {e}"
    if done.returncode != 0:
        return f"nvidia-smi exit {done.returncode}: {done.stderr.strip()[:200]}"
    values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values))


def summary(record: dict) -> dict:
    """Expected training images/s of every train part, ratios to the official code."""
    parts = record.get("parts", {})
    ours = {n: p["expected_images_per_s"] for n, p in parts.items()
            if n.startswith("train/") and p.get("expected_images_per_s")}
    official = {n: p["expected_images_per_s"] for n, p in parts.items()
                if n.startswith("official/") and p.get("expected_images_per_s")}
    out = {"status": {n: p["status"] for n, p in parts.items()},
           "train_expected_images_per_s": ours, "official_expected_images_per_s": official,
           "sample_images_per_s": {n: p["images_per_s"] for n, p in parts.items()
                                   if n.startswith("sample/") and p.get("images_per_s")},
           "peak_memory_gib": {n: p.get("peak_memory_gib") for n, p in parts.items()
                               if p.get("peak_memory_gib") is not None}}
    out["ours_over_official"] = {f"{a} / {b}": ours[a] / official[b] for a in ours for b in official}
    parity = parts.get("parity/float32", {})
    if "pass" in parity:
        out["parity_float32_pass"] = parity["pass"]
    return out


def plan(settings: Settings, args) -> list[Part]:
    w, m = WEIGHTS, settings.min_part_s
    parts = [Part(f"parity/{p}", part_parity(p), w["parity"], m.get("parity", 0)) for p in PRECISIONS]
    parts += [Part(f"train/{p}/{g}", part_train(p, g), w["train"], m.get("train", 0))
              for g in TRAIN_GRAPHS for p in PRECISIONS]
    # a sampling part's weight grows with its network calls: K = 250 gets 2, K = 25 0.2
    parts += [Part(f"sample/{g}/{method}_K{k}", part_sample(g, method),
                   w["sample"] * k / max(settings.sample_steps.values()) * 2, m.get("sample", 0))
              for g in SAMPLE_GRAPHS for method, k in settings.sample_steps.items()]
    parts.append(Part("loader", part_loader, w["loader"], m.get("loader", 0)))
    parts += [Part(f"official/{'use_fp16' if f else 'float32'}", part_official(f), w["official"],
                   m.get("official", 0)) for f in (False, True)]
    if args.parts:
        wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
        parts = [p for p in parts if any(p.name.startswith(want) for want in wanted)]
    return parts


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write (rewritten after each part)")
    ap.add_argument("--official", type=Path, default=None,
                    help="checkout of github prateksha/ScaleSpaceDiffusion (outside this repository)")
    ap.add_argument("--images", type=Path, default=None,
                    help="image folder for the loader and the trainer (default: generated JPEGs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget of all parts, seconds (default 420; smoke 600)")
    ap.add_argument("--parts", default=None,
                    help="comma-separated name prefixes of the parts to run (e.g. parity,train/float32)")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU with a tiny model")
    ap.add_argument("--official-stand-in", action="store_true",
                    help="(--smoke only) the plain-torch twin takes the official code's place")
    args = ap.parse_args(argv)
    if args.official_stand_in and not args.smoke:
        print("error: --official-stand-in only with --smoke", file=sys.stderr)
        return 2
    if args.official is not None and not (args.official / "guided_diffusion" / "unet.py").is_file():
        print(f"error: --official {args.official}: not a checkout of the official SSD code "
              "(no guided_diffusion/unet.py)", file=sys.stderr)
        return 2
    if args.images is not None and not args.images.is_dir():
        print(f"error: --images {args.images}: not a directory", file=sys.stderr)
        return 2

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); --smoke runs every part "
              "on the CPU", file=sys.stderr)
        return 2
    settings = SMOKE if args.smoke else FULL
    budget = args.budget_s if args.budget_s is not None else (600.0 if args.smoke else 420.0)
    clock = Clock(budget)
    ctx = Context(args, settings, clock)
    record = ctx.record
    record["check"] = {"mode": "smoke" if args.smoke else "full", "budget_s": budget,
                       "pipeline": str(settings.pipeline.relative_to(ROOT)), "batch": settings.batch,
                       "command": " ".join([Path(sys.argv[0]).name]
                                           + (argv if argv is not None else sys.argv[1:]))}
    record["device"] = device_info(ctx)

    def save():
        record["check"]["elapsed_s"] = round(time.monotonic() - clock.start, 1)
        try:
            record["summary"] = summary(record)
        except Exception as e:  # noqa: BLE001 - the parts' own records are what matters
            record["summary"] = {"error": f"{type(e).__name__}: {_first_line(e)}"}
        write_json(args.out, record)

    def say(message: str) -> None:
        print(f"{time.monotonic() - clock.start:7.1f} s  {message}", file=sys.stderr, flush=True)

    save()
    try:
        run_parts(plan(settings, args), ctx, record, clock, save=save, say=say)
    finally:
        if ctx.cuda:
            record["device"]["tf32_at_end"] = _tf32_state(torch)
        save()
        ctx.close()
    print(json.dumps(record["summary"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
