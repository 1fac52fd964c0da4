"""FLOPs and parameter counts per Flexi-UNet path (ssd_keras.nn.flops)."""

import keras
import numpy as np
import pytest

from ssd_keras.nn import FlexiUNet
from ssd_keras.nn.flops import (
    cost_table,
    format_cost_table,
    graph_flops,
    path_cost,
    run_flops,
)

TINY = dict(
    base_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(16, 8),
    num_heads=2,
)


@pytest.fixture(scope="module")
def unet():
    return FlexiUNet(32, [8, 16, 32], full_res_change_via_upsample=False, **TINY)


def test_conv_and_dense_flops_known_values():
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(16, 3, padding="same")(x)  # 8*8*16 outputs x 27 MACs
    h = keras.layers.Conv2D(4, 3, strides=2, padding="valid")(h)  # 3*3*4 outputs x 144
    y = keras.layers.Dense(10)(h)  # 3*3 positions x 4 x 10
    y = keras.layers.Activation("relu")(y)  # not counted
    model = keras.Model(x, y)
    assert graph_flops(model) == 2 * (8 * 8 * 16 * 27 + 3 * 3 * 4 * 144 + 3 * 3 * 4 * 10)


def test_shared_layer_counted_per_call():
    conv = keras.layers.Conv2D(8, 1)
    a, b = keras.Input((4, 4, 8)), keras.Input((2, 2, 8))
    both = keras.Model([a, b], [conv(conv(a)), conv(b)])
    assert graph_flops(both) == 2 * 64 * (16 + 16 + 4)
    assert graph_flops(keras.Model(b, conv(b))) == 2 * 64 * 4


@pytest.mark.backend
@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch FlopCounterMode")
def test_path_flops_match_torch_flop_counter(unet):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
        b, h, t, d = q
        return 2 * 2 * b * h * t * k[-2] * d  # q k^T and attn v

    # torch's counter has no formula for the CPU flash kernel of scaled_dot_product_attention
    mapping = {
        getattr(torch.ops.aten, name): sdpa_flops
        for name in ("_scaled_dot_product_flash_attention_for_cpu",)
        if hasattr(torch.ops.aten, name)
    }
    for key in unet.path_keys:
        x = np.zeros((1, key[0], key[0], 3), "float32")
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            unet.path(*key)([x, np.zeros((1,), "float32")])
        assert path_cost(unet, *key)["flops"] == counter.get_total_flops(), key


def test_params_match_path_variables(unet):
    for key in unet.path_keys:
        expected = sum(int(np.prod(v.shape)) for v in unet.path_variables(*key))
        assert path_cost(unet, *key)["params"] == expected
    # the full path uses everything except the other levels' adapters
    adapters = {id(v) for v in unet.variables if "adapter" in v.path}
    others = sum(int(np.prod(v.shape)) for v in unet.variables if id(v) in adapters)
    assert path_cost(unet, 32, 32)["params"] == unet.count_params() - others > 0


def test_smaller_paths_cost_less(unet):
    c = {key: path_cost(unet, *key) for key in unet.path_keys}
    flops = [c[k]["flops"] for k in [(8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert c[(8, 8)]["params"] < c[(16, 16)]["params"] < c[(32, 32)]["params"]


def test_upsampled_full_res_change_costs_the_full_path():
    u = FlexiUNet(32, [16, 32], **TINY)
    assert path_cost(u, 16, 32) == path_cost(u, 32, 32)


def test_cost_table_and_run_flops(unet):
    rows = cost_table(unet)
    assert [r["path"] for r in rows] == unet.path_keys
    assert rows[-1]["flops_ratio"] == 1.0 and rows[-1]["params_ratio"] == 1.0
    text = format_cost_table(rows)
    assert "(8, 16)" in text and "GFLOPs" in text
    counts = {(32, 32): 3, (8, 8): 2}
    assert run_flops(unet, counts) == 3 * rows[-1]["flops"] + 2 * rows[0]["flops"]
