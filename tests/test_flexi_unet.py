"""Flexi-UNet (docs/architecture.md): paths, shared variables, zero skips, serialization."""

import json
import math

import keras
import numpy as np
import pytest
from keras import ops

from _tolerance import assert_rounding_close, network_tolerance
from ssd_keras.nn import FlexiUNet, PathError
from ssd_keras.nn import layers as L

# backend-sensitive: CI reruns this module under jax and tensorflow
pytestmark = pytest.mark.backend

TORCH = keras.backend.backend() == "torch"

# Tiny 3-level UNet (32, 16, 8) with SSD levels [8, 16, 32]; attention at 16 and 8.
TINY = dict(
    base_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(16, 8),
    num_heads=2,
)


def randomize(unet, seed=0):
    """Non-trivial weights (ADM zero-initializes the last convs, which would make every
    output zero and every gradient upstream of them zero)."""
    rng = np.random.default_rng(seed)
    for v in unet.variables:
        shape = tuple(v.shape)
        if len(shape) >= 2:
            value = rng.normal(0.0, 1.0 / math.sqrt(math.prod(shape[:-1])), shape)
        elif v.name == "gamma":
            value = 1.0 + 0.1 * rng.normal(size=shape)
        else:
            value = 0.1 * rng.normal(size=shape)
        v.assign(value.astype("float32"))


def inputs(r, batch=2, seed=1, channels=3):
    rng = np.random.default_rng(seed + r)
    x = rng.normal(size=(batch, r, r, channels)).astype("float32")
    t = np.linspace(0, 999, batch).astype("float32")
    return x, t


def run(model, x, t):
    return ops.convert_to_numpy(model([x, t], training=False))


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(0)
    u = FlexiUNet(32, [8, 16, 32], **TINY)
    randomize(u)
    return u


@pytest.fixture(scope="module")
def unet_zero_skip_top():
    keras.utils.set_random_seed(0)
    u = FlexiUNet(32, [8, 16, 32], full_res_change_via_upsample=False, **TINY)
    randomize(u)
    return u


def layer_names(model):
    return {layer.name for layer in model.layers}


# ---------------------------------------------------------------------------- config


def test_path_keys_fixed_order(unet):
    assert unet.path_keys == [(8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(resolutions=[12, 32]), "resolution 12"),
        (dict(resolutions=[4, 8, 16, 32]), "resolution 4"),  # below the UNet's levels
        (dict(resolutions=[8, 32]), "8 is followed by 32"),
        (dict(resolutions=[8, 16]), "image_size=32"),
        (dict(resolutions=[32], base_channels=40), "base_channels=40"),
        (dict(resolutions=[32], attention_resolutions=(12,)), "attention resolution 12"),
        (dict(resolutions=[32], num_heads=3), "num_heads=3"),
    ],
)
def test_invalid_configs_raise_clear_errors(kwargs, match):
    cfg = {**TINY, **kwargs}
    resolutions = cfg.pop("resolutions")
    with pytest.raises(ValueError, match=match):
        FlexiUNet(32, resolutions, **cfg)


def test_invalid_path_lists_valid_pairs(unet):
    with pytest.raises(KeyError):
        unet.path(8, 32)
    with pytest.raises(ValueError, match=r"\(8, 16\)") as info:
        unet.path(16, 8)
    assert isinstance(info.value, PathError)


# ---------------------------------------------------------------------------- sharing


def test_all_paths_share_the_same_variable_objects(unet):
    union = {id(v): v for v in unet.variables}
    assert len(union) == len(unet.variables)
    seen = set()
    for key in unet.path_keys:
        pvars = unet.path_variables(*key)
        assert pvars, key
        for v in pvars:
            assert id(v) in union, f"{key}: {v.path} is not a variable of the union model"
        seen |= {id(v) for v in pvars}
    assert seen == set(union), "some union variables belong to no path"
    # The middle block's variables are literally the same objects in every path.
    middle = [v for v in unet.variables if v.path.startswith("middle_block_")]
    assert middle
    for key in unet.path_keys:
        ids = {id(v) for v in unet.path(*key).variables}
        assert all(id(v) in ids for v in middle), key


def test_output_shapes_per_path(unet):
    for r_in, r_out in unet.path_keys:
        x, t = inputs(r_in, batch=3)
        y = unet.path(r_in, r_out)([x, t])
        assert tuple(y.shape) == (3, r_out, r_out, 3), (r_in, r_out)
        assert keras.backend.standardize_dtype(y.dtype) == "float32"
        assert np.all(np.isfinite(ops.convert_to_numpy(y)))


