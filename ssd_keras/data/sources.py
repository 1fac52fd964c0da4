"""Random-access image sources: the bundled digits, an image folder, a tensorflow-datasets split.

A source is a sequence of images addressed by index: ``len(source)``, ``source.load(i)``
returns a PIL image (any mode) or raises for unreadable data, and ``source.describe(i)``
names item ``i`` for messages (a file path, or ``tfds:name/split[i]``).

Labels (class-conditional training, ``data.labels``): a source opened with labels has
``classes`` (the class names, in label order) and ``label(i)``, the class index of item
``i``: the digits' own targets, a folder's class subfolders (ImageFolder's convention) or
a labels file, a tfds label feature. Without labels ``classes`` is ``None``.
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

    def __init__(self, labels: bool = False, classes=()) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images  # (1797, 8, 8) float64 in 0..16
        self._images = np.round(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.classes = None
        if labels:
            found = [str(d) for d in range(10)]
            self.classes = _declared_order(found, classes, "the digits")
            index = {name: i for i, name in enumerate(self.classes)}
            self._labels = np.array([index[str(int(d))] for d in digits.target], np.int64)

    def label(self, index: int) -> int:
        return int(self._labels[index])

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


def _declared_order(found, declared, where: str) -> list[str]:
    """The class list: ``declared`` (data.classes) if given, else ``found`` sorted; a class
    found in the data but not declared is an error naming it."""
    if not declared:
        return sorted(found)
    unknown = [c for c in sorted(set(found)) if c not in declared]
    if unknown:
        raise DataError(f"{where} has class {unknown[0]!r}, which data.classes does not list "
                        f"({len(declared)} classes: {', '.join(list(declared)[:10])}"
                        f"{', ...' if len(declared) > 10 else ''})")
    return list(declared)


def read_labels_file(path: str) -> dict[str, str]:
    """``relative/path.png,class`` per line (blank lines and # comments skipped)."""
    entries = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            file, comma, name = line.rpartition(",")
            if not comma or not file.strip() or not name.strip():
                raise DataError(f"labels_file {path!r} line {number}: expected "
                                f"`relative/path.png,class`, got {line!r}")
            entries[file.strip()] = name.strip()
    if not entries:
        raise DataError(f"labels_file {path!r} lists no images")
    return entries


class FolderSource:
    """Images in a folder tree (jpg, jpeg, png, webp, bmp), in sorted order.

    With ``split_file``, exactly the files it lists (paths relative to ``root``, or
    absolute), in the file's order; every listed file must exist.

    With ``labels``: each image's class is its top subfolder (``root/<class>/...``, the
    ImageFolder convention), or, with ``labels_file``, the class that file gives it
    (then the images are the ones it lists, unless ``split_file`` picks them).
    """

    name = "folder"
    expected_small = False

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike | None = None,
                 labels: bool = False, labels_file: str | os.PathLike | None = None,
                 classes=()):
        root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.exists(root):
            raise MissingDataError(f"data path {root!r} does not exist (path={root!r})")
        if not os.path.isdir(root):
            raise DataError(
                f"data path {root!r} is a file, not a folder; point `path` at the folder that "
                "holds the images"
            )
        self.root = root
        by_file = None
        if labels and labels_file is not None:
            labels_file = os.path.abspath(os.path.expanduser(os.fspath(labels_file)))
            if not os.path.isfile(labels_file):
                raise MissingDataError(f"labels_file {labels_file!r} does not exist")
            by_file = read_labels_file(labels_file)
            if split_file is None:
                missing = [p for p in by_file if not os.path.isfile(os.path.join(root, p))]
                if missing:
                    raise MissingDataError(
                        f"{len(missing)} of the {len(by_file)} files listed in labels_file "
                        f"{labels_file!r} do not exist under {root!r}: {missing[0]!r}")
        if by_file is not None and split_file is None:
            rel_paths = list(by_file)
        elif split_file is not None:
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
        self.classes = None
        if labels:
            names = self._class_names(by_file, labels_file)
            self.classes = _declared_order(set(names), classes, f"data path {root!r}")
            index = {name: i for i, name in enumerate(self.classes)}
            self._labels = np.array([index[n] for n in names], np.int64)

    def _class_names(self, by_file, labels_file) -> list[str]:
        if by_file is not None:
            missing = [p for p in self.files if p not in by_file]
            if missing:
                raise DataError(f"labels_file {labels_file!r} gives no class for "
                                f"{len(missing)} image(s), e.g. {missing[0]!r}")
            return [by_file[p] for p in self.files]
        top = [Path(p).parts for p in self.files]
        if not any(len(parts) > 1 for parts in top):
            raise DataError(
                f"data.labels = true, but {self.root!r} has no class subfolders (the images "
                "must lie in <path>/<class>/...), and no data.labels_file is given")
        loose = [p for p, parts in zip(self.files, top) if len(parts) == 1]
        if loose:
            raise DataError(
                f"image {os.path.join(self.root, loose[0])!r} is not in a class subfolder "
                f"({len(loose)} such image(s)); with data.labels = true every image lies in "
                "<path>/<class>/...")
        return [parts[0] for parts in top]

    def label(self, index: int) -> int:
        return int(self._labels[index])

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
                 image_key: str = "image", labels: bool = False, label_key: str = "label",
                 classes=()):
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
        self.classes, self.label_key = None, label_key
        if labels:
            if label_key not in first:
                raise DataError(f"tfds dataset {name!r} has no feature label_key={label_key!r}; "
                                f"its features are {sorted(first)}")
            names = None
            try:  # a ClassLabel feature names its classes
                names = list(self._ds.dataset_info.features[label_key].names)
            except Exception:
                pass
            if names is None and not classes:
                raise DataError(f"tfds feature {name!r}[{label_key!r}] names no classes; list "
                                "them in data.classes")
            self.classes = list(classes) if classes else names
            if classes and names is not None and len(names) != len(classes):
                raise DataError(f"tfds feature {name!r}[{label_key!r}] has {len(names)} "
                                f"classes, data.classes lists {len(classes)}")

    def label(self, index: int) -> int:
        value = int(np.asarray(self._ds[index][self.label_key]))
        if not 0 <= value < len(self.classes):
            raise DataError(f"{self.describe(index)}: label {value} is not a class "
                            f"(0..{len(self.classes) - 1})")
        return value

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
