"""FID, KID and precision/recall through torch-fidelity (docs/evaluation.md).

The feature extractor is torch-fidelity's ``inception-v3-compat``: the TF-Inception graph of
2015-12-05 that TTUR's FID, pytorch-fid and clean-fid also use, with TensorFlow 1.x's
bilinear resize to 299x299, read from a local weights file
(:data:`WEIGHTS_FILE`). The 2048-d pool features feed

- FID: ``torch_fidelity.metric_fid`` (mean and covariance; trace of the square root via
  eigenvalues of ``S1 S2``),
- KID: ``torch_fidelity.metric_kid`` (unbiased MMD^2, kernel ``(x.y/d + 1)^3``, 100 random
  subsets of ``min(1000, N)`` images),
- precision/recall: ``torch_fidelity.metric_prc`` (Kynkaanniemi et al. 2019, k = 3, on the
  same Inception features, as ADM's evaluation suite does; torch-fidelity's own default
  for precision/recall is VGG16).

Every number here is computed by torch-fidelity's own functions, in the order and batch
size its ``calculate_metrics`` uses on a folder of images, so the results equal that
function's on the same two folders (tests/test_evaluation.py checks it).

torch is a dependency of ssd_keras anyway; torch-fidelity is the optional ``fid`` extra.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
#: torch.hub's convention: the file name holds the first hex digits of the file's SHA-256
STANDARD_SHA256_PREFIX = "6726825d"
EXTRACTOR = "inception-v3-compat"
LAYER = "2048"
BATCH_SIZE = 64  # torch-fidelity's default batch size (features do not depend on it in theory,
#                  but float32 convolutions may round differently at another batch size)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3

MISSING_WEIGHTS = (
    f"FID, KID and precision/recall need the standard Inception weights file {WEIGHTS_FILE} "
    f"(TF-Inception 2015-12-05 converted to PyTorch; 95 MB). It is usually downloaded from "
    f"torch-fidelity's releases: {WEIGHTS_URL} . Pass it with --inception-weights FILE or "
    "set eval.inception_weights in the pipeline; reporting the weights-free measures only."
)
MISSING_LIBRARY = (
    "FID, KID and precision/recall need torch-fidelity: pip install 'ssd_keras[fid]' "
    "(or torch-fidelity with the torchvision release matching your torch)"
)


class InceptionError(ValueError):
    """A weights file or library problem, with the file at fault in the message."""


def import_torch_fidelity():
    """``torch_fidelity``, imported even where torchvision's compiled ops cannot load.

    PyPI's torchvision wheels for Linux are CUDA builds; beside the CPU build of torch
    their compiled ops fail to load, which torchvision is written to survive (its
    ``extension._has_ops()`` is then false and only the detection ops refuse to run),
    except that its ``_meta_registrations`` registers fake kernels for ``torchvision::nms``
    and ``torchvision::qnms`` unconditionally, which raises "operator torchvision::nms
    does not exist" and aborts the import. torch-fidelity uses only torchvision's Python
    parts (datasets, ``pil_to_tensor``). So where exactly that error occurs, the two
    operators' schemas are declared (no kernels: calling them still fails) and the import
    is retried.
    """
    try:
        import torch_fidelity
    except ModuleNotFoundError as exc:
        if exc.name in ("torch_fidelity", "torchvision"):
            raise InceptionError(MISSING_LIBRARY) from None
        raise
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        _declare_torchvision_ops()
        import torch_fidelity
    return torch_fidelity


_DECLARED = []


def _declare_torchvision_ops() -> None:
    import torch

    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "torch_fidelity")]:
        del sys.modules[name]  # the half-imported modules of the failed attempt
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _DECLARED.append(lib)  # the declarations live as long as the Library object


def library_version() -> str:
    return import_torch_fidelity().__version__


def torch_version() -> str:
    import torch

    return torch.__version__


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_extractor(weights: str | Path, *, cuda: bool | None = None):
    """torch-fidelity's Inception feature extractor with the weights from ``weights``."""
    weights = Path(weights)
    if not weights.is_file():
        raise InceptionError(f"{weights}: no such file (the Inception weights file {WEIGHTS_FILE})")
    import torch

    utils = _utils()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    try:
        return utils.create_feature_extractor(
            EXTRACTOR, [LAYER], cuda=cuda, feature_extractor_weights_path=str(weights), verbose=False)
    except (RuntimeError, KeyError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InceptionError(f"{weights}: not a torch-fidelity Inception weights file "
                             f"({WEIGHTS_FILE}): {first}") from None
    except Exception as exc:  # pickle errors of a file that is not a torch checkpoint
        if type(exc).__module__ in ("pickle", "_pickle") or "pickle" in type(exc).__name__.lower():
            raise InceptionError(f"{weights}: not a torch-fidelity Inception weights file "
                                 f"({WEIGHTS_FILE}): {exc}") from None
        raise


def _utils():
    import_torch_fidelity()
    import torch_fidelity.utils as utils

    return utils


def image_files(folder: str | Path) -> list[str]:
    """The PNG/JPEG files of ``folder`` (not recursive) in the order torch-fidelity reads a
    folder: real paths, sorted (its ``glob_samples_paths``; needs no torch-fidelity)."""
    folder = Path(folder)
    return sorted(os.path.realpath(p) for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def folder_features(folder: str | Path, extractor, *, batch_size: int = BATCH_SIZE,
                    progress: bool = True, files: list[str] | None = None) -> np.ndarray:
    """``(N, 2048)`` float32 Inception features of the images in ``folder``.

    Exactly torch-fidelity's path for a folder input: files in sorted order, PIL ->
    RGB -> uint8 tensor, batches of ``batch_size``.
    """
    import torch

    utils = _utils()
    from torch_fidelity.datasets import ImagesPathDataset

    files = image_files(folder) if files is None else files
    if not files:
        raise InceptionError(f"no png/jpg images in {folder}")
    cuda = next(extractor.parameters()).is_cuda
    out = utils.get_featuresdict_from_dataset(
        ImagesPathDataset(files), extractor, batch_size, cuda, True, progress)
    feats = out[LAYER]
    assert isinstance(feats, torch.Tensor)
    return feats.numpy()


def fid_statistics(features: np.ndarray) -> dict:
    """torch-fidelity's FID statistics ``{"mu", "sigma"}`` of ``(N, D)`` features."""
    import torch

    _utils()
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))


