"""Super-resolution with a trained SSD run (docs/scale_space_edits.md, section 7).

Held-out images are downsampled to each level below full resolution with the process's own
operator (the antialiased bilinear chain), stored as 8-bit images (what a user hands to
``ssd-run upsample``), and brought back to full resolution by

- ``ours``: ``edits.upsample``, the code behind ``ssd-run upsample`` (with and without data
  consistency, at the given strengths);
- ``bicubic`` and ``lanczos``: PIL's resizes of the 8-bit input.

Reported per level and method: PSNR against the originals (mean over images, [0, 255]
scale, outputs rounded to 8 bits as saved); the weights-free FD and KID at full resolution
(``metrics.pixel_features`` at the image size, i.e. the raw pixels; and FD-pix8) of the
outputs against as many *other* real images (the first training digits, or the folder's
next images), with the originals' own score as the floor; the consistency PSNR (the output downsampled again with the
process's operator, against the input); seconds per image.

Held-out images: ``--run``'s training used ``data.limit`` images of the bundled digits;
the next ``--num-images`` digits are held out. ``--images FOLDER`` takes a folder instead
(center-cropped and resized to the run's size as training does).

    ssd-run pipelines/quickstart.toml --set run.name=quickstart_holdout --set data.limit=1500
    python benchmarks/study_upsample.py --run runs/quickstart_holdout --num-images 256 \\
        --out docs/study/upsample_quickstart
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402


def held_out_digits(start: int, count: int, size: int) -> np.ndarray:
    from ssd_keras.data import DigitsSource, center_crop_arr, to_rgb

    source = DigitsSource()
    stop = min(start + count, len(source))
    if stop <= start:
        sys.exit(f"no held-out digits after index {start}")
    return np.stack([center_crop_arr(to_rgb(source.load(i)), size) for i in range(start, stop)])


def folder_images(folder: str, count: int, size: int) -> np.ndarray:
    from ssd_keras.data import center_crop_arr, list_image_files, load_image_file, to_rgb

    files = list_image_files(folder)[:count]
    if not files:
        sys.exit(f"no images in {folder}")
    return np.stack([center_crop_arr(to_rgb(load_image_file(os.path.join(folder, f))), size) for f in files])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the PSNR of uint8-valued float arrays."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def to8(x: np.ndarray) -> np.ndarray:
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)


def resize_pil(y8: np.ndarray, size: int, method) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), method)) for img in y8])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/quickstart_holdout")
    ap.add_argument("--images", help="an image folder to use instead of the held-out digits")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100, help="respaced steps K of the whole chain")
    ap.add_argument("--method", default="ancestral")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure-images", type=int, default=6)
    ap.add_argument("--out", default="docs/study/upsample_quickstart", help="writes OUT.json and OUT.png")
    args = ap.parse_args()

    from PIL import Image

    from ssd_keras import edits
    from ssd_keras.metrics import frechet_distance_features, kernel_inception_distance, pixel_features
    from ssd_keras.runs import load_run, sampling_parts

    cfg, groups, meta, path = load_run(Path(args.run))
    model, process, objective = sampling_parts(cfg, groups, meta, path)
    size = process.image_size
    if args.images:
        originals8 = folder_images(args.images, args.num_images, size)
        reference8 = folder_images(args.images, 2 * args.num_images, size)[args.num_images:]
        source = f"folder {args.images}"
    else:
        start = cfg.data.limit or sys.exit("the run trained on every digit: nothing is held out (data.limit)")
        originals8 = held_out_digits(start, args.num_images, size)
        reference8 = held_out_digits(0, len(originals8), size)  # other real images (training ones)
        source = f"digits[{start}:{start + len(originals8)}] (training used digits[:{start}])"
    originals = originals8.astype(np.float32) / 127.5 - 1
    n = len(originals)
    if len(reference8) < n:
        sys.exit(f"{len(reference8)} reference images for {n} held-out ones: give a larger folder")
    # FD/KID of a method's outputs against *other* real images (the reference set): how real
    # they look, not how close they are to their originals (PSNR says that). The floor is the
    # originals themselves against the reference.
    feats = {k: pixel_features(reference8.astype(np.float32) / 127.5 - 1, size=k) for k in (size, 8)}

    def scores(out8: np.ndarray, y8: np.ndarray, r: int) -> dict:
        x = out8.astype(np.float32) / 127.5 - 1
        res = {"psnr": psnr(out8, originals8)}
        for k in (size, 8):
            f = pixel_features(x, size=k)
            res[f"fd_pix{k}"] = frechet_distance_features(f, feats[k])
            res[f"kid_pix{k}"] = kernel_inception_distance(f, feats[k], num_subsets=50,
                                                           subset_size=min(n, 1000), seed=0)[0]
        down = np.asarray(process.operator(size, r).apply(x.astype(np.float64)))
        res["consistency_psnr"] = psnr(np.clip((down + 1) * 127.5, 0, 255), y8.astype(np.float64))
        return res

    results = {"run": str(args.run), "checkpoint": str(path), "step": meta["step"], "source": source,
               "num_images": n, "steps": args.steps, "method": args.method, "seed": args.seed,
               "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "load_average": os.getloadavg(), "levels": {}}
    floor = {"psnr": None}
    f_floor = {k: pixel_features(originals, size=k) for k in (size, 8)}
    for k in (size, 8):
        floor[f"fd_pix{k}"] = frechet_distance_features(f_floor[k], feats[k])
        floor[f"kid_pix{k}"] = kernel_inception_distance(f_floor[k], feats[k], num_subsets=50,
                                                         subset_size=min(n, 1000), seed=0)[0]
    results["data_floor"] = floor
    figure_rows = []
    for r in edits.input_levels(process):
        y = np.asarray(process.operator(size, r).apply(originals.astype(np.float64)))
        y8 = to8(y)
        yq = y8.astype(np.float32) / 127.5 - 1
        rows = {}
        for name, method in (("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)):
            start = time.perf_counter()
            out8 = resize_pil(y8, size, method)
            rows[name] = dict(scores(out8, y8, r), seconds_per_image=(time.perf_counter() - start) / n)
        shown = {"input": np.repeat(np.repeat(yq, size // r, 1), size // r, 2),
                 "bicubic": resize_pil(y8, size, Image.BICUBIC).astype(np.float32) / 127.5 - 1}
        for strength in args.strengths:
            for dc in (True, False):
                name = f"ours s={strength:g} {'dc' if dc else 'free'}"
                start = time.perf_counter()
                images, result = edits.upsample(model, process, objective, yq, num_samples=1, strength=strength,
                                                consistency=dc, steps=args.steps, method=args.method,
                                                seed=args.seed, batch_size=args.batch_size, progress=False)
                seconds = time.perf_counter() - start
                out8 = to8(images[:, 0])
                rows[name] = dict(scores(out8, y8, r), seconds_per_image=seconds / n,
                                  network_calls_per_image=len(process.reverse_steps(
                                      args.steps, start=edits.start_step(process, r, strength))) + 1,
                                  start_step=edits.start_step(process, r, strength))
                print(f"{r} px {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[name].items()), flush=True)
                if strength == args.strengths[0]:
                    shown[name] = out8.astype(np.float32) / 127.5 - 1
        shown["original"] = originals
        figure_rows.append((r, shown))
        results["levels"][str(r)] = rows

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    save_figure(figure_rows, out.with_suffix(".png"), args.figure_images)
    print(format_table(results))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')}")


def save_figure(figure_rows, path: Path, count: int) -> None:
    """Per level: one row per image, columns input | bicubic | ours ... | original."""
    from PIL import Image, ImageDraw

    from ssd_keras.images import to_uint8

    cell, pad, label = 64, 3, 14
    columns = list(figure_rows[0][1])
    height = sum(label + count * (cell + pad) for _ in figure_rows) + label
    canvas = Image.new("RGB", (len(columns) * (cell + pad) + 50, height), "white")
    draw = ImageDraw.Draw(canvas)
    y0 = 0
    for r, shown in figure_rows:
        draw.text((2, y0 + 2), f"{r} px input", fill="black")
        for j, name in enumerate(columns):
            draw.text((50 + j * (cell + pad), y0 + 2), name.replace("ours ", ""), fill="black")
        y0 += label
        for i in range(count):
            for j, name in enumerate(columns):
                img = to_uint8(shown[name][i: i + 1])[0]
                pil = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
                canvas.paste(pil, (50 + j * (cell + pad), y0))
            y0 += cell + pad
    canvas.save(path)


def format_table(results: dict) -> str:
    lines = [f"| input | method | PSNR | FD-pix{16} | KID-pix16 | FD-pix8 | consistency PSNR | s/image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, rows in results["levels"].items():
        for name, v in rows.items():
            keys = [k for k in v if k.startswith("fd_pix") and k != "fd_pix8"]
            full = keys[0] if keys else "fd_pix8"
            lines.append(f"| {r} px | {name} | {v['psnr']:.2f} | {v[full]:.3f} | {v[full.replace('fd', 'kid')]:.4f} | "
                         f"{v['fd_pix8']:.3f} | {v['consistency_psnr']:.1f} | {v['seconds_per_image']:.4f} |")
    f = results["data_floor"]
    keys = [k for k in f if k.startswith("fd_pix") and k != "fd_pix8"]
    lines.append(f"| | originals (floor) | | {f[keys[0]]:.3f} | {f[keys[0].replace('fd', 'kid')]:.4f} | {f['fd_pix8']:.3f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
