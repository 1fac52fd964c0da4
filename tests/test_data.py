"""Tests of ssd_keras.data on images generated here and on tfds mock data (no download)."""

import json
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from ssd_keras.data import (
    BadImageWarning,
    DataError,
    SmallImageWarning,
    center_crop_arr,
    list_image_files,
    make_dataset,
    to_rgb,
)


# ---------------------------------------------------------------------------- helpers
def _save(path, array, mode=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path, format=fmt)
    return path


def _to_uint8(batch):
    return np.round((batch + 1.0) * 127.5).astype(np.int64)


def _coded_folder(root, n, size=16):
    """n constant-grey PNGs; image i has value 5*i, so a batch element names its source."""
    for i in range(n):
        _save(root / f"img_{i:03d}.png", np.full((size, size, 3), 5 * i))
    return root


def _ids(batch):
    """Index of the coded image each batch element came from."""
    pixels = _to_uint8(batch)
    assert (pixels == pixels[:, :1, :1, :1]).all(), "coded images must stay constant"
    return [int(v) // 5 for v in pixels[:, 0, 0, 0]]


def _take(ds, k):
    return [next(ds) for _ in range(k)]


@pytest.fixture
def coded10(tmp_path):
    return _coded_folder(tmp_path / "coded", 10)


@pytest.fixture
def mixed_folder(tmp_path):
    """Every kind of file a real folder has: modes, sizes, nesting, cases, junk."""
    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    _save(root / "a_rgb.jpg", rng.integers(0, 255, (40, 40, 3)))
    _save(root / "b_gray.png", rng.integers(0, 255, (40, 40)), "L")
    pal = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(root / "c_palette.png")
    _save(root / "d_rgba.png", rng.integers(0, 255, (40, 40, 4)), "RGBA")
    _save(root / "nested" / "deeper" / "e_wide.PNG", rng.integers(0, 255, (40, 70, 3)))
    _save(root / "nested" / "f_upper.JPEG", rng.integers(0, 255, (50, 40, 3)), fmt="JPEG")
    _save(root / "g.webp", rng.integers(0, 255, (40, 40, 3)))
    _save(root / "h.BMP", rng.integers(0, 255, (40, 40, 3)), fmt="BMP")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


# ---------------------------------------------------------------------------- basics
@pytest.mark.backend  # the data pipeline is numpy only; checked under every backend
def test_digits_shapes_dtype_range():
    with make_dataset("digits", 16, 8, seed=0) as ds:
        assert ds.num_images == 1797
        batch = next(ds)
        assert batch.shape == (8, 16, 16, 3) and batch.dtype == np.float32
        assert batch.min() == -1.0 and batch.max() == 1.0
        # grey digits: the three channels agree
        assert np.array_equal(batch[..., 0], batch[..., 2])
        assert ds.report()["small_images"] == 0  # digits are upscaled on purpose, silently


def test_digits_look_like_digits():
    """Upscaled digits keep the 8x8 layout: block means match the source image."""
    from sklearn.datasets import load_digits

    with make_dataset("digits", 32, 4, seed=0, random_flip=False, prefetch=0,
                      num_workers=0) as ds:
        order = ds.epoch_order(0)
        batch = next(ds)
    ref = load_digits().images[order[0]] / 16.0  # (8, 8) in [0, 1]
    blocks = ((batch[0, :, :, 0] + 1) / 2).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), ref.ravel())[0, 1] > 0.95


def test_folder_listing_is_recursive_sorted_case_insensitive(mixed_folder):
    files = list_image_files(mixed_folder)
    assert files == sorted(files)
    assert "nested/deeper/e_wide.PNG" in files and "nested/f_upper.JPEG" in files
    assert "h.BMP" in files and "g.webp" in files
    assert "notes.txt" not in files and ".hidden.png" not in files
    assert len(files) == 8


def test_folder_all_modes_decode(mixed_folder):
    with pytest.warns(SmallImageWarning, match="upscaling images smaller than image_size=48"):
        with make_dataset("folder", 48, 8, path=str(mixed_folder), seed=1) as ds:
            batch = next(ds)
            report = ds.report()
    assert batch.shape == (8, 48, 48, 3) and batch.dtype == np.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0
    assert report["bad_images"] == 0
    assert report["small_images"] == 8  # all are below 48 on the shorter side


