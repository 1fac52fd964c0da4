"""``ssd-run evaluate``: samples on disk, reference statistics, metrics.json (docs/evaluation.md).

Three stages, each restartable:

1. **Samples** (:func:`sample_to_folder`): PNGs ``images/000000.png ...`` written chunk by
   chunk. Chunk ``c`` holds images ``[c*C, (c+1)*C)`` and is sampled with its own seed
   :func:`chunk_seed` ``(seed, c)``; batches inside a chunk draw from that seed in order,
   so image ``i`` depends only on the seed, ``i``, the chunk size ``C`` and the batch size
   (not on how many images are asked for, nor on where an earlier run stopped). A folder
   remembers what made its images (``samples.json``); a resumed run decodes every PNG
   already there (:func:`whole_png`), redraws the chunks with one missing, truncated or
   unreadable (their images come out as in a clean run: same chunk seed), skips the rest,
   and refuses settings that would make different images. The folder is locked while an
   evaluation works in it (``ssd_keras/run_lock.py``).
2. **Reference** (:func:`reference_folder`, :func:`reference_statistics`): the run's data,
   preprocessed as in training without flips, written once as PNGs to a cache folder whose
   name is a hash of the dataset, split, resolution, preprocessing and image count; the
   Inception statistics (mean, covariance, features) are cached beside them per weights
   file. Or a given ``.npz`` with ``mu`` and ``sigma`` (and optionally ``features``).
3. **Metrics**: FID, KID and precision/recall from torch-fidelity (``inception.py``) when
   the weights file is given; the weights-free measures of ``metrics.py`` always.
"""

from __future__ import annotations

from dataclasses import asdict
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import inception, metrics

CHUNK_TARGET = 500  # default chunk: the multiple of the batch size nearest this (at least one batch)
WEIGHTS_FREE_IMAGES = 1000  # the weights-free measures use at most this many images of each set
REFERENCE_SEED = 0  # the reference images are epoch 0 of the data in this seed's order
#: What is done to a dataset image before it becomes a reference PNG. Part of the cache key:
#: change it (e.g. bump "version") whenever ``ssd_keras.data``'s preprocessing changes.
PREPROCESSING = {"crop": "ADM center_crop_arr (box-halving, bicubic, center crop)",
                 "random_flip": False, "stored": "PNG uint8", "version": 1}


