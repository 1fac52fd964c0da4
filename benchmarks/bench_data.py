"""Decoding throughput of ssd_keras.data (images/s), to compare with a training step's rate.

    python benchmarks/bench_data.py [--images 300] [--seconds 2.0]

Writes folders of 64x64 and 256x256 JPEGs to a temporary directory and times
``make_dataset("folder", ...)`` for num_workers 1 and 2, with and without the decoded cache.
``measure_decode_rate`` is the reusable piece (returns images/s).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from ssd_keras.data import make_dataset


def write_jpeg_folder(root: str, count: int, size: int, seed: int = 0, quality: int = 90,
                      width: int | None = None) -> str:
    """``count`` photo-like JPEGs (smooth colour fields plus grain), ``size`` pixels high
    and ``width`` (default ``size``) wide."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = width or size
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, size), Image.BICUBIC)
        grain = rng.normal(0, 12, (size, width, 3))
        arr = np.clip(np.asarray(image, np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(root, f"img_{i:05d}.jpg"), quality=quality)
    return root


def measure_decode_rate(source: str = "folder", image_size: int = 64, batch_size: int = 32, *,
                        seconds: float = 2.0, warmup_batches: int = 2, warm_epoch: bool = False,
                        **dataset_kwargs) -> float:
    """Images per second that ``make_dataset(source, image_size, batch_size, **kw)`` delivers.

    The consumer does nothing but ``next()``, so this is the pipeline's ceiling. With
    ``warm_epoch=True`` one full epoch is read first (fills the cache when ``cache=True``).
    Runs for about ``seconds`` after the warm-up.
    """
    with make_dataset(source, image_size, batch_size, **dataset_kwargs) as ds:
        warm = warmup_batches
        if warm_epoch:
            warm = max(warm, -(-ds.images_per_epoch // batch_size) + 1)
        for _ in range(warm):
            next(ds)
        count, start = 0, time.perf_counter()
        while True:
            next(ds)
            count += batch_size
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300, help="JPEGs per folder")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ssd_bench_data_") as tmp:
        folders = {
            64: write_jpeg_folder(os.path.join(tmp, "jpeg64"), args.images, 64, seed=1),
            256: write_jpeg_folder(os.path.join(tmp, "jpeg256"), args.images, 256, seed=2),
        }
        # (files, image_size, batch_size)
        cases = [(64, 64, 32), (256, 256, 32), (256, 64, 64), (64, 64, 64)]
        print(f"# ssd_keras.data decode rate; {args.images} JPEGs per folder, "
              f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}")
        print(f"| {'files':>9} | {'image_size':>10} | {'batch':>5} | {'workers':>7} "
              f"| {'cache':>5} | {'images/s':>9} |")
        print("|" + "|".join("-" * (w + 2) for w in (9, 10, 5, 7, 5, 9)) + "|")
        for files, size, batch in cases:
            for workers in (1, 2):
                for cache in (False, True):
                    rate = measure_decode_rate(
                        "folder", size, batch, path=folders[files], num_workers=workers,
                        cache=cache, seconds=args.seconds, warm_epoch=cache, seed=0,
                    )
                    print(f"| {f'{files}px jpg':>9} | {size:>10} | {batch:>5} | {workers:>7} "
                          f"| {str(cache).lower():>5} | {rate:>9.0f} |", flush=True)
        for workers in (1, 2):
            rate = measure_decode_rate("digits", 64, 64, num_workers=workers,
                                       seconds=args.seconds, seed=0)
            print(f"| {'digits':>9} | {64:>10} | {64:>5} | {workers:>7} | {'false':>5} "
                  f"| {rate:>9.0f} |", flush=True)


if __name__ == "__main__":
    main()
