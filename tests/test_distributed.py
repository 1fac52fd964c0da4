"""Data-parallel training (docs/distributed.md): 2 torchrun processes on the CPU (gloo),
and jax's DataParallel over 2 forced host devices.

The torchrun tests start real process groups (``python -m torch.distributed.run``), so
they run on the torch backend only: the CI reruns of ``-m backend`` under jax and
tensorflow do not select them (no ``backend`` mark). The jax test starts its own jax
subprocesses, so it runs in the torch session too.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _dist_worker import fixed_step, record_first_step
from _tolerance import assert_rounding_close, network_tolerance, rms
from test_end_to_end import TINY, write_images

from ssd_keras.checkpoint import list_checkpoints, load_checkpoint
from ssd_keras.config import ConfigError, load_pipeline
from ssd_keras.data import make_dataset

HERE = Path(__file__).parent
WORKER = HERE / "_dist_worker.py"
pytestmark = pytest.mark.slow


def pipeline(tmp_path, steps=6, checkpoint_every=3, batch_size=4, extra=""):
    write_images(tmp_path / "data", n=10)
    text = TINY.format(out=tmp_path / "runs", data=tmp_path / "data")
    text = (text.replace("steps = 4\n", f"steps = {steps}\n", 1)
            .replace("checkpoint_every = 2", f"checkpoint_every = {checkpoint_every}")
            .replace("batch_size = 4\n", f"batch_size = {batch_size}\n", 1)
            .replace("sample_every = 4", "sample_every = 0")) + extra
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def env(**extra):
    e = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    e.pop("WORLD_SIZE", None)
    e.update(extra)
    return e


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *map(str, args)]


def run_worker(mode, pipe, out, steps):
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(torchrun(WORKER, mode, pipe, out, steps), env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, infos


def test_ranks_stay_bitwise_identical_and_only_rank0_writes(tmp_path):
    pipe = pipeline(tmp_path, steps=8, checkpoint_every=4)
    ranks, infos = run_worker("state", pipe, tmp_path / "out", 8)
    assert [i["step"] for i in infos] == [8, 8] and infos[0]["world_size"] == 2
    # the ranks drew their own paths: at least one step had two different paths, so the
    # union of variables (zeros off a rank's path) was exercised
    assert any(a != b for a, b in zip(infos[0]["paths"], infos[1]["paths"])), infos
    assert sorted(ranks[0]) == sorted(ranks[1])
    kinds = {k[0] for k in ranks[0]}
    assert kinds == {"w", "e", "o"}
    for name in ranks[0]:  # weights, EMA, optimizer state (moments, step counter)
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    # rank 1 opened no file for writing; rank 0 wrote the run directory
    assert infos[1]["writes"] == [], infos[1]["writes"]
    run_dir = tmp_path / "runs" / "tiny"
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [4, 8]
    log = (run_dir / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 8  # one header, one row per step (log_every = 1), no duplicates
    groups, meta = load_checkpoint(run_dir / "checkpoints" / "ckpt_000000008.npz")
    assert meta["world_size"] == 2 and len(meta["ranks"]) == 2
    for i, w in enumerate(groups["ema"]):
        np.testing.assert_array_equal(w, ranks[0][f"e{i:04d}"])


def test_buckets_overlapped_with_the_backward_pass_give_the_same_bits(tmp_path):
    """train.allreduce_bucket_mb = 0.02 (tens of buckets, most launched from gradient hooks
    during the backward pass, ranks on different paths) against 0 (one all-reduce after
    it): the same weights, EMA and optimizer state bit for bit (each element is the same
    sum of the same two gradients), on both ranks."""
    results = {}
    for mb in (0, 0.02):
        pipe = pipeline(tmp_path / f"mb{mb}", steps=4, checkpoint_every=4)
        pipe.write_text(pipe.read_text().replace("[train]\n", f"[train]\nallreduce_bucket_mb = {mb}\n"))
        results[mb] = run_worker("state", pipe, tmp_path / f"mb{mb}" / "out", 4)
    (one, one_info), (bucketed, info) = results[0], results[0.02]
    assert one_info[0]["paths"] == info[0]["paths"] and one_info[1]["paths"] == info[1]["paths"]
    assert any(a != b for a, b in zip(info[0]["paths"], info[1]["paths"])), info
    assert all(e == 0 for i in one_info for e in i["early"])  # one bucket, after the backward
    assert all(e >= 5 for i in info for e in i["early"]), [i["early"] for i in info]
    for r in range(2):
        for name in one[r]:
            np.testing.assert_array_equal(bucketed[r][name], one[r][name], err_msg=name)


def test_two_ranks_on_one_path_equal_one_process_on_the_whole_batch(tmp_path):
    """Two ranks, each on half of the batch, compute the gradient and loss of one process
    on the whole batch (averaged over the ranks, not summed, and not one rank's half), to
    float32 rounding; and the ranks stay bitwise identical over three steps."""
    from ssd_keras.distributed import Single
    from ssd_keras.train import Trainer

    steps = 3
    pipe = pipeline(tmp_path)
    ranks, _ = run_worker("same_path", pipe, tmp_path / "out", steps)
    cfg = load_pipeline(pipe, [f"run.output_dir={tmp_path / 'single'}"])
    trainer = Trainer(cfg, progress=False, dist=Single())
    try:
        single = record_first_step(trainer)
        x0, t, noise = fixed_step(trainer.process, 0, cfg.train.batch_size)
        key = trainer.process.path_at(int(t[0]))
        trainer._draw = lambda batch: (t, key, noise)
        single["loss0"] = trainer.train_step(x0)[0]
        assert_same_first_step(ranks[0], single, trainer.model, key, cfg.train.batch_size)
    finally:
        trainer.close()
    for name in ranks[0]:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    moved = sum(not np.array_equal(ranks[0][f"w{i:04d}"], _initial(trainer, i))
                for i in range(len(trainer.model.trainable_variables)))
    assert moved > 0


def assert_same_first_step(got, want, model, key, batch):
    """The loss and the gradients of the first step of two runs agree to float32 rounding
    (tests/_tolerance.py): each weight gradient sums ``batch * r_in**2`` products per
    element (r_in: the path's input size, the largest feature map) through about one
    layer per kernel of the path."""
    path = model.path(*key)
    tol = network_tolerance(path.trainable_variables, terms=batch * key[0] ** 2)
    names = sorted(k for k in want if k.startswith("g"))
    assert names and sorted(k for k in got if k.startswith("g")) == names
    assert len(names) == len(path.trainable_variables)
    scale = rms([want[k] for k in names])
    for k in names:
        assert_rounding_close(got[k], want[k], tol=tol, scale=scale,
                              err_msg=model.trainable_variables[int(k[1:])].path)
    np.testing.assert_allclose(float(got["loss0"]), float(want["loss0"]), rtol=tol)


def _initial(trainer, i):
    from keras import ops

    # EMA at step 0 was a copy of the initial weights; with ema.rate = 0.9 it moved, so
    # compare with a fresh model instead
    from ssd_keras.builders import build_model
    import random

    state = random.getstate()
    random.seed(trainer.cfg.run.seed)
    try:
        model = build_model(trainer.cfg, channels=3)
    finally:
        random.setstate(state)
    return ops.convert_to_numpy(model.trainable_variables[i].value)


def _children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.mark.parametrize("target", ["rank1", "job"])
def test_sigterm_stops_all_ranks_with_one_checkpoint_then_resume_on_one_process(tmp_path, target):
    pipe = pipeline(tmp_path, steps=100000, checkpoint_every=5)
    run_dir = tmp_path / "runs" / "tiny"
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(torchrun("-m", "ssd_keras", "train", pipe, "--no-progress"),
                            env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None and not list_checkpoints(run_dir / "checkpoints"):
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        # the newest worker pid is rank 1 (torchrun starts them in rank order); or the job:
        # torchrun forwards the signal to every worker
        os.kill(max(workers) if target == "rank1" else proc.pid, signal.SIGTERM)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "torchrun.log").read_text()
    assert "stopped by SIGTERM" in text, text[-3000:]
    assert "Traceback" not in text.split("stopped by SIGTERM")[0], text[-3000:]
    ckpts = list_checkpoints(run_dir / "checkpoints")
    last, path = ckpts[-1]
    groups, meta = load_checkpoint(path)
    assert meta["step"] == last and meta["world_size"] == 2
    assert not list(run_dir.glob(".tmp-*")) and not list((run_dir / "checkpoints").glob(".tmp-*"))
    # resume with ONE process from the 2-process checkpoint: the data goes on from the
    # job's global position
    from ssd_keras.distributed import Single
    from ssd_keras.train import Trainer

    cfg = load_pipeline(pipe, ["train.steps=" + str(last + 2)])
    trainer = Trainer(cfg, progress=False, dist=Single())
    try:
        assert trainer.step == last and trainer.resumed_from == path
        assert trainer.data.state()["epoch"] == meta["data"]["epoch"]
        assert trainer.data.state()["position"] == meta["data"]["position"]
        trainer.fit()
        assert trainer.step == last + 2
    finally:
        trainer.close()
    assert list_checkpoints(run_dir / "checkpoints")[-1][0] == last + 2


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_makes_the_other_exit_with_a_clear_message(tmp_path):
    """Without torchrun's supervision (which would also stop the survivors): rank 1 is
    SIGKILLed mid-run; rank 0's next collective fails and it exits with one error line."""
    pipe = pipeline(tmp_path, steps=100000, checkpoint_every=5)
    run_dir = tmp_path / "runs" / "tiny"
    port = str(_free_port())
    procs, logs = [], []
    for rank in range(2):
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        e = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SSD_DIST_TIMEOUT="120")
        procs.append(subprocess.Popen([sys.executable, "-m", "ssd_keras", "train", str(pipe),
                                       "--no-progress"], env=e, stdout=logs[-1],
                                      stderr=subprocess.STDOUT))
    try:
        while procs[0].poll() is None and not list_checkpoints(run_dir / "checkpoints"):
            time.sleep(0.5)
        assert procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-3000:]
        procs[1].kill()
        procs[1].wait()
        code = procs[0].wait()  # bounded: gloo sees the closed connection, else the timeout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    text = (tmp_path / "rank0.log").read_text()
    assert code == 1, text[-3000:]
    assert "error: rank 0 of 2:" in text and "another process crashed, was killed" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert list_checkpoints(run_dir / "checkpoints")  # what was written is intact


