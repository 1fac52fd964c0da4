"""Sample-quality metrics: weights-free ones always, FID/KID with a local Inception file.

Every function takes images as float NHWC arrays in [-1, 1] (what ``sample_images`` and
``make_dataset`` produce) and returns plain Python numbers.

Weights-free metrics (no download, no network, deterministic):

- **FD-pix8**: the Fréchet distance between Gaussian fits of two image sets in a fixed
  feature space: each image downsampled to 8x8 with antialiased bilinear resizing
  (``operators.resize_matrix``, equal to torch's ``interpolate(..., antialias=True)``),
  flattened to 8*8*C = 192 numbers in [-1, 1]. It measures coarse layout and colour, not
  texture or detail. It is *not* FID and must not be compared with FIDs.
- **KID-pix8**: KID (below) in the same 8x8 pixel space.
- **Channel statistics**: per-channel mean and standard deviation over all pixels of all
  images, samples vs data (in [-1, 1] units). A wrong posterior noise shows up here as a
  colour shift or a wrong contrast.
- **Nearest-neighbour ratio** (memorization check): the mean Euclidean distance from each
  sample (flattened, full resolution, [-1, 1]) to its nearest data image, divided by the
  mean leave-one-out nearest-neighbour distance among the data images themselves. About 1
  for a model that generalizes like a fresh draw from the data distribution, near 0 for a
  model that copies data images. Only the data images drawn for the evaluation are
  searched, so a sample copying a training image outside that set is not caught.

FID, KID and precision/recall with the standard TF-Inception features are computed by
torch-fidelity (``inception.py``, ``evaluation.py``, docs/evaluation.md), not here.

Fréchet distance (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))``
with ``tr(sqrt(S1 S2))`` taken as the sum of the square roots of the eigenvalues of ``S1 S2``
(real parts), as torch-fidelity computes it: no matrix square root (scipy's ``sqrtm`` took
~86 s at 2048 dimensions), and finite for singular covariances.

KID (Bińkowski et al. 2018): the unbiased estimator of the squared MMD with the polynomial
kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (default 100 subsets of
up to 1000 images, as in their code); reported as mean and standard deviation over subsets.

Both FD/FID and KID depend on the number of images (FD is biased upward at small N,
strongly so when N is not much larger than the feature dimension): compare values only at
equal N.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PIX_SIZE = 8
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
CHANNEL_NAMES = "RGB"

# ------------------------------------------------------------------ feature spaces
def _as_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images, got an array of shape {x.shape}")
    return x.astype(np.float64, copy=False)


def pixel_features(images, size: int = PIX_SIZE) -> np.ndarray:
    """``(N, size*size*C)`` float64: images downsampled (antialiased bilinear) and flattened."""
    from .operators import resize_matrix

    x = _as_images(images)
    _, h, w, _ = x.shape
    mh = np.eye(h) if h == size else resize_matrix(h, size)
    mw = np.eye(w) if w == size else resize_matrix(w, size)
    small = np.einsum("ah,nhwc,bw->nabc", mh, x, mw, optimize=True)
    return small.reshape(len(x), -1)


def channel_stats(images) -> dict:
    """Per-channel mean and standard deviation over all pixels of all images."""
    x = _as_images(images)
    flat = x.reshape(-1, x.shape[-1])
    return {"mean": flat.mean(0).tolist(), "std": flat.std(0).tolist()}


def compare_channel_stats(samples, data) -> dict:
    """Channel statistics of samples and data and the largest absolute differences."""
    s, d = channel_stats(samples), channel_stats(data)
    return {
        "samples": s,
        "data": d,
        "max_abs_mean_diff": float(np.max(np.abs(np.subtract(s["mean"], d["mean"])))),
        "max_abs_std_diff": float(np.max(np.abs(np.subtract(s["std"], d["std"])))),
    }


# ------------------------------------------------------------------ Fréchet distance
def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of ``(N, D)`` features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features for a Gaussian fit, got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 sum sqrt(eig(sigma1 sigma2))``: the
    eigenvalues of a product of two covariances are real and >= 0 up to rounding; their
    square roots are taken in complex arithmetic and the real parts summed (torch-fidelity's
    formula), which stays finite for singular covariances (fewer images than dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1),) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_features(features1, features2) -> float:
    """Fréchet distance between Gaussian fits of two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_fit(features1), *gaussian_fit(features2))


