"""Parity with the official SSD network and its checkpoint format (docs/official_checkpoints.md).

tests/data/official_flexi_unet_16px_3L.pt is an official FlexiUNet (16 px, levels
4/8/16, base 32, channel_mult 1,2,2, 2 res blocks, attention at 8x8, 2 heads) with random
weights in every tensor, saved with ``torch.save(model.state_dict())`` by the official
code, as the released checkpoints are; the ``.npz`` beside it holds the official code's
outputs on every path, its r(t) table and its respaced step lists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

from ssd_keras.config import load_pipeline
from ssd_keras.importer import file_name_hints, find_pipeline, import_checkpoint
from ssd_keras.official import (
    OfficialCheckpointError,
    from_keras_array,
    keras_arrays,
    official_names,
    official_parameter_count,
    official_tensor_shapes,
    read_state_dict,
)

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "official_flexi_unet_16px_3L.pt"
PIPELINE = DATA / "official_16px_3L.toml"
FIXTURE = np.load(DATA / "official_flexi_unet_16px_3L.npz")
CONFIG = json.loads(str(FIXTURE["config_json"]))
ROOT = Path(__file__).resolve().parents[1]


def path_outputs(model, key):
    r_in, r_out = key
    x = FIXTURE[f"x_{r_in}_{r_out}"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    t = FIXTURE[f"t_{r_in}_{r_out}"].astype("float32")
    out = keras.ops.convert_to_numpy(model.path(r_in, r_out)([x, t], training=False))
    return out, FIXTURE[f"out_{r_in}_{r_out}"].transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    report = import_checkpoint(CHECKPOINT, pipeline=PIPELINE, runs_dir=runs)
    return report


@pytest.mark.backend
def test_imported_run_reproduces_the_official_outputs_on_every_path(imported):
    from ssd_keras.runs import load_sampling_model

    model, process, _ = load_sampling_model(imported.run_dir)
    assert sorted(list(k) for k in model.path_keys) == sorted(CONFIG["paths"])
    for key in model.path_keys:
        out, ref = path_outputs(model, key)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4, err_msg=str(key))


def test_r_table_and_respaced_steps_equal_the_official_ones(imported):
    from ssd_keras.builders import build_process

    process = build_process(load_pipeline(imported.run_dir / "config.toml"))
    np.testing.assert_array_equal(process.r, FIXTURE["r"])
    for k in (25, 50, 100, 250):
        assert process.respace(k) == FIXTURE[f"respace_{k}"].tolist(), k


def test_import_writes_a_complete_run_and_lists_the_tensors_no_path_runs(imported):
    run = imported.run_dir
    assert (run / "config.toml").is_file() and (run / "import.json").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_000000000.npz"]
    record = json.loads((run / "import.json").read_text())
    # the top level's last decoder block (output_blocks.8) is dead weight officially
    assert record["never_run"] and all(k.startswith("output_blocks.8.0.") for k in record["never_run"])
    assert record["official_parameters"] == CONFIG["n_params"] == imported.official_parameters
    assert not list(run.parent.glob(".tmp-*"))


def test_official_shapes_and_parameter_counts_of_the_paper_networks():
    # the counts the official code gives for its 64/128/256 px networks, any level count
    for size, mult, count in [(64, (1, 2, 3, 4), 92_256_131), (128, (1, 1, 2, 3, 4), 95_228_163),
                              (256, (1, 1, 2, 2, 4, 4), 124_250_883)]:
        shapes = official_tensor_shapes(size, 128, mult, 2, (16, 8))
        assert official_parameter_count(shapes) == count, size
    tensors = read_state_dict(CHECKPOINT)
    expected = official_tensor_shapes(16, 32, (1, 2, 2), 2, (8,))
    assert list(expected) == list(tensors)
    assert {k: v.shape for k, v in tensors.items()} == expected


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "pipelines").glob("*.toml")))
def test_every_pipeline_network_maps_onto_the_official_format(name):
    """A state_dict of the official shapes loads into every pipeline's network (reduced
    width, same structure) and reads back unchanged: names and layouts are general."""
    from ssd_keras.builders import build_model

    cfg = load_pipeline(ROOT / "pipelines" / f"{name}.toml",
                        ["model.base_channels=32", "model.dropout=0.0"])
    if cfg.model.num_classes:  # the official label_emb has no null-class row
        cfg = cfg.replace(model={"null_class": False}, train={"cond_drop_prob": 0.0},
                          sampler={"guidance": 1.0})
    shapes = official_tensor_shapes(cfg.process.image_size, 32, cfg.model.channel_mult,
                                    cfg.model.num_res_blocks, cfg.model.attention_resolutions,
                                    num_classes=cfg.model.num_classes)
    rng = np.random.default_rng(0)
    tensors = {k: rng.normal(size=s).astype("float32") for k, s in shapes.items()}
    first = {}  # shared adapters: one tensor pair per (side, weight shape)
    for key in [k for k in shapes if k.startswith("adapters_")]:
        prefix, leaf = key.rsplit(".", 1)
        owner = first.setdefault((prefix.split(".")[0], shapes[f"{prefix}.weight"]), prefix)
        tensors[key] = tensors[f"{owner}.{leaf}"]
    model = build_model(cfg, precision="float32")
    arrays, unused = keras_arrays(model, tensors, source=name)
    names = official_names(model)
    for variable, array in zip(model.trainable_variables, arrays):
        variable.assign(array)
        key = names[variable.path][0]
        back = from_keras_array(keras.ops.convert_to_numpy(variable.value), shapes[key], key)
        np.testing.assert_array_equal(back, tensors[names[variable.path][0]])
    # at most the last decoder block and adapters of resolutions that are no SSD level
    top_last = f"output_blocks.{(cfg.model.num_res_blocks + 1) * len(cfg.model.channel_mult) - 1}.0."
    assert all(k.startswith((top_last, "adapters_")) for k in unused), unused


# ---------------------------------------------------------------------------- refusals
def _save(tmp_path, obj, name="bad.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _state_dict():
    return torch.load(CHECKPOINT, weights_only=True)


def refused(tmp_path, path, match, **kwargs):
    runs = tmp_path / "runs"
    with pytest.raises(OfficialCheckpointError, match=match):
        import_checkpoint(path, runs_dir=runs, **kwargs)
    assert not runs.exists() or not list(runs.iterdir()), "a refused import wrote something"


def test_a_truncated_file_is_refused(tmp_path):
    data = CHECKPOINT.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    refused(tmp_path, path, "truncated.pt: not a readable PyTorch state_dict", pipeline=PIPELINE)


def test_a_renamed_key_is_refused_naming_it(tmp_path):
    sd = _state_dict()
    sd["input_blocks.4.0.in_layers.2.weight_renamed"] = sd.pop("input_blocks.4.0.in_layers.2.weight")
    path = _save(tmp_path, sd)
    refused(tmp_path, path, r"no tensor 'input_blocks\.4\.0\.in_layers\.2\.weight'.*"
                            r"'input_blocks\.4\.0\.in_layers\.2\.weight_renamed' instead",
            pipeline=PIPELINE)


def test_a_wrongly_shaped_tensor_is_refused_with_both_shapes(tmp_path):
    sd = _state_dict()
    sd["middle_block.0.in_layers.2.weight"] = torch.zeros(64, 64, 1, 1)
    path = _save(tmp_path, sd)
    refused(tmp_path, path, r"'middle_block\.0\.in_layers\.2\.weight' has shape \(64, 64, 1, 1\), "
                            r".* needs \(64, 64, 3, 3\)", pipeline=PIPELINE)


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    refused(tmp_path, _save(tmp_path, [torch.zeros(3)], "list.pt"), "holds a list, not a state_dict",
            pipeline=PIPELINE)
    refused(tmp_path, _save(tmp_path, {"step": 3, "w": torch.zeros(2)}, "mixed.pt"),
            "entry 'step' is a int, not a tensor", pipeline=PIPELINE)
    # an arbitrary pickled object is never unpickled (weights_only=True)
    refused(tmp_path, _save(tmp_path, {"w": Path("x")}, "object.pt"), "not a readable PyTorch",
            pipeline=PIPELINE)
    (tmp_path / "text.pt").write_text("hello")
    refused(tmp_path, tmp_path / "text.pt", "not a readable PyTorch", pipeline=PIPELINE)


def test_an_existing_run_is_not_overwritten(tmp_path, imported):
    with pytest.raises(OfficialCheckpointError, match="already exists"):
        import_checkpoint(CHECKPOINT, pipeline=PIPELINE, runs_dir=imported.run_dir.parent)


# ---------------------------------------------------------------------------- finding the pipeline
def test_the_pipeline_is_found_from_shapes_and_the_file_name(tmp_path):
    tensors = read_state_dict(CHECKPOINT)
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "digits16_3L.toml").write_text(PIPELINE.read_text())
    cfg, reason = find_pipeline(tensors, CHECKPOINT, pipelines)
    assert cfg.process.levels == 3 and "digits16_3L.toml" in reason
    # a 2-level pipeline has the very same network: only the name can tell them apart
    (pipelines / "digits16_2L.toml").write_text(PIPELINE.read_text().replace("levels = 3", "levels = 2"))
    with pytest.raises(OfficialCheckpointError, match="fits several pipelines.*--pipeline"):
        find_pipeline(tensors, CHECKPOINT, pipelines)
    named = tmp_path / "ssd_16res_digits_2levels_ema_0.9999_5000.pt"
    named.write_bytes(CHECKPOINT.read_bytes())
    cfg, reason = find_pipeline(tensors, named, pipelines)
    assert cfg.process.levels == 2 and "levels 2" in reason
    assert file_name_hints(named) == {"image_size": 16, "levels": 2, "step": 5000}
    # a network no pipeline describes
    with pytest.raises(OfficialCheckpointError, match="no pipeline in .* describes"):
        find_pipeline(tensors, CHECKPOINT, ROOT / "pipelines")


def test_released_file_names_select_the_paper_pipeline():
    shapes = official_tensor_shapes(64, 128, (1, 2, 3, 4), 2, (16, 8))
    tensors = {k: np.zeros(s, dtype="float32") for k, s in shapes.items()}
    cfg, _ = find_pipeline(tensors, Path("ssd_64res_celeba_4levels_ema_0.9999_1000000.pt"))
    assert cfg.source.endswith("celeba64_4L.toml")
    cfg, _ = find_pipeline(tensors, Path("ssd_64res_imagenet_2levels_ema_0.9999_1000000.pt"))
    assert cfg.source.endswith("imagenet64_2L.toml")


# ---------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_import_then_sample_and_inspect_through_the_cli(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ssd_keras", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)

    done = run("import", str(CHECKPOINT), "--pipeline", str(PIPELINE), "--name", "official")
    assert done.returncode == 0, done.stderr
    assert "1,748,227 parameters" in done.stdout and "output_blocks.8.0 (12 tensors)" in done.stdout
    done = run("sample", "official", "--steps", "25", "-n", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "27 network calls per image" in done.stdout  # 25 kept steps + the 2 change steps
    assert list((tmp_path / "runs" / "official" / "samples").glob("*/grid.png"))
    done = run("inspect", "runs/official")
    assert done.returncode == 0, done.stderr
    assert "1,748,227 parameters in the checkpoint" in done.stdout
    done = run("import", str(CHECKPOINT), "--name", "again")  # no bundled pipeline fits
    assert done.returncode == 2 and "error:" in done.stderr and "--pipeline" in done.stderr
    assert "Traceback" not in done.stderr
