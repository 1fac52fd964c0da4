"""Fine-tuning (``train.init_from``) and exports (``ssd-run export``), docs/finetune.md.

The network is the one of tests/data/official_flexi_unet_16px_3L.pt (16 px, 3 levels,
base 32, channel_mult 1,2,2, 2 res blocks, attention at 8x8), so the same small configs
start from our runs, our files and the official fixture. Every round trip is bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssd_keras.checkpoint import load_checkpoint
from ssd_keras.cli import main
from ssd_keras.config import from_dict, load_pipeline

DATA = Path(__file__).parent / "data"
OFFICIAL = DATA / "official_flexi_unet_16px_3L.pt"
OFFICIAL_PIPELINE = DATA / "official_16px_3L.toml"


def config(root: Path, name: str, **changes) -> object:
    """A small run of the official fixture's network on the bundled digits."""
    sections = {
        "run": {"name": name, "output_dir": str(root / "runs"), "seed": 3},
        "data": {"source": "digits", "random_flip": False, "num_workers": 1},
        "process": {"image_size": 16, "levels": 3, "timesteps": 60},
        "model": {"base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
                  "attention_resolutions": [8], "num_heads": 2, "dropout": 0.0},
        "optimizer": {"lr": 1e-3},
        "ema": {"rate": 0.5},
        "train": {"batch_size": 2, "steps": 2, "log_every": 1, "checkpoint_every": 2,
                  "sample_every": 0},
        "sampler": {"steps": 2, "num_images": 1, "batch_size": 1},
    }
    for section, keys in changes.items():
        sections.setdefault(section, {}).update(keys)
    return from_dict(sections, source=f"test_finetune:{name}")


def numpy(variables):
    from keras import ops

    return [ops.convert_to_numpy(v.value if hasattr(v, "value") else v) for v in variables]


