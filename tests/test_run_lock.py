"""One job per folder (ssd_keras/run_lock.py): a second trainer on a run directory exits 2
at once naming the holder; a lock left by a SIGKILL or by a dead host never blocks; and
readers (sampling, inspect) get a complete checkpoint while a trainer writes and prunes."""

import datetime
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ssd_keras import checkpoint, run_lock
from ssd_keras.checkpoint import latest_good_checkpoint, list_checkpoints, save_checkpoint
from ssd_keras.cli import main
from ssd_keras.config import load_pipeline
from ssd_keras.run_lock import FolderLock, FolderLockedError

from test_resilience import one_line_error, write_pipeline

HOLDER = """
import sys
from ssd_keras.run_lock import FolderLock
FolderLock(sys.argv[1], "run").acquire()
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def start_holder(folder):
    """A separate process that takes ``folder``'s lock and holds it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def iso(seconds_ago):
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_second_trainer_exits_2_at_once_naming_run_pid_host_and_start(tmp_path, capsys):
    from ssd_keras.train import Trainer

    pipe = write_pipeline(tmp_path, "busy", steps=2)
    run_dir = tmp_path / "runs" / "busy"
    first = Trainer(load_pipeline(pipe), progress=False)  # holds the run (this process)
    try:
        record = json.loads((run_dir / "lock.json").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert main([str(pipe), "--no-progress"]) == 2
        lines = one_line_error(capsys.readouterr().err, 2, "is in use by")
        assert len(lines) == 1, lines
        assert (f"run {run_dir} is in use by PID {os.getpid()} on host {socket.gethostname()} "
                f"since {record['started']}") in lines[0]
        assert not list_checkpoints(run_dir / "checkpoints")  # the second job wrote nothing
        assert not (run_dir / "log.csv").exists()
        first.fit()
    finally:
        first.close()
    assert not (run_dir / "lock.json").exists()  # released
    assert main([str(pipe), "--no-progress"]) == 0  # the run is free again (already done)


def test_a_lock_left_by_sigkill_never_blocks_the_next_run(tmp_path, capsys):
    pipe = write_pipeline(tmp_path, "killed", steps=2)
    run_dir = tmp_path / "runs" / "killed"
    holder = start_holder(run_dir)
    assert main([str(pipe), "--no-progress"]) == 2  # alive: refused
    assert f"PID {holder.pid}" in capsys.readouterr().err
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run_dir / "lock.json").read_text())["pid"] == holder.pid  # left behind
    assert main([str(pipe), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the stale lock of PID {holder.pid}" in err
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2]
    assert not (run_dir / "lock.json").exists()


@pytest.mark.parametrize("age, taken", [(10, True), (400, False)])
def test_another_hosts_lock_counts_while_its_heartbeat_is_fresh(tmp_path, capsys, age, taken):
    """A shared file system whose flock does not reach this machine: the record decides;
    a heartbeat older than SSD_LOCK_STALE_S (default 300 s) is a dead host's."""
    pipe = write_pipeline(tmp_path, "shared", steps=2)
    run_dir = tmp_path / "runs" / "shared"
    run_dir.mkdir(parents=True)
    record = {"pid": 4242, "host": "node-that-is-not-this-one", "started": iso(age + 3600),
              "heartbeat": iso(age), "command": "ssd-run shared.toml"}
    (run_dir / "lock.json").write_text(json.dumps(record))
    code = main([str(pipe), "--no-progress"])
    err = capsys.readouterr().err
    if taken:
        assert code == 2
        one_line_error(err, 2, f"is in use by PID 4242 on host node-that-is-not-this-one since "
                               f"{record['started']}")
        assert not list_checkpoints(run_dir / "checkpoints")
    else:
        assert code == 0, err
        assert "taking over the stale lock of PID 4242 on host node-that-is-not-this-one" in err


def test_without_flock_a_record_of_this_host_counts_while_its_pid_lives(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / "lock.json").write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "started": iso(5), "heartbeat": iso(5)}))
        with pytest.raises(FolderLockedError, match=f"PID {sleeper.pid}"):
            FolderLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match="stale lock"):
        lock = FolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    lock.release()


def test_the_heartbeat_is_rewritten_while_held(tmp_path):
    lock = FolderLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        first = json.loads((tmp_path / "lock.json").read_text())
        # the heartbeat is written to the second: poll until it moves (no time limit)
        while json.loads((tmp_path / "lock.json").read_text())["heartbeat"] == first["heartbeat"]:
            threading.Event().wait(0.05)
        assert json.loads((tmp_path / "lock.json").read_text())["started"] == first["started"]
    finally:
        lock.release()
    assert not (tmp_path / "lock.json").exists() and (tmp_path / ".lock").exists()


def test_a_bad_stale_timeout_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_LOCK_STALE_S", "soon")
    with pytest.raises(FolderLockedError, match="SSD_LOCK_STALE_S = 'soon'"):
        FolderLock(tmp_path)


# ----------------------------------------------------------------------------- readers
def _groups(step):
    arrays = [np.full((64, 64), step, np.float32), np.full((3,), step, np.float32)]
    return {"model": arrays}, {"model": ["a", "b"]}


def _check(found):
    path, groups, meta = found
    step = meta["step"]
    assert path.name == f"ckpt_{step:09d}.npz"
    assert all(np.all(a == step) for a in groups["model"])  # complete, and all of one step
    return step


def test_a_checkpoint_pruned_between_listing_and_reading_is_no_error(tmp_path, monkeypatch):
    """The exact interleaving: the reader lists, then the trainer writes the next
    checkpoint and prunes the listed one (keep_checkpoints = 1), then the reader reads."""
    groups, names = _groups(1)
    save_checkpoint(tmp_path, 1, groups, {}, names)
    real = checkpoint.list_checkpoints
    calls = []

    def list_then_trainer_moves_on(directory):
        found = real(directory)
        calls.append(found)
        if len(calls) == 1:  # the reader's first listing: then the trainer moves on
            g, n = _groups(2)
            save_checkpoint(tmp_path, 2, g, {}, n)
            checkpoint.prune_checkpoints(tmp_path, keep=1)
        return found

    monkeypatch.setattr(checkpoint, "list_checkpoints", list_then_trainer_moves_on)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a vanished file is no damaged one: no warning
        found = latest_good_checkpoint(tmp_path)
    assert found is not None and _check(found) == 2
    assert [s for s, _ in calls[0]] == [1]  # the listing it started from held step 1 only


def test_readers_always_get_a_complete_checkpoint_while_a_trainer_writes(tmp_path):
    """A writer process saves and prunes (keep 1) checkpoints back to back while this
    process reads the newest one, as ``ssd-run sample`` and ``evaluate`` do."""
    writer = f"""
import sys, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_run_lock import _groups
from ssd_keras.checkpoint import save_checkpoint, prune_checkpoints
for step in range(1, 301):
    g, n = _groups(step)
    save_checkpoint({str(tmp_path)!r}, step, g, {{}}, n)
    prune_checkpoints({str(tmp_path)!r}, keep=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", writer],
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    reads, last = 0, 0
    try:
        while proc.poll() is None:
            found = latest_good_checkpoint(tmp_path)
            if found is None:
                assert last == 0  # only before the first write: never once there is one
                continue
            step = _check(found)
            assert step >= last  # never an older one than already seen
            last, reads = step, reads + 1
    finally:
        proc.wait()
    assert proc.returncode == 0
    assert _check(latest_good_checkpoint(tmp_path)) == 300
    assert reads > 0