class EvaluationError(ValueError):
    """Bad input to an evaluation (a mismatching folder, an unreadable reference file)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssd_keras"


def chunk_size_for(batch_size: int, requested: int = 0) -> int:
    """``requested`` (a multiple of the batch size), or the multiple nearest CHUNK_TARGET."""
    if requested:
        return requested
    return batch_size * max(1, round(CHUNK_TARGET / batch_size))


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk ``chunk``: numpy's SeedSequence of ``(seed, chunk)``."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def whole_png(path: Path, image_size: int | None) -> bool:
    """Whether ``path`` is a complete, uncorrupted PNG (of ``image_size`` square): its chunk
    checksums verified and its pixels decoded to the end (a file cut short by a kill or a
    full disk, or any other damage, is not)."""
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone let PIL pad cut-off files: not here
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated samples "
                           "would pass as whole ones")
    try:
        with Image.open(path) as img:
            if img.format != "PNG" or (image_size and img.size != (image_size, image_size)):
                return False
            img.verify()  # chunk CRCs
        with Image.open(path) as img:
            img.load()  # the pixel data, to its last byte
        return True
    except Exception:  # PIL reports damage as OSError, SyntaxError, ValueError, zlib.error...
        return False


def _sampler_settings(cfg) -> dict:
    d = cfg.to_dict()["sampler"]
    d.pop("num_images", None)
    return d


def balanced_labels(num_classes: int, start: int, count: int):
    """Class-conditional runs: sample ``i`` has class ``i mod num_classes`` (a class-balanced
    sample whatever the chunking); ``None`` for unconditional runs."""
    if not num_classes:
        return None
    return (np.arange(start, start + count) % num_classes).astype(np.int32)


# ---------------------------------------------------------------------------- samples
def sample_to_folder(parts: Callable, cfg, folder: Path, *, num_samples: int, identity: dict,
                     progress: bool = True, say: Callable = print) -> dict:
    """Make ``folder/images/000000.png ...`` hold ``num_samples`` samples; returns timing.

    ``parts()`` gives ``(model, process, objective)`` (called only if something is left to
    sample). ``identity`` (checkpoint, weights used, ...) and the sampler settings and chunk
    size are stored in ``folder/samples.json``; an existing folder made with other values
    is refused.
    """
    from tqdm.auto import tqdm

    from .images import save_grid, save_images
    from .backend import Execution
    from .sample import sample_images

    s = cfg.sampler
    chunk = chunk_size_for(s.batch_size, cfg.eval.chunk_size)
    made_by = {**identity, "sampler": _sampler_settings(cfg), "chunk_size": chunk,
               "chunk_seeds": "numpy SeedSequence([sampler.seed, chunk index])"}
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "samples.json"
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise EvaluationError(
                f"{record} is unreadable ({exc}): what made the samples in {folder} is unknown; "
                "give another --out or delete that folder") from None
        diff = sorted(k for k in set(before) | set(made_by) if before.get(k) != made_by.get(k))
        if diff:
            raise EvaluationError(
                f"{folder} holds samples made with other settings ({', '.join(diff)}: "
                f"{', '.join(f'{before.get(k)!r} != {made_by.get(k)!r}' for k in diff)}); "
                "give another --out or delete that folder")
    else:
        metrics.save_json(made_by, record)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    name = lambda i: images / f"{i:06d}.png"  # noqa: E731
    for leftover in images.glob(".*.tmp"):  # the temporary file of a killed or failed write
        leftover.unlink(missing_ok=True)
    chunks = -(-num_samples // chunk)
    todo, damaged = [], []
    for c in range(chunks):  # every image already there is decoded: a damaged one is redrawn
        present = [i for i in range(c * chunk, min((c + 1) * chunk, num_samples)) if name(i).is_file()]
        bad = [i for i in present if not whole_png(name(i), cfg.process.image_size)]
        damaged += bad
        if bad or len(present) < min((c + 1) * chunk, num_samples) - c * chunk:
            todo.append(c)
    done = num_samples - sum(min((c + 1) * chunk, num_samples) - c * chunk for c in todo)
    seconds, sampled = 0.0, 0
    if damaged:
        shown = ", ".join(name(i).name for i in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        say(f"warning: {len(damaged)} unreadable or truncated samples in {images} ({shown}): "
            "their chunks are sampled again")
    if todo:
        if done:
            say(f"resuming: {done} of {num_samples} samples already in {images}")
        model, process, objective = parts()
        execution = Execution.from_config(cfg)  # keeps each path's trace across the chunks
        bar = tqdm(total=num_samples, initial=done, desc="samples", unit="img", disable=not progress)
        for c in todo:
            start, stop = c * chunk, min((c + 1) * chunk, num_samples)
            want = -(-(stop - start) // s.batch_size) * s.batch_size  # whole batches
            t0 = time.perf_counter()
            settings = dict(asdict(s), num_images=want, seed=chunk_seed(s.seed, c))
            result = sample_images(model, process, objective, **settings, progress=progress,
                                   execution=execution,
                                   labels=balanced_labels(cfg.model.num_classes, start, want))
            try:
                save_images(result.images[: stop - start], images, start=start)  # named as name(i)
            except OSError as exc:  # a full disk: what is written stays, the rest resumes
                raise EvaluationError(
                    f"cannot write samples to {images}: {exc.strerror or exc}; the first {start} of "
                    f"{num_samples} are done; run the same command again to resume") from exc
            seconds += time.perf_counter() - t0
            sampled += stop - start
            bar.update(stop - start)
        bar.close()
    grid_path = folder / "grid.png"
    if todo or not whole_png(grid_path, None):
        first = metrics.load_image_folder(images, image_size=cfg.process.image_size, limit=64)
        save_grid(first, grid_path)  # [-1, 1], as save_grid takes them
    return {"sampling_seconds": round(seconds, 3), "sampled_now": sampled}


# ---------------------------------------------------------------------------- reference
def reference_description(cfg, num_images: int) -> dict:
    """What determines the reference images: dataset, split, resolution, preprocessing, count."""
    d = cfg.data

    def absolute(p):
        return str(Path(p).resolve()) if p else ""

    split_hash = ""
    if d.split_file and Path(d.split_file).is_file():
        split_hash = hashlib.sha256(Path(d.split_file).read_bytes()).hexdigest()[:16]
    return {
        "source": d.source, "path": absolute(d.path), "split_file": absolute(d.split_file),
        "split_file_sha256": split_hash, "tfds_name": d.tfds_name, "tfds_split": d.tfds_split,
        "image_key": d.image_key, "limit": d.limit, "small_images": d.small_images,
        "on_bad_image": d.on_bad_image, "image_size": cfg.process.image_size,
        "preprocessing": PREPROCESSING, "order_seed": REFERENCE_SEED, "num_images": num_images,
    }


def _key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def reference_folder(cfg, num_images: int, cache_dir: Path, *, progress: bool = True,
                     say: Callable = print) -> tuple[Path, dict]:
    """The cached folder of reference PNGs for ``cfg``'s data; made if missing.

    ``num_images`` is capped at one epoch of the data. Returns ``(folder, description)``;
    the PNGs are in ``folder/images``.
    """
    from tqdm.auto import tqdm

    from .builders import build_dataset
    from .images import save_images

    description = reference_description(cfg, num_images)
    key = _key(description)
    folder = Path(cache_dir) / "reference" / f"{cfg.data.source}{cfg.process.image_size}-{key}"
    if (folder / "reference.json").is_file():
        return folder, json.loads((folder / "reference.json").read_text())
    ds = build_dataset(cfg.replace(data={"random_flip": False, "labels": False, "labels_file": ""}, run={"seed": REFERENCE_SEED},
                                   source="evaluation reference (random_flip = false)"))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        n = min(num_images, ds.images_per_epoch)
        if n < num_images:
            say(f"note: the dataset has {ds.images_per_epoch} images; the reference uses all of them")
        say(f"writing {n} reference images of the run's data to {folder}")
        bar = tqdm(total=n, desc="reference", unit="img", disable=not progress)
        have = 0
        while have < n:
            written = save_images(next(ds)[: n - have], tmp / "images", start=have)
            have += len(written)
            bar.update(len(written))
        bar.close()
        description = {**description, "images_written": n, "key": key}
        metrics.save_json(description, tmp / "reference.json")
    except BaseException:  # a full disk, a kill: no half-made folder left to fill it further
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ds.close()
    if folder.exists():  # made meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder, json.loads((folder / "reference.json").read_text())


def reference_statistics(folder: Path, extractor, weights_sha256: str, *, progress: bool = True,
                         say: Callable = print) -> tuple[dict, bool]:
    """``({"mu", "sigma", "features"}, from_cache)`` of a reference folder, cached beside it."""
    path = folder / f"inception-{weights_sha256[:16]}-torch-fidelity-{inception.library_version()}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in ("mu", "sigma", "features")}, True
    say(f"computing the reference statistics of {folder / 'images'} (cached in {path.name})")
    feats = inception.folder_features(folder / "images", extractor, progress=progress)
    stats = {**inception.fid_statistics(feats), "features": feats}
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **stats)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return stats, False


def read_reference_npz(path: Path) -> dict:
    """``mu``, ``sigma`` (and ``features`` if present) of a reference statistics file."""
    try:
        with np.load(path) as z:
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise EvaluationError(f"{path}: no {' or '.join(missing)} array (has {', '.join(z.files)}); "
                                      "a reference .npz holds the FID statistics mu and sigma")
            out = {k: z[k] for k in ("mu", "sigma", "features") if k in z.files}
    except (OSError, ValueError) as exc:
        if isinstance(exc, EvaluationError):
            raise
        raise EvaluationError(f"{path}: not a readable .npz file ({exc})") from None
    d = out["mu"].shape[0] if out["mu"].ndim == 1 else -1
    if d < 1 or out["sigma"].shape != (d, d):
        raise EvaluationError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape} are not "
                              "a mean vector and its covariance")
    return out


# ---------------------------------------------------------------------------- everything
def evaluate(cfg, *, out: Path, **kwargs) -> dict:
    """Sample (unless ``samples_dir``), measure, write ``out/metrics.json``; returns the result.

    ``out`` is locked meanwhile (``ssd_keras/run_lock.py``): a second evaluation into the
    same folder raises ``FolderLockedError`` at once. See :func:`_evaluate` for the rest.
    """
    from .run_lock import FolderLock

    weights, reference = kwargs.get("weights"), kwargs.get("reference")
    if weights is not None and not Path(weights).is_file():
        raise EvaluationError(f"--inception-weights {weights}: no such file")
    if reference is not None and not Path(reference).is_file():
        raise EvaluationError(f"--reference {reference}: no such file")
    with FolderLock(out, "evaluation"):
        return _evaluate(cfg, out=Path(out), **kwargs)


def _evaluate(cfg, *, out: Path, parts: Callable | None, identity: dict, samples_dir: Path | None = None,
              samples_limit: int | None = None, weights: Path | None = None, reference: Path | None = None,
              cache_dir: Path | None = None, progress: bool = True, say: Callable = print) -> dict:
    """``evaluate`` in the locked folder ``out``.

    ``cfg``: the run's config with the command line's overrides (``sampler.*``, ``eval.*``);
    ``parts``: gives the model, process and objective for sampling; ``identity``: what
    names the checkpoint (run, checkpoint path, step), stored with the samples and in the
    result. ``samples_dir``: measure the PNG/JPEG files of this folder (or its ``images/``),
    the first ``samples_limit`` in sorted order, instead of sampling.
    """
    e, s = cfg.eval, cfg.sampler
    cache_dir = Path(cache_dir or e.cache_dir or default_cache_dir())
    notes, timing = [], {}
    result = {**identity}
    if weights is None:
        say(inception.MISSING_WEIGHTS)
        notes.append(inception.MISSING_WEIGHTS)
    else:
        inception.import_torch_fidelity()  # a missing library is reported before any sampling

    # 1. samples
    if samples_dir is not None:
        folder = samples_dir / "images" if (samples_dir / "images").is_dir() else samples_dir
        files = [Path(f) for f in inception.image_files(folder)][:samples_limit] if folder.is_dir() else []
        if len(files) < 2:
            raise EvaluationError(f"--samples-dir {samples_dir}: need at least 2 png/jpg images, found {len(files)}")
        result["samples_dir"] = str(samples_dir)
    else:
        timing.update(sample_to_folder(parts, cfg, out, num_samples=e.num_samples, identity=identity,
                                       progress=progress, say=say))
        folder = out / "images"
        files = [folder / f"{i:06d}.png" for i in range(e.num_samples)]
        if cfg.model.num_classes:
            result["classes"] = {"num_classes": cfg.model.num_classes, "guidance": cfg.sampler.guidance,
                                 "labels": "class-balanced: sample i has class i mod num_classes"}
        result["sampler"] = {**_sampler_settings(cfg), "ema": identity.get("ema", True),
                             "chunk_size": chunk_size_for(s.batch_size, e.chunk_size),
                             "chunk_seeds": "numpy SeedSequence([seed, chunk index])"}
    result["num_samples"] = len(files)
    result["samples"] = str(folder)

    # 2. reference images (always: the weights-free measures compare with them)
    ref_count = e.reference_images if reference is None else min(e.reference_images, WEIGHTS_FREE_IMAGES)
    ref_folder, ref_info = reference_folder(cfg, ref_count, cache_dir, progress=progress, say=say)
    result["reference"] = {"images": str(ref_folder / "images"), "num_images": ref_info["images_written"],
                           "key": ref_info["key"], "dataset": {k: ref_info[k] for k in (
                               "source", "path", "tfds_name", "tfds_split", "image_size", "preprocessing")}}

    measured = {}
    # 3. standard metrics
    if weights is not None:
        extractor = inception.load_extractor(weights)
        sha = inception.file_sha256(weights)
        result["feature_extractor"] = {
            "library": "torch-fidelity", "version": inception.library_version(),
            "extractor": inception.EXTRACTOR, "layer": inception.LAYER, "weights": str(weights),
            "weights_sha256": sha, "batch_size": inception.BATCH_SIZE,
            "device": "cuda" if next(extractor.parameters()).is_cuda else "cpu",
            "torch": inception.torch_version(),
        }
        if not sha.startswith(inception.STANDARD_SHA256_PREFIX):
            note = (f"{weights} is not the standard {inception.WEIGHTS_FILE} (its SHA-256 starts with "
                    f"{sha[:8]}, not {inception.STANDARD_SHA256_PREFIX}): these numbers are not comparable "
                    "with published ones")
            say(f"warning: {note}")
            notes.append(note)
        t0 = time.perf_counter()
        if reference is not None:
            ref_stats = read_reference_npz(Path(reference))
            result["reference"] = {"file": str(reference), "sha256": inception.file_sha256(reference),
                                   "num_images": int(len(ref_stats["features"])) if "features" in ref_stats else None}
        else:
            ref_stats, cached = reference_statistics(ref_folder, extractor, sha, progress=progress, say=say)
            timing["reference_statistics_cached"] = cached
        timing["reference_seconds"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        feats = inception.folder_features(folder, extractor, progress=progress, files=[str(f) for f in files])
        timing["features_seconds"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        measured["fid"] = inception.fid(inception.fid_statistics(feats), ref_stats)
        if "features" in ref_stats:
            ref_feats = ref_stats["features"]
            kid_settings = inception.kid_settings(len(feats), len(ref_feats), s.seed)
            measured["kid"] = {**inception.kid(feats, ref_feats, **kid_settings),
                               "subsets": kid_settings["kid_subsets"],
                               "subset_size": kid_settings["kid_subset_size"], "seed": s.seed}
            measured["precision_recall"] = {**inception.precision_recall(feats, ref_feats),
                                            "k": inception.PRC_NEIGHBORHOOD}
        else:
            notes.append(f"{reference} holds no features: KID and precision/recall need them")
        timing["statistics_seconds"] = round(time.perf_counter() - t0, 3)
        n_ref = len(ref_stats["features"]) if "features" in ref_stats else None
        if len(files) < 50000 or (n_ref is not None and n_ref < 50000):
            notes.append(f"FID at {len(files)} samples" + (f" / {n_ref} reference images" if n_ref else "")
                         + ": FID is biased upward at small N; the paper's FIDs use 50000 samples")

    # 4. weights-free measures on at most WEIGHTS_FREE_IMAGES of each set
    t0 = time.perf_counter()
    w = min(WEIGHTS_FREE_IMAGES, len(files))
    samples = metrics.load_images(files[:w], image_size=cfg.process.image_size)
    data = metrics.load_image_folder(ref_folder / "images", image_size=cfg.process.image_size,
                                     limit=WEIGHTS_FREE_IMAGES)
    free = metrics.evaluate_images(samples, data, seed=s.seed)
    timing["weights_free_seconds"] = round(time.perf_counter() - t0, 3)
    measured["weights_free"] = {**free["metrics"], "num_samples": free["num_samples"], "num_data": free["num_data"]}
    notes += free["notes"]

    result["metrics"] = measured
    result["definitions"] = DEFINITIONS
    result["notes"] = notes
    result["timing"] = timing
    metrics.save_json(result, out / "metrics.json")
    return result


DEFINITIONS = {
    "fid": "Frechet distance of Gaussian fits to 2048-d TF-Inception (2015-12-05) pool features, "
           "torch-fidelity inception-v3-compat (TF1 bilinear resize to 299)",
    "kid": "KID: unbiased MMD^2 with kernel (x.y/d+1)^3 over random subsets, same features "
           "(torch-fidelity)",
    "precision_recall": "improved precision/recall (Kynkaanniemi et al. 2019), k-NN balls with k = 3 "
                        "in the same features (torch-fidelity)",
    **{f"weights_free.{k}": v for k, v in metrics.DEFINITIONS.items()},
}


def format_report(result: dict) -> str:
    """A small human-readable table of :func:`evaluate`'s result."""
    m = result["metrics"]
    lines = []
    if "fid" in m:
        lines.append(f"{result['num_samples']} samples vs {result['reference'].get('num_images')} "
                     f"reference images (torch-fidelity {result['feature_extractor']['version']}, "
                     "TF-Inception 2015-12-05)")
        rows = [("FID", f"{m['fid']:.4f}")]
        if "kid" in m:
            rows += [("KID", f"{m['kid']['mean']:.6f} ± {m['kid']['std']:.6f}"),
                     ("precision / recall", f"{m['precision_recall']['precision']:.4f} / "
                                            f"{m['precision_recall']['recall']:.4f}")]
        width = max(len(a) for a, _ in rows)
        lines += [f"{a:<{width}}  {b}" for a, b in rows]
        lines.append("")
    free = {"num_samples": m["weights_free"]["num_samples"], "num_data": m["weights_free"]["num_data"],
            "metrics": m["weights_free"], "notes": []}
    lines.append("weights-free measures: " + metrics.format_table(free))
    lines += [f"note: {n}" for n in result.get("notes", []) if n != inception.MISSING_WEIGHTS]
    return "\n".join(lines)
