"""Random-access image sources: the bundled digits, an image folder, a tensorflow-datasets split.

A source is a sequence of images addressed by index: ``len(source)``, ``source.load(i)``
returns a PIL image (any mode) or raises for unreadable data, and ``source.describe(i)``
names item ``i`` for messages (a file path, or ``tfds:name/split[i]``).
Nothing here imports TensorFlow, Keras or torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .preprocess import array_to_image, load_image_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(ValueError):
    """The data itself is unusable: missing, empty, not prepared, or a bad image."""


class MissingDataError(DataError, FileNotFoundError):
    """A path the configuration names does not exist."""


class DigitsSource:
    """scikit-learn's handwritten digits (1797 images, 8x8, values 0..16), no download.

    Scaled to 0..255 (white digit on black). They are far smaller than any training size
    and are upscaled on purpose, so they never trigger the small-image warning.
    """

    name = "digits"
    expected_small = True

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        images = load_digits().images  # (1797, 8, 8) float64 in 0..16
        self._images = np.round(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self._images[index], "L")

    def describe(self, index: int) -> str:
        return f"digits[{index}]"


def list_image_files(root: str | os.PathLike) -> list[str]:
    """All image files under ``root`` (recursive), as sorted relative POSIX paths.

    Extensions are matched case-insensitively against ``IMAGE_EXTENSIONS``. Hidden files
    and folders (names starting with ".", e.g. macOS ``._x.jpg`` resource forks, which
    are not images) are left out. Symlinked folders are followed.
    """
    root = os.fspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(Path(rel).as_posix())
    found.sort()
    return found


def read_split_file(split_file: str | os.PathLike) -> list[str]:
    """Relative image paths, one per line; blank lines and lines starting with # are skipped."""
    entries = []
    with open(split_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line)
    return entries


class FolderSource:
    """Images in a folder tree (jpg, jpeg, png, webp, bmp), in sorted order.

    With ``split_file``, exactly the files it lists (paths relative to ``root``, or
    absolute), in the file's order; every listed file must exist.
    """

    name = "folder"
    expected_small = False

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike | None = None):
        root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.exists(root):
            raise MissingDataError(f"data path {root!r} does not exist (path={root!r})")
        if not os.path.isdir(root):
            raise DataError(
                f"data path {root!r} is a file, not a folder; point `path` at the folder that "
                "holds the images"
            )
        self.root = root
        if split_file is not None:
            split_file = os.path.abspath(os.path.expanduser(os.fspath(split_file)))
            if not os.path.isfile(split_file):
                raise MissingDataError(f"split_file {split_file!r} does not exist")
            rel_paths = read_split_file(split_file)
            if not rel_paths:
                raise DataError(f"split_file {split_file!r} lists no files")
            missing = [p for p in rel_paths if not os.path.isfile(os.path.join(root, p))]
            if missing:
                shown = ", ".join(repr(p) for p in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise MissingDataError(
                    f"{len(missing)} of the {len(rel_paths)} files listed in split_file "
                    f"{split_file!r} do not exist under {root!r}: {shown}{more}"
                )
        else:
            rel_paths = list_image_files(root)
            if not rel_paths:
                others = sum(len(files) for _, _, files in os.walk(root))
                detail = (
                    f"it holds {others} other file(s) but none with an image extension"
                    if others
                    else "it is empty"
                )
                raise DataError(
                    f"no images found under {root!r} (searched recursively for "
                    f"{', '.join(IMAGE_EXTENSIONS)}, any case); {detail}"
                )
        self.files = rel_paths

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        return load_image_file(os.path.join(self.root, self.files[index]))

    def describe(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])


def _tfds_build_hint(name: str, data_dir: str | None, manual: bool) -> str:
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    hint = (
        f"prepare it once with TensorFlow installed (pip install tensorflow): "
        f"`tfds build {name}{dir_flag} --file_format=array_record`"
    )
    if manual:
        hint += (
            f" --manual_dir=<folder with the files you downloaded>; {name} needs a manual "
            "download first (see its tensorflow-datasets catalog page)"
        )
    return hint


# Datasets whose tfds builders fetch files that often need a manual step in practice
# (CelebA's Google-Drive files hit quota limits; ImageNet-resized needs a licence login).
_OFTEN_MANUAL = {
    "celeb_a": "CelebA's files come from Google Drive, whose download quota often fails; "
    "if it does, download them by hand into <data_dir>/downloads/manual and rerun",
    "imagenet_resized": "ImageNet-resized files need an image-net.org account; download "
    "them by hand and pass --manual_dir",
}


class TfdsSource:
    """One split of a prepared tensorflow-datasets dataset, read through ``tfds.data_source``.

    ``tfds.data_source`` reads array_record files with random access and needs no
    TensorFlow; preparing (``tfds build``) does. Nothing is ever downloaded from here.
    """

    name = "tfds"
    expected_small = False

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image"):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataError(
                "source='tfds' needs tensorflow-datasets and array-record: "
                "pip install 'ssd_keras[tfds]'"
            ) from e
        if data_dir is not None:
            data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
        self.tfds_name, self.split, self.image_key = name, split, image_key
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise self._explain(tfds, e, name, split, data_dir) from e
        if isinstance(self._ds, dict):
            raise DataError(
                f"tfds_split={split!r} selects several splits {sorted(self._ds)}; give one"
            )
        if len(self._ds) == 0:
            raise DataError(f"tfds dataset {name!r} split {split!r} has no examples")
        first = self._ds[0]
        if not isinstance(first, dict) or image_key not in first:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise DataError(
                f"tfds dataset {name!r} has no feature image_key={image_key!r}; its features "
                f"are {keys}"
            )
        shape = np.shape(first[image_key])
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3, 4)):
            raise DataError(
                f"tfds feature {name!r}[{image_key!r}] has shape {shape}, not an image "
                "(H, W[, 1|3|4])"
            )

    @staticmethod
    def _explain(tfds, error: Exception, name: str, split: str, data_dir: str | None):
        not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
        if not_found and isinstance(error, not_found):
            return DataError(
                f"tensorflow-datasets has no dataset tfds_name={name!r} "
                "(see https://www.tensorflow.org/datasets/catalog/overview)"
            )
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            prepared = builder.is_prepared()
            where = os.fspath(builder.data_dir)
            manual = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
        except Exception:
            prepared, where, manual = False, data_dir or "~/tensorflow_datasets", False
        base = name.split("/")[0].split(":")[0]
        extra = f" ({_OFTEN_MANUAL[base]})" if base in _OFTEN_MANUAL else ""
        if not prepared:
            return DataError(
                f"tfds dataset {name!r} is not prepared locally (looked in {where}); "
                f"{_tfds_build_hint(name, data_dir, manual)}{extra}"
            )
        if "array_record" in str(error).lower() or "FileFormat" in str(error):
            return DataError(
                f"tfds dataset {name!r} is prepared at {where} but not in the array_record "
                "format that random access without TensorFlow needs; rebuild it with "
                f"`tfds build {name} --data_dir=<another dir> --file_format=array_record` "
                f"(original error: {error})"
            )
        return DataError(f"could not open tfds dataset {name!r} split {split!r}: {error}")

    def __len__(self) -> int:
        return len(self._ds)

    def load(self, index: int) -> Image.Image:
        return array_to_image(self._ds[index][self.image_key])

    def describe(self, index: int) -> str:
        return f"tfds:{self.tfds_name}/{self.split}[{index}]"