def trainer(cfg):
    from ssd_keras.train import Trainer

    return Trainer(cfg, progress=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run trained 2 steps (EMA rate 0.5, so its EMA and raw weights differ)."""
    root = tmp_path_factory.mktemp("source")
    t = trainer(config(root, "src"))
    try:
        t.fit()
    finally:
        t.close()
    run = root / "runs" / "src"
    groups, meta = load_checkpoint(run / "checkpoints" / "ckpt_000000002.npz")
    return {"root": root, "run": run, "ckpt": run / "checkpoints" / "ckpt_000000002.npz",
            "groups": groups, "meta": meta}


def trainable(groups, meta, group):
    """A checkpoint group's trainable tensors by name (without dropout seed states)."""
    return {n: a for n, a in zip(meta["names"][group], groups[group])
            if not n.startswith("seed_generator_state/")}


def assert_fresh_start(t):
    """Step 0, a fresh optimizer (no step taken, zero moments), EMA = model."""
    assert t.step == 0
    moments = [v for v in t.optimizer.variables if "learning_rate" not in v.path]
    assert len(moments) == 1 + 2 * len(t.model.trainable_variables)  # iterations, m, v
    for v in moments:
        assert not np.any(numpy([v])[0]), v.path
    for w, e in zip(numpy(t.model.trainable_variables), numpy(t.ema)):
        np.testing.assert_array_equal(w, e)


# ------------------------------------------------------------------ sources
@pytest.mark.parametrize("spec, weights", [("run", "ema"), ("run", "raw"), ("name", "ema"),
                                           ("checkpoint", "raw")])
def test_init_from_a_run_or_a_checkpoint(spec, weights, source, tmp_path):
    given = {"run": str(source["run"]), "name": "src", "checkpoint": str(source["ckpt"])}[spec]
    # a run name is looked up under the new run's run.output_dir
    root = source["root"] if spec == "name" else tmp_path
    cfg = config(root, f"ft_{spec}_{weights}",
                 train={"init_from": given, "init_weights": weights})
    t = trainer(cfg)
    try:
        assert_fresh_start(t)
        want = trainable(source["groups"], source["meta"], "ema" if weights == "ema" else "model")
        got = dict(zip((v.path for v in t.model.trainable_variables),
                       numpy(t.model.trainable_variables)))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        report = t.initialized_from
        assert report.kind == ("checkpoint" if spec == "checkpoint" else "run")
        assert report.source == str(source["ckpt"].resolve()) and report.step == 2
        assert report.loaded == len(want) and not report.kept and not report.ignored
        record = json.loads((t.run_dir / "init_from.json").read_text())
        from ssd_keras.finetune import sha256_of

        assert record["sha256"] == sha256_of(source["ckpt"]) and record["weights"] == weights
    finally:
        t.close()
    if spec == "run" and weights == "ema":  # the EMA and raw weights differ: the test sees which
        assert any(not np.array_equal(a, b) for a, b in zip(
            trainable(source["groups"], source["meta"], "ema").values(),
            trainable(source["groups"], source["meta"], "model").values()))


@pytest.mark.backend
def test_init_from_an_official_checkpoint(tmp_path):
    from ssd_keras.importer import import_checkpoint

    imported = import_checkpoint(OFFICIAL, pipeline=OFFICIAL_PIPELINE, runs_dir=tmp_path / "imp")
    groups, meta = load_checkpoint(next((imported.run_dir / "checkpoints").glob("*.npz")))
    t = trainer(config(tmp_path, "ft_official", train={"init_from": str(OFFICIAL)}))
    try:
        assert_fresh_start(t)
        want = trainable(groups, meta, "ema")
        for v, got in zip(t.model.trainable_variables, numpy(t.model.trainable_variables)):
            np.testing.assert_array_equal(got, want[v.path], err_msg=v.path)
        assert t.initialized_from.kind == "official"
    finally:
        t.close()


@pytest.mark.backend
def test_export_safetensors_round_trip_and_init_from_it(source, tmp_path):
    from ssd_keras.export import export_run, read_safetensors
    from ssd_keras.importer import import_checkpoint

    for ema in (True, False):
        out = tmp_path / f"w_{ema}.safetensors"
        report = export_run(source["run"], "safetensors", out, ema=ema)
        want = trainable(source["groups"], source["meta"], "ema" if ema else "model")
        tensors, meta = read_safetensors(out)
        assert tensors.keys() == want.keys() and report.tensors == len(want)
        assert meta["step"] == "2" and meta["weights"] == ("ema" if ema else "raw")
        for k in want:
            np.testing.assert_array_equal(tensors[k], want[k], err_msg=k)
        # import rebuilds the run from the metadata alone
        imported = import_checkpoint(out, runs_dir=tmp_path / "runs_imp")
        cfg = load_pipeline(imported.run_dir / "config.toml")
        assert cfg.model == load_pipeline(source["run"] / "config.toml").model
        groups, m = load_checkpoint(next((imported.run_dir / "checkpoints").glob("*.npz")))
        assert m["step"] == 2
        back = trainable(groups, m, "ema")
        for k in want:
            np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    t = trainer(config(tmp_path, "ft_st", train={"init_from": str(tmp_path / "w_True.safetensors")}))
    try:
        assert_fresh_start(t)
        want = trainable(source["groups"], source["meta"], "ema")
        for v, got in zip(t.model.trainable_variables, numpy(t.model.trainable_variables)):
            np.testing.assert_array_equal(got, want[v.path], err_msg=v.path)
        assert t.initialized_from.kind == "safetensors"
    finally:
        t.close()


# ------------------------------------------------------------------ strict and not
def test_strict_mismatch_names_the_tensor_and_both_shapes(source, tmp_path):
    from ssd_keras.finetune import InitError

    cfg = config(tmp_path, "wider", model={"channel_mult": [1, 2, 3]},
                 train={"init_from": str(source["run"])})
    with pytest.raises(InitError) as info:
        trainer(cfg)
    message = str(info.value)
    assert "input_blocks_" in message or "middle_block" in message
    assert "(96," in message or ", 96)" in message  # this network's width ...
    assert "64" in message  # ... and the source's
    assert "train.init_strict = false" in message


def test_strict_refuses_tensors_the_network_lacks(source, tmp_path):
    from ssd_keras.finetune import InitError

    cfg = config(tmp_path, "fewer", model={"num_res_blocks": 1},
                 train={"init_from": str(source["run"])})
    with pytest.raises(InitError, match=r"tensor .*(not in the source|not part of this network|shape)"):
        trainer(cfg)


def test_not_strict_loads_what_fits_and_lists_the_rest(source, tmp_path):
    cfg_fresh = config(tmp_path, "fresh_wider", model={"channel_mult": [1, 2, 3]})
    fresh = trainer(cfg_fresh)
    initial = dict(zip((v.path for v in fresh.model.trainable_variables),
                       numpy(fresh.model.trainable_variables)))
    fresh.close()
    cfg = config(tmp_path, "loose", model={"channel_mult": [1, 2, 3]},
                 train={"init_from": str(source["run"]), "init_strict": False})
    t = trainer(cfg)
    try:
        assert_fresh_start(t)
        want = trainable(source["groups"], source["meta"], "ema")
        report = t.initialized_from
        kept = {line.split(":")[0].split(" ")[0] for line in report.kept}
        loaded = 0
        for v, got in zip(t.model.trainable_variables, numpy(t.model.trainable_variables)):
            if v.path in kept:  # the fresh run's initial value (same run.seed)
                np.testing.assert_array_equal(got, initial[v.path], err_msg=v.path)
            else:
                np.testing.assert_array_equal(got, want[v.path], err_msg=v.path)
                loaded += 1
        assert kept and loaded == report.loaded > len(kept)
        assert report.loaded + len(report.kept) == len(t.model.trainable_variables)
        # both kinds are listed: a shape that differs, and a tensor the source lacks
        assert any("shape" in line for line in report.kept)
        assert any("not in the source" in line for line in report.kept)  # adapters_in_to_96
        assert json.loads((t.run_dir / "init_from.json").read_text())["kept"] == report.kept
    finally:
        t.close()


def test_fewer_and_more_levels(source, tmp_path):
    """SSD levels decide which entry adapters exist: 2 levels from a 3-level run leave its
    4 px entry adapter over (strict: an error; not strict: listed as ignored), and 3 levels
    from that 2-level run have a new one (kept at its initial value, listed)."""
    from ssd_keras.finetune import InitError

    with pytest.raises(InitError, match=r"tensor adapters_in_to_64/kernel \(1, 1, 32, 64\) is "
                                        r"not part of this network"):
        trainer(config(tmp_path, "levels2_strict", process={"levels": 2},
                       train={"init_from": str(source["run"])}))
    t = trainer(config(tmp_path, "levels2", process={"levels": 2},
                       train={"init_from": str(source["run"]), "init_strict": False}))
    try:
        r = t.initialized_from
        assert r.loaded == len(t.model.trainable_variables) and not r.kept
        assert sorted(r.ignored) == ["adapters_in_to_64/bias", "adapters_in_to_64/kernel"]
        t.save()  # a 2-level checkpoint at step 0
    finally:
        t.close()
    t = trainer(config(tmp_path, "levels3", train={"init_from": str(t.run_dir),
                                                   "init_strict": False}))
    try:
        r = t.initialized_from
        assert [k.split(" ")[0] for k in r.kept] == ["adapters_in_to_64/kernel",
                                                      "adapters_in_to_64/bias"]
        assert all("not in the source" in k for k in r.kept) and not r.ignored
        assert r.loaded == len(t.model.trainable_variables) - 2
    finally:
        t.close()


def test_official_source_strict_and_not(tmp_path):
    from ssd_keras.finetune import InitError

    cfg = config(tmp_path, "off_wider", model={"channel_mult": [1, 2, 3]},
                 train={"init_from": str(OFFICIAL)})
    with pytest.raises(InitError, match=r"has shape \(.*\), this pipeline needs \(.*\)"):
        trainer(cfg)
    t = trainer(config(tmp_path, "off_loose", model={"channel_mult": [1, 2, 3]},
                       train={"init_from": str(OFFICIAL), "init_strict": False}))
    try:
        r = t.initialized_from
        assert r.kept and r.loaded > len(r.kept)
        assert r.loaded + len(r.kept) == len(t.model.trainable_variables)
    finally:
        t.close()


@pytest.mark.parametrize("value, expected", [
    ("missing.pt", "train.init_from = 'missing.pt': no such file"),
    ("notes.txt", "is none of a run"),
])
def test_bad_sources_are_one_line_errors(value, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(config(tmp_path, "bad").to_toml())
    assert main([str(pipeline), "--init-from", value, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "runs" / "bad" / "checkpoints").glob("*.npz"))


# ------------------------------------------------------------------ resume
def test_a_fine_tuned_run_resumes_bitwise_without_reading_the_source(source, tmp_path):
    """4 steps at once vs 2 + 2 in a new Trainer whose source file is gone by then."""
    copy = tmp_path / "copy.npz"
    shutil.copy(source["ckpt"], copy)
    changes = dict(train={"init_from": str(copy), "steps": 4, "checkpoint_every": 4})
    a = trainer(config(tmp_path, "whole", **changes))
    a.fit()
    a.close()
    b = trainer(config(tmp_path, "halves", **changes))
    b.fit(2)
    b.close()
    copy.unlink()  # a resumed run never reads its source again
    c = trainer(config(tmp_path, "halves", **changes))
    try:
        assert c.step == 2 and c.initialized_from is None
        c.fit()
    finally:
        c.close()
    ga, ma = load_checkpoint(tmp_path / "runs" / "whole" / "checkpoints" / "ckpt_000000004.npz")
    gc, mc = load_checkpoint(tmp_path / "runs" / "halves" / "checkpoints" / "ckpt_000000004.npz")
    for group in ("model", "ema", "optimizer"):
        for i, (x, y) in enumerate(zip(ga[group], gc[group])):
            assert np.array_equal(x, y), f"{group}[{i}]"
    for key in ("rng", "data", "log_window"):
        assert ma[key] == mc[key], key
    assert mc["init_from"]["sha256"] == ma["init_from"]["sha256"]
    assert mc["init_from"]["source"] == str(copy.resolve())


# ------------------------------------------------------------------ official export
@pytest.mark.backend
def test_official_export_has_the_official_names_and_reimports_bit_for_bit(source, tmp_path):
    from ssd_keras.export import export_run
    from ssd_keras.importer import import_checkpoint
    from ssd_keras.official import model_tensor_shapes, read_state_dict

    cfg = load_pipeline(source["run"] / "config.toml")
    out = tmp_path / "src_ema.pt"
    report = export_run(source["run"], "official", out)
    state = read_state_dict(out)
    shapes = model_tensor_shapes(cfg.model, cfg.process.image_size)
    assert list(state) == list(shapes)  # every key, in the official order
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    # what is filled in: the top level's last decoder block (zeros) and the copies of
    # shared adapters at resolutions that are no level
    assert report.fill["zeros"] and all(k.startswith("output_blocks.") for k in report.fill["zeros"])
    for key in report.fill["zeros"]:
        assert not state[key].any()
    for key, twin in report.fill["copied"].items():
        np.testing.assert_array_equal(state[key], state[twin])
    pipeline = tmp_path / "src.toml"
    pipeline.write_text(cfg.to_toml())
    imported = import_checkpoint(out, pipeline=pipeline, runs_dir=tmp_path / "runs")
    groups, meta = load_checkpoint(next((imported.run_dir / "checkpoints").glob("*.npz")))
    want = trainable(source["groups"], source["meta"], "ema")
    back = trainable(groups, meta, "ema")
    assert back.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    card = out.with_suffix(".md").read_text()
    assert "step 2" in card and "[model]" in card and "digits" in card


@pytest.mark.backend
def test_export_of_an_imported_official_file_gives_back_its_tensors(tmp_path):
    from ssd_keras.export import export_run
    from ssd_keras.importer import import_checkpoint
    from ssd_keras.official import read_state_dict

    imported = import_checkpoint(OFFICIAL, pipeline=OFFICIAL_PIPELINE, runs_dir=tmp_path)
    out = tmp_path / "again.pt"
    report = export_run(imported.run_dir, "official", out)
    original, again = read_state_dict(OFFICIAL), read_state_dict(out)
    assert list(again) == list(original)
    never_run = set(json.loads((imported.run_dir / "import.json").read_text())["never_run"])
    differ = [k for k in original if not np.array_equal(original[k], again[k])]
    # only tensors no path runs may differ, and only those filled with zeros
    # (the fixture holds random values there, so every zeroed tensor shows)
    assert set(differ) == set(report.fill["zeros"]) <= never_run
    # the zeroed ones: the top level's last decoder block (3 levels x 3 blocks: number 8)
    assert {".".join(k.split(".")[:2]) for k in report.fill["zeros"]} == {"output_blocks.8"}
    # the copies of the shared adapter (adapters_out.4 = adapters_out.8) come back exactly
    assert report.fill["copied"] and not set(report.fill["copied"]) & set(differ)


def test_model_card_lists_evaluation_numbers(source, tmp_path):
    from ssd_keras.export import export_run

    run = tmp_path / "run"
    shutil.copytree(source["run"], run)
    (run / "eval" / "step2_K2_exact_seed0").mkdir(parents=True)
    (run / "eval" / "step2_K2_exact_seed0" / "metrics.json").write_text(json.dumps({
        "num_samples": 10, "metrics": {"fid": 12.345,
                                       "weights_free": {"fd_pix8": 1.5, "kid_pix8": {"mean": 0.01}}}}))
    export_run(run, "safetensors", tmp_path / "w.safetensors")
    card = (tmp_path / "w.md").read_text()
    assert "| step2_K2_exact_seed0 | 10 | 12.35 | 1.5000 | 0.01000 |" in card


def test_export_command_and_bad_arguments(source, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["export", str(source["run"]), "--format", "safetensors", "--raw",
                 "--out", str(out)]) == 0
    assert "raw weights of step 2" in capsys.readouterr().out and out.with_suffix(".md").is_file()
    assert main(["export", str(source["run"]), "--format", "onnx", "--out", str(out)]) == 2
    assert "error: --format 'onnx': must be one of official, safetensors" in capsys.readouterr().err
    not_ours = tmp_path / "foreign.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(not_ours))
    assert main(["import", str(not_ours), "--runs-dir", str(tmp_path / "r")]) == 2
    assert "without ssd_keras's metadata" in capsys.readouterr().err