def test_batch_size_not_divisible_by_world_size_is_a_config_error(tmp_path, monkeypatch):
    from ssd_keras.train import Trainer

    cfg = load_pipeline(pipeline(tmp_path, batch_size=6))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"tiny\.toml: train\.batch_size = 6: not divisible by the 4 processes"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("old, new", [(2, 1), (2, 3), (3, 2), (1, 2)])
def test_strided_shards_resume_with_another_count_without_skipping(tmp_path, old, new):
    """The job's global stream is consumed in order: ``old`` shards take 2 steps, the run
    resumes with ``new`` shards from the job's position; nothing skipped or repeated."""
    write_images(tmp_path / "d", n=24)
    kw = dict(path=str(tmp_path / "d"), seed=5, random_flip=False, num_workers=0, prefetch=0,
              sharding="strided")

    def ids(batch):  # the images are distinct noise: identify each by its pixel sum
        return [round(float(x.sum()), 3) for x in batch]

    with make_dataset("folder", 8, 24, **kw) as ds:  # one shard: the global stream
        stream = ids(next(ds))
    assert len(set(stream)) == 24
    b, states, consumed = 2, [], []
    for k in range(old):
        with make_dataset("folder", 8, b, shard_index=k, num_shards=old, **kw) as ds:
            for s in range(2):
                batch = ids(next(ds))
                # step s of shard k holds the global elements s*old*b + k + j*old
                assert batch == [stream[s * old * b + k + j * old] for j in range(b)]
                consumed += batch
            states.append(ds.state())
    start = 2 * old * b
    assert sorted(consumed) == sorted(stream[:start])
    assert {(s["epoch"], s["position"]) for s in states} == {(0, start)}
    rest = []
    for k in range(new):
        with make_dataset("folder", 8, b, shard_index=k, num_shards=new, **kw) as ds:
            ds.restore(states[0])
            rest += ids(next(ds)) + ids(next(ds))
    assert sorted(rest) == sorted(stream[start: start + 2 * new * b])


