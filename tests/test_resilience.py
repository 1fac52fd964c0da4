"""Training that survives: kills, signals, NaNs, bad configs, broken disks and files.

Subprocess tests run ``ssd-run PIPELINE --no-progress`` (``ssd_keras.cli.main``, what
``python -m ssd_keras`` runs) in children forked from one warm interpreter
(tests/_cli_forkserver.py), so that Keras and torch are imported once, not per run.
"""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd_keras.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ssd_keras.cli import main
from ssd_keras.config import load_pipeline

HERE = Path(__file__).parent

PIPELINE = """
[run]
name = "{name}"
output_dir = "{out}"
seed = 5

[data]
source = "folder"
path = "{data}"
num_workers = 1

[process]
image_size = 16
levels = {levels}
timesteps = 100

[model]
base_channels = 32
channel_mult = [1, 1, 1]
num_res_blocks = 1
attention_resolutions = [4]
num_heads = 1
dropout = 0.1

[optimizer]
lr = 1e-3

[ema]
rate = 0.9

[train]
batch_size = 2
steps = {steps}
log_every = {log_every}
checkpoint_every = {checkpoint_every}
sample_every = 0
keep_checkpoints = 2

[sampler]
steps = 2
num_images = 1
batch_size = 1
"""

LOG_COLUMNS = ("step", "loss", "path", "t_mean", "skipped")  # not the timings


def write_pipeline(tmp_path, name="r", *, steps=4, log_every=1, checkpoint_every=2, levels=3):
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / f"{i}.png")
    path = tmp_path / f"{name}.toml"
    path.write_text(PIPELINE.format(name=name, out=(tmp_path / "runs").as_posix(),
                                    data=data.as_posix(), steps=steps, log_every=log_every,
                                    checkpoint_every=checkpoint_every, levels=levels))
    return path


def read_log(run_dir):
    with open(run_dir / "log.csv", newline="") as f:
        return [{k: r[k] for k in LOG_COLUMNS} for r in csv.DictReader(f)]


def assert_same_checkpoint(a, b):
    ga, ma = load_checkpoint(a)
    gb, mb = load_checkpoint(b)
    assert ga.keys() == gb.keys() == {"model", "ema", "optimizer"}
    for group in ga:
        assert len(ga[group]) == len(gb[group]) > 0
        for i, (x, y) in enumerate(zip(ga[group], gb[group])):
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{group}[{i}] differs"
    for key in ("step", "rng", "data", "skipped", "log_window"):
        assert ma[key] == mb[key], key


def all_checkpoints_load(ckpt_dir):
    found = list_checkpoints(ckpt_dir)
    for _, path in found:
        load_checkpoint(path)  # raises if any file under a checkpoint name is broken
    return found


def tmp_files(run_dir):
    return sorted(p.name for p in run_dir.rglob(".tmp-*"))


def one_line_error(err, code, expected):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    assert lines, err
    assert any(expected in line for line in lines), (expected, err)
    return lines