# ------------------------------------------------------------------ KID
def polynomial_kernel(x, y, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """``(x y^T / d + coef0) ^ degree`` (Bińkowski et al.'s KID kernel)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x, y, **kernel) -> float:
    """Unbiased estimate of the squared MMD between two equal-size samples."""
    m = len(x)
    kxx, kyy, kxy = polynomial_kernel(x, x, **kernel), polynomial_kernel(y, y, **kernel), polynomial_kernel(x, y, **kernel)
    same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(same - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(features1, features2, *, num_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over random subsets.

    Each subset draws ``min(subset_size, N1, N2)`` images without replacement from each
    set (independently per subset), as in Bińkowski et al.'s reference code.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------------ memorization
def _nearest_distances(a: np.ndarray, b: np.ndarray, exclude_self: bool = False,
                       chunk: int = 256) -> np.ndarray:
    """For each row of ``a``, the Euclidean distance to its nearest row of ``b``."""
    b_sq = (b * b).sum(1)
    out = np.empty(len(a))
    for i in range(0, len(a), chunk):
        part = a[i: i + chunk]
        d2 = (part * part).sum(1)[:, None] + b_sq[None, :] - 2.0 * part @ b.T
        if exclude_self:
            rows = np.arange(len(part))
            d2[rows, rows + i] = np.inf
        out[i: i + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def nearest_neighbour_ratio(samples, data) -> dict:
    """Memorization check in pixel space (flattened images, full resolution).

    ``sample_to_data``: mean distance from each sample to its nearest data image;
    ``data_to_data``: mean distance from each data image to its nearest *other* data image;
    ``ratio``: their quotient (about 1 for fresh draws of the data distribution, near 0 when
    samples copy data images).
    """
    s = _as_images(samples).reshape(len(samples), -1)
    d = _as_images(data).reshape(len(data), -1)
    if len(d) < 2:
        raise ValueError("the nearest-neighbour check needs at least 2 data images")
    s_nn = _nearest_distances(s, d).mean()
    d_nn = _nearest_distances(d, d, exclude_self=True).mean()
    return {"sample_to_data": float(s_nn), "data_to_data": float(d_nn),
            "ratio": float(s_nn / d_nn) if d_nn > 0 else float("inf")}


# ------------------------------------------------------------------ everything at once
def evaluate_images(samples, data, *, kid_subsets: int = KID_SUBSETS,
                    kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict:
    """The weights-free metrics of ``samples`` against ``data`` ([-1, 1] NHWC arrays), JSON-able."""
    samples, data = np.asarray(samples, np.float32), np.asarray(data, np.float32)
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples are {samples.shape[1:]} images but the data are {data.shape[1:]}")
    if len(samples) < 2 or len(data) < 2:
        raise ValueError(f"need at least 2 samples and 2 data images, got {len(samples)} and {len(data)}")
    notes = []
    ps, pd = pixel_features(samples), pixel_features(data)
    kid = dict(num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    kid_mean, kid_std = kernel_inception_distance(ps, pd, **kid)
    metrics = {
        "fd_pix8": frechet_distance_features(ps, pd),
        "kid_pix8": {"mean": kid_mean, "std": kid_std},
        "channels": compare_channel_stats(samples, data),
        "nearest_neighbour": nearest_neighbour_ratio(samples, data),
    }
    small = min(len(samples), len(data))
    if small <= ps.shape[1]:
        notes.append(f"{small} images <= {ps.shape[1]} FD-pix8 dimensions: the covariances are singular "
                     "and FD-pix8 is strongly biased; compare only at equal N")
    return {
        "num_samples": len(samples),
        "num_data": len(data),
        "image_shape": list(samples.shape[1:]),
        "metrics": metrics,
        "definitions": DEFINITIONS,
        "notes": notes,
    }


DEFINITIONS = {
    "fd_pix8": "Fréchet distance of Gaussian fits to images downsampled (antialiased bilinear) to 8x8, "
               "flattened, values in [-1, 1]; weights-free, NOT FID",
    "kid_pix8": "KID (unbiased MMD^2, kernel (x.y/d+1)^3, subsets) in the FD-pix8 feature space",
    "channels": "per-channel mean/std over all pixels, [-1, 1] units",
    "nearest_neighbour": "mean L2 distance (flattened [-1, 1] pixels) of each sample to its nearest data "
                         "image / mean leave-one-out nearest-neighbour distance among the data images; "
                         "~1 fresh, ~0 copies",
}


def format_table(result: dict) -> str:
    """A small human-readable table of ``evaluate_images``'s result."""
    m = result["metrics"]
    ch = m["channels"]
    nn = m["nearest_neighbour"]
    names = CHANNEL_NAMES if len(ch["samples"]["mean"]) == 3 else "per channel"
    vec = lambda v: " ".join(f"{a:+.3f}" for a in v)
    rows = [
        ("metric", "value"),
        ("FD-pix8 (8x8 pixels; not FID)", f"{m['fd_pix8']:.4f}"),
        ("KID-pix8", f"{m['kid_pix8']['mean']:.5f} ± {m['kid_pix8']['std']:.5f}"),
    ]
    rows += [
        (f"channel mean {names} samples", vec(ch["samples"]["mean"])),
        (f"channel mean {names} data", vec(ch["data"]["mean"])),
        (f"channel std  {names} samples", vec(ch["samples"]["std"])),
        (f"channel std  {names} data", vec(ch["data"]["std"])),
        ("max |mean diff| / |std diff|", f"{ch['max_abs_mean_diff']:.4f} / {ch['max_abs_std_diff']:.4f}"),
        ("NN L2 sample->data", f"{nn['sample_to_data']:.4f}"),
        ("NN L2 data->data", f"{nn['data_to_data']:.4f}"),
        ("NN ratio (~1 fresh, ~0 copies)", f"{nn['ratio']:.4f}"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"{result['num_samples']} samples vs {result['num_data']} data images"]
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    lines.insert(2, "-" * (width + 2 + max(len(b) for _, b in rows)))
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def save_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ image sources
def quantize(images) -> np.ndarray:
    """Round [-1, 1] images to the 256 levels a PNG stores (so sampling directly and
    reading saved samples give the same metrics)."""
    from .images import to_uint8

    return to_uint8(images).astype(np.float32) / 127.5 - 1.0


def load_images(files, *, image_size: int) -> np.ndarray:
    """[-1, 1] NHWC RGB images from a list of files, each ``image_size`` square."""
    from PIL import Image

    from .data import to_rgb

    out = []
    for p in files:
        with Image.open(p) as img:
            arr = np.asarray(to_rgb(img))
        if arr.shape[:2] != (image_size, image_size):
            raise ValueError(f"{p} is {arr.shape[1]}x{arr.shape[0]}, the run's images are "
                             f"{image_size}x{image_size}")
        out.append(arr)
    return np.stack(out).astype(np.float32) / 127.5 - 1.0


def load_image_folder(folder: str | Path, *, image_size: int, limit: int | None = None) -> np.ndarray:
    """[-1, 1] NHWC RGB images from a samples folder (its ``images/`` subfolder if present).

    Files are read in sorted order; every image must be ``image_size`` square.
    """
    from .data import IMAGE_EXTENSIONS

    folder = Path(folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise ValueError(f"no samples folder {folder}")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    files = files[:limit] if limit else files
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return load_images(files, image_size=image_size)
