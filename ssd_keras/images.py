"""Writing what people look at: sample grids, single images and progression figures."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` float NHWC -> uint8 NHWC."""
    x = (np.clip(np.asarray(images, dtype=np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(x).astype(np.uint8)


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 HWC image."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return out


def save_image(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save a uint8 HWC image (format from the suffix; ``scale``: nearest-neighbour enlarged)."""
    img = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return _save(img, path)


def save_images(images: np.ndarray, folder: str | Path, start: int = 0, digits: int = 6) -> list[Path]:
    """Save ``[-1, 1]`` NHWC images one file each: ``folder/000000.png`` (numbered from
    ``start``, ``digits`` wide). Each is written whole or not at all (see :func:`_save`)."""
    folder = Path(folder)
    return [save_image(img, folder / f"{start + i:0{digits}d}.png")
            for i, img in enumerate(to_uint8(images))]


def _save(img: Image.Image, path: str | Path) -> Path:
    """Write under a temporary name (``.NAME.tmp``: no image name, folder readers skip it)
    and rename: a killed process leaves no half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    os.replace(tmp, path)
    return path


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None) -> Path:
    """Save ``[-1, 1]`` NHWC images as a grid PNG, enlarged to at least ~512 px wide."""
    tiled = grid(to_uint8(images), columns)
    return save_image(tiled, path, scale=max(1, 512 // tiled.shape[1]))


def save_progression(frames: list[dict], path: str | Path, image_size: int, max_rows: int = 4) -> Path:
    """A figure of x_t and the predicted x0 over the reverse process.

    ``frames``: dicts with ``t``, ``x_t`` and ``x0_hat`` ([-1, 1] NHWC, any resolution).
    Each column is one moment; for each sample there is a row of x_t and a row of x0_hat,
    every image shown at full size (nearest-neighbour, so the resolution stays visible).
    """
    cell, pad, label_h = max(image_size, 64), 4, 14
    samples = min(max_rows, frames[0]["x_t"].shape[0])
    cols = len(frames)
    width = pad + cols * (cell + pad) + 60
    height = label_h + pad + samples * 2 * (cell + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, frame in enumerate(frames):
        x0 = 60 + pad + k * (cell + pad)
        res = frame["x_t"].shape[1]
        draw.text((x0, 1), f"t={frame['t']} ({res}px)", fill="black")
        for i in range(samples):
            for j, key in enumerate(("x_t", "x0_hat")):
                img = to_uint8(frame[key][i: i + 1])[0]
                pil = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
                pil = pil.convert("RGB").resize((cell, cell), Image.NEAREST)
                y0 = label_h + pad + (2 * i + j) * (cell + pad)
                canvas.paste(pil, (x0, y0))
                if k == 0:
                    draw.text((2, y0 + cell // 2 - 6), "x_t" if j == 0 else "x0 pred", fill="black")
    return _save(canvas, path)


def save_gif(images: np.ndarray, path: str | Path, frame_ms: int = 120, min_size: int = 128) -> Path:
    """``[-1, 1]`` NHWC images as a looping GIF (forward, then back), enlarged (nearest) to at
    least ``min_size`` px. Written whole or not at all (see :func:`_save`)."""
    frames = []
    for img in to_uint8(images):
        pil = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).convert("RGB")
        k = max(1, -(-min_size // pil.width))
        frames.append(pil.resize((pil.width * k, pil.height * k), Image.NEAREST))
    frames = frames + frames[-2:0:-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    os.replace(tmp, path)
    return path
