"""`ssd-run evaluate`: torch-fidelity's numbers on the same folders, resume after a kill, the
reference cache. The Inception weights file is made here: torch-fidelity's own Inception
module with random weights, saved as its standard file is."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ssd_keras import evaluation, inception
from ssd_keras.cli import main

from test_end_to_end import TINY, write_images

N = 6  # samples
CHUNK = 4  # chunks of two batches of 2: images 0-3 and 4-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny trained run (16 px, 8 data images) and a random-weights Inception file."""
    tmp = tmp_path_factory.mktemp("evaluate")
    write_images(tmp / "data", n=8)
    pipeline = tmp / "tiny.toml"
    pipeline.write_text(TINY.format(out=tmp / "runs", data=tmp / "data").replace("steps = 4\n", "steps = 2\n", 1))
    assert main([str(pipeline), "--no-progress"]) == 0
    weights = inception.save_random_weights(tmp / "random-inception.pth")
    return {"tmp": tmp, "runs": tmp / "runs", "weights": weights, "cache": tmp / "cache"}


def run_evaluate(setup, out, *extra):
    argv = ["evaluate", "tiny", "--runs-dir", str(setup["runs"]), "-n", str(N), "--steps", "4", "--seed", "1",
            "--chunk-size", str(CHUNK), "--cache-dir", str(setup["cache"]), "--out", str(out), "--no-progress",
            *extra]
    return argv, main(argv)


def comparable(result):
    """metrics.json without what depends on the folder or on this invocation's timing."""
    return {k: v for k, v in result.items() if k not in ("timing", "samples")}


def test_random_weights_file_is_read_back_by_torch_fidelity_and_features_differ(setup):
    import torch

    state = torch.load(setup["weights"], weights_only=False)
    assert "Mixed_7c.branch_pool.conv.weight" in state and state["fc.weight"].shape == (1008, 2048)
    extractor = inception.load_extractor(setup["weights"], cuda=False)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    feats = extractor(images)[0]
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    assert feats.std(0).mean() > 0.1  # the images give different features


def test_metrics_equal_torch_fidelity_on_the_same_folders(setup, capsys):
    out = setup["tmp"] / "eval_a"
    _, code = run_evaluate(setup, out, "--inception-weights", str(setup["weights"]))
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads((out / "metrics.json").read_text())
    assert result["num_samples"] == N and len(list((out / "images").glob("*.png"))) == N
    ref_images = result["reference"]["images"]
    assert result["reference"]["num_images"] == 8  # all of the dataset (< reference_images)
    fe = result["feature_extractor"]
    assert fe["library"] == "torch-fidelity" and fe["version"] == inception.library_version()
    assert fe["weights_sha256"] == inception.file_sha256(setup["weights"])
    assert any("not the standard" in n for n in result["notes"])  # random weights are not the file
    assert result["sampler"]["steps"] == 4 and result["sampler"]["seed"] == 1
    assert result["sampler"]["chunk_size"] == CHUNK and result["step"] == 2
    for row in ("FID", "KID", "precision / recall", "FD-pix8", "NN ratio"):
        assert row in text

    tf = inception.import_torch_fidelity()
    lib = tf.calculate_metrics(
        input1=str(out / "images"), input2=ref_images, cuda=False, fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=str(setup["weights"]), kid_subset_size=N, rng_seed=1,
        prc_neighborhood=3, save_cpu_ram=True, cache=False, verbose=False)
    m = result["metrics"]
    assert m["fid"] == lib["frechet_inception_distance"]
    assert m["kid"]["mean"] == lib["kernel_inception_distance_mean"]
    assert m["kid"]["std"] == lib["kernel_inception_distance_std"]
    assert m["precision_recall"]["precision"] == lib["precision"]
    assert m["precision_recall"]["recall"] == lib["recall"]
    assert m["kid"]["subset_size"] == N

    # the reference folder against itself: FID ~ 0, precision = recall = 1 (and still the library's)
    same = setup["tmp"] / "eval_same"
    code = main(["evaluate", "tiny", "--runs-dir", str(setup["runs"]), "--samples-dir", ref_images,
                 "--seed", "1", "--cache-dir", str(setup["cache"]), "--out", str(same), "--no-progress",
                 "--inception-weights", str(setup["weights"])])
    assert code == 0
    m2 = json.loads((same / "metrics.json").read_text())["metrics"]
    assert abs(m2["fid"]) < 1e-2 * m["fid"]
    assert m2["precision_recall"]["precision"] == 1.0 and m2["precision_recall"]["recall"] == 1.0
    capsys.readouterr()