def fid(stats_samples: dict, stats_reference: dict) -> float:
    """torch-fidelity's Frechet distance between two ``{"mu", "sigma"}`` statistics."""
    _utils()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a, b = stats_samples, stats_reference
    if a["mu"].dtype != b["mu"].dtype or a["sigma"].dtype != b["sigma"].dtype:
        # e.g. a reference .npz written by another tool in float64
        a = {k: np.asarray(v, np.float64) for k, v in a.items()}
        b = {k: np.asarray(v, np.float64) for k, v in b.items()}
    if a["mu"].shape != b["mu"].shape:
        raise InceptionError(f"reference statistics have {b['mu'].shape[0]} dimensions, "
                             f"the features {a['mu'].shape[0]}")
    return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


def kid_settings(n_samples: int, n_reference: int, seed: int) -> dict:
    """The KID keyword arguments of torch-fidelity for these set sizes (subset size capped)."""
    return {"kid_subsets": KID_SUBSETS, "kid_subset_size": min(KID_SUBSET_SIZE, n_samples, n_reference),
            "rng_seed": seed}


def kid(features_samples: np.ndarray, features_reference: np.ndarray, **settings) -> dict:
    """torch-fidelity's KID ``{"mean", "std"}``; ``settings`` from :func:`kid_settings`."""
    import torch

    _utils()
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    out = kid_features_to_metric(torch.from_numpy(features_samples), torch.from_numpy(features_reference),
                                 verbose=False, **settings)
    return {"mean": float(out[KEY_METRIC_KID_MEAN]), "std": float(out[KEY_METRIC_KID_STD])}


def precision_recall(features_samples: np.ndarray, features_reference: np.ndarray) -> dict:
    """torch-fidelity's precision, recall and F-score (k = 3, batched distances)."""
    import torch

    _utils()
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(torch.from_numpy(features_samples), torch.from_numpy(features_reference),
                                 **PRC_SETTINGS)
    return {k: float(out[k]) for k in ("precision", "recall", "f_score")}


#: torch-fidelity keyword arguments for precision/recall (save_cpu_ram: distances in row
#: blocks of 10000, never an N x N matrix)
PRC_SETTINGS = {"prc_neighborhood": PRC_NEIGHBORHOOD, "save_cpu_ram": True, "verbose": False}


def save_random_weights(path: str | Path, seed: int = 0) -> Path:
    """A weights file in the standard file's format with random weights (for tests).

    torch-fidelity's Inception module is built with freshly initialized parameters
    (its loading step skipped) and its ``state_dict`` saved, the format the real file has.
    """
    import torch

    import_torch_fidelity()
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class Fresh(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is None:  # keep the fresh initialization
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    download = fe.load_state_dict_from_url
    try:
        fe.load_state_dict_from_url = lambda *args, **kwargs: None  # nothing is downloaded
        module = Fresh(EXTRACTOR, [LAYER])
    finally:
        fe.load_state_dict_from_url = download
    # a randomly initialized deep network maps every image to almost the same features;
    # BatchNorm statistics measured on random images make every layer pass on unit-variance
    # activations, so the features differ between images as real ones do
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    module.train()
    with torch.no_grad():
        module(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    module.eval()
    torch.save(module.state_dict(), path)
    return path
