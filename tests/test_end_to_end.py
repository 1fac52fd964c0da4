"""End to end through the CLI: train, checkpoint, resume, sample with respacing."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ssd_keras.checkpoint import list_checkpoints
from ssd_keras.cli import main

TINY = """
[run]
name = "tiny"
output_dir = "{out}"
seed = 3

[data]
source = "folder"
path = "{data}"
random_flip = false
num_workers = 1

[process]
image_size = 16
levels = 3
timesteps = 100

[model]
base_channels = 32
channel_mult = [1, 1, 1]
num_res_blocks = 1
attention_resolutions = [4]
num_heads = 1
dropout = 0.0

[optimizer]
lr = 1e-3

[ema]
rate = 0.9

[train]
batch_size = 4
steps = 4
log_every = 1
checkpoint_every = 2
sample_every = 4
keep_checkpoints = 2

[sampler]
steps = 5
num_images = 3
batch_size = 2
"""


def write_images(folder, n=6, size=20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def tiny_pipeline(tmp_path):
    write_images(tmp_path / "data")
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(out=tmp_path / "runs", data=tmp_path / "data"))
    return path


def read_log(run_dir):
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.backend  # the tiny CLI end to end, rerun under jax and tensorflow in CI
def test_train_resume_and_sample_through_the_cli(tiny_pipeline, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "tiny"
    assert main([str(tiny_pipeline), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "new run" in out and "step 4" in out
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]
    assert (run_dir / "config.toml").is_file()
    assert (run_dir / "samples" / "step_000000004.png").is_file()
    assert (run_dir / "samples" / "final" / "grid.png").is_file()
    assert [int(r["step"]) for r in read_log(run_dir)] == [1, 2, 3, 4]

    # resume: a longer schedule continues from step 4, and old checkpoints are pruned
    assert main([str(tiny_pipeline), "--set", "train.steps=6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 4" in out
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [4, 6]
    assert [int(r["step"]) for r in read_log(run_dir)] == [1, 2, 3, 4, 5, 6]

    # sample from the most recent run with respacing and the Lanczos sampler
    code = main(["sample", "--runs-dir", str(tmp_path / "runs"), "--steps", "4", "--noise", "lanczos",
                 "--lanczos-iterations", "8", "-n", "3", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    sample_dir = run_dir / "samples" / "step6_K4_lanczos_seed0"
    assert (sample_dir / "grid.png").is_file() and (sample_dir / "progression.png").is_file()
    images = sorted((sample_dir / "images").glob("*.png"))
    assert len(images) == 3
    assert np.asarray(Image.open(images[0])).shape == (16, 16, 3)
    # K=4 plus the two change steps -> 6 network calls per image
    assert "6 network calls" in out

    # few-step DDIM-style sampling (docs/sampling.md), and evaluate with it
    code = main(["sample", "--runs-dir", str(tmp_path / "runs"), "--steps", "4", "--method", "ddim",
                 "--eta", "0.5", "-n", "2", "--no-progress"])
    assert code == 0
    assert "6 network calls" in capsys.readouterr().out
    ddim_dir = run_dir / "samples" / "step6_K4_ddim0.5_seed0"
    assert len(list((ddim_dir / "images").glob("*.png"))) == 2
    code = main(["evaluate", "tiny", "--runs-dir", str(tmp_path / "runs"), "-n", "3", "--steps", "4",
                 "--method", "ddim", "--no-progress"])
    assert code == 0
    result = json.loads((run_dir / "eval" / "step6_K4_ddim0_seed0" / "metrics.json").read_text())
    assert result["sampler"]["method"] == "ddim" and result["sampler"]["eta"] == 0.0
    code = main(["sample", "--runs-dir", str(tmp_path / "runs"), "--method", "ddim", "--eta", "2",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "sampler.eta = 2.0: must be <= 1.0" in err


def test_changed_model_is_refused_on_resume(tiny_pipeline, capsys):
    assert main([str(tiny_pipeline), "--set", "train.steps=2", "--no-progress"]) == 0
    code = main([str(tiny_pipeline), "--set", "model.base_channels=64", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.base_channels" in err and "--allow-config-change" in err


def test_bad_pipeline_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[process]\nimage_size = 32\nlevels = 9\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "process.levels" in err and "bad.toml" in err
    assert "Traceback" not in err


def test_sample_without_runs_says_what_to_do(tmp_path, capsys):
    assert main(["sample", "--runs-dir", str(tmp_path / "nothing")]) == 2
    assert "train one first" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "ssd_keras", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for verb in ("train", "sample", "inspect"):
        assert verb in result.stdout