def test_reference_cache_is_reused_and_invalidated_by_preprocessing(setup, capsys, monkeypatch):
    weights = ["--inception-weights", str(setup["weights"])]
    _, code = run_evaluate(setup, setup["tmp"] / "eval_cache1", *weights)
    assert code == 0
    capsys.readouterr()
    _, code = run_evaluate(setup, setup["tmp"] / "eval_cache2", *weights)
    out = capsys.readouterr().out
    assert code == 0
    first = json.loads((setup["tmp"] / "eval_cache1" / "metrics.json").read_text())
    second = json.loads((setup["tmp"] / "eval_cache2" / "metrics.json").read_text())
    assert second["timing"]["reference_statistics_cached"] is True
    assert "writing" not in out  # no reference image rewritten
    assert "computing the reference statistics" not in out
    assert second["reference"] == first["reference"] and second["metrics"] == first["metrics"]

    # another preprocessing -> another key, the images and statistics are made again
    monkeypatch.setattr(evaluation, "PREPROCESSING", {**evaluation.PREPROCESSING, "version": 99})
    _, code = run_evaluate(setup, setup["tmp"] / "eval_cache3", *weights)
    out = capsys.readouterr().out
    assert code == 0
    third = json.loads((setup["tmp"] / "eval_cache3" / "metrics.json").read_text())
    assert third["reference"]["key"] != first["reference"]["key"]
    assert third["timing"]["reference_statistics_cached"] is False
    assert "writing 8 reference images" in out and "computing the reference statistics" in out
    # same data, same images: the same numbers
    assert third["metrics"] == first["metrics"]

    # the key follows the dataset and resolution, not the run's seed or sampler
    from ssd_keras.config import from_dict
    from ssd_keras.runs import load_run

    cfg = load_run(setup["runs"] / "tiny")[0]
    key = lambda **change: evaluation._key(evaluation.reference_description(  # noqa: E731
        from_dict({s: {**v, **change.get(s, {})} for s, v in cfg.to_dict().items()}), 8))
    assert key() == key(run={"seed": 7}, sampler={"seed": 5, "steps": 3})
    assert key() != key(process={"image_size": 32}, model={"attention_resolutions": [8]})
    assert key() != key(data={"limit": 5})


