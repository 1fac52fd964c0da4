"""Backend portability: the compiled training step, inference and checkpoints across
torch, jax and tensorflow.

Tests marked ``backend`` run under whichever backend the session uses (CI reruns them
under jax and tensorflow). ``test_checkpoint_moves_between_backends`` starts one
subprocess per backend itself, so it runs once, from the default (torch) session.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from _tolerance import assert_rounding_close, network_tolerance, rms
from ssd_keras import backend
from ssd_keras.backend import graphs
from ssd_keras.nn import FlexiUNet

BACKENDS = ("torch", "jax", "tensorflow")
PACKAGE = Path(__file__).resolve().parents[1] / "ssd_keras"

TINY = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(16, 8), num_heads=2)


def tiny_unet(dropout=0.0, seed=0):
    keras.utils.set_random_seed(seed)
    u = FlexiUNet(32, [8, 16, 32], full_res_change_via_upsample=False, dropout=dropout, **TINY)
    rng = np.random.default_rng(seed)
    for v in u.trainable_variables:  # non-zero last convs, so every gradient is non-zero
        shape = tuple(v.shape)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.1
        base = 1.0 if v.name == "gamma" else 0.0
        v.assign((base + scale * rng.normal(size=shape)).astype("float32"))
    return u


def batch(r_in, r_out, n=2, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, r_in, r_in, 3)).astype("float32")
    t = np.linspace(10, 900, n).astype("float32")
    target = rng.normal(size=(n, r_out, r_out, 3)).astype("float32")
    weight = np.linspace(0.5, 2.0, n).astype("float32")
    return [ops.convert_to_tensor(a) for a in (x, t, target, weight)]


def mse(prediction, target, weight):
    err = ops.mean(ops.square(ops.cast(prediction, "float32") - target), axis=(1, 2, 3))
    return ops.mean(err * weight)


def snapshot(variables):
    return [np.array(ops.convert_to_numpy(v.value), copy=True) for v in variables]


# ----------------------------------------------------------------------------- in-process


@pytest.mark.backend
def test_training_step_changes_only_the_path_and_its_optimizer_slots():
    u = tiny_unet()
    opt = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.1, global_clipnorm=1.0)
    opt.build(u.trainable_variables)
    steps = {}
    for key in [(8, 16), (16, 16), (8, 16)]:  # a path, another one, the first again (cached)
        path = u.path(*key)
        if key not in steps:
            steps[key] = backend.make_loss_and_grads(path, mse)
        on = {id(v) for v in path.trainable_variables}
        assert 0 < len(on) < len(u.trainable_variables)
        before, opt_before = snapshot(u.variables), snapshot(opt.variables)
        step_before = int(ops.convert_to_numpy(opt.iterations))
        loss, grads = steps[key](*batch(*key))
        assert np.isfinite(float(ops.convert_to_numpy(loss)))
        assert len(grads) == len(path.trainable_variables)
        assert {keras.backend.standardize_dtype(g.dtype) for g in grads} == {"float32"}
        backend.apply_gradients(opt, grads, path.trainable_variables)
        assert int(ops.convert_to_numpy(opt.iterations)) == step_before + 1
        for v, old in zip(u.variables, before):
            same = np.array_equal(ops.convert_to_numpy(v.value), old)
            if id(v) in on:
                assert not same, f"{key}: {v.path} on the path did not change"
            else:
                assert same, f"{key}: {v.path} off the path changed"
        # the Adam slots of off-path variables are untouched as well
        slots_changed = sum(
            not np.array_equal(ops.convert_to_numpy(v.value), old)
            for v, old in zip(opt.variables, opt_before)
        )
        # iterations + (m, v) per path variable; nothing else moves
        assert slots_changed == 1 + 2 * len(on), (key, slots_changed, len(on))


@pytest.mark.backend
def test_compiled_step_equals_the_textbook_update():
    """The gradient matches a central difference of the loss, and one step of plain SGD
    through ``apply_gradients`` is ``w - lr * grad``."""
    u = tiny_unet(seed=2)
    path = u.path(16, 32)
    variables = path.trainable_variables
    x, t, target, weight = batch(16, 32)
    loss, grads = backend.make_loss_and_grads(path, mse)(x, t, target, weight)
    grads_np = [np.array(ops.convert_to_numpy(g), copy=True) for g in grads]
    before = snapshot(variables)

    v, g = variables[0], grads_np[0]
    idx = np.unravel_index(np.argmax(np.abs(g)), g.shape)
    eps = 1e-2

    def loss_at(delta):
        value = np.array(before[0], copy=True)
        value[idx] += delta
        v.assign(value)
        return float(ops.convert_to_numpy(mse(path([x, t], training=False), target, weight)))

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    v.assign(before[0])
    np.testing.assert_allclose(g[idx], numeric, rtol=2e-2)

    opt = keras.optimizers.SGD(learning_rate=0.5)
    opt.build(u.trainable_variables)
    backend.apply_gradients(opt, grads, variables)
    for v, old, g in zip(variables, before, grads_np):
        np.testing.assert_allclose(ops.convert_to_numpy(v.value), old - 0.5 * g, rtol=1e-6, atol=1e-7)


@pytest.mark.backend
def test_dropout_draws_fresh_masks_each_step():
    """The jax trap of docs/design.md: a SeedGenerator inside raw jax.jit repeats its noise.
    Here the seed state is threaded through stateless_call, so masks change per step."""
    u = tiny_unet(dropout=0.5, seed=3)
    path = u.path(8, 8)
    seeds = [v for v in path.non_trainable_variables]
    assert seeds, "dropout should own a seed state"
    step = backend.make_loss_and_grads(path, mse)
    args = batch(8, 8)
    seed_before = snapshot(seeds)
    losses = [float(ops.convert_to_numpy(step(*args)[0])) for _ in range(3)]
    assert len(set(losses)) == 3, losses
    if backend.BACKEND != "torch":  # torch's Keras dropout draws from torch's global generator
        assert any(not np.array_equal(ops.convert_to_numpy(v.value), old)
                   for v, old in zip(seeds, seed_before))
    # without dropout the same batch gives the same loss every time
    plain = tiny_unet(dropout=0.0, seed=3).path(8, 8)
    step = backend.make_loss_and_grads(plain, mse)
    again = [float(ops.convert_to_numpy(step(*args)[0])) for _ in range(2)]
    assert again[0] == again[1]


@pytest.mark.backend
@pytest.mark.parametrize("graph", backend.INFERENCE_GRAPHS)
def test_inference_fn_matches_the_model_and_sees_new_weights(graph):
    u = tiny_unet(seed=4)
    for key in [(8, 8), (16, 32)]:
        path = u.path(*key)
        fn = backend.inference_fn(path, graph)
        x, t, _, _ = batch(*key)
        direct = ops.convert_to_numpy(path([x, t], training=False))
        np.testing.assert_allclose(ops.convert_to_numpy(fn(x, t)), direct, rtol=1e-5, atol=1e-5)
        for v in path.trainable_variables:  # a compiled function must not freeze the weights
            v.assign(ops.convert_to_numpy(v.value) * 0.5)
        halved = ops.convert_to_numpy(path([x, t], training=False))
        assert not np.allclose(halved, direct)
        np.testing.assert_allclose(ops.convert_to_numpy(fn(x, t)), halved, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="tracing is torch's graph mode")
def test_a_trace_that_disagrees_with_the_model_is_not_used():
    """A layer whose result the tracer would freeze (a fresh host random number per call):
    the first call's check sees the replay differ from the eager run, warns, and every call
    stays eager, so the results keep changing from call to call as the model's do."""

    class Jitter(keras.layers.Layer):
        def call(self, x):
            return x + float(np.random.default_rng().random())

    x_in = keras.Input((4,))
    model = keras.Model(x_in, Jitter()(x_in))

    class TwoInputs(keras.Model):  # inference_fn calls model([x, t])
        def __init__(self):
            super().__init__()
            self.inner = model

        def call(self, inputs, training=False):
            return self.inner(inputs[0])

    fn = backend.inference_fn(TwoInputs(), "trace")
    x, t = ops.ones((2, 4)), ops.zeros((2,))
    with pytest.warns(UserWarning, match="eagerly"):
        first = ops.convert_to_numpy(fn(x, t))
    later = [ops.convert_to_numpy(fn(x, t)) for _ in range(3)]
    assert len({float(a[0, 0]) for a in [first] + later}) == 4


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="tracing is torch's graph mode")
def test_traced_training_forward_gives_the_eager_loss_and_gradients():
    """Every path: the replayed trace gives the eager loss and gradients, also after the
    weights changed (the trace reads the live parameters while autograd records)."""
    u = tiny_unet(seed=7)
    for key in u.path_keys:
        path = u.path(*key)
        eager = backend.make_loss_and_grads(path, mse, "eager")
        traced = backend.make_loss_and_grads(path, mse, "trace")
        args = batch(*key)
        for change in range(2):
            for _ in range(2):  # the first call traces, the second replays
                loss_t, grads_t = traced(*args)
            loss_e, grads_e = eager(*args)
            np.testing.assert_allclose(float(loss_t), float(loss_e), rtol=1e-6, err_msg=str(key))
            for a, b in zip(grads_t, grads_e):
                np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b),
                                           rtol=0, atol=1e-6, err_msg=str(key))
            for v, g in zip(path.trainable_variables, grads_e):  # a plain SGD step
                v.assign(v.value - 0.5 * g)