# ----------------------------------------------------------------------------- subprocesses
class ForkServer:
    def __init__(self):
        env = dict(os.environ, KERAS_BACKEND="torch", OMP_WAIT_POLICY="PASSIVE")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_cli_forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=HERE.parent)
        self.ready = False

    def wait_ready(self):
        if not self.ready:
            assert "ready" in self._read()
            self.ready = True
        return self

    def _read(self):
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def start(self, argv, log_dir, signals=()):
        """Fork a child running ``ssd-run argv``; ``signals``: ones it sends itself at
        chosen points (see tests/_cli_forkserver.py). Returns the child's pid."""
        self.log_dir = Path(log_dir)
        request = {"argv": [str(a) for a in argv], "stdout": str(self.log_dir / "stdout.txt"),
                   "stderr": str(self.log_dir / "stderr.txt"), "signals": list(signals)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()["pid"]

    def wait(self):
        code = self._read()["exit"]
        return code, (self.log_dir / "stdout.txt").read_text(), (self.log_dir / "stderr.txt").read_text()

    def run(self, argv, log_dir, signals=()):
        self.start(argv, log_dir, signals)
        return self.wait()

    def close(self):
        self.proc.stdin.close()  # no child is running between requests
        self.proc.kill()  # skip the interpreter's slow shutdown
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _server_process():
    """Started before the first test of the module, so that its imports overlap them."""
    s = ForkServer() if hasattr(os, "fork") else None
    yield s
    if s is not None:
        s.close()


@pytest.fixture
def server(_server_process):
    if _server_process is None:
        pytest.skip("needs os.fork")
    return _server_process.wait_ready()


# ----------------------------------------------------------------------------- exact resume
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
    """4 steps at once vs 2 + (new Trainer) 2: the same log rows, weights, EMA and
    optimizer state, bit for bit. Dropout is on (its seed state must be restored) and a
    log row (every 3 steps) spans the interruption (its window must be restored)."""
    from ssd_keras.train import Trainer

    def trainer(name):
        cfg = load_pipeline(write_pipeline(tmp_path, name, steps=4, log_every=3, checkpoint_every=4))
        return Trainer(cfg, progress=False)

    a = trainer("whole")
    a.fit()
    a.close()

    b = trainer("halves")
    b.fit(2)  # stops after 2 steps with a checkpoint, as if the job had been preempted
    b.close()
    del b
    c = trainer("halves")
    assert c.step == 2 and c.resumed_from.name == "ckpt_000000002.npz"
    c.fit()
    c.close()

    run_a, run_c = tmp_path / "runs" / "whole", tmp_path / "runs" / "halves"
    rows = read_log(run_a)
    assert [r["step"] for r in rows] == ["3", "4"]
    assert read_log(run_c) == rows
    assert_same_checkpoint(run_a / "checkpoints" / "ckpt_000000004.npz",
                           run_c / "checkpoints" / "ckpt_000000004.npz")


def wait_for(predicate, pid):
    """Poll until ``predicate()`` holds (True) or the child ``pid`` is gone (then False).
    No time limit: how long a step takes depends on the load of the machine."""
    while not predicate():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return predicate()
        time.sleep(0.01)
    return True


def log_rows(run_dir):
    try:
        return max(len((run_dir / "log.csv").read_text().splitlines()) - 1, 0)
    except OSError:
        return 0


def test_sigkill_at_random_moments_always_resumes(server, tmp_path):
    """SIGKILL a run (checkpointing every step) at seeded random moments, four times
    over, resuming each time: every file under a checkpoint name loads, and the resumed
    run ends with the log and the weights of a run that was never killed.

    The run aims at far more steps than it can take before a kill lands, so that every
    kill lands whatever the speed of the machine; the last resume then trains to a step
    ``goal`` just past the newest checkpoint with ``--steps`` (and the reference run too)."""
    pipe = write_pipeline(tmp_path, "killed", steps=100_000, checkpoint_every=1)
    run_dir = tmp_path / "runs" / "killed"
    rng = np.random.default_rng(1234)
    for trial in range(4):
        pid = server.start([pipe, "--no-progress"], tmp_path)
        # a kill during start-up, mid-step, mid-checkpoint-write or mid-log-append
        before = list_checkpoints(run_dir / "checkpoints")
        done = before[-1][0] if before else 0
        target_rows = done + int(rng.integers(0, 3))
        if target_rows > done:
            assert wait_for(lambda: log_rows(run_dir) >= target_rows, pid), server.wait()
        time.sleep(float(rng.uniform(0.0, 0.4)))  # a random moment, not a time limit
        os.kill(pid, signal.SIGKILL)
        code, out, err = server.wait()
        assert code == -signal.SIGKILL, (code, err)
        all_checkpoints_load(run_dir / "checkpoints")

    done = ([(0, None)] + list_checkpoints(run_dir / "checkpoints"))[-1][0]
    goal = done + 2
    code, out, err = server.run([pipe, "--no-progress", "--steps", 2], tmp_path)
    assert code == 0, err
    assert "Traceback" not in err
    steps = [s for s, _ in all_checkpoints_load(run_dir / "checkpoints")]
    assert steps[-1] == goal
    assert not tmp_files(run_dir)

    # the reference: the same pipeline under another name, never interrupted
    ref = write_pipeline(tmp_path, "reference", steps=100_000, checkpoint_every=1)
    code, _, err = server.run([ref, "--no-progress", "--steps", goal], tmp_path)
    assert code == 0, err
    assert read_log(run_dir) == read_log(tmp_path / "runs" / "reference")
    assert [r["step"] for r in read_log(run_dir)] == [str(s) for s in range(1, goal + 1)]
    assert_same_checkpoint(run_dir / "checkpoints" / f"ckpt_{goal:09d}.npz",
                           tmp_path / "runs" / "reference" / "checkpoints" / f"ckpt_{goal:09d}.npz")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_exits_128_plus_signum(signum, server, tmp_path):
    """One signal from another process, as a scheduler or a terminal sends it."""
    pipe = write_pipeline(tmp_path, "sig", steps=10_000, checkpoint_every=10_000, levels=1)
    run_dir = tmp_path / "runs" / "sig"
    name = signal.Signals(signum).name
    pid = server.start([pipe, "--no-progress"], tmp_path)
    assert wait_for(lambda: log_rows(run_dir) >= 2, pid), server.wait()
    os.kill(pid, signum)
    code, out, err = server.wait()
    assert code == 128 + signum, err
    assert f"{name} received" in err and f"stopped by {name} at step" in err, err
    assert "Traceback" not in err
    step = int(err.split(f"stopped by {name} at step ")[1].split(";")[0])
    assert step >= 2
    (saved, path), = all_checkpoints_load(run_dir / "checkpoints")
    assert saved == step and str(path) in err
    assert [int(r["step"]) for r in read_log(run_dir)] == list(range(1, step + 1))
    if signum != signal.SIGINT:
        return

    # resume, then two signals at once from outside: whichever the process handles
    # second stops it at once (which one that is, the two racing signals decide)
    pid = server.start([pipe, "--no-progress"], tmp_path)
    assert wait_for(lambda: log_rows(run_dir) >= step + 2, pid), server.wait()
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    code, out, err = server.wait()
    assert f"resuming {run_dir} at step {step}" in out
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM), err
    second = signal.Signals(code - 128).name
    assert f"{second} received as a second signal: stopped at once" in err, err
    assert "Traceback" not in err and "stopped by" not in err, err
    assert not tmp_files(run_dir)
    assert [s for s, _ in all_checkpoints_load(run_dir / "checkpoints")] == [step]


