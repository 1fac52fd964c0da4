"""``make_dataset``: an infinite, seeded, resumable stream of preprocessed image batches.

Order. Epoch ``e`` visits the images in ``rng([seed, 0, e]).permutation(N)``. Two ways to
shard it over ``n`` processes (``sharding``):

- ``"contiguous"``: shard ``k`` takes the ``k``-th of ``n`` equal contiguous slices of it
  (``N // n`` images each, so every shard has the same epoch length; the ``N % n`` images
  left over change every epoch). The state is a position in the shard's own slice.
- ``"strided"`` (data-parallel training, docs/distributed.md): the epochs form one global
  stream and shard ``k``, restored to global position ``P``, takes the stream's elements
  ``P + k, P + k + n, P + k + 2n, ...``. The state is the *job's* global position (where
  the next round of ``n`` images starts), so a run can resume with another ``n``: no image
  of the epoch is skipped or repeated. With ``n = 1`` both modes are the same stream.
Whether image ``i`` is flipped in epoch ``e`` is ``rng([seed, 1, e]).random(N)[i] < 0.5``:
it depends on (seed, epoch, index) only, never on decoding order or worker count.

Stream. The shard's epochs are concatenated into one endless stream; a batch is the next
``batch_size`` good images of it (a batch can straddle two epochs, so every batch is full
and no image is dropped). Bad images are skipped in place. The resume state is the stream
position after the last batch handed out: ``{"epoch", "position"}`` (+ consistency fields).

Labels. A source opened with labels (``make_dataset(labels=True)``) makes every batch a
pair ``(x, y)``: ``y`` int64 (B,) holds the class indices of the images of ``x``, in the
order of ``ImageBatches.classes``. The stream and its state are the same as without.

Workers. Decoding runs in a thread pool (PIL releases the GIL while decoding and
resampling); a background thread assembles batches in stream order and keeps ``prefetch``
of them ready. ``num_workers=0`` decodes in that thread, ``prefetch=0`` does everything
inside ``next()``. The output never depends on either.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import queue
import threading
import warnings
from typing import Any

import numpy as np

from .preprocess import center_crop_arr, to_rgb
from .sources import DataError, DigitsSource, FolderSource, TfdsSource

SOURCES = ("digits", "folder", "tfds")
ON_BAD_IMAGE = ("skip", "error")
SMALL_IMAGES = ("upscale", "skip", "error")
SHARDINGS = ("contiguous", "strided")
STATE_VERSION = 1

# How many bad images are named one by one in warnings / report() before they are only counted.
_MAX_NAMED_BAD = 10
# Give up when this many images were tried and not a single one decoded.
_ALL_BAD_PROBE = 256


class BadImageWarning(UserWarning):
    """A corrupt or unreadable image was skipped."""


class SmallImageWarning(UserWarning):
    """Images smaller than image_size are being upscaled."""


class _Decoded:
    __slots__ = ("array", "error", "small_size", "label")

    def __init__(self, array=None, error=None, small_size=None, label=None):
        self.array, self.error, self.small_size = array, error, small_size
        self.label = label


def _decode(source, index: int, image_size: int) -> _Decoded:
    """Load + preprocess one image; errors are returned, not raised (they are data)."""
    try:
        image = source.load(index)
        image = to_rgb(image)
        size = image.size
        array = center_crop_arr(image, image_size)
    except Exception as e:  # corrupt, truncated, unknown format, decompression bomb, ...
        return _Decoded(error=f"{type(e).__name__}: {e}")
    small = size if min(size) < image_size else None
    # a label outside the classes is a DataError: raised, never skipped as a bad image
    label = source.label(index) if getattr(source, "classes", None) is not None else None
    return _Decoded(array=array, small_size=small, label=label)


class _InlineFuture:
    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    def cancel(self):
        return False


class _Pipeline:
    """Everything the background thread needs (it never holds the public wrapper, so an
    ``ImageBatches`` that is dropped without ``close()`` is still collected and stopped)."""

    def __init__(self, source, *, image_size, batch_size, seed, random_flip, cache,
                 on_bad_image, small_images, num_workers, shard_index, num_shards, num_images,
                 sharding="contiguous"):
        self.source = source
        self.sharding = sharding
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.random_flip, self.on_bad_image = random_flip, on_bad_image
        self.small_images, self.num_workers = small_images, num_workers
        self.shard_index, self.num_shards = shard_index, num_shards
        self.num_images = num_images
        self.labelled = getattr(source, "classes", None) is not None
        # the range of the state's position: the shard's slice, or the global epoch
        self.images_per_epoch = num_images if sharding == "strided" else num_images // num_shards
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.lock = threading.Lock()
        self.bad: dict[int, str] = {}        # index -> error text (unreadable)
        self.small: dict[int, tuple] = {}    # index -> original (w, h)
        self.small_warned = False
        self.decoded_ok = 0
        self.executor = (
            cf.ThreadPoolExecutor(num_workers, thread_name_prefix="ssd-data-decode")
            if num_workers > 0 else None
        )
        self._epoch_tables: collections.OrderedDict = collections.OrderedDict()

    # ------------------------------------------------------------------ ordering
    def epoch_table(self, epoch: int):
        """(shard order of dataset indices, flip flags over all indices or None)."""
        with self.lock:
            table = self._epoch_tables.get(epoch)
            if table is None:
                n, length = self.num_images, self.images_per_epoch
                perm = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
                order = (perm if self.sharding == "strided" else
                         perm[self.shard_index * length : (self.shard_index + 1) * length])
                flips = (np.random.default_rng([self.seed, 1, epoch]).random(n) < 0.5
                         if self.random_flip else None)
                table = (order, flips)
                self._epoch_tables[epoch] = table
                while len(self._epoch_tables) > 3:
                    self._epoch_tables.popitem(last=False)
            return table

    def stream(self, epoch: int, position: int):
        """Yield ``(epoch, position, index, flip)`` forever from a stream position; the
        ``(epoch, position)`` yielded is the state *after* taking that image."""
        k, n = (self.shard_index, self.num_shards) if self.sharding == "strided" else (0, 1)
        skip = k  # strided: skip k images, then take one in every n
        while True:
            order, flips = self.epoch_table(epoch)
            for pos in range(position, len(order)):
                if skip:
                    skip -= 1
                    continue
                skip = n - 1
                index = int(order[pos])
                # the job's next position: this image's round of n images is done
                after, after_epoch = pos + n - k, epoch
                while after >= len(order):
                    after, after_epoch = after - len(order), after_epoch + 1
                yield after_epoch, after, index, bool(flips[index]) if flips is not None else False
            epoch, position = epoch + 1, 0

    # ------------------------------------------------------------------ decoding
    def excluded(self, index: int) -> bool:
        return index in self.bad or (self.small_images == "skip" and index in self.small)

    def submit(self, index: int):
        if self.cache is not None:
            array = self.cache.get(index)
            if array is not None:
                label = self.source.label(index) if self.labelled else None
                return _InlineFuture(_Decoded(array=array, label=label))
        if self.executor is None:
            return _InlineFuture(_decode(self.source, index, self.image_size))
        return self.executor.submit(_decode, self.source, index, self.image_size)

    def _check_some_usable(self, name: str, why: str):
        with self.lock:
            unusable = len(self.bad) + (len(self.small) if self.small_images == "skip" else 0)
        if unusable >= self.num_images:
            raise DataError(
                f"none of the {self.num_images} images is usable (e.g. {name}: {why})"
            )
        if self.decoded_ok == 0 and unusable >= _ALL_BAD_PROBE:
            raise DataError(
                f"the first {unusable} images tried are all unusable (e.g. {name}: {why}); "
                "check the data path and format"
            )

    def handle_bad(self, index: int, error: str, notes: list):
        name = self.source.describe(index)
        if self.on_bad_image == "error":
            raise DataError(
                f"cannot read image {name}: {error} (on_bad_image='error'; use "
                "on_bad_image='skip' to skip unreadable images)"
            )
        with self.lock:
            first_time = index not in self.bad
            self.bad[index] = error
            count = len(self.bad)
        if first_time and count <= _MAX_NAMED_BAD:
            tail = (" Further unreadable images are only counted (see report())."
                    if count == _MAX_NAMED_BAD else "")
            notes.append((BadImageWarning, f"skipping unreadable image {name}: {error}.{tail}"))
        self._check_some_usable(name, error)

    def handle_small(self, index: int, size: tuple, notes: list) -> bool:
        """Record an image smaller than image_size; return True if it is to be used."""
        name = self.source.describe(index)
        if self.small_images == "error":
            raise DataError(
                f"image {name} is {size[0]}x{size[1]}, smaller than image_size="
                f"{self.image_size} (small_images='error'; use small_images='upscale' to "
                "upscale such images or 'skip' to leave them out)"
            )
        with self.lock:
            self.small[index] = size
            warn = not self.small_warned
            self.small_warned = True
        if warn:
            verb = "upscaling" if self.small_images == "upscale" else "skipping"
            notes.append((
                SmallImageWarning,
                f"{verb} images smaller than image_size={self.image_size}, the first being "
                f"{name} ({size[0]}x{size[1]}); warned once, report()['small_images'] counts "
                "them",
            ))
        if self.small_images == "skip":
            self._check_some_usable(name, f"{size[0]}x{size[1]} is smaller than image_size")
            return False
        return True

    def batches(self, epoch: int, position: int):
        """Generator of ``(batch, state_after, notes)`` starting at a stream position."""
        window = max(16, 4 * self.num_workers) if self.executor is not None else 1
        stream = self.stream(epoch, position)
        pending: collections.deque = collections.deque()
        size, expected_small = self.image_size, self.source.expected_small
        try:
            while True:
                arrays, labels, notes = [], [], []
                while len(arrays) < self.batch_size:
                    while len(pending) < window:
                        ep, pos, index, flip = next(stream)
                        future = None if self.excluded(index) else self.submit(index)
                        pending.append((ep, pos, index, flip, future))
                    ep, pos, index, flip, future = pending.popleft()
                    epoch, position = ep, pos
                    if future is None or self.excluded(index):
                        continue
                    result = future.result()
                    if result.error is not None:
                        self.handle_bad(index, result.error, notes)
                        continue
                    if result.small_size is not None and not expected_small:
                        if not self.handle_small(index, result.small_size, notes):
                            continue
                    self.decoded_ok += 1
                    if self.cache is not None and index not in self.cache:
                        self.cache[index] = result.array
                    arrays.append(result.array[:, ::-1] if flip else result.array)
                    labels.append(result.label)
                batch = np.empty((self.batch_size, size, size, 3), np.float32)
                for i, array in enumerate(arrays):
                    batch[i] = array
                batch /= 127.5
                batch -= 1.0
                if self.labelled:
                    batch = (batch, np.asarray(labels, np.int64))
                yield batch, (epoch, position), notes
        finally:
            for item in pending:
                if item[4] is not None:
                    item[4].cancel()

    def close(self):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


def _produce(gen, q: queue.Queue, stop: threading.Event):
    """Background thread: run the batch generator into the queue until stopped."""
    try:
        for item in gen:
            if not _put(q, ("batch", item), stop) or stop.is_set():
                return
    except BaseException as e:  # hand every failure to the consumer
        _put(q, ("error", e), stop)
    finally:
        gen.close()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` into ``q``, waiting in 0.1 s slices; ``False`` if stopped first."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class ImageBatches:
    """Infinite iterator of ``float32 (B, H, W, 3)`` batches in [-1, 1] (NHWC).

    ``next(it)`` gives the next batch; ``state()`` / ``restore(state)`` resume exactly;
    ``report()`` has the bad/small image counters; ``close()`` (or ``with``) stops the
    background threads. With labels each batch is ``(x, y)`` and ``classes`` names the
    classes (else ``None``). Attributes: ``num_images`` (images in the source, after ``limit``),
    ``images_per_epoch`` (per shard), ``epoch`` (of the next image), ``num_bad``, ``num_small``.
    """

    def __init__(self, source, *, image_size: int, batch_size: int, seed: int,
                 random_flip: bool, cache: bool, on_bad_image: str, small_images: str,
                 num_workers: int, prefetch: int, shard_index: int, num_shards: int,
                 limit: int | None, sharding: str = "contiguous"):
        self._closed = True  # until fully built, so __del__ is harmless
        num_images = len(source) if limit is None else min(limit, len(source))
        if num_images // num_shards == 0:
            raise DataError(
                f"the dataset has {num_images} image(s), fewer than num_shards={num_shards}"
            )
        self.source = source
        self.classes = getattr(source, "classes", None)
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.shard_index, self.num_shards = shard_index, num_shards
        self.sharding = sharding
        self.num_workers, self.prefetch = num_workers, prefetch
        self.num_images = num_images
        self.images_per_epoch = num_images if sharding == "strided" else num_images // num_shards
        if batch_size > num_images // num_shards:
            warnings.warn(
                f"batch_size={batch_size} is larger than the {num_images // num_shards} images of "
                "an epoch (per shard): batches span several epochs and repeat images",
                stacklevel=3,
            )
        self._pipe = _Pipeline(
            source, image_size=image_size, batch_size=batch_size, seed=seed,
            random_flip=random_flip, cache=cache, on_bad_image=on_bad_image,
            small_images=small_images, num_workers=num_workers, shard_index=shard_index,
            num_shards=num_shards, num_images=num_images, sharding=sharding,
        )
        self._thread = self._queue = self._stop = self._gen = None
        self._error: BaseException | None = None
        self._closed = False
        self._start(0, 0)

    # ------------------------------------------------------------------ threads
    def _start(self, epoch: int, position: int):
        self._state = (epoch, position)
        self._error = None
        self._gen = self._pipe.batches(epoch, position)
        if self.prefetch == 0:
            return
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(self._gen, self._queue, self._stop),
            name="ssd-data-prefetch", daemon=True,
        )
        self._thread.start()

    def _halt(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        elif self._gen is not None:
            self._gen.close()
        self._gen = None

    # ------------------------------------------------------------------ public API
    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._closed:
            raise RuntimeError("this ImageBatches is closed")
        if self._error is not None:
            raise self._error
        if self._thread is None:
            try:
                batch, state, notes = next(self._gen)
            except BaseException as e:
                self._error = e
                raise
        else:
            while True:
                try:
                    kind, item = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        self._error = RuntimeError("the data prefetch thread stopped")
                        raise self._error from None
            if kind == "error":
                self._error = item
                raise item
            batch, state, notes = item
        self._state = state
        for category, message in notes:
            warnings.warn(message, category, stacklevel=2)
        return batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices this shard visits in ``epoch``, in order (unusable ones included;
        strided: from the epoch's start)."""
        order = self._pipe.epoch_table(epoch)[0]
        if self.sharding == "strided":
            order = order[self.shard_index::self.num_shards]
        return order.copy()

    def state(self) -> dict[str, Any]:
        """JSON-serializable stream position after the last batch returned by ``next``."""
        return {
            "version": STATE_VERSION,
            "epoch": int(self._state[0]),
            "position": int(self._state[1]),
            "seed": self.seed,
            "num_images": self.num_images,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "sharding": self.sharding,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``'s output: the next batches equal an uninterrupted run's.

        Seed, image count and sharding must match; batch_size, num_workers, prefetch and
        cache may differ. A ``"strided"`` dataset also takes the state of another shard or
        shard count (strided, or contiguous with one shard: the same global stream).
        """
        if self._closed:
            raise RuntimeError("this ImageBatches is closed")
        if not isinstance(state, dict) or "epoch" not in state or "position" not in state:
            raise ValueError(f"state must be a dict from ImageBatches.state(), got {state!r}")
        keys = ("seed", "num_images", "shard_index", "num_shards")
        if self.sharding == "strided" and (state.get("sharding") == "strided"
                                           or state.get("num_shards", 1) == 1):
            keys = ("seed", "num_images")  # a global position: any shard count resumes it
        elif state.get("sharding", "contiguous") != self.sharding and self.num_shards > 1:
            raise ValueError(
                f"cannot restore: the saved data state has sharding="
                f"{state.get('sharding', 'contiguous')!r} but this dataset has "
                f"sharding={self.sharding!r}, num_shards={self.num_shards}")
        for key in keys:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot restore: the saved data state has {key}={state[key]!r} but this "
                    f"dataset has {key}={getattr(self, key)!r}"
                )
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and isinstance(position, int) and epoch >= 0
                and 0 <= position < self.images_per_epoch):
            raise ValueError(
                f"cannot restore: epoch={epoch!r}, position={position!r} out of range "
                f"(epoch >= 0, 0 <= position < {self.images_per_epoch})"
            )
        self._halt()
        self._start(epoch, position)

    @property
    def epoch(self) -> int:
        return self._state[0]

    @property
    def num_bad(self) -> int:
        return len(self._pipe.bad)

    @property
    def num_small(self) -> int:
        return len(self._pipe.small)

    def report(self) -> dict[str, Any]:
        """Counters: images, unreadable (skipped) and small (below image_size) images.

        Counts include images the prefetcher has decoded ahead of ``next``.
        """
        pipe, describe = self._pipe, self.source.describe
        with pipe.lock:
            bad = sorted(pipe.bad.items())
            small = sorted(pipe.small.items())
        return {
            "source": self.source.name,
            "num_images": self.num_images,
            "images_per_epoch": self.images_per_epoch,
            "bad_images": len(bad),
            "bad_examples": [[describe(i), err] for i, err in bad[:_MAX_NAMED_BAD]],
            "small_images": len(small),
            "small_images_action": pipe.small_images,
            "small_examples": [[describe(i), list(sz)] for i, sz in small[:_MAX_NAMED_BAD]],
            "cached_images": len(pipe.cache) if pipe.cache is not None else 0,
        }

    def close(self) -> None:
        """Stop the prefetch thread and the decoding pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._halt()
        self._pipe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")


def _check_choice(name: str, value, choices):
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name}={value!r}; valid values: {valid}")