def test_a_killed_evaluation_resumes_to_the_same_result(setup, capsys):
    weights = ["--inception-weights", str(setup["weights"])]
    whole = setup["tmp"] / "eval_whole"
    _, code = run_evaluate(setup, whole, *weights)
    assert code == 0

    # the same command in a child process that SIGKILLs itself while writing the 6th PNG,
    # in the middle of the second chunk (images 4 and 5)
    killed = setup["tmp"] / "eval_killed"
    argv, _ = ["evaluate", "tiny", "--runs-dir", str(setup["runs"]), "-n", str(N), "--steps", "4", "--seed", "1",
               "--chunk-size", str(CHUNK), "--cache-dir", str(setup["cache"]), "--out", str(killed),
               "--no-progress", *weights], None
    script = textwrap.dedent(f"""
        import os, signal, sys
        from ssd_keras import images
        from ssd_keras.cli import main
        save, count = images.save_image, [0]
        def dying_save(array, path):
            count[0] += 1
            if count[0] == 6:
                path.with_name("." + path.name + ".tmp").write_bytes(b"half a png")
                os.kill(os.getpid(), signal.SIGKILL)
            return save(array, path)
        images.save_image = dying_save
        sys.exit(main({argv!r}))
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    written = sorted(p.name for p in (killed / "images").glob("*.png"))
    assert written == [f"{i:06d}.png" for i in range(5)]
    assert not (killed / "metrics.json").exists()

    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"resuming: {CHUNK} of {N} samples" in out
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["timing"]["sampled_now"] == N - CHUNK
    assert comparable(resumed) == comparable(json.loads((whole / "metrics.json").read_text()))
    for i in range(N):
        name = f"{i:06d}.png"
        assert (killed / "images" / name).read_bytes() == (whole / "images" / name).read_bytes(), name

    # a finished folder is not sampled again; other settings in it are refused
    assert main(argv[:-len(weights)]) == 0
    assert json.loads((killed / "metrics.json").read_text())["timing"]["sampled_now"] == 0
    capsys.readouterr()
    assert main(argv[:-len(weights)] + ["--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert str(killed) in err and "sampler" in err and "--out" in err


def test_without_weights_it_names_the_file_and_reports_the_weights_free_measures(setup, capsys):
    out = setup["tmp"] / "eval_free"
    _, code = run_evaluate(setup, out)
    text = capsys.readouterr().out
    assert code == 0
    assert inception.WEIGHTS_FILE in text and "torch-fidelity" in text and "--inception-weights" in text
    result = json.loads((out / "metrics.json").read_text())
    assert "fid" not in result["metrics"] and "feature_extractor" not in result
    free = result["metrics"]["weights_free"]
    assert np.isfinite(free["fd_pix8"]) and free["nearest_neighbour"]["ratio"] > 0
    assert free["num_samples"] == N and free["num_data"] == 8
    assert "FD-pix8" in text and "FID " not in text
    # grid.png tiles the samples themselves (images.grid: 2 px padding, then enlarged)
    from PIL import Image

    grid = np.asarray(Image.open(out / "grid.png"))
    scale = grid.shape[1] // (3 * (16 + 2) + 2)  # 6 samples of 16 px: 3 columns
    first = np.asarray(Image.open(out / "images" / "000000.png").convert("RGB"))
    assert np.array_equal(grid[::scale, ::scale][2:18, 2:18], first)


def test_a_given_reference_npz(setup, capsys):
    weights = ["--inception-weights", str(setup["weights"])]
    base = setup["tmp"] / "eval_a"
    if not (base / "metrics.json").is_file():
        assert run_evaluate(setup, base, *weights)[1] == 0
    result = json.loads((base / "metrics.json").read_text())
    cached = next((setup["cache"] / "reference").glob(f"*-{result['reference']['key']}/inception-*.npz"))

    # the cached file itself (mu, sigma, features): the same numbers
    _, code = run_evaluate(setup, setup["tmp"] / "eval_ref", "--reference", str(cached), *weights)
    assert code == 0
    given = json.loads((setup["tmp"] / "eval_ref" / "metrics.json").read_text())
    assert given["metrics"]["fid"] == result["metrics"]["fid"]
    assert given["metrics"]["kid"] == result["metrics"]["kid"]
    assert given["reference"]["file"] == str(cached)

    # float64 mu and sigma only (as pytorch-fid writes them): FID only, with a note
    with np.load(cached) as z:
        np.savez(setup["tmp"] / "musigma.npz", mu=z["mu"].astype(np.float64), sigma=z["sigma"])
    _, code = run_evaluate(setup, setup["tmp"] / "eval_ref2", "--reference", str(setup["tmp"] / "musigma.npz"),
                           *weights)
    assert code == 0
    only = json.loads((setup["tmp"] / "eval_ref2" / "metrics.json").read_text())
    assert only["metrics"]["fid"] == pytest.approx(result["metrics"]["fid"], rel=1e-6)
    assert "kid" not in only["metrics"] and any("holds no features" in n for n in only["notes"])

    # a file without mu/sigma is one clear error
    np.savez(setup["tmp"] / "bad.npz", arr_0=np.zeros(3))
    capsys.readouterr()
    _, code = run_evaluate(setup, setup["tmp"] / "eval_ref3", "--reference", str(setup["tmp"] / "bad.npz"),
                           *weights)
    err = capsys.readouterr().err
    assert code == 2 and "bad.npz" in err and "mu" in err


def test_bad_weights_files_are_one_clear_error(setup, capsys):
    capsys.readouterr()
    _, code = run_evaluate(setup, setup["tmp"] / "eval_bad", "--inception-weights", str(setup["tmp"] / "nope.pth"))
    assert code == 2 and "nope.pth" in capsys.readouterr().err
    junk = setup["tmp"] / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(inception.InceptionError, match="junk.pth"):
        inception.load_extractor(junk, cuda=False)


def test_chunk_seeds_and_sizes():
    assert evaluation.chunk_seed(1, 0) != evaluation.chunk_seed(1, 1) != evaluation.chunk_seed(2, 1)
    assert evaluation.chunk_seed(1, 3) == evaluation.chunk_seed(1, 3)
    assert evaluation.chunk_size_for(16) == 496 and evaluation.chunk_size_for(16, 32) == 32
    assert evaluation.chunk_size_for(1000) == 1000


# ----------------------------------------------------------------------------- damaged folders
def _clean(setup, capsys):
    """The clean run's folder (made here if the test that makes it did not run)."""
    base = setup["tmp"] / "eval_a"
    if not (base / "metrics.json").is_file():
        assert run_evaluate(setup, base, "--inception-weights", str(setup["weights"]))[1] == 0
    capsys.readouterr()
    return base, json.loads((base / "metrics.json").read_text())


def _without_paths(result):
    out = comparable(result)
    out["reference"] = {k: v for k, v in out["reference"].items() if k != "images"}
    return out


def test_truncated_or_damaged_samples_are_redrawn_never_counted(setup, capsys):
    base, clean = _clean(setup, capsys)
    out = setup["tmp"] / "eval_damaged"
    shutil.copytree(base, out)
    (out / "metrics.json").unlink()
    images = out / "images"
    whole = (images / "000001.png").read_bytes()
    (images / "000001.png").write_bytes(whole[: len(whole) // 2])  # cut short (chunk 0)
    damaged = bytearray((images / "000002.png").read_bytes())
    damaged[damaged.index(b"IDAT") + 8] ^= 0xFF  # one byte of pixel data: its CRC fails
    (images / "000002.png").write_bytes(bytes(damaged))
    (images / "000004.png").write_bytes(b"")  # an empty file (chunk 1)
    (images / "000005.png").unlink()  # and a chunk half written: its last PNG missing,
    (images / ".000005.png.tmp").write_bytes(whole[:100])  # the temporary file left
    assert not evaluation.whole_png(images / "000002.png", 16)
    assert evaluation.whole_png(images / "000000.png", 16)
    assert not evaluation.whole_png(images / "000000.png", 32)  # another size is no sample

    _, code = run_evaluate(setup, out, "--inception-weights", str(setup["weights"]))
    text = capsys.readouterr().out
    assert code == 0, text
    assert "warning: 3 unreadable or truncated samples" in text and "000001.png" in text
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["timing"]["sampled_now"] == N  # both chunks drawn again
    assert comparable(resumed) == comparable(clean)  # FID, KID, P/R, weights-free: all equal
    for i in range(N):  # the same images as the clean run, bit for bit
        name = f"{i:06d}.png"
        assert (images / name).read_bytes() == (base / "images" / name).read_bytes(), name
    assert not list(images.glob(".*"))


def test_a_full_disk_while_sampling_or_making_the_reference_then_resume(setup, capsys, tmp_path,
                                                                      monkeypatch):
    """A fault hook fills the disk (ENOSPC) at a chosen PNG write, leaving half of it in
    its temporary file: once among the samples, once among the reference images."""
    import errno
    import io
    from pathlib import Path

    from PIL import Image

    base, clean = _clean(setup, capsys)
    real_save, count, fail_at = Image.Image.save, [0], [0]

    def save(self, fp, *args, **kwargs):
        count[0] += 1
        if count[0] == fail_at[0]:
            buf = io.BytesIO()
            real_save(self, buf, *args, **kwargs)
            Path(fp).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out, cache = tmp_path / "eval_full", tmp_path / "cache"  # a new cache: the reference is made
    argv = ["evaluate", "tiny", "--runs-dir", str(setup["runs"]), "-n", str(N), "--steps", "4", "--seed", "1",
            "--chunk-size", str(CHUNK), "--cache-dir", str(cache), "--out", str(out), "--no-progress",
            "--inception-weights", str(setup["weights"])]

    count[0], fail_at[0] = 0, 6  # the 6th sample: chunk 1's second image
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write samples to {out / 'images'}: No space left on device" in err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]

    count[0], fail_at[0] = 0, 6  # resumed: samples 4, 5 and the grid, then the 3rd reference image
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    reference = cache / "reference"
    assert not [p.name for p in reference.iterdir()], "a half-made reference folder was left"
    assert not (out / "metrics.json").exists()

    fail_at[0] = -1  # space again
    assert main(argv) == 0
    capsys.readouterr()
    resumed = json.loads((out / "metrics.json").read_text())
    assert _without_paths(resumed) == _without_paths(clean)
    for i in range(N):
        name = f"{i:06d}.png"
        assert (out / "images" / name).read_bytes() == (base / "images" / name).read_bytes(), name
    assert not list((out / "images").glob(".*")) and not list(out.glob("*.tmp"))


def test_a_second_evaluation_into_the_same_folder_exits_2(setup, capsys):
    from ssd_keras.run_lock import FolderLock

    out = setup["tmp"] / "eval_locked"
    with FolderLock(out, "evaluation"):  # another job's (a separate lock in this process)
        _, code = run_evaluate(setup, out)
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"evaluation {out} is in use by PID {os.getpid()}" in lines[0], err
    assert not (out / "images").exists() and not (out / "metrics.json").exists()
    _, code = run_evaluate(setup, out)  # free again
    assert code == 0
