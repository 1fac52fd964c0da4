"""Dataset sources and preprocessing: batches of x0 in [-1, 1], NHWC, float32.

``make_dataset(source, image_size, batch_size, ...)`` returns an endless, seeded,
resumable ``ImageBatches`` iterator over one of three sources:

- ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (no download), upscaled;
- ``"folder"``: jpg/jpeg/png/webp/bmp files under a folder (recursive, sorted), optionally
  restricted to the paths listed in a ``split_file``;
- ``"tfds"``: a prepared tensorflow-datasets split read with ``tfds.data_source`` (no
  TensorFlow needed to read, only to prepare).

Preprocessing is ADM's ``center_crop_arr`` (box-halving, bicubic, center crop), optional
seeded horizontal flips, and ``x / 127.5 - 1``. Pure numpy + PIL: no Keras, torch or
TensorFlow import, so it works under every Keras backend.
"""

from .batches import (
    ON_BAD_IMAGE,
    SMALL_IMAGES,
    SOURCES,
    BadImageWarning,
    ImageBatches,
    SmallImageWarning,
    make_dataset,
)
from .preprocess import ALPHA_BACKGROUND, array_to_image, center_crop_arr, load_image_file, to_rgb
from .sources import (
    IMAGE_EXTENSIONS,
    DataError,
    DigitsSource,
    FolderSource,
    MissingDataError,
    TfdsSource,
    list_image_files,
    read_split_file,
)

__all__ = [
    "ALPHA_BACKGROUND", "BadImageWarning", "DataError", "DigitsSource", "FolderSource",
    "IMAGE_EXTENSIONS", "ImageBatches", "MissingDataError", "ON_BAD_IMAGE", "SMALL_IMAGES",
    "SOURCES", "SmallImageWarning", "TfdsSource", "array_to_image", "center_crop_arr",
    "list_image_files", "load_image_file", "make_dataset", "read_split_file", "to_rgb",
]