def make_dataset(source: str, image_size: int, batch_size: int, *, seed: int = 0,
                 path: str | None = None, split_file: str | None = None,
                 tfds_name: str | None = None, tfds_split: str = "train",
                 tfds_data_dir: str | None = None, image_key: str = "image",
                 random_flip: bool = True, cache: bool = False, on_bad_image: str = "skip",
                 small_images: str = "upscale", num_workers: int = 2, prefetch: int = 2,
                 shard_index: int = 0, num_shards: int = 1, sharding: str = "contiguous",
                 limit: int | None = None, labels: bool = False, labels_file: str | None = None,
                 label_key: str = "label", classes=()) -> ImageBatches:
    """Open an image source as an endless, seeded, resumable stream of training batches.

    Args:
      source: "digits" (scikit-learn's bundled 8x8 handwritten digits, no download),
        "folder" (images under ``path``) or "tfds" (a prepared tensorflow-datasets split).
      image_size: side of the square output images.
      batch_size: images per batch.
      seed: seeds the epoch orders and flips (integer >= 0).
      path: the image folder (source="folder"), searched recursively for
        jpg/jpeg/png/webp/bmp files, any case; hidden files are skipped.
      split_file: optional text file listing the images to use, one path relative to
        ``path`` per line (source="folder").
      tfds_name, tfds_split, tfds_data_dir, image_key: the tensorflow-datasets name (with
        config, e.g. "imagenet_resized/64x64"), split, data dir and image feature.
      random_flip: mirror each image left-right with probability 1/2 (seeded).
      cache: keep the decoded, cropped uint8 images in memory (small datasets).
      on_bad_image: "skip" (warn, count, go on) or "error" for unreadable files.
      small_images: images smaller than ``image_size``: "upscale" (warn once), "skip"
        or "error".
      num_workers: decoding threads (0: decode in the prefetch thread).
      prefetch: batches prepared ahead in a background thread (0: decode in ``next()``).
      shard_index, num_shards: this process's share of every epoch (equal, disjoint).
      sharding: "contiguous" (a slice of every epoch per shard) or "strided" (every
        ``num_shards``-th image of one global stream; resumable with another shard count).
      limit: use only the first ``limit`` images of the source (in listing order).
      labels: batches are ``(x, y)`` with the images' class indices: the digits' own,
        the class subfolders of ``path`` (or ``labels_file``: ``relative/path,class``
        lines), the tfds feature ``label_key``. ``classes``: the class names in label
        order (default: those found, sorted; a class not listed is an error).

    Returns:
      an ``ImageBatches`` iterator; ``next(it)`` is ``float32 (batch_size, image_size,
      image_size, 3)`` in [-1, 1].
    """
    # A pipeline's [data] keys were validated by ssd_keras.config (with section.key messages);
    # these checks guard direct calls, and keep the invariants the stream relies on.
    _check_choice("source", source, SOURCES)
    _check_int("image_size", image_size, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    _check_choice("small_images", small_images, SMALL_IMAGES)
    _check_int("num_workers", num_workers, 0)
    _check_int("prefetch", prefetch, 0)
    _check_int("num_shards", num_shards, 1)
    _check_int("shard_index", shard_index, 0)
    _check_int("limit", limit, 1, allow_none=True)
    _check_choice("sharding", sharding, SHARDINGS)
    if shard_index >= num_shards:
        raise ValueError(
            f"shard_index must be in [0, num_shards), got shard_index={shard_index!r} with "
            f"num_shards={num_shards!r}"
        )
    for name, value in (("random_flip", random_flip), ("cache", cache)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be true or false, got {name}={value!r}")
    only_for = {"path": "folder", "split_file": "folder", "tfds_name": "tfds",
                "tfds_data_dir": "tfds"}
    given = {"path": path, "split_file": split_file, "tfds_name": tfds_name,
             "tfds_data_dir": tfds_data_dir}
    for name, owner in only_for.items():
        if given[name] is not None and source != owner:
            raise ValueError(
                f"{name}={given[name]!r} is only used with source={owner!r}, but "
                f"source={source!r}"
            )

    if labels_file is not None and source != "folder":
        raise ValueError(f"labels_file={labels_file!r} is only used with source='folder'")
    classes = tuple(classes)
    if source == "digits":
        src = DigitsSource(labels, classes)
    elif source == "folder":
        if path is None:
            raise ValueError("source='folder' needs path=<folder of images>, got path=None")
        src = FolderSource(path, split_file, labels, labels_file, classes)
    else:
        if not tfds_name:
            raise ValueError(
                "source='tfds' needs tfds_name=<dataset name, e.g. 'cifar10' or "
                f"'imagenet_resized/64x64'>, got tfds_name={tfds_name!r}"
            )
        src = TfdsSource(tfds_name, tfds_split, tfds_data_dir, image_key, labels, label_key,
                         classes)

    return ImageBatches(
        src, image_size=int(image_size), batch_size=int(batch_size), seed=int(seed),
        random_flip=bool(random_flip), cache=bool(cache), on_bad_image=on_bad_image,
        small_images=small_images, num_workers=int(num_workers), prefetch=int(prefetch),
        shard_index=int(shard_index), num_shards=int(num_shards), sharding=sharding,
        limit=None if limit is None else int(limit),
    )