# The first signal as step 3 starts (checkpoint 2 is written), the second at a chosen
# point: (signals, what the second one is, the checkpoints and the log rows left)
SECOND_SIGNAL = {
    # both at once, as step 3 starts
    "at-once": (["train-step#3:SIGINT", "train-step#3:SIGTERM"], "SIGTERM", [2], 2),
    # in the middle of the step, inside code that swallows every exception (as Keras'
    # Functional does in each forward pass): the run used to finish the step, write a
    # checkpoint and exit 130
    "in-the-step": (["train-step#3:SIGINT", "forward#3:SIGTERM"], "SIGTERM", [2], 2),
    "in-the-step-sigint-twice": (["train-step#3:SIGINT", "forward#3:SIGINT"], "SIGINT", [2], 2),
    # while the checkpoint of step 3 is written (before its rename): not left half-done
    "in-the-checkpoint-write": (["train-step#3:SIGINT", "checkpoint-write#2:SIGTERM"],
                                "SIGTERM", [2], 3),
    # after that checkpoint, while the data loader shuts down
    "in-the-data-loader-shutdown": (["train-step#3:SIGINT", "data-close#1:SIGTERM"],
                                    "SIGTERM", [2, 3], 3),
}


@pytest.mark.parametrize("case", list(SECOND_SIGNAL))
def test_a_second_signal_stops_at_once(case, server, tmp_path):
    """A second SIGINT/SIGTERM ends the process at once with 128 + signum, wherever it
    lands: no temporary file is left, the checkpoints written before are intact."""
    signals, second, checkpoints, rows = SECOND_SIGNAL[case]
    pipe = write_pipeline(tmp_path, "sig2", steps=10_000, checkpoint_every=2, levels=1)
    run_dir = tmp_path / "runs" / "sig2"
    code, out, err = server.run([pipe, "--no-progress"], tmp_path, signals=signals)
    for spec in signals:
        assert f"test hook: {spec}" in err, err  # the signal was sent where it should be
    assert code == 128 + signal.Signals[second], err
    assert "SIGINT received: finishing step 3" in err, err
    assert f"{second} received as a second signal: stopped at once" in err, err
    assert "Traceback" not in err and "stopped by" not in err, err
    assert "new run" in out  # printed before the signals: not lost by the hard exit
    assert not tmp_files(run_dir)
    assert [s for s, _ in all_checkpoints_load(run_dir / "checkpoints")] == checkpoints
    assert [int(r["step"]) for r in read_log(run_dir)] == list(range(1, rows + 1))