def test_to_rgb_modes():
    gray = Image.fromarray(np.full((4, 4), 77, np.uint8), "L")
    assert np.array_equal(np.asarray(to_rgb(gray)), np.full((4, 4, 3), 77))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :2, 3] = 255  # left opaque red, right fully transparent
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:, :2] == [200, 0, 0]).all() and (out[:, 2:] == 255).all()  # white background
    pal = Image.fromarray(np.full((4, 4, 3), [10, 20, 30], np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert (np.asarray(to_rgb(pal)) == [10, 20, 30]).all()
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert deep.mode.startswith("I")
    assert (np.asarray(to_rgb(deep)) == 255).all()


# ---------------------------------------------------------------------------- preprocessing
def _bands(width, height, bounds):
    """Vertical colour bands: red up to bounds[0], green up to bounds[1], blue after."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : bounds[0], 0] = 255
    arr[:, bounds[0] : bounds[1], 1] = 255
    arr[:, bounds[1] :, 2] = 255
    return arr


def test_center_crop_non_square():
    # 96x64 at image_size 64: no resize (shorter side already 64), crop columns 16..79
    out = center_crop_arr(Image.fromarray(_bands(96, 64, (32, 64))), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, _bands(64, 64, (16, 48)))


def test_center_crop_box_halving_then_crop():
    # 384x256 -> box-halve twice -> 96x64 (bands at 128/256 land on 32/64) -> crop 16..79
    out = center_crop_arr(Image.fromarray(_bands(384, 256, (128, 256))), 64)
    assert np.array_equal(out, _bands(64, 64, (16, 48)))


@pytest.mark.parametrize("width, height, size", [(256, 192, 32), (301, 250, 64), (90, 60, 64),
                                                   (77, 120, 16)])
def test_center_crop_matches_adm_recipe(width, height, size):
    """Against ADM's recipe written out with PIL's resize(BOX): same geometry, values within
    2/255 (we halve with Image.reduce, which rounds the 2x2 mean to nearest; ADM's resize(BOX)
    reads about +0.5/255 high per halving)."""
    image = Image.fromarray(
        np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    ref = image
    while min(ref.size) >= 2 * size:
        ref = ref.resize((ref.size[0] // 2, ref.size[1] // 2), resample=Image.BOX)
    scale = size / min(ref.size)
    ref = ref.resize(tuple(round(s * scale) for s in ref.size), resample=Image.BICUBIC)
    ref = np.asarray(ref)
    top, left = (ref.shape[0] - size) // 2, (ref.shape[1] - size) // 2
    ref = ref[top : top + size, left : left + size]
    out = center_crop_arr(image, size)
    assert out.shape == ref.shape == (size, size, 3)
    diff = np.abs(out.astype(int) - ref)
    assert diff.max() <= 2 and diff.mean() < 1.0


def test_center_crop_tall_and_bicubic_path():
    # 50 wide x 100 tall -> bicubic to 32x64 -> rows 16..47 kept; a top band must vanish
    arr = np.full((100, 50, 3), 128, np.uint8)
    arr[:20] = 0
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3)
    assert (out == 128).all()


def test_folder_center_crop_in_pipeline(tmp_path):
    _save(tmp_path / "bands.png", _bands(96, 64, (32, 64)))
    with make_dataset("folder", 64, 1, path=str(tmp_path), random_flip=False) as ds:
        batch = next(ds)
    assert np.array_equal(_to_uint8(batch[0]), _bands(64, 64, (16, 48)))


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_batches_other_seed_other_order(coded10):
    def run(seed, **kw):
        with make_dataset("folder", 16, 4, path=str(coded10), seed=seed, **kw) as ds:
            return [_ids(b) for b in _take(ds, 5)]

    a = run(3)
    assert a == run(3)
    assert a == run(3, num_workers=0, prefetch=0)
    assert a == run(3, num_workers=2, prefetch=3, cache=True)
    assert a != run(4)
    # each epoch is a permutation: the first 10 ids cover all images once
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new order every epoch


def test_batches_identical_pixels_with_workers_and_cache(mixed_folder):
    kw = dict(path=str(mixed_folder), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallImageWarning)
        with make_dataset("folder", 24, 3, num_workers=0, prefetch=0, **kw) as ds:
            ref = _take(ds, 6)
        with make_dataset("folder", 24, 3, num_workers=2, prefetch=2, cache=True, **kw) as ds:
            got = _take(ds, 6)
    for x, y in zip(ref, got):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------------------- resume
@pytest.mark.backend  # the data pipeline is numpy only; checked under every backend
@pytest.mark.parametrize("cut", [1, 2, 3])  # 4 per batch, 10 per epoch: mid-epoch and across
def test_resume_matches_uninterrupted(coded10, cut):
    kw = dict(path=str(coded10), seed=11)
    with make_dataset("folder", 16, 4, **kw) as ds:
        full = [_ids(b) for b in _take(ds, 8)]
    with make_dataset("folder", 16, 4, **kw) as ds:
        head = [_ids(b) for b in _take(ds, cut)]
        state = json.loads(json.dumps(ds.state()))
    assert head == full[:cut]
    with make_dataset("folder", 16, 4, num_workers=0, prefetch=0, **kw) as ds:
        ds.restore(state)
        tail = [_ids(b) for b in _take(ds, 8 - cut)]
    assert tail == full[cut:]


def test_resume_state_at_epoch_boundary_and_in_place(coded10):
    with make_dataset("folder", 16, 5, path=str(coded10), seed=2) as ds:
        first = _take(ds, 2)
        assert ds.state()["epoch"] == 1 and ds.state()["position"] == 0
        following = _take(ds, 3)
        ds.restore({"epoch": 0, "position": 0})  # rewind the same object
        again = _take(ds, 5)
    for x, y in zip(first + following, again):
        assert np.array_equal(x, y)


def test_restore_rejects_mismatch(coded10):
    with make_dataset("folder", 16, 4, path=str(coded10), seed=1) as ds:
        state = ds.state()
    with make_dataset("folder", 16, 4, path=str(coded10), seed=2) as ds:
        with pytest.raises(ValueError, match="seed=1 but this dataset has seed=2"):
            ds.restore(state)
        with pytest.raises(ValueError, match="out of range"):
            ds.restore({"epoch": 0, "position": 10})


# ---------------------------------------------------------------------------- sharding
def test_shards_disjoint_and_covering(tmp_path):
    root = _coded_folder(tmp_path / "c9", 9)
    seen = []
    for k in range(3):
        with make_dataset("folder", 16, 3, path=str(root), seed=7, shard_index=k,
                          num_shards=3) as ds:
            assert ds.images_per_epoch == 3
            seen.append(_ids(next(ds)))  # one batch == this shard's whole epoch 0
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(9))  # disjoint and covering


def test_shards_uneven_equal_lengths(coded10):
    orders = []
    for k in range(3):
        with make_dataset("folder", 16, 2, path=str(coded10), num_shards=3, shard_index=k) as ds:
            orders.append(ds.epoch_order(0))
    assert all(len(o) == 3 for o in orders)
    flat = np.concatenate(orders)
    assert len(set(flat.tolist())) == 9  # disjoint; one image left over this epoch


# ---------------------------------------------------------------------------- flips
def _asymmetric_folder(root, n=8):
    for i in range(n):
        arr = np.zeros((16, 16, 3), np.uint8)
        arr[:, :6] = 20 * (i + 1)  # left part codes the image, right part black
        _save(root / f"a{i}.png", arr)
    return root


def test_random_flip_mirrors_exactly(tmp_path):
    root = _asymmetric_folder(tmp_path / "asym")
    with make_dataset("folder", 16, 8, path=str(root), seed=0) as ds:
        batches = _take(ds, 4)
    flipped = plain = 0
    for batch in batches:
        for img in _to_uint8(batch):
            code = img[0, 0, 0] if img[0, 0, 0] else img[0, -1, 0]
            ref = np.zeros((16, 16, 3), np.int64)
            ref[:, :6] = code
            if np.array_equal(img, ref):
                plain += 1
            else:
                assert np.array_equal(img, ref[:, ::-1]), "a flip must be an exact mirror"
                flipped += 1
    assert flipped > 0 and plain > 0


def test_no_flip_when_disabled(tmp_path):
    root = _asymmetric_folder(tmp_path / "asym")
    with make_dataset("folder", 16, 8, path=str(root), seed=0, random_flip=False) as ds:
        for batch in _take(ds, 4):
            img = _to_uint8(batch)
            assert (img[:, :, :6] > 0).all() and (img[:, :, 6:] == 0).all()


# ---------------------------------------------------------------------------- split_file
def test_split_file_selects_listed(coded10, tmp_path):
    split = tmp_path / "train.txt"
    split.write_text("# training images\nimg_001.png\n\nimg_004.png\nimg_007.png\n")
    with make_dataset("folder", 16, 3, path=str(coded10), split_file=str(split),
                      seed=0) as ds:
        assert ds.num_images == 3
        assert sorted(_ids(next(ds))) == [1, 4, 7]


def test_split_file_missing_entries_named(coded10, tmp_path):
    split = tmp_path / "train.txt"
    split.write_text("img_001.png\nnot_there.png\nsub/gone.jpg\n")
    with pytest.raises(DataError, match=r"2 of the 3 files .*'not_there.png', 'sub/gone.jpg'"):
        make_dataset("folder", 16, 3, path=str(coded10), split_file=str(split))
    with pytest.raises(DataError, match="split_file .*nope.txt' does not exist"):
        make_dataset("folder", 16, 3, path=str(coded10), split_file=str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------------------- bad data
def test_corrupt_files_skipped_counted_warned(coded10):
    (coded10 / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = np.full((16, 16, 3), 9, np.uint8)
    Image.fromarray(good).save(coded10 / "zz_trunc.jpg")
    data = (coded10 / "zz_trunc.jpg").read_bytes()
    (coded10 / "zz_trunc.jpg").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with make_dataset("folder", 16, 4, path=str(coded10), seed=0) as ds:
            assert ds.num_images == 12
            batches = _take(ds, 6)  # 24 images: both bad files were met
            report = ds.report()
    bad_warnings = sorted(str(w.message) for w in caught if w.category is BadImageWarning)
    assert len(bad_warnings) == 2  # once per file, not once per epoch
    assert "zz_corrupt.png" in bad_warnings[0] and "zz_trunc.jpg" in bad_warnings[1]
    ids = [i for b in batches for i in _ids(b)]
    assert sorted(ids[:10]) == list(range(10))  # an epoch = the 10 good images
    assert report["bad_images"] == 2
    assert {p.rsplit("/", 1)[-1] for p, _ in report["bad_examples"]} == {
        "zz_corrupt.png", "zz_trunc.jpg"}


def test_corrupt_file_error_mode_names_file(coded10):
    (coded10 / "broken.png").write_bytes(b"garbage")
    with make_dataset("folder", 16, 11, path=str(coded10), on_bad_image="error") as ds:
        with pytest.raises(DataError, match=r"cannot read image .*broken.png"):
            next(ds)
        with pytest.raises(DataError):  # stays failed
            next(ds)


def test_all_bad_images_error_not_hang(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"nope")
    with make_dataset("folder", 16, 2, path=str(tmp_path)) as ds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadImageWarning)
            with pytest.raises(DataError, match="none of the 3 images is usable"):
                next(ds)


def test_small_images_error_and_skip(tmp_path):
    _save(tmp_path / "big.png", np.zeros((32, 32, 3)))
    _save(tmp_path / "tiny.png", np.zeros((8, 12, 3)))
    with make_dataset("folder", 16, 2, path=str(tmp_path), small_images="error",
                      prefetch=0) as ds:
        with pytest.raises(DataError, match=r"tiny.png is 12x8, smaller than image_size=16"):
            next(ds)
    with pytest.warns(SmallImageWarning, match=r"skipping images smaller .*tiny.png \(12x8\)"):
        with make_dataset("folder", 16, 2, path=str(tmp_path), small_images="skip") as ds:
            next(ds)
            assert ds.report()["small_images"] == 1


def test_small_images_upscale_warns_once(tmp_path):
    for i in range(4):
        _save(tmp_path / f"t{i}.png", np.zeros((8, 8, 3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with make_dataset("folder", 16, 4, path=str(tmp_path)) as ds:
            _take(ds, 3)
            assert ds.num_small == 4
    small = [w for w in caught if issubclass(w.category, SmallImageWarning)]
    assert len(small) == 1 and "upscaling" in str(small[0].message)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match=r"data path .*does_not_exist.* does not exist"):
        make_dataset("folder", 16, 2, path=str(tmp_path / "does_not_exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found under .*empty.*it is empty"):
        make_dataset("folder", 16, 2, path=str(tmp_path / "empty"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="1 other file"):
        make_dataset("folder", 16, 2, path=str(tmp_path / "texts"))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(source="mnist"), r"unknown source='mnist'; valid values: 'digits', 'folder', 'tfds'"),
        (dict(image_size=0), r"image_size must be an integer >= 1, got image_size=0"),
        (dict(batch_size=2.5), r"batch_size must be an integer >= 1, got batch_size=2.5"),
        (dict(seed=-1), r"seed must be an integer >= 0, got seed=-1"),
        (dict(on_bad_image="ignore"), r"unknown on_bad_image='ignore'; valid values: 'skip'"),
        (dict(small_images="pad"), r"unknown small_images='pad'; valid values: 'upscale'"),
        (dict(shard_index=2, num_shards=2), r"shard_index must be in \[0, num_shards\)"),
        (dict(num_workers=-1), r"num_workers must be an integer >= 0"),
        (dict(limit=0), r"limit must be an integer >= 1, got limit=0"),
        (dict(random_flip="yes"), r"random_flip must be true or false"),
        (dict(path="/x"), r"path='/x' is only used with source='folder', but source='digits'"),
        (dict(source="folder"), r"source='folder' needs path="),
        (dict(source="tfds"), r"source='tfds' needs tfds_name="),
    ],
)
def test_argument_errors(kwargs, pattern):
    args = dict(source="digits", image_size=16, batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        make_dataset(**args)


def test_import_pulls_no_framework():
    code = ("import sys, ssd_keras.data; "
            "print([m for m in ('keras', 'torch', 'tensorflow', 'jax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_limit_and_threads_stop(coded10):
    before = {t.ident for t in threading.enumerate()}
    ds = make_dataset("folder", 16, 2, path=str(coded10), limit=4, seed=0)
    assert ds.num_images == 4
    assert set(_ids(next(ds)) + _ids(next(ds))) == {0, 1, 2, 3}
    ds.close()
    ds.close()
    leftover = [t for t in threading.enumerate()
                if t.ident not in before and t.name.startswith("ssd-data")]
    assert not leftover
    with pytest.raises(RuntimeError, match="closed"):
        next(ds)


# ---------------------------------------------------------------------------- tfds
import tensorflow_datasets as tfds  # noqa: E402  (a test dependency: the [test] extra)


def test_tfds_mock_mnist_and_cifar10(tmp_path):
    tf_before = "tensorflow" in sys.modules
    with tfds.testing.mock_data(num_examples=12):
        with pytest.warns(SmallImageWarning, match=r"tfds:mnist/train\[\d+\] \(28x28\)"):
            with make_dataset("tfds", 32, 4, tfds_name="mnist",
                              tfds_data_dir=str(tmp_path)) as ds:
                batch = next(ds)
                assert ds.num_images == 12
        assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.float32
        assert np.array_equal(batch[..., 0], batch[..., 1])  # grayscale -> RGB
        assert -1 <= batch.min() and batch.max() <= 1

        def run(seed):
            with make_dataset("tfds", 16, 4, tfds_name="cifar10", tfds_split="test",
                              seed=seed, tfds_data_dir=str(tmp_path)) as ds:
                return _take(ds, 4), ds.state()

        a, state = run(0)
        b, _ = run(0)
        c, _ = run(1)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))
        assert a[0].shape == (4, 16, 16, 3)
        with make_dataset("tfds", 16, 4, tfds_name="cifar10", tfds_split="test",
                          tfds_data_dir=str(tmp_path)) as ds:
            ds.restore({**state, "epoch": 0, "position": 8})
            assert np.array_equal(next(ds), a[2])
    if not tf_before:
        assert "tensorflow" not in sys.modules  # reading needs no TensorFlow


def test_tfds_wrong_image_key(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        with pytest.raises(DataError, match=r"no feature image_key='img'.*'image', 'label'"):
            make_dataset("tfds", 16, 2, tfds_name="mnist", image_key="img",
                         tfds_data_dir=str(tmp_path))


def test_tfds_not_prepared_gives_build_hint(tmp_path):
    with pytest.raises(DataError) as info:
        make_dataset("tfds", 16, 2, tfds_name="mnist", tfds_data_dir=str(tmp_path))
    msg = str(info.value)
    assert "'mnist' is not prepared locally" in msg
    assert f"tfds build mnist --data_dir={tmp_path} --file_format=array_record" in msg


def test_tfds_not_prepared_celeba_mentions_manual_download(tmp_path):
    with pytest.raises(DataError, match=r"tfds build celeb_a .*download them by hand"):
        make_dataset("tfds", 16, 2, tfds_name="celeb_a", tfds_data_dir=str(tmp_path))


def test_tfds_unknown_name(tmp_path):
    with pytest.raises(DataError, match="no dataset tfds_name='no_such_dataset_xyz'"):
        make_dataset("tfds", 16, 2, tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
