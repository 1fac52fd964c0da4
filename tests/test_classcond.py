"""Class-conditional SSD with classifier-free guidance (docs/sampling.md).

tests/data/official_classcond_16px_3L.pt is a class-conditional official FlexiUNet (ADM's
``label_emb``, 10 classes) with random weights, saved by the official code; the ``.npz``
beside it holds the official network's outputs on every path for given labels. Both
are made by benchmarks/make_classcond_fixture.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from ssd_keras import backend
from ssd_keras.config import ConfigError, load_pipeline
from ssd_keras.data import DataError, make_dataset
from ssd_keras.importer import class_conditional, import_checkpoint
from ssd_keras.nn import FlexiUNet
from ssd_keras.official import read_state_dict
from ssd_keras.sample import denoiser, sample_images
from ssd_keras.training.step import drop_labels

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "official_classcond_16px_3L.pt"
PIPELINE = DATA / "official_classcond_16px_3L.toml"
FIXTURE = np.load(DATA / "official_classcond_16px_3L.npz")
ROOT = Path(__file__).resolve().parents[1]
# float32 results of two computations of the same network that differ in batching or in
# the order of a few additions: a few hundred ulps of outputs of size ~1
F32 = float(np.finfo(np.float32).eps) * 256


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return import_checkpoint(CHECKPOINT, pipeline=PIPELINE, runs_dir=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def tiny():
    """A random class-conditional network (3 classes + the null row) and its process."""
    from ssd_keras.builders import build_process
    from ssd_keras.objectives import make_objective

    keras.utils.set_random_seed(3)
    cfg = load_pipeline(PIPELINE, ["model.num_classes=3"])
    model = FlexiUNet(16, [4, 8, 16], base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
                      attention_resolutions=(4,), num_heads=2, dropout=0.0, num_classes=3)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # zero-initialised convs too: every path responds
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.1)
    process = build_process(cfg)
    return model, process, make_objective(process, "x0", 5.0)


# ------------------------------------------------------------------ network and parity
@pytest.mark.backend
def test_class_conditional_official_network_is_reproduced_on_every_path(imported):
    from ssd_keras.runs import load_sampling_model

    model, _, _ = load_sampling_model(imported.run_dir)
    assert model.num_classes == 10 and model.null_label is None
    paths = json.loads(str(FIXTURE["config_json"]))["paths"]
    assert sorted(list(k) for k in model.path_keys) == sorted(paths)
    for r_in, r_out in model.path_keys:
        key = f"{r_in}_{r_out}"
        x = FIXTURE[f"x_{key}"].transpose(0, 2, 3, 1)
        out = np_(model.path(r_in, r_out)([x, FIXTURE[f"t_{key}"], FIXTURE[f"y_{key}"].astype("int32")]))
        np.testing.assert_allclose(out, FIXTURE[f"out_{key}"].transpose(0, 2, 3, 1), rtol=0,
                                   atol=1e-4, err_msg=key)


def test_a_class_conditional_checkpoint_is_detected_without_num_classes(tmp_path):
    text = PIPELINE.read_text().replace("num_classes = 10\n", "").replace("labels = true\n", "")
    plain = tmp_path / "plain.toml"
    plain.write_text(text)
    cfg = class_conditional(load_pipeline(plain), read_state_dict(CHECKPOINT), CHECKPOINT)
    assert (cfg.model.num_classes, cfg.model.null_class, cfg.sampler.guidance) == (10, False, 1.0)
    report = import_checkpoint(CHECKPOINT, pipeline=plain, runs_dir=tmp_path / "runs")
    assert load_pipeline(report.run_dir / "config.toml").model.num_classes == 10


def test_guidance_is_refused_for_a_model_without_a_null_row(imported, tmp_path):
    from ssd_keras.runs import load_sampling_model

    model, process, objective = load_sampling_model(imported.run_dir)
    with pytest.raises(ValueError, match="null-class row"):
        sample_images(model, process, objective, num_images=2, steps=4, labels=[1, 2],
                      guidance=2.0, progress=False)
    with pytest.raises(ConfigError, match="sampler.guidance = 2.0: this model has no null-class row"):
        load_pipeline(imported.run_dir / "config.toml", ["sampler.guidance=2"])


def test_unconditional_networks_keep_their_inputs_and_variables():
    plain = FlexiUNet(16, [8, 16], base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_heads=2)
    cond = FlexiUNet(16, [8, 16], base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, num_classes=4)
    assert [len(plain.path(*k).inputs) for k in plain.path_keys] == [2, 2, 2]
    assert [len(cond.path(*k).inputs) for k in cond.path_keys] == [3, 3, 3]
    extra = {v.path for v in cond.trainable_variables} - {v.path for v in plain.trainable_variables}
    assert extra == {"label_emb/embeddings"}
    assert cond.label_emb.embeddings.shape == (5, 128) and cond.null_label == 4


def test_labels_reach_every_path(tiny):
    model, _, _ = tiny
    for key in model.path_keys:
        path = model.path(*key)
        assert "label_emb/embeddings" in {v.path for v in path.trainable_variables}, key
        x = np.random.default_rng(1).normal(size=(2, key[0], key[0], 3)).astype("float32")
        t = np.full(2, 500.0, "float32")
        a, b = (np_(path([x, t, np.array(y, "int32")])) for y in ([0, 1], [2, 3]))
        for image in range(2):  # each image's output depends on its own label
            assert np.abs(a[image] - b[image]).max() > 1e-3, (key, image)


# ------------------------------------------------------------------ guidance
def test_guidance_one_is_the_conditional_model_and_zero_the_null_class(tiny):
    model, process, objective = tiny
    rng = np.random.default_rng(2)
    for t in (999, int(np.argmax(np.diff(process.r) != 0)), 3):
        key = process.path_at(t)
        x_np = rng.normal(size=(3, key[0], key[0], 3)).astype("float32")
        y = np.array([0, 1, 2], "int32")
        tt = np.full(3, float(t), "float32")
        conditional = np_(model.path(*key)([x_np, tt, y]))
        null = np_(model.path(*key)([x_np, tt, np.full(3, model.null_label, "int32")]))
        x = keras.ops.convert_to_tensor(x_np)  # as the sampler holds it
        for graph in ("eager", "trace"):
            execution = backend.Execution(sample_graph=graph)
            one = denoiser(model, process, objective, execution=execution, clip=False, guidance=1.0)
            zero = denoiser(model, process, objective, execution=execution, clip=False,
                            guidance=0.0)
            np.testing.assert_allclose(np_(one(x, t, y)), conditional, rtol=0, atol=F32 * 10)
            np.testing.assert_allclose(np_(zero(x, t, y)), null, rtol=0, atol=F32 * 10)
            for batched in (True, False):
                w3 = denoiser(model, process, objective, execution=execution, clip=False,
                              guidance=3.0, guidance_batch=batched)
                # |guided| ~ 3 |outputs|: the two predictions' rounding, amplified by 2w + 1
                np.testing.assert_allclose(np_(w3(x, t, y)), null + 3.0 * (conditional - null),
                                           rtol=0, atol=F32 * 10 * 7)


def test_guidance_zero_samples_equal_unconditional_samples(tiny):
    model, process, objective = tiny
    common = dict(num_images=3, steps=6, seed=5, progress=False, graph="eager")
    unconditional = sample_images(model, process, objective, **common).images  # null class
    guided0 = sample_images(model, process, objective, labels=[0, 1, 2], guidance=0.0, **common).images
    np.testing.assert_array_equal(guided0, unconditional)
    conditional = sample_images(model, process, objective, labels=[0, 1, 2], **common).images
    assert np.abs(conditional - unconditional).max() > 1e-3
    for method in ("ancestral", "ddim"):
        w2 = sample_images(model, process, objective, labels=[0, 1, 2], guidance=2.0,
                           method=method, **common).images
        assert np.isfinite(w2).all() and w2.shape == (3, 16, 16, 3)


def test_bad_sampling_labels_are_refused(tiny):
    model, process, objective = tiny
    common = dict(num_images=2, steps=4, progress=False)
    with pytest.raises(ValueError, match="label 3 is not a class"):
        sample_images(model, process, objective, labels=[0, 3], **common)
    with pytest.raises(ValueError, match="expected 2 integer class indices"):
        sample_images(model, process, objective, labels=[0], **common)


# ------------------------------------------------------------------ training
def test_label_dropout_happens_at_the_declared_rate():
    y = np.arange(200_000) % 7
    for prob in (0.0, 0.1, 0.5):
        dropped = drop_labels(y, np.random.default_rng(0), prob, 7)
        share = float(np.mean(dropped == 7))
        sigma = np.sqrt(prob * (1 - prob) / len(y))
        assert abs(share - prob) <= 5 * sigma + 1e-12, (prob, share)
        kept = dropped != 7
        np.testing.assert_array_equal(dropped[kept], y[kept])


def _trainer_cfg(tmp_path, *extra):
    return load_pipeline(ROOT / "pipelines" / "quickstart_classes.toml", [
        f"run.output_dir={tmp_path}", "model.base_channels=32", "model.channel_mult=[1,1,1]",
        "model.attention_resolutions=[]", "train.batch_size=64", "train.steps=100",
        "train.sample_every=0", "train.cond_drop_prob=0.25", "data.num_workers=0", *extra])


def test_training_feeds_the_data_labels_with_dropout_to_the_path(tmp_path):
    from sklearn.datasets import load_digits

    from ssd_keras.train import Trainer

    trainer = Trainer(_trainer_cfg(tmp_path), progress=False)
    try:
        assert trainer.classes == [str(d) for d in range(10)]
        assert (trainer.run_dir / "classes.txt").read_text().split() == trainer.classes
        seen = []
        gradients = trainer._step_fn.gradients

        def spy(key):  # the path's loss-and-gradients function, recording its labels input
            path, fn = gradients(key)

            def recorded(*inputs):  # (x_t, t, y, target, weight)
                seen.append(np_(inputs[2]))
                return fn(*inputs)
            return path, recorded

        trainer._step_fn.gradients = spy
        order = trainer.data.epoch_order(0)
        for _ in range(8):
            trainer.train_step()
    finally:
        trainer.close()
    y = np.concatenate(seen)
    truth = load_digits().target[order[: len(y)]]
    dropped = y == 10
    assert abs(dropped.mean() - 0.25) <= 5 * np.sqrt(0.25 * 0.75 / len(y))
    np.testing.assert_array_equal(y[~dropped], truth[~dropped])


def test_class_count_mismatch_and_missing_labels_are_errors(tmp_path):
    from ssd_keras.train import Trainer

    with pytest.raises(DataError, match="the data has 10 classes, model.num_classes = 5"):
        Trainer(_trainer_cfg(tmp_path, "model.num_classes=5"), progress=False)
    with pytest.raises(DataError, match="set data.labels = true"):
        Trainer(_trainer_cfg(tmp_path, "data.labels=false"), progress=False)
    with pytest.raises(ConfigError, match="data.labels = true: labels train a class-conditional"):
        _trainer_cfg(tmp_path, "model.num_classes=0", "sampler.guidance=1")


# ------------------------------------------------------------------ labelled data
def _folder(root, layout):
    for rel in layout:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(rel) * 9 % 255, 0, 0)).save(path)
    return root


def test_image_folder_classes_are_the_sorted_subfolders(tmp_path):
    root = _folder(tmp_path / "d", ["dog/a.png", "cat/b.png", "cat/c.png", "emu/d.png"])
    ds = make_dataset("folder", 8, 4, path=str(root), labels=True, random_flip=False,
                      num_workers=0, prefetch=0)
    try:
        assert ds.classes == ["cat", "dog", "emu"]
        x, y = next(ds)
        files = [ds.source.files[i] for i in ds.epoch_order(0)[:4]]
        assert y.tolist() == [["cat", "dog", "emu"].index(f.split("/")[0]) for f in files]
        assert x.shape == (4, 8, 8, 3)
    finally:
        ds.close()
    ordered = make_dataset("folder", 8, 4, path=str(root), labels=True, prefetch=0,
                           classes=("emu", "dog", "cat"))
    assert ordered.classes == ["emu", "dog", "cat"]
    ordered.close()


def test_labels_file_gives_the_classes(tmp_path):
    root = _folder(tmp_path / "d", ["a.png", "b.png", "sub/c.png"])
    labels = tmp_path / "labels.csv"
    labels.write_text("# file,class\na.png,zebra\nsub/c.png,ant\nb.png,zebra\n")
    ds = make_dataset("folder", 8, 3, path=str(root), labels=True, labels_file=str(labels),
                      random_flip=False, num_workers=0, prefetch=0)
    try:
        assert ds.classes == ["ant", "zebra"] and ds.source.files == ["a.png", "sub/c.png", "b.png"]
        _, y = next(ds)
        expect = {"a.png": 1, "sub/c.png": 0, "b.png": 1}
        assert y.tolist() == [expect[ds.source.files[i]] for i in ds.epoch_order(0)[:3]]
    finally:
        ds.close()


@pytest.mark.parametrize("layout, kwargs, match", [
    (["a.png", "b.png"], {}, "has no class subfolders"),
    (["cat/a.png", "b.png"], {}, "is not in a class subfolder"),
    (["cat/a.png", "dog/b.png"], {"classes": ("cat",)}, "has class 'dog', which data.classes does not list"),
])
def test_bad_labels_are_clear_errors(tmp_path, layout, kwargs, match):
    root = _folder(tmp_path / "d", layout)
    with pytest.raises(DataError, match=match):
        make_dataset("folder", 8, 2, path=str(root), labels=True, prefetch=0, **kwargs)


def test_labels_file_errors_name_the_problem(tmp_path):
    root = _folder(tmp_path / "d", ["a.png", "b.png"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png\n")
    with pytest.raises(DataError, match="line 1: expected `relative/path.png,class`"):
        make_dataset("folder", 8, 2, path=str(root), labels=True, labels_file=str(bad), prefetch=0)
    split = tmp_path / "split.txt"
    split.write_text("a.png\nb.png\n")
    part = tmp_path / "part.csv"
    part.write_text("a.png,x\n")
    with pytest.raises(DataError, match="gives no class for 1 image"):
        make_dataset("folder", 8, 2, path=str(root), labels=True, labels_file=str(part),
                     split_file=str(split), prefetch=0)


def test_the_digits_labels_are_the_digits():
    from sklearn.datasets import load_digits

    ds = make_dataset("digits", 16, 32, labels=True, random_flip=False, num_workers=0, prefetch=0)
    try:
        _, y = next(ds)
        assert ds.classes == [str(d) for d in range(10)]
        np.testing.assert_array_equal(y, load_digits().target[ds.epoch_order(0)[:32]])
    finally:
        ds.close()


# ------------------------------------------------------------------ command line
def test_sample_by_class_and_guidance_through_the_cli(tmp_path, capsys):
    from ssd_keras.cli import main
    from ssd_keras.train import Trainer

    cfg = _trainer_cfg(tmp_path, "train.steps=2", "train.checkpoint_every=2")
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = str(trainer.run_dir)
    out = tmp_path / "s"
    assert main(["sample", run, "--class", "7", "--class", "3", "--guidance", "3", "-n", "4",
                 "--steps", "5", "--out", str(out), "--no-progress"]) == 0
    assert (out / "labels.txt").read_text().splitlines() == [
        "images/00000.png,7", "images/00001.png,7", "images/00002.png,3", "images/00003.png,3"]
    assert "guidance 3" in capsys.readouterr().out
    assert main(["sample", run, "--class", "eleven", "--steps", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: --class: unknown class 'eleven'; this run's 10 classes are 0, 1" in err


def test_evaluation_samples_are_class_balanced_and_record_the_guidance(tiny, tmp_path, monkeypatch):
    import ssd_keras.sample as sample_module
    from ssd_keras.evaluation import sample_to_folder

    model, process, objective = tiny
    cfg = load_pipeline(PIPELINE, ["model.num_classes=3", "sampler.steps=4", "sampler.batch_size=4",
                                   "eval.chunk_size=4", "sampler.guidance=2"])
    asked = []
    real = sample_module.sample_images

    def recording(*args, labels=None, guidance=1.0, **kwargs):
        asked.append((labels.tolist(), guidance))
        return real(*args, labels=labels, guidance=guidance, **kwargs)

    monkeypatch.setattr(sample_module, "sample_images", recording)
    sample_to_folder(lambda: (model, process, objective), cfg, tmp_path, num_samples=7,
                     identity={}, progress=False)
    assert asked == [([0, 1, 2, 0], 2.0), ([1, 2, 0, 1], 2.0)]  # sample i: class i mod 3
    assert json.loads((tmp_path / "samples.json").read_text())["sampler"]["guidance"] == 2.0


@pytest.mark.parametrize("overrides, match", [
    (["sampler.guidance=2", "model.num_classes=0", "data.labels=false"],
     "sampler.guidance = 2.0: guidance needs a class-conditional model"),
    (['data.labels_file="x.csv"'], 'data.labels_file = "x.csv": is only used with data.source = "folder"'),
    (["data.classes=[\"a\", \"a\"]"], "data.classes = \\[\"a\", \"a\"\\]: names a class twice"),
    (["data.classes=[\"a\", \"b\"]"], "data.classes = \\[\"a\", \"b\"\\]: lists 2 classes, model.num_classes = 10"),
    (["model.null_class=false"], "train.cond_drop_prob = 0.1: label dropout needs the null class"),
])
def test_class_conditional_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_pipeline(ROOT / "pipelines" / "quickstart_classes.toml", overrides)