def expected_resblocks(u, k_in, k_out):
    """ADM names of the ResBlocks on path level k_in -> k_out (built from ADM numbering)."""
    n, nrb = len(u.channel_mult), u.num_res_blocks
    names, idx = set(), 1
    for k in range(n):
        for _ in range(nrb):
            if k >= k_in:
                names.add(f"input_blocks_{idx}_0")
            idx += 1
        idx += k != n - 1  # Downsample
    names |= {"middle_block_0", "middle_block_2"}
    idx = 0
    for k in reversed(range(n)):
        for i in range(nrb + 1):
            # the official decoder extent: the output level's last block does not run
            if k > k_out or (k == k_out and i < nrb):
                names.add(f"output_blocks_{idx}_0")
            idx += 1
    return names


def test_only_blocks_on_the_path_are_in_its_graph(unet_zero_skip_top):
    u = unet_zero_skip_top
    level = {32: 0, 16: 1, 8: 2}
    for r_in, r_out in u.path_keys:
        model = u.path(r_in, r_out)
        blocks = {l.name for l in model.layers if isinstance(l, L.ResBlock)}
        assert blocks == expected_resblocks(u, level[r_in], level[r_out]), (r_in, r_out)
    names = layer_names(u.path(8, 8))
    # nothing of the 32x32 or 16x16 levels: encoder, decoder, Downsample/Upsample, adapters
    assert not names & {"input_blocks_1_0", "input_blocks_2_0", "input_blocks_3_0"}
    assert not any(n.startswith("output_blocks_") and int(n.split("_")[2]) >= 2 for n in names)
    # one adapter per channel count: 64 channels in at 8x8, 64 out at 16x16 and 8x8
    assert "adapters_in_to_64" in names and "adapters_out_from_64" in names
    assert not any(n.startswith("adapters_") for n in layer_names(u.path(32, 32)))
    # the change path (8, 16) adds the 8x8 level's last block with its Upsample and the
    # first block of the 16x16 level
    extra = layer_names(u.path(8, 16)) - names
    assert {"output_blocks_1_0", "output_blocks_1_1", "output_blocks_1_2",
            "output_blocks_2_0", "output_blocks_2_1"} <= extra
    assert not {"output_blocks_3_0"} & extra
    assert "output_blocks_1_2" in extra  # the 8 -> 16 Upsample (last block of level 8)
    assert "output_blocks_3_2" not in extra  # the 16 -> 32 Upsample
    assert not any(n.startswith("input_blocks_") for n in extra)


# ---------------------------------------------------------------------------- training


def torch_grads(model, variables, x, t, target):
    """Gradients of an MSE loss w.r.t. ``variables`` with torch autograd."""
    for v in variables:
        v.value.grad = None
    out = model([x, t], training=True)
    loss = ops.mean(ops.square(out - ops.convert_to_tensor(target)))
    loss.backward()
    return [v.value.grad for v in variables]


@pytest.mark.backend
@pytest.mark.skipif(not TORCH, reason="the gradient helper uses torch autograd")
def test_train_step_leaves_off_path_variables_bit_identical(unet_zero_skip_top):
    u = unet_zero_skip_top
    randomize(u, seed=3)
    key = (8, 16)
    path = u.path(*key)
    pvars = u.path_variables(*key)
    on = {id(v) for v in pvars}
    assert 0 < len(on) < len(u.trainable_variables)
    opt = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.1)
    opt.build(u.trainable_variables)
    before = {id(v): ops.convert_to_numpy(v).copy() for v in u.variables}
    x, t = inputs(8, batch=2)
    target = np.random.default_rng(5).normal(size=(2, 16, 16, 3)).astype("float32")
    grads = torch_grads(path, pvars, x, t, target)
    assert all(g is not None for g in grads)
    opt.apply(grads, pvars)
    changed_on, unchanged_off = 0, 0
    for v in u.variables:
        now = ops.convert_to_numpy(v)
        if id(v) in on:
            assert not np.array_equal(now, before[id(v)]), f"{v.path} on the path did not change"
            changed_on += 1
        else:
            assert np.array_equal(now, before[id(v)]), f"{v.path} off the path changed"
            unchanged_off += 1
    assert changed_on == len(pvars) and unchanged_off > 0
    randomize(u)  # leave the module fixture as other tests expect it


