"""The execution layer (ssd_keras.backend.Execution): modes and "auto", caches kept in the
execution (nothing attached to torch or Keras objects), no environment changed on
import, and torch.compile / mixed precision checked against eager on the CPU."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from ssd_keras import backend
from ssd_keras.backend import AUTO, GRAPHS, Execution, resolve_graph
from ssd_keras.backend.execution import COMPILE_MODES
from ssd_keras.nn import FlexiUNet

from test_backends import batch, mse, snapshot, tiny_unet

TORCH = keras.backend.backend() == "torch"
EPS32 = float(np.finfo(np.float32).eps)


def test_graph_values_are_the_config_values():
    from typing import get_args

    from ssd_keras.config import Graph

    assert set(get_args(Graph)) == set(GRAPHS) == {"auto", "eager", "trace", "compile"}


@pytest.mark.skipif(not TORCH, reason="the modes are torch's")
def test_auto_resolves_per_device_and_a_trace_never_freezes_dropout():
    assert resolve_graph("auto", "cpu", "train") == AUTO["cpu"]["train"] == "trace"
    assert resolve_graph("auto", "cpu", "sample") == AUTO["cpu"]["sample"] == "trace"
    assert resolve_graph("auto", "cuda", "train") == "compile"
    assert resolve_graph("auto", "cuda", "sample") == "compile"
    assert COMPILE_MODES["cuda"]["sample"] == "reduce-overhead"  # CUDA graphs
    assert resolve_graph("auto", "mps", "train") == "eager"  # unmeasured devices run eagerly
    for graph in ("eager", "trace", "compile"):
        assert resolve_graph(graph, "cpu", "sample") == graph
        assert resolve_graph(graph, "cuda", "train") == graph
    # a trace would freeze the dropout masks of training: eager instead (compile keeps them)
    assert resolve_graph("auto", "cpu", "train", dropout=0.1) == "eager"
    assert resolve_graph("trace", "cpu", "train", dropout=0.1) == "eager"
    assert resolve_graph("trace", "cpu", "sample", dropout=0.1) == "trace"
    assert resolve_graph("compile", "cpu", "train", dropout=0.1) == "compile"
    with pytest.raises(ValueError, match="unknown graph mode 'jit'"):
        resolve_graph("jit", "cpu", "train")


@pytest.mark.backend
def test_the_execution_keeps_its_functions_and_attaches_nothing():
    """Every cache lives in the execution: the model, its paths, their variables and
    tensors, and the optimizer carry no new attribute after training steps and sampling
    calls, and a second request returns the function built by the first."""
    u = tiny_unet(seed=11)
    path = u.path(8, 8)
    opt = keras.optimizers.AdamW(learning_rate=1e-3)
    opt.build(u.trainable_variables)
    execution = Execution(train_graph="auto", sample_graph="auto")
    objects = [u, path, opt] + list(u.variables)
    if TORCH:
        objects += [v.value for v in u.variables]

    def attributes():
        return [sorted(vars(o)) for o in objects]

    # what Keras itself sets on a first call and a first update, before the snapshot
    x, t, target, weight = batch(8, 8)
    path([x, t], training=False)
    opt.apply([ops.zeros_like(v.value) for v in path.trainable_variables], path.trainable_variables)
    before = attributes()
    fn = execution.loss_and_grads(path, mse)
    assert execution.loss_and_grads(path, mse) is fn
    for _ in range(2):
        loss, grads = fn(x, t, target, weight)
        execution.apply_gradients(opt, grads, path.trainable_variables)
    forward = execution.forward(path)
    assert execution.forward(path) is forward
    for _ in range(2):
        forward(x, t)
    assert attributes() == before


def test_importing_the_package_changes_no_environment_but_the_command_sets_its_own():
    code = (
        "import os, json\n"
        "before = dict(os.environ)\n"
        "import ssd_keras, ssd_keras.backend, ssd_keras.train, ssd_keras.sample\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "from ssd_keras.cli import main\n"
        "main(['--version'])\n"
        "print(json.dumps([changed, os.environ.get('OMP_WAIT_POLICY')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["KERAS_BACKEND"] = keras.backend.backend()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(__file__)).stdout
    import json

    changed, policy = json.loads(out.strip().splitlines()[-1])
    assert changed == []
    assert policy == "PASSIVE"  # the entry point's setting


# ----------------------------------------------------------------------------- compile, CPU
# Inductor generates its own kernels: it fuses elementwise ops and may reorder sums, so
# its results differ from eager ones by float32 rounding. A path here chains ~20 layers,
# each with reductions of up to a few thousand terms (convolutions, group norms,
# attention); allowing 2**10 roundings of the output's magnitude (eps * 1024 * scale,
# about 1.2e-4 relative) covers that growth with a wide margin, and is still far below
# any real error (a wrong weight or layout changes outputs at order 1).
GROWTH = 1024


def _close(got, want, what, scale=None):
    got, want = ops.convert_to_numpy(got), ops.convert_to_numpy(want)
    scale = max(float(np.abs(want).max()) if scale is None else scale, 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= GROWTH * EPS32 * scale, f"{what}: error {err} at scale {scale}"


def smallest_unet(seed):
    """A 2-level Flexi-UNet small enough to compile in seconds, attention included."""
    keras.utils.set_random_seed(seed)
    u = FlexiUNet(16, [8, 16], base_channels=32, channel_mult=(1, 1), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=1, full_res_change_via_upsample=False)
    rng = np.random.default_rng(seed)
    for v in u.trainable_variables:  # non-zero last convs, so every gradient is non-zero
        shape = tuple(v.shape)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.1
        v.assign(((1.0 if v.name == "gamma" else 0.0) + scale * rng.normal(size=shape)).astype("float32"))
    return u


@pytest.mark.slow
@pytest.mark.skipif(not TORCH, reason="torch.compile")
def test_compiled_path_matches_eager_outputs_gradients_and_training_steps():
    """``graph = "compile"`` on the smallest path (inductor on the CPU): the inference
    output, the loss and every gradient equal eager ones to float rounding, and three
    optimizer steps through the execution give the eager weights to float rounding (SGD:
    its update is linear in the gradient, so rounding stays rounding; Adam's first step is
    the sign of each gradient, which rounding may flip where a gradient is ~0)."""
    key = (8, 8)
    results = {}
    for mode in ("eager", "compile"):
        u = smallest_unet(seed=12)
        path = u.path(*key)
        execution = Execution(train_graph=mode, sample_graph=mode)
        x, t, target, weight = batch(*key, n=3, seed=4)
        out = execution.forward(path)(x, t)
        loss, grads = execution.loss_and_grads(path, mse)(x, t, target, weight)
        grads = [ops.convert_to_numpy(g) for g in grads]
        opt = keras.optimizers.SGD(learning_rate=0.1)
        opt.build(u.trainable_variables)
        fn = execution.loss_and_grads(path, mse)
        for step in range(3):
            xs, ts, targets, weights = batch(*key, n=3, seed=20 + step)
            _, g = fn(xs, ts, targets, weights)
            execution.apply_gradients(opt, g, path.trainable_variables)
        # the weights changed: a compiled forward reads them live
        after = execution.forward(path)(x, t)
        results[mode] = (out, float(loss), grads, snapshot(path.trainable_variables), after)
    (out_e, loss_e, grads_e, w_e, after_e), (out_c, loss_c, grads_c, w_c, after_c) = (
        results["eager"], results["compile"])
    _close(out_c, out_e, "inference output")
    assert abs(loss_c - loss_e) <= GROWTH * EPS32 * abs(loss_e)
    # the rounding of a backward pass scales with the gradients flowing through it, not with
    # a result that cancels: a bias feeding a group norm has a gradient of exactly zero in
    # exact arithmetic (the norm removes it), ~1e-9 in float32. So every gradient is held
    # to the largest gradient's scale.
    scale = max(float(np.abs(g).max()) for g in grads_e)
    for i, (a, b) in enumerate(zip(grads_c, grads_e)):
        _close(a, b, f"gradient {i}", scale=scale)
    for i, (a, b) in enumerate(zip(w_c, w_e)):
        _close(a, b, f"weight {i} after 3 steps")
    _close(after_c, after_e, "inference output after the steps")


# ----------------------------------------------------------------------------- mixed bf16
BF16_EPS = 2.0 ** -8  # bfloat16's machine epsilon (8 significand bits)


def _trainer(tmp_path, precision, graph):
    from ssd_keras.config import from_dict
    from ssd_keras.train import Trainer

    cfg = from_dict({"run": {"name": f"{precision}-{graph}", "output_dir": str(tmp_path), "seed": 3},
                     "process": {"image_size": 8, "levels": 2},
                     "model": {"base_channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1,
                               "attention_resolutions": [4], "dropout": 0.0},
                     "optimizer": {"lr": 1e-3},
                     "ema": {"rate": 0.5},
                     "train": {"batch_size": 4, "precision": precision, "graph": graph}})
    return Trainer(cfg, progress=False)


@pytest.mark.skipif(not TORCH, reason="the trace is torch's")
def test_mixed_bfloat16_trains_with_float32_state_and_tracks_float32(tmp_path):
    """``train.precision = "mixed_bfloat16"`` (Keras mixed precision: bf16 compute,
    float32 variables): four steps on the same batches and noise give the float32 run's
    losses to a few bf16 roundings; the weights, the optimizer's slots and the EMA stay
    float32; and the traced training forward (``auto`` on the CPU) gives the eager
    bf16 losses (the trace replays the same ops)."""
    runs = {}
    for precision, graph in (("float32", "auto"), ("mixed_bfloat16", "auto"),
                             ("mixed_bfloat16", "eager")):
        trainer = _trainer(tmp_path, precision, graph)
        try:
            batch = next(trainer.data)
            losses = [trainer.train_step(batch)[0] for _ in range(4)]
            dtypes = {str(v.dtype) for v in trainer.model.trainable_variables}
            dtypes |= {str(v.dtype) for v in trainer.optimizer.variables if v.name != "iteration"}
            dtypes |= {keras.backend.standardize_dtype(e.dtype) for e in trainer.ema}
            runs[precision, graph] = (trainer.execution.train_graph, losses, dtypes)
        finally:
            trainer.close()
    assert runs["float32", "auto"][0] == runs["mixed_bfloat16", "auto"][0] == "trace"
    f32, bf16 = runs["float32", "auto"][1], runs["mixed_bfloat16", "auto"][1]
    np.testing.assert_allclose(bf16, f32, rtol=4 * BF16_EPS)
    assert bf16 != f32  # it really computed in bf16
    np.testing.assert_allclose(runs["mixed_bfloat16", "eager"][1], bf16, rtol=1e-5)
    for key, (_, _, dtypes) in runs.items():
        assert dtypes == {"float32"}, (key, dtypes)