def test_the_trainer_traces_only_paths_without_dropout(tmp_path):
    from ssd_keras.config import from_dict
    from ssd_keras.train import Trainer

    def graph_of(dropout):
        cfg = from_dict({"run": {"name": f"d{dropout}", "output_dir": str(tmp_path)},
                         "process": {"image_size": 8, "levels": 2},
                         "model": {"base_channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1,
                                   "attention_resolutions": [], "dropout": dropout},
                         "train": {"batch_size": 2}})
        trainer = Trainer(cfg, progress=False)
        try:
            return trainer._step_fn.gradients.execution.train_graph
        finally:
            trainer.close()

    # train.graph = "auto" (the default) is the trace on this CPU, but never with dropout
    assert graph_of(0.0) == "trace"
    assert graph_of(0.1) == "eager"


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="tracing is torch's graph mode")
@pytest.mark.parametrize("threads, n", [(2, 5), (3, 7), (4, 3)])
def test_traced_inference_splits_the_batch_over_threads_with_the_same_result(threads, n, monkeypatch):
    """On the CPU the traced replay runs one chunk of the batch per torch thread, each on
    a single-threaded worker: the outputs equal the whole batch's on one thread (to float
    rounding: oneDNN may pick another kernel for another batch size), chunks of unequal
    size included, and the chunks really ran on the workers."""
    import threading

    import torch

    u = tiny_unet(seed=8)
    path = u.path(16, 16)
    x, t, _, _ = batch(16, 16, n=n, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            whole = graphs.traced_call(path)
            whole(x, t)  # traces
            expected = ops.convert_to_numpy(whole(x, t))  # one thread, no split
        torch.set_num_threads(threads)
        fn = backend.inference_fn(path, "trace")
        ran_on = []
        pools = graphs.CpuWorkers

        class Spy:
            def __init__(self, pool):
                self.pool = pool

            def map(self, f, *chunks):
                def recorded(*args):
                    ran_on.append((threading.current_thread().name, torch.get_num_threads(),
                                   int(args[0].shape[0])))
                    return f(*args)
                return self.pool.map(recorded, *chunks)

        monkeypatch.setattr(pools, "get", classmethod(lambda cls, k: Spy(pools._start(k))))
        first = ops.convert_to_numpy(fn(x, t))  # traces each chunk shape, on this thread
        assert ran_on == []
        again = ops.convert_to_numpy(fn(x, t))  # replays the chunks on the workers
        assert torch.get_num_threads() == threads  # the caller's thread count is kept
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again, first)  # the same chunks, replayed
    k = min(threads, n)
    assert sorted(size for _, _, size in ran_on) == sorted(len(c) for c in np.array_split(np.arange(n), k))
    assert all(name.startswith("ssd-inference") and count == 1 for name, count, _ in ran_on), ran_on


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="tracing is torch's graph mode")
def test_a_forked_child_samples_with_fresh_worker_threads():
    """The parent's inference workers are threads a forked child does not have: the child
    starts its own instead of waiting forever on the parent's."""
    import multiprocessing

    import torch

    u = tiny_unet(seed=9)
    fn = backend.inference_fn(u.path(8, 8), "trace")
    x, t, _, _ = batch(8, 8, n=4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fn(x, t)
        expected = ops.convert_to_numpy(fn(x, t))  # the parent's workers exist now
        assert graphs.CpuWorkers._pools
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()

        def child():
            queue.put(ops.convert_to_numpy(fn(x, t)))

        proc = ctx.Process(target=child)
        proc.start()
        proc.join(120)
        alive = proc.is_alive()
        if alive:
            proc.kill()
        assert not alive and proc.exitcode == 0
        np.testing.assert_array_equal(queue.get(timeout=10), expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="tracing is torch's graph mode")
def test_traced_paths_are_kept_by_the_execution_across_sampling_calls():
    u = tiny_unet(seed=5)
    path = u.path(8, 8)
    execution = backend.Execution(sample_graph="trace")
    assert execution.forward(path) is execution.forward(path)
    assert execution.forward(path) is not execution.forward(u.path(16, 16))


@pytest.mark.backend
def test_ema_update_is_the_moving_average_and_a_copy_at_rate_zero():
    u = tiny_unet(seed=6)
    variables = u.path(8, 8).trainable_variables
    weights = snapshot(variables)
    rng = np.random.default_rng(0)
    ema0 = [rng.normal(size=w.shape).astype("float32") for w in weights]
    ema = backend.ema_update([ops.convert_to_tensor(e) for e in ema0], variables, 0.9)
    for e, e0, w in zip(ema, ema0, weights):
        np.testing.assert_allclose(ops.convert_to_numpy(e), 0.9 * e0 + 0.1 * w, rtol=1e-6, atol=1e-7)
    copied = backend.ema_update([ops.convert_to_tensor(e) for e in ema0], variables, 0.0)
    for e, w in zip(copied, weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(e), w)


#: the modules allowed to import a framework, and why
FRAMEWORK_MODULES = {
    "backend": "everything that depends on the Keras backend (a package)",
    "distributed.py": "the data-parallel engines: torch.distributed, jax's device mesh",
    "inception.py": "torch-fidelity's Inception, a torch model whatever the Keras backend",
}


def test_only_backend_py_imports_a_framework():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|jax|jaxlib|tensorflow)\b", re.M)
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in FRAMEWORK_MODULES and p.relative_to(PACKAGE).parts[0] not in FRAMEWORK_MODULES
        and pattern.search(p.read_text())
    ]
    assert offenders == []