# ----------------------------------------------------------------------------- non-finite loss
def nan_at(monkeypatch, steps):
    """Make the loss NaN at the given (1-based) steps."""
    from ssd_keras.train import Trainer

    original = Trainer._loss_fn

    def loss_fn(self, prediction, target, weight):
        loss = original(self, prediction, target, weight)
        return loss * float("nan") if self.step + 1 in steps else loss

    monkeypatch.setattr(Trainer, "_loss_fn", loss_fn)


def test_nonfinite_loss_stops_naming_step_level_and_path(tmp_path, monkeypatch, capsys):
    pipe = write_pipeline(tmp_path, "nan", steps=6, checkpoint_every=2)
    ckpt_dir = tmp_path / "runs" / "nan" / "checkpoints"
    nan_at(monkeypatch, {3})
    assert main([str(pipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    (line,) = one_line_error(err, 2, "loss is nan at step 3")
    assert "level" in line and "px" in line and "path " in line and "->" in line
    (step, path), = all_checkpoints_load(ckpt_dir)  # the last good one, untouched
    groups, meta = load_checkpoint(path)
    assert step == meta["step"] == 2
    assert all(np.isfinite(a).all() for g in ("model", "ema") for a in groups[g])


def test_nonfinite_loss_skipped_and_counted(tmp_path, monkeypatch, capsys):
    pipe = write_pipeline(tmp_path, "skip", steps=4, checkpoint_every=4)
    pipe.write_text(pipe.read_text().replace("[train]", '[train]\non_nonfinite = "skip"'))
    nan_at(monkeypatch, {2, 3})
    assert main([str(pipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 non-finite steps skipped" in out
    run_dir = tmp_path / "runs" / "skip"
    rows = read_log(run_dir)
    assert [r["skipped"] for r in rows] == ["0", "1", "2", "2"]
    assert rows[1]["loss"] == "nan" and rows[0]["loss"] != "nan"
    groups, meta = load_checkpoint(run_dir / "checkpoints" / "ckpt_000000004.npz")
    assert meta["skipped"] == 2
    assert all(np.isfinite(a).all() for g in ("model", "ema") for a in groups[g])


# ----------------------------------------------------------------------------- bad input
BASE = """
[process]
image_size = 16
levels = 3
[model]
channel_mult = [1, 1, 1]
"""

BAD_PIPELINES = {
    "toml-syntax": ("[process\nimage_size = 16\n", "TOML syntax error"),
    "unknown-key": (BASE + "base_chanels = 32\n", "did you mean model.base_channels"),
    "unknown-section": (BASE + "[trian]\nsteps = 3\n", "did you mean [train]"),
    "wrong-type": (BASE + "[optimizer]\nlr = \"fast\"\n", "optimizer.lr = \"fast\": expected a number"),
    "out-of-range": (BASE + "[train]\nsteps = 0\n", "train.steps = 0: must be > 0"),
    "impossible": (BASE.replace("levels = 3", "levels = 5"), "process.levels = 5"),
    "eps-with-levels": (BASE + "[loss]\ntarget = \"eps\"\n", "loss.target"),
    "missing-key": ("[process]\nimage_size = 16\n", "process.levels: required key is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_PIPELINES))
def test_bad_pipeline_files(case, tmp_path, capsys):
    text, expected = BAD_PIPELINES[case]
    pipe = tmp_path / "bad.toml"
    pipe.write_text(text)
    assert main([str(pipe), "--no-progress"]) == 2
    captured = capsys.readouterr()
    one_line_error(captured.err, 2, expected)
    assert not (tmp_path / "runs").exists() and not Path("runs/bad").exists()


@pytest.mark.parametrize("argv, expected", [
    (["{tmp}/missing.toml"], "pipeline file not found"),
    (["{pipe}", "--set", "train.steps"], "expected section.key=value"),
    (["{pipe}", "--set", "train.stepz=3"], "did you mean train.steps"),
    (["{pipe}", "--set", "data.path={tmp}/no-such-folder"], "does not exist"),
    (["{pipe}", "--set", 'run.output_dir="{tmp}/a-file/runs"'], "cannot write to the run directory"),
    (["{pipe}", "--steps", "0"], "--steps 0"),
    (["sample", "nope", "--runs-dir", "{tmp}/runs"], "no run 'nope'"),
    (["sample", "--runs-dir", "{tmp}/runs"], "train one first"),
])
def test_bad_commands(argv, expected, tmp_path, capsys):
    pipe = write_pipeline(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    argv = [a.format(tmp=tmp_path.as_posix(), pipe=pipe) for a in argv]
    assert main(argv + (["--no-progress"] if argv[0] != "sample" else [])) == 2
    one_line_error(capsys.readouterr().err, 2, expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained to step 4 with checkpoints at 2 and 4 (copied per test)."""
    root = tmp_path_factory.mktemp("trained")
    pipe = write_pipeline(root, "done", steps=4, checkpoint_every=2)
    assert main([str(pipe), "--no-progress"]) == 0
    return root


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    pipe = tmp_path / "done.toml"
    pipe.write_text(pipe.read_text().replace(trained.as_posix(), tmp_path.as_posix()))
    run_dir = tmp_path / "runs" / "done"
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]
    return pipe, run_dir


def snapshot(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for p in sorted((run_dir / "checkpoints").iterdir())}


def test_corrupt_only_checkpoint_is_a_clear_error(run, capsys):
    pipe, run_dir = run
    ckpts = run_dir / "checkpoints"
    (ckpts / "ckpt_000000002.npz").unlink()
    (ckpts / "ckpt_000000004.npz").write_bytes(b"PK\x03\x04 this is no zip file")
    before = snapshot(run_dir)
    assert main([str(pipe), "--set", "train.steps=6", "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, 2, "holds no readable checkpoint")
    assert snapshot(run_dir) == before  # nothing overwritten, nothing started afresh


def test_truncated_newest_checkpoint_falls_back_to_the_older_one(run, capsys):
    pipe, run_dir = run
    newest = run_dir / "checkpoints" / "ckpt_000000004.npz"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a copy cut short
    assert main([str(pipe), "--set", "train.steps=5", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.out and "at step 2" in captured.out
    assert "warning: skipping checkpoint" in captured.err and "Traceback" not in captured.err
    # set aside (not deleted), so that pruning cannot keep it instead of a good one
    assert (run_dir / "checkpoints" / "ckpt_000000004.npz.unreadable").read_bytes() == data[: len(data) // 2]
    assert [s for s, _ in all_checkpoints_load(run_dir / "checkpoints")] == [4, 5]
    assert [int(r["step"]) for r in read_log(run_dir)] == [1, 2, 3, 4, 5]


def test_sample_from_a_corrupt_checkpoint_file(run, capsys):
    pipe, run_dir = run
    bad = run_dir / "checkpoints" / "ckpt_000000004.npz"
    bad.write_bytes(b"\0" * 100)
    code = main(["sample", str(run_dir), "--checkpoint", str(bad), "--no-progress"])
    assert code == 2
    one_line_error(capsys.readouterr().err, 2, "is unreadable")


def test_changed_model_refused_unless_allowed(run, capsys):
    pipe, run_dir = run
    before = snapshot(run_dir)
    code = main([str(pipe), "--set", "process.timesteps=200", "--set", "model.dropout=0.2",
                 "--no-progress"])
    assert code == 2
    (line,) = one_line_error(capsys.readouterr().err, 2, "process.timesteps, model.dropout")
    assert "--allow-config-change" in line
    assert snapshot(run_dir) == before
    # a change that does not alter the model or the process resumes
    assert main([str(pipe), "--set", "train.steps=5", "--set", "optimizer.lr=1e-4",
                 "--no-progress"]) == 0
    code = main([str(pipe), "--set", "train.steps=6", "--set", "model.dropout=0.2",
                 "--allow-config-change", "--no-progress"])
    assert code == 0
    assert list_checkpoints(run_dir / "checkpoints")[-1][0] == 6


def _rewrite_checkpoint(path, change_names):
    """Rewrite a checkpoint with its model group's names changed by ``change_names``
    (arrays unchanged, as a checkpoint of a renamed or reordered network would be)."""
    groups, meta = load_checkpoint(path)
    names = meta.pop("names")
    names["model"] = change_names(list(names["model"]))
    for key in ("step", "format_version", "groups"):
        meta.pop(key)
    path.unlink()
    save_checkpoint(path.parent, int(path.stem.split("_")[1]), groups, meta, names)


@pytest.mark.parametrize("change, expected", [
    (lambda n: [n[0].replace("kernel", "weights")] + n[1:], "model tensor 0 is 'input_blocks_0_0/weights'"),
    (lambda n: [n[1], n[0]] + n[2:], "model tensor 0 is 'input_blocks_0_0/bias'"),
])
def test_a_renamed_or_reordered_variable_is_caught_on_load(change, expected, run, capsys):
    pipe, run_dir = run
    for step in (2, 4):
        _rewrite_checkpoint(run_dir / "checkpoints" / f"ckpt_{step:09d}.npz", change)
    before = snapshot(run_dir)
    assert main([str(pipe), "--set", "train.steps=6", "--no-progress"]) == 2
    (line,) = one_line_error(capsys.readouterr().err, 2, expected)
    assert "the model's is 'input_blocks_0_0/kernel'" in line
    assert snapshot(run_dir) == before
    assert main(["sample", str(run_dir), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, 2, expected)


def test_a_checkpoint_of_the_old_positional_format_is_refused(run, capsys):
    pipe, run_dir = run
    path = run_dir / "checkpoints" / "ckpt_000000004.npz"
    groups, meta = load_checkpoint(path)
    meta = dict(meta, format_version=1)
    payload = {f"{g}/{i:05d}": a for g, arrays in groups.items() for i, a in enumerate(arrays)}
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **payload)
    assert main(["sample", str(run_dir), "--checkpoint", str(path), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, 2, "has format 1, expected 2 (arrays keyed by position")


def test_changed_data_refused_on_resume(run, capsys):
    pipe, run_dir = run
    Image.new("RGB", (20, 20)).save(run_dir.parent.parent / "data" / "new.png")
    assert main([str(pipe), "--set", "train.steps=5", "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, 2, "the data changed since the checkpoint")


def test_disk_full_during_checkpoint_write_keeps_old_checkpoints(run, capsys, monkeypatch):
    pipe, run_dir = run
    before = snapshot(run_dir)
    real_savez = np.savez

    def savez_then_disk_full(file, **arrays):
        real_savez(file, **arrays)  # part of the file is on disk ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then the disk is full

    monkeypatch.setattr("ssd_keras.checkpoint.np.savez", savez_then_disk_full)
    assert main([str(pipe), "--set", "train.steps=6", "--no-progress"]) == 2
    (line,) = one_line_error(capsys.readouterr().err, 2, "No space left on device")
    assert "ckpt_000000006.npz" in line
    assert snapshot(run_dir) == before  # ckpt 2 and 4 intact, no temporary file left
    assert not tmp_files(run_dir)

    monkeypatch.setattr("ssd_keras.checkpoint.np.savez", real_savez)
    assert main([str(pipe), "--set", "train.steps=6", "--no-progress"]) == 0
    assert [s for s, _ in all_checkpoints_load(run_dir / "checkpoints")] == [4, 6]


def test_milestones_are_kept(run):
    pipe, run_dir = run
    assert main([str(pipe), "--set", "train.steps=9", "--set", "train.milestones=[5]",
                 "--set", "train.checkpoint_every=2", "--no-progress"]) == 0
    # keep_checkpoints = 2 newest (6 is pruned), plus the milestone 5 (not a multiple of 2)
    assert [s for s, _ in all_checkpoints_load(run_dir / "checkpoints")] == [5, 8, 9]


@pytest.mark.parametrize("raised, code, expected", [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2, "out of memory (CUDA"),
    (KeyboardInterrupt(), 130, "interrupted"),  # Ctrl-C before training (Typer returns 130)
])
def test_out_of_memory_and_ctrl_c_before_training(raised, code, expected, tmp_path, capsys,
                                                  monkeypatch):
    from ssd_keras.train import Trainer

    def fail(self, *args, **kwargs):
        raise raised

    monkeypatch.setattr(Trainer, "__init__", fail)
    assert main([str(write_pipeline(tmp_path)), "--no-progress"]) == code
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    from ssd_keras.train import Trainer

    def fail(self, *args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(Trainer, "__init__", fail)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main([str(write_pipeline(tmp_path)), "--no-progress"])
