"""``ssd-run inspect``: FLOPs ratios, sampling costs, memory estimates and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssd_keras.builders import build_model, build_process
from ssd_keras.config import from_dict
from ssd_keras.inspection import (
    activation_bytes,
    describe_pipeline,
    path_probabilities,
    plot_schedule,
    training_memory,
)
from ssd_keras.nn.flops import path_cost

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(levels: int, **train):
    return from_dict({
        "run": {"name": f"small_{levels}L"},
        "process": {"image_size": 32, "levels": levels},
        "model": {"base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                  "attention_resolutions": [8], "num_heads": 2, "dropout": 0.1},
        "train": {"batch_size": 8, **train},
    })


@pytest.fixture(scope="module")
def ddpm_report():
    return describe_pipeline(small_cfg(1))


@pytest.fixture(scope="module")
def ssd():
    cfg = small_cfg(3)
    return cfg, describe_pipeline(cfg), build_model(cfg, precision="float32"), build_process(cfg)


def test_one_level_pipeline_costs_exactly_ddpm(ddpm_report):
    d = ddpm_report.data
    for k in (1000, 250):
        assert d[f"sampling_{k}"]["calls"] == k
        assert d[f"sampling_{k}"]["speedup"] == 1.0
        assert d[f"sampling_{k}"]["flops"] == d[f"sampling_{k}"]["ddpm_flops"]
    assert d["sampling_1000"]["speedup_vs_ddpm_full"] == 1.0
    assert d["sampling_250"]["speedup_vs_ddpm_full"] == 4.0
    assert d["train_step_speedup"] == 1.0
    assert np.all(ddpm_report.step_flops == ddpm_report.full_flops)


def test_sampling_flops_are_the_sum_over_the_respaced_steps(ssd):
    cfg, report, model, process = ssd
    costs = {key: path_cost(model, *key)["flops"] for key in model.path_keys}
    full = costs[(32, 32)]
    assert report.full_flops == full
    for k in (1000, 250):
        kept = process.respace(k)
        row = report.data[f"sampling_{k}"]
        assert row["calls"] == len(kept) == len(process.reverse_steps(k)) + 1
        assert row["flops"] == sum(costs[process.path_at(t)] for t in kept)
        assert row["ddpm_flops"] == k * full
        assert row["speedup"] == pytest.approx(k * full / row["flops"])
        assert row["speedup_vs_ddpm_full"] == pytest.approx(1000 * full / row["flops"])
    assert report.data["sampling_250"]["calls"] == 250 + 2  # both change steps are added
    assert report.data["sampling_1000"]["speedup"] > 1.0
    # training: each t has probability 1/T
    probs = path_probabilities(process)
    assert sum(probs.values()) == pytest.approx(1.0)
    expected = sum(p * costs[key] for key, p in probs.items())
    assert report.data["train_step_flops"] == pytest.approx(expected)
    assert report.step_flops.shape == (1000,)
    assert report.change_steps == process.change_steps


def test_report_text_names_every_quantity(ssd):
    text = ssd[1].text
    for needle in ("change steps", "steps per level", "parameters", "(8, 16)",
                   "sampling, 1000 steps", "sampling, 250 steps", "vs DDPM@1000",
                   "training step (avg)", "AdamW", "EMA", "gradients",
                   "activations, largest path", "activations, average path", "float32"):
        assert needle in text, needle


def test_memory_estimate(ssd):
    cfg, report, model, process = ssd
    mem = report.data["memory"]
    n = model.count_params()
    assert mem["weights"] == 4 * n
    assert mem["adamw"] == 8 * n
    assert mem["ema"] == 4 * n
    biggest = max(sum(int(np.prod(v.shape)) for v in model.path_variables(*k))
                  for k in process.paths)
    assert mem["grads_max"] == 4 * biggest
    assert mem["largest_path"] == (16, 32)  # ResizeInput: the full path plus a 16x16 input
    assert mem["activations_avg"] < mem["activations_max"]
    assert mem["activations_max_graph"] < mem["activations_max"]
    assert mem["total_max"] == (mem["weights"] + mem["adamw"] + mem["ema"] + mem["grads_max"]
                                + mem["activations_max"])
    # activations scale with the batch; mixed precision halves them, not the variables
    double = training_memory(cfg, model, process, batch_size=16)
    assert double["activations_max"] == 2 * mem["activations_max"]
    assert double["weights"] == mem["weights"]
    mixed = training_memory(small_cfg(3, precision="mixed_bfloat16"), model, process)
    assert mixed["activations_max_graph"] == mem["activations_max_graph"] // 2
    assert mixed["weights"] == mem["weights"] and mixed["precision"] == "mixed_bfloat16"


def test_activation_estimate_matches_torch_saved_tensors(ssd):
    """On torch: the count is within 10% of what autograd actually saves per sample."""
    import keras

    if keras.backend.backend() != "torch":
        pytest.skip("saved-tensor hooks are torch's")
    import torch

    model = ssd[2]
    own = {v.value.untyped_storage().data_ptr() for v in model.variables}

    def saved(path, r, batch):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(batch, r, r, 3)
        t = torch.full((batch,), 500.0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            path([x, t], training=True)
        return sum(n for p, n in seen.items() if p not in own)

    for key in ((8, 16), (32, 32)):
        path = model.path(*key)
        per_sample = (saved(path, key[0], 3) - saved(path, key[0], 1)) / 2  # weight copies cancel
        est = activation_bytes(path, 4)["total"]
        assert 0.9 < est / per_sample < 1.1, (key, est, per_sample)


def test_plot_is_written(ssd, tmp_path):
    out = plot_schedule(ssd[1], tmp_path / "sub" / "schedule.png")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect(tmp_path, capsys):
    from ssd_keras.cli import main

    plot = tmp_path / "q.png"
    rc = main(["inspect", str(ROOT / "pipelines" / "quickstart.toml"), "--plot", str(plot),
               "--steps", "100", "--steps", "1000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sampling, 100 steps" in out and "sampling, 1000 steps" in out
    assert "vs DDPM@1000" in out and "activations, largest path" in out
    assert plot.is_file()
    assert main(["inspect", str(ROOT / "pipelines" / "quickstart.toml"), "--steps", "1"]) == 2