# ----------------------------------------------------------------------------- across backends

PIPELINE = {
    "run": {"name": "cross", "seed": 5},
    "data": {"source": "folder", "random_flip": False, "num_workers": 1},
    "process": {"image_size": 16, "levels": 3, "timesteps": 60},
    "model": {"base_channels": 32, "channel_mult": [1, 1, 1], "num_res_blocks": 1,
              "attention_resolutions": [4], "num_heads": 1, "dropout": 0.0},
    "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
    "ema": {"rate": 0.9},
    "train": {"batch_size": 4, "steps": 3, "log_every": 1, "checkpoint_every": 3,
              "sample_every": 0, "keep_checkpoints": 3},
}

# Runs in a fresh interpreter under KERAS_BACKEND=<backend>: load the run's checkpoint,
# record the restored optimizer state, evaluate every path of the model and of its EMA on
# fixed inputs, sample with both noise samplers, then resume training for two steps and
# record the loss and gradients of the first (weights after AdamW steps are not compared:
# tests/_tolerance.py).
PROBE = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import numpy as np
    import keras
    from keras import ops
    sys.path.insert(0, sys.argv[4])
    from _dist_worker import record_first_step
    from ssd_keras.config import from_dict
    from ssd_keras.sample import sample_images
    from ssd_keras.train import Trainer

    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    work = out.parent / ("run_" + keras.backend.backend())
    shutil.copytree(run_dir, work / run_dir.name)
    cfg_dict = json.loads(sys.argv[3])
    cfg_dict["run"]["output_dir"] = str(work)
    cfg = from_dict(cfg_dict, source="probe")
    trainer = Trainer(cfg, progress=False)
    assert trainer.step == 3, trainer.step
    result = {"backend": np.array(keras.backend.backend())}
    for i, v in enumerate(trainer.optimizer.variables):
        result[f"o{i:04d}"] = ops.convert_to_numpy(v.value)
    rng = np.random.default_rng(0)
    ema = trainer.ema_model()
    for r_in, r_out in trainer.model.path_keys:
        x = rng.normal(size=(2, r_in, r_in, 3)).astype("float32")
        t = np.array([3.0, 41.0], "float32")
        result[f"model_{r_in}_{r_out}"] = ops.convert_to_numpy(trainer.model.path(r_in, r_out)([x, t]))
        result[f"ema_{r_in}_{r_out}"] = ops.convert_to_numpy(ema.path(r_in, r_out)([x, t]))
    for noise in ("exact", "lanczos"):
        s = sample_images(ema, trainer.process, trainer.objective, num_images=2, steps=6,
                          noise=noise, lanczos_iterations=10, seed=11, batch_size=2,
                          progress=False)
        result[f"sample_{noise}"] = s.images
    first_step = record_first_step(trainer)  # filled by the first step
    result["loss"] = np.float64(trainer.train_step()[0])
    trainer.train_step()
    result.update(first_step)
    result["iterations"] = ops.convert_to_numpy(trainer.optimizer.iterations)
    np.savez(out, **result)
    """
)


def _missing_backends():
    return [b for b in ("jax", "tensorflow") if importlib.util.find_spec(b) is None]


def _run(code_args, backend_name, timeout=900):
    env = dict(os.environ, KERAS_BACKEND=backend_name, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", *code_args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{backend_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_checkpoint_moves_between_backends(tmp_path):
    """Train under torch, then load the checkpoint under torch, jax and tensorflow: the
    optimizer state restored bit for bit, and to float32 rounding (tests/_tolerance.py)
    the same path outputs, the same samples for the same seed (both noise samplers), and
    the same loss and gradients in the first step of resumed training."""
    missing = _missing_backends()
    if missing:
        message = f"{', '.join(missing)} not installed (pip install -e '.[jax,tensorflow]')"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs both: a skip there would hide a regression
        pytest.skip(message)
    from PIL import Image

    (tmp_path / "data").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "data" / f"{i}.png")
    cfg = json.loads(json.dumps(PIPELINE))
    cfg["run"]["output_dir"] = str(tmp_path / "runs")
    cfg["data"]["path"] = str(tmp_path / "data")
    train = textwrap.dedent(
        """
        import json, sys
        from ssd_keras.config import from_dict
        from ssd_keras.train import Trainer
        Trainer(from_dict(json.loads(sys.argv[1]), source="cross"), progress=False).fit()
        """
    )
    _run([train, json.dumps(cfg)], "torch")
    run_dir = tmp_path / "runs" / "cross"
    cfg["train"]["steps"] = 5  # the probes resume for two more steps
    results = {}
    for name in BACKENDS:
        out = tmp_path / name / "probe.npz"
        out.parent.mkdir()
        _run([PROBE, str(run_dir), str(out), json.dumps(cfg), str(Path(__file__).parent)], name)
        with np.load(out) as data:
            results[name] = {k: data[k] for k in data.files}
        assert str(results[name]["backend"]) == name
    ref = results["torch"]
    assert int(ref["iterations"]) == 5
    # what float32 rounding explains (tests/_tolerance.py), from the network's own shape
    from ssd_keras.builders import build_model
    from ssd_keras.config import from_dict

    model = build_model(from_dict(cfg, source="cross"), channels=3)
    batch, size = cfg["train"]["batch_size"], cfg["process"]["image_size"]
    outputs = network_tolerance(model.trainable_variables)
    samples = network_tolerance(model.trainable_variables, calls=7)  # 6 respaced steps, the last call
    gradients = network_tolerance(model.trainable_variables, terms=batch * size * size)
    grad_names = sorted(k for k in ref if re.fullmatch(r"g\d+", k))
    assert grad_names
    grad_scale = rms([ref[k] for k in grad_names])
    for name in ("jax", "tensorflow"):
        got = results[name]
        assert set(got) == set(ref)
        worst = {}
        for k in ref:
            if k not in ("backend", "iterations"):
                group = re.sub(r"\d+$", "", k.split("_")[0])
                diff = float(np.max(np.abs(got[k] - ref[k])))
                worst[group] = max(worst.get(group, 0.0), diff)
        print(f"{name} vs torch, max |difference|: " + ", ".join(f"{g} {d:.1e}" for g, d in worst.items()))
        for k in ref:
            what = f"{name} vs torch: {k}"
            if re.fullmatch(r"o\d+", k) or k == "iterations":  # restored bit for bit
                np.testing.assert_array_equal(got[k], ref[k], err_msg=what)
            elif k.startswith(("model_", "ema_")):
                assert_rounding_close(got[k], ref[k], tol=outputs, err_msg=what)
            elif k.startswith("sample_"):
                assert_rounding_close(got[k], ref[k], tol=samples, err_msg=what)
            elif k in grad_names:
                assert_rounding_close(got[k], ref[k], tol=gradients, scale=grad_scale, err_msg=what)
            elif k == "loss":
                np.testing.assert_allclose(got[k], ref[k], rtol=gradients, err_msg=what)