# ---------------------------------------------------------------------------- ADM


def official_reference_forward(u, x, t):
    """guided-diffusion's UNetModel.forward with the official SSD decoder extent (the last
    decoder block does not run, so the stem output is no skip), looking the layers up by
    their ADM names."""
    layers = {l.name: l for l in u.model.layers}

    def run_block(prefix, h, emb):
        j = 0
        while f"{prefix}_{j}" in layers:
            layer = layers[f"{prefix}_{j}"]
            h = layer(h, emb) if isinstance(layer, L.ResBlock) else layer(h)
            j += 1
        return h

    emb = layers["time_embed"](ops.convert_to_tensor(t))
    hs, h, i = [], ops.convert_to_tensor(x), 0
    while f"input_blocks_{i}_0" in layers:
        h = run_block(f"input_blocks_{i}", h, emb)
        hs.append(h)
        i += 1
    h = run_block("middle_block", h, emb)
    i = 0
    while f"output_blocks_{i}_0" in layers:
        h = ops.concatenate([h, hs.pop()], axis=-1)
        h = run_block(f"output_blocks_{i}", h, emb)
        i += 1
    assert len(hs) == 1  # the stem output
    return ops.convert_to_numpy(layers["out"](h))


def test_single_level_model_is_an_adm_unet_with_the_official_decoder_extent():
    keras.utils.set_random_seed(1)
    cfg = dict(TINY, num_res_blocks=2)
    u = FlexiUNet(32, [32], **cfg)
    randomize(u, seed=7)
    assert u.path_keys == [(32, 32)]
    n, nrb = 3, 2
    model = u.path(32, 32)
    kinds = [type(l) for l in model.layers]
    # ADM's blocks but the top level's last decoder block (attention is at 16 and 8 only)
    assert kinds.count(L.ResBlock) == n * nrb + 2 + n * (nrb + 1) - 1
    # attention after every ResBlock at 16 and 8, plus the middle block's
    assert kinds.count(L.AttentionBlock) == 2 * nrb + 2 * (nrb + 1) + 1
    assert kinds.count(L.Downsample) == n - 1 and kinds.count(L.Upsample) == n - 1
    assert L.ZeroSkip not in kinds and L.ResizeInput not in kinds
    assert not any(l.name.startswith("adapters_") for l in model.layers)
    assert len(model.variables) == len(u.variables)
    x, t = inputs(32, batch=2)
    assert_rounding_close(run(model, x, t), official_reference_forward(u, x, t),
                          tol=network_tolerance(model.trainable_variables))


def test_attention_block_matches_adm_legacy_reference():
    rng = np.random.default_rng(0)
    block = L.AttentionBlock(num_heads=2)
    x = rng.normal(size=(2, 4, 4, 64)).astype("float32")
    block(x)
    for v in block.variables:
        v.assign(rng.normal(0, 0.2, tuple(v.shape)).astype("float32"))
    got = ops.convert_to_numpy(block(x))
    # numpy reference with ADM's legacy qkv layout [head][q|k|v][ch]
    g, b = (ops.convert_to_numpy(w) for w in (block.norm.gamma, block.norm.beta))
    xr = x.reshape(2, 16, 32, 2)
    mu, var = xr.mean(axis=(1, 3), keepdims=True), xr.var(axis=(1, 3), keepdims=True)
    h = ((xr - mu) / np.sqrt(var + 1e-5)).reshape(2, 16, 64) * g + b
    wq, bq = (ops.convert_to_numpy(w) for w in (block.qkv.kernel, block.qkv.bias))
    qkv = (h @ wq + bq).reshape(2, 16, 2, 3, 32)
    q, k, v = (np.transpose(qkv[:, :, :, j], (0, 2, 1, 3)) for j in range(3))
    s = 32**-0.25
    w = np.einsum("bhtc,bhsc->bhts", q * s, k * s)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.transpose(np.einsum("bhts,bhsc->bhtc", w, v), (0, 2, 1, 3)).reshape(2, 16, 64)
    wp, bp = (ops.convert_to_numpy(w_) for w_ in (block.proj_out.kernel, block.proj_out.bias))
    ref = x + (a @ wp + bp).reshape(2, 4, 4, 64)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- skips


