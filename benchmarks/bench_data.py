"""Decoding throughput of ssd_keras.data (images/s), to compare with a training step's rate.

    python benchmarks/bench_data.py [--images 300] [--seconds 2.0] [--workers 1,2] [--repeats 1]
    python benchmarks/bench_data.py --cases 64px:64:128,178x218:128:64 --workers 1 --repeats 3

Writes folders of JPEGs (64x64, 128x128, 256x256 and CelebA's 178x218) to a temporary
directory and times ``make_dataset("folder", ...)`` for each number of decoding threads,
with and without the decoded cache (``data.cache``); the last column is images/s per
decoding thread (with one thread: per core). ``measure_decode_rate`` is the reusable
piece (returns images/s; ``benchmarks/device_check.py`` uses it too).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
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


FOLDERS = {  # name -> (height, width) of its JPEGs
    "64px": (64, 64),
    "128px": (128, 128),
    "256px": (256, 256),
    "178x218": (218, 178),  # CelebA's aligned images, which the celeba pipelines read
}
# (folder, image_size, batch_size)
CASES = [("64px", 64, 32), ("128px", 128, 32), ("256px", 256, 32), ("256px", 64, 64),
         ("64px", 64, 64), ("178x218", 64, 128), ("178x218", 128, 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300, help="JPEGs per folder")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per row")
    parser.add_argument("--workers", default="1,2", help="decoding threads to try")
    parser.add_argument("--cases", default=None,
                        help="only these rows, e.g. 64px:64:32,178x218:128:64 (folder:image_size:batch)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved repeats of every row; the median is printed")
    args = parser.parse_args()
    cases = CASES
    if args.cases:
        cases = [(f, int(size), int(batch)) for f, size, batch in
                 (c.split(":") for c in args.cases.split(","))]
    workers_list = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="ssd_bench_data_") as tmp:
        folders = {}
        for seed, name in enumerate(sorted({f for f, _, _ in cases}), start=1):
            height, width = FOLDERS[name]
            folders[name] = write_jpeg_folder(os.path.join(tmp, name), args.images, height,
                                              seed=seed, width=width)
        print(f"# ssd_keras.data decode rate; {args.images} JPEGs per folder, "
              f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
              f"median of {args.repeats} interleaved repeat(s)")
        print(f"| {'files':>11} | {'image_size':>10} | {'batch':>5} | {'workers':>7} "
              f"| {'cache':>5} | {'images/s':>9} | {'per worker':>10} |")
        print("|" + "|".join("-" * (w + 2) for w in (11, 10, 5, 7, 5, 9, 10)) + "|")
        rows = [(f, size, batch, w, cache) for f, size, batch in cases
                for w in workers_list for cache in (False, True)]
        rates = {row: [] for row in rows}
        for r in range(args.repeats):
            for row in (rows if r % 2 == 0 else rows[::-1]):
                files, size, batch, workers, cache = row
                rates[row].append(measure_decode_rate(
                    "folder", size, batch, path=folders[files], num_workers=workers, cache=cache,
                    seconds=args.seconds, warm_epoch=cache, seed=0))
        for row in rows:
            files, size, batch, workers, cache = row
            rate = statistics.median(rates[row])
            print(f"| {files + ' jpg':>11} | {size:>10} | {batch:>5} | {workers:>7} "
                  f"| {str(cache).lower():>5} | {rate:>9.0f} | {rate / workers:>10.0f} |", flush=True)
        if args.cases is None:
            for workers in workers_list:
                rate = measure_decode_rate("digits", 64, 64, num_workers=workers,
                                           seconds=args.seconds, seed=0)
                print(f"| {'digits':>11} | {64:>10} | {64:>5} | {workers:>7} | {'false':>5} "
                      f"| {rate:>9.0f} | {rate / workers:>10.0f} |", flush=True)


if __name__ == "__main__":
    main()