def test_contiguous_state_refused_by_other_shard_counts(tmp_path):
    write_images(tmp_path / "d", n=8)
    kw = dict(path=str(tmp_path / "d"), seed=1, num_workers=0, prefetch=0)
    with make_dataset("folder", 8, 2, num_shards=2, **kw) as ds:
        next(ds)
        state = ds.state()
    with make_dataset("folder", 8, 2, num_shards=2, shard_index=0, sharding="strided", **kw) as ds:
        with pytest.raises(ValueError, match="sharding"):
            ds.restore(state)


JAX_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from _dist_worker import fixed_step, record_first_step
from ssd_keras.config import load_pipeline
from ssd_keras.train import Trainer
import jax
from keras import ops
cfg = load_pipeline({pipe!r}, ["run.output_dir={out}"])
trainer = Trainer(cfg, progress=False)
dist = trainer._jax_distribution
info = {{"devices": len(jax.local_devices()), "data_parallel": dist is not None}}
if dist is not None:
    v = trainer.model.trainable_variables[0].value
    info["weight_devices"] = len(v.sharding.device_set)
    info["weight_replicated"] = bool(v.sharding.is_fully_replicated)
    from ssd_keras.distributed import shard_batch
    x, = shard_batch(dist, ops.convert_to_tensor(np.zeros((4, 16, 16, 3), np.float32)))
    info["batch_shards"] = [list(s.data.shape) for s in x.addressable_shards]