def concat_skip_sources(model):
    """For each decoder concat of ``model``: (concat name, layer producing the skip)."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Concatenate):
            for node in layer._inbound_nodes:
                skip = node.arguments.keras_tensors[1]
                out.append((layer.name, skip._keras_history.operation))
    return out


def test_zero_skips_are_zeros_on_change_paths(unet_zero_skip_top):
    u = unet_zero_skip_top
    nrb = u.num_res_blocks
    for r_in, r_out in u.path_keys:
        probe, info = u.skip_probe(r_in, r_out)
        x, t = inputs(r_in)
        outs = probe([x, t])
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        skips = [ops.convert_to_numpy(s) for s in outs]
        zero_flags = [z for _, z in info]
        assert len(skips) == len(info)
        assert sum(zero_flags) == (0 if r_in == r_out else nrb + 1), (r_in, r_out)
        zero_sizes = []
        for (name, zero), s in zip(info, skips):
            assert s.shape[1] == s.shape[2]
            if zero:
                assert np.all(s == 0), (r_in, r_out, name)
                zero_sizes.append(s.shape[1])
            else:
                assert np.abs(s).max() > 0, (r_in, r_out, name)
        if r_in != r_out:  # the entry level's last block (before its Upsample), then r_out
            assert zero_sizes == [r_in] + [r_out] * nrb, (r_in, r_out)
        # and the graph feeds exactly those zero tensors into the decoder concats
        sources = concat_skip_sources(u.path(r_in, r_out))
        n_zero = sum(isinstance(op, L.ZeroSkip) for _, op in sources)
        assert n_zero == sum(zero_flags)


def test_full_res_change_via_upsample_switch(unet, unet_zero_skip_top):
    # True (official): (16, 32) = bilinear upsample + plain (32, 32) path
    up = unet.path(16, 32)
    kinds = [type(l) for l in up.layers]
    assert L.ResizeInput in kinds and L.ZeroSkip not in kinds
    assert {id(v) for v in up.variables} == {id(v) for v in unet.path(32, 32).variables}
    x, t = inputs(16)
    x_up = ops.convert_to_numpy(
        ops.image.resize(x, (32, 32), interpolation="bilinear", antialias=False)
    )
    assert_rounding_close(run(up, x, t), run(unet.path(32, 32), x_up, t), tol=network_tolerance(up.trainable_variables))
    # the other change path is unaffected by the switch
    assert L.ZeroSkip in [type(l) for l in unet.path(8, 16).layers]
    # False: (16, 32) uses zero skips at 32 and never runs the 32x32 encoder
    zs = unet_zero_skip_top.path(16, 32)
    kinds = [type(l) for l in zs.layers]
    assert L.ResizeInput not in kinds
    assert kinds.count(L.ZeroSkip) == unet_zero_skip_top.num_res_blocks + 1
    assert "input_blocks_1_0" not in layer_names(zs)
    assert len(zs.variables) < len(unet_zero_skip_top.path(32, 32).variables)


# ---------------------------------------------------------------------------- saving


def test_save_load_round_trip_and_from_config(unet, tmp_path):
    cfg = unet.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    path = str(tmp_path / "flexi.weights.h5")
    unet.save_weights(path)
    keras.utils.set_random_seed(123)
    other = FlexiUNet.from_config(cfg)
    assert other.get_config() == cfg
    x, t = inputs(32)
    assert not np.allclose(run(other.path(32, 32), x, t), run(unet.path(32, 32), x, t))
    other.load_weights(path)
    for r_in, r_out in unet.path_keys:
        x, t = inputs(r_in)
        np.testing.assert_array_equal(
            run(other.path(r_in, r_out), x, t), run(unet.path(r_in, r_out), x, t)
        )


def test_mixed_bfloat16_forward(unet, tmp_path):
    mixed = FlexiUNet(32, [8, 16, 32], dtype="mixed_bfloat16", **TINY)
    assert mixed.get_config()["dtype"] == "mixed_bfloat16"
    assert {keras.backend.standardize_dtype(v.dtype) for v in mixed.variables} == {"float32"}
    path = str(tmp_path / "w.weights.h5")
    unet.save_weights(path)
    mixed.load_weights(path)
    for key in [(8, 16), (32, 32)]:
        x, t = inputs(key[0])
        y = mixed.path(*key)([x, t])
        assert keras.backend.standardize_dtype(y.dtype) == "float32"
        y, ref = ops.convert_to_numpy(y), run(unet.path(*key), x, t)
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert rel < 0.05, (key, rel)  # bfloat16 compute, float32 GroupNorm