first = record_first_step(trainer)
for s in range(3):
    x0, t, noise = fixed_step(trainer.process, s, cfg.train.batch_size)
    key = trainer.process.path_at(int(t[0]))
    trainer._draw = lambda batch, t=t, key=key, noise=noise: (t, key, noise)
    loss = trainer.train_step(x0)[0]
    if s == 0:
        first["loss0"] = np.float64(loss)
        info["key"] = list(key)
np.savez({npz!r}, **first)
trainer.close()
print(json.dumps(info))
"""


def test_jax_data_parallel_over_two_host_devices_equals_one_device(tmp_path):
    pipe = pipeline(tmp_path)
    results = {}
    for devices in (2, 1):
        npz = tmp_path / f"jax{devices}.npz"
        script = JAX_SCRIPT.format(tests=str(HERE), pipe=str(pipe), out=tmp_path / f"jax{devices}",
                                   npz=str(npz))
        e = env(KERAS_BACKEND="jax", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-5000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        results[devices] = (info, dict(np.load(npz)))
    two, one = results[2][0], results[1][0]
    assert two["devices"] == 2 and two["data_parallel"]
    assert two["weight_devices"] == 2 and two["weight_replicated"]
    assert two["batch_shards"] == [[2, 16, 16, 3], [2, 16, 16, 3]]
    assert one["devices"] == 1 and not one["data_parallel"]
    # the first step's gradients and loss, not weights after AdamW steps (tests/_tolerance.py)
    from ssd_keras.builders import build_model

    cfg = load_pipeline(pipe)
    key = tuple(two["key"])
    assert key == tuple(one["key"])
    model = build_model(cfg, channels=3)
    assert_same_first_step(results[2][1], results[1][1], model, key, cfg.train.batch_size)


def test_a_run_started_from_init_from_trains_on_two_ranks_and_resumes_on_one(tmp_path):
    """train.init_from under torchrun: both ranks start from the source's weights (rank 1
    writes nothing), and the run then resumes on one process without its source."""
    from ssd_keras.train import Trainer

    source_pipe = pipeline(tmp_path / "src", steps=2, checkpoint_every=2)
    src = Trainer(load_pipeline(source_pipe), progress=False)
    src.fit()
    src.close()
    source = tmp_path / "source.npz"
    (tmp_path / "src" / "runs" / "tiny" / "checkpoints" / "ckpt_000000002.npz").rename(source)
    pipe = pipeline(tmp_path, steps=4, checkpoint_every=2)
    pipe.write_text(pipe.read_text().replace("[train]\n", f"[train]\ninit_from = '{source}'\n", 1))
    ranks, infos = run_worker("state", pipe, tmp_path / "out", 2)
    assert [i["step"] for i in infos] == [2, 2] and infos[1]["writes"] == []
    for name in ranks[0]:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    run_dir = tmp_path / "runs" / "tiny"
    groups, meta = load_checkpoint(run_dir / "checkpoints" / "ckpt_000000002.npz")
    assert meta["world_size"] == 2 and meta["init_from"]["source"] == str(source.resolve())
    assert json.loads((run_dir / "init_from.json").read_text())["sha256"] == meta["init_from"]["sha256"]
    source.unlink()  # resuming never reads it
    trainer = Trainer(load_pipeline(pipe), progress=False)
    try:
        assert trainer.step == 2 and trainer.initialized_from is None
        trainer.fit()
        assert trainer.step == 4
    finally:
        trainer.close()
    _, meta = load_checkpoint(run_dir / "checkpoints" / "ckpt_000000004.npz")
    assert meta["init_from"]["sha256"] == json.loads((run_dir / "init_from.json").read_text())["sha256"]


def test_a_stopped_rank_ends_the_job_naming_it_and_the_run_resumes(tmp_path):
    """Rank 1 is SIGSTOPped mid-run (as a hung file system would hold it): rank 0's next
    collective times out within SSD_DIST_TIMEOUT and its one error line names rank 1;
    rank 1, once continued, ends too; every checkpoint loads and the run resumes."""
    from ssd_keras.distributed import grace_s

    timeout = 20
    pipe = pipeline(tmp_path, steps=100000, checkpoint_every=5)
    run_dir = tmp_path / "runs" / "tiny"
    port = str(_free_port())
    procs, logs = [], []
    for rank in range(2):
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        e = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SSD_DIST_TIMEOUT=str(timeout))
        procs.append(subprocess.Popen([sys.executable, "-m", "ssd_keras", "train", str(pipe),
                                       "--no-progress"], env=e, stdout=logs[-1],
                                      stderr=subprocess.STDOUT))
    try:
        while procs[0].poll() is None and not list_checkpoints(run_dir / "checkpoints"):
            time.sleep(0.5)
        assert procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-3000:]
        procs[1].send_signal(signal.SIGSTOP)
        code = procs[0].wait()  # bounded by the collective's timeout
        procs[1].send_signal(signal.SIGCONT)  # the file system answers again
        code1 = procs[1].wait()  # its peer is gone: its next collective fails at once
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
        for f in logs:
            f.close()
    text = (tmp_path / "rank0.log").read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, text[-3000:]
    assert errors[0].startswith("error: rank 0 of 2:"), errors
    assert f"did not answer within {timeout} s (SSD_DIST_TIMEOUT): rank 1 sent no report" in errors[0]
    assert "Traceback" not in text, text[-3000:]
    text1 = (tmp_path / "rank1.log").read_text()
    assert code1 == 1 and "error: rank 1 of 2:" in text1 and "Traceback" not in text1, text1[-3000:]
    assert 0 < grace_s(timeout) < timeout

    ckpts = list_checkpoints(run_dir / "checkpoints")
    for _, path in ckpts:
        load_checkpoint(path)  # every file under a checkpoint name is whole
    last, path = ckpts[-1]
    from ssd_keras.distributed import Single
    from ssd_keras.train import Trainer

    cfg = load_pipeline(pipe, ["train.steps=" + str(last + 2)])
    trainer = Trainer(cfg, progress=False, dist=Single())  # the dead job's lock is stale
    try:
        assert trainer.step == last and trainer.resumed_from == path
        trainer.fit()
        assert trainer.step == last + 2
    finally:
        trainer.close()


def test_a_locked_run_ends_every_rank_at_once_with_the_same_error(tmp_path):
    """Rank 0 alone takes the run's lock; the ranks agree on the outcome, so rank 1 does
    not wait in a collective for a rank 0 that gave up."""
    from ssd_keras.run_lock import FolderLock

    pipe = pipeline(tmp_path, steps=4)
    run_dir = tmp_path / "runs" / "tiny"
    with FolderLock(run_dir, "run"):  # a job that holds the run (this test process)
        proc = subprocess.run(torchrun("-m", "ssd_keras", "train", pipe, "--no-progress"),
                              env=env(SSD_DIST_TIMEOUT="600"), capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"error: run {run_dir} is in use by PID {os.getpid()} on host") == 2, text[-4000:]
    assert not list_checkpoints(run_dir / "checkpoints")
    assert not (run_dir / "lock.json").exists()  # released by the holder, never rewritten


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_nan_gradient_on_one_rank_is_decided_by_all_ranks_together(tmp_path, policy):
    """Rank 1's gradients are NaN at step 2, its loss finite: the averaged gradients are
    NaN on both ranks, so both skip the step (weights, EMA and optimizer state as after
    step 1, then training goes on) or both stop at it, nothing applied."""
    pipe = pipeline(tmp_path)
    pipe.write_text(pipe.read_text().replace("[train]\n", f'[train]\non_nonfinite = "{policy}"\n'))
    ranks, infos = run_worker("nan_grad", pipe, tmp_path / "out", 3)
    assert infos[0]["digests"] == infos[1]["digests"]
    for info in infos:
        if policy == "skip":
            assert info["error"] is None and info["step"] == 3 and info["skipped"] == 1
            first, second, third = info["digests"]
            assert second == first and third != second
        else:
            assert info["step"] == 1 and len(info["digests"]) == 1
            assert "non-finite gradients" in info["error"] and "at step 2" in info["error"]
    for name in ranks[0]:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        assert np.isfinite(ranks[0][name]).all(), name
