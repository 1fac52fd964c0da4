"""Pipeline config: loading, defaults, overrides, round trip, errors, resume checks."""

import dataclasses
import inspect
from pathlib import Path

import pytest

from ssd_keras.config import (
    MODEL_FINGERPRINT_KEYS,
    SECTIONS,
    ConfigError,
    PipelineConfig,
    ProcessConfig,
    from_dict,
    incompatible_keys,
    load_pipeline,
    parse_override,
)

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
PIPELINE_FILES = sorted(PIPELINES.glob("*.toml"))

MINIMAL = "[process]\nimage_size = 64\nlevels = 4\n"


def write(tmp_path, text, name="bad.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# pipelines/
# --------------------------------------------------------------------------------------

# name -> (image_size, levels, channel_mult, batch_size, lr, target, data source)
PAPER = {
    "celeba64_2L": (64, 2, (1, 2, 3, 4), 128, 1e-4, "x0", "tfds"),
    "celeba64_3L": (64, 3, (1, 2, 3, 4), 128, 1e-4, "x0", "tfds"),
    "celeba64_4L": (64, 4, (1, 2, 3, 4), 128, 1e-4, "x0", "tfds"),
    "celeba128_3L": (128, 3, (1, 1, 2, 3, 4), 128, 1e-4, "x0", "folder"),
    "celeba128_5L": (128, 5, (1, 1, 2, 3, 4), 128, 1e-4, "x0", "folder"),
    "celeba256_3L": (256, 3, (1, 1, 2, 2, 4, 4), 64, 5e-5, "x0", "folder"),
    "celeba256_4L": (256, 4, (1, 1, 2, 2, 4, 4), 64, 5e-5, "x0", "folder"),
    "celeba256_6L": (256, 6, (1, 1, 2, 2, 4, 4), 64, 5e-5, "x0", "folder"),
    "imagenet64_2L": (64, 2, (1, 2, 3, 4), 128, 1e-4, "x0", "tfds"),
    "imagenet64_4L": (64, 4, (1, 2, 3, 4), 128, 1e-4, "x0", "tfds"),
    "celeba64_ddpm_x0": (64, 1, (1, 2, 3, 4), 128, 1e-4, "x0", "tfds"),
    "celeba64_ddpm_eps": (64, 1, (1, 2, 3, 4), 128, 1e-4, "eps", "tfds"),
}


def test_expected_pipelines_exist():
    names = {p.stem for p in PIPELINE_FILES}
    assert set(PAPER) | {"quickstart", "cifar10_3L"} <= names


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.stem)
def test_every_pipeline_loads(path):
    cfg = load_pipeline(path)
    assert cfg.run.name == path.stem
    assert cfg.process.resolutions[-1] == cfg.process.image_size
    assert len(cfg.process.resolutions) == cfg.process.levels
    assert set(cfg.process.resolutions) <= set(cfg.feature_resolutions)
    assert path.read_text().startswith("# "), "each pipeline starts with a header comment"
    if cfg.data.source == "tfds":
        assert cfg.data.tfds_name
    if cfg.data.source == "folder":
        assert cfg.data.path and cfg.data.split_file


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_pipelines_match_the_paper(name):
    size, levels, mult, batch, lr, target, source = PAPER[name]
    cfg = load_pipeline(PIPELINES / f"{name}.toml")
    assert (cfg.process.image_size, cfg.process.levels) == (size, levels)
    assert cfg.model.channel_mult == mult
    assert (cfg.train.batch_size, cfg.optimizer.lr) == (batch, lr)
    assert cfg.loss.target == target
    assert cfg.data.source == source
    assert cfg.process.timesteps == 1000 and cfg.process.noise_schedule == "linear"
    assert cfg.process.resolution_schedule == "ConvexDecay-0.5"
    assert cfg.model.base_channels == 128 and cfg.model.num_res_blocks == 2
    assert cfg.model.attention_resolutions == (16, 8) and cfg.model.num_heads == 4
    assert cfg.ema.rate == 0.9999
    if target == "eps":  # DDPM-eps baseline: plain L_simple, fixed-large variance
        assert cfg.loss.min_snr_gamma == 0 and cfg.sampler.variance == "fixed_large"
    else:
        assert cfg.loss.min_snr_gamma == 5 and cfg.sampler.variance == "fixed_small"


def test_paper_data_sources():
    assert load_pipeline(PIPELINES / "celeba64_4L.toml").data.tfds_name == "celeb_a"
    assert load_pipeline(PIPELINES / "imagenet64_2L.toml").data.tfds_name == "imagenet_resized/64x64"
    assert load_pipeline(PIPELINES / "cifar10_3L.toml").data.tfds_name == "cifar10"
    assert load_pipeline(PIPELINES / "celeba256_6L.toml").data.path == "data/celeba_hq_256"


def test_quickstart():
    cfg = load_pipeline(PIPELINES / "quickstart.toml")
    assert cfg.data.source == "digits"
    assert cfg.process.resolutions == [4, 8, 16]  # three levels, two resolution changes
    assert cfg.model.channel_mult == (1, 2, 2) and cfg.model.base_channels == 32
    assert cfg.sampler.steps == 100 and cfg.sampler.steps <= cfg.process.timesteps


# --------------------------------------------------------------------------------------
# defaults and derived values
# --------------------------------------------------------------------------------------

DEFAULTS = {
    "run": {"name": "minimal", "output_dir": "runs", "seed": 0},
    "data": {"source": "digits", "path": "", "split_file": "", "tfds_name": "",
             "tfds_split": "train", "tfds_data_dir": "", "image_key": "image",
             "random_flip": True, "cache": False, "on_bad_image": "skip",
             "small_images": "upscale", "num_workers": 2, "limit": 0,
             "labels": False, "labels_file": "", "label_key": "label", "classes": []},
    "process": {"image_size": 64, "levels": 4, "timesteps": 1000, "noise_schedule": "linear",
                "resolution_schedule": "ConvexDecay-0.5"},
    "model": {"base_channels": 128, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 2,
              "attention_resolutions": [16, 8], "num_heads": 4, "num_head_channels": -1,
              "dropout": 0.1, "full_res_change_via_upsample": True,
              "num_classes": 0, "null_class": True},
    "loss": {"target": "x0", "min_snr_gamma": 5.0},
    "optimizer": {"lr": 1e-4, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999,
                  "epsilon": 1e-8, "grad_clip": 1.0},
    "ema": {"rate": 0.9999, "start_step": 0},
    "train": {"batch_size": 128, "steps": 500000, "precision": "float32", "log_every": 50,
              "checkpoint_every": 5000, "sample_every": 10000, "keep_checkpoints": 3,
              "milestones": [], "on_nonfinite": "stop", "loss_scale_init": 65536.0,
              "loss_scale_growth_interval": 2000, "allreduce_bucket_mb": 25.0, "graph": "auto",
              "init_from": "", "init_weights": "ema", "init_strict": True,
              "cond_drop_prob": 0.1},
    "sampler": {"steps": 1000, "noise": "exact", "lanczos_iterations": 40, "clip": True,
                "variance": "fixed_small", "method": "ancestral", "eta": 0.0, "num_images": 16,
                "batch_size": 16, "seed": 0, "graph": "auto", "guidance": 1.0},
    "eval": {"num_samples": 1000, "inception_weights": "", "reference": "", "reference_images": 50000,
             "chunk_size": 0, "cache_dir": ""},
}


def test_defaults(tmp_path):
    cfg = load_pipeline(write(tmp_path, MINIMAL, "minimal.toml"))
    assert cfg.to_dict() == DEFAULTS
    assert list(cfg.to_dict()) == list(SECTIONS)
    assert isinstance(cfg.model.channel_mult, tuple)
    assert isinstance(cfg.loss.min_snr_gamma, float)
    assert cfg.run_dir == Path("runs") / "minimal"


def test_section_classes_and_frozen(tmp_path):
    cfg = load_pipeline(write(tmp_path, MINIMAL))
    for name, cls in SECTIONS.items():
        assert type(getattr(cfg, name)) is cls
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.base_channels = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = None
    # sections are handed over as keyword arguments
    assert dataclasses.asdict(cfg.process) == DEFAULTS["process"]


def test_int_accepted_for_float(tmp_path):
    cfg = load_pipeline(write(tmp_path, MINIMAL + "[loss]\nmin_snr_gamma = 5\n[optimizer]\nlr = 1\n"))
    assert cfg.loss.min_snr_gamma == 5.0 and type(cfg.loss.min_snr_gamma) is float
    assert type(cfg.optimizer.lr) is float


def test_sampler_steps_defaults_to_timesteps(tmp_path):
    cfg = load_pipeline(write(tmp_path, "[process]\nimage_size = 64\nlevels = 2\ntimesteps = 500\n"))
    assert cfg.sampler.steps == 500
    cfg = load_pipeline(write(tmp_path, MINIMAL), ["process.timesteps=200"])
    assert cfg.sampler.steps == 200


@pytest.mark.parametrize("size, levels, expected", [
    (64, 4, [8, 16, 32, 64]), (64, 2, [32, 64]), (64, 1, [64]),
    (128, 5, [8, 16, 32, 64, 128]), (256, 3, [64, 128, 256]),
    (256, 6, [8, 16, 32, 64, 128, 256]),
])
def test_resolutions(size, levels, expected):
    assert ProcessConfig(image_size=size, levels=levels).resolutions == expected


def test_from_dict_and_default_name():
    cfg = from_dict({"process": {"image_size": 32, "levels": 2},
                     "model": {"channel_mult": [1, 2, 2]}})
    assert cfg.run.name == "run"
    assert from_dict({"process": {"image_size": 32, "levels": 2}}, "x/my_run.toml").run.name == "my_run"
    assert PipelineConfig.from_dict(cfg.to_dict(), "<d>") == cfg
    assert cfg.model.channel_mult == (1, 2, 2)


def test_direct_construction_is_validated():
    PipelineConfig(process=ProcessConfig(image_size=64, levels=4))
    with pytest.raises(ConfigError, match=r"process.levels = 7"):
        PipelineConfig(process=ProcessConfig(image_size=64, levels=7))
    cfg = load_pipeline(PIPELINES / "quickstart.toml")
    assert cfg.replace(train={"steps": 10}).train.steps == 10
    with pytest.raises(ConfigError, match=r"quickstart.toml: train.steps = 0: must be > 0"):
        cfg.replace(train={"steps": 0})
    with pytest.raises(ConfigError, match=r"did you mean train.steps"):
        cfg.replace(train={"step": 10})


def test_replace_validates_the_whole_config_and_names_the_given_source():
    cfg = load_pipeline(PIPELINES / "quickstart.toml")
    where = "run/ckpt.npz (with command-line options)"
    new = cfg.replace(sampler={"steps": 10, "method": "ddim"}, source=where)
    assert (new.sampler.steps, new.sampler.method, new.source) == (10, "ddim", where)
    assert new.model == cfg.model and cfg.sampler.method == "ancestral"
    with pytest.raises(ConfigError, match=r"^run/ckpt.npz \(with command-line options\): "
                                          r"sampler.eta = 2.0: must be <= 1.0"):
        cfg.replace(sampler={"eta": 2.0}, source=where)
    with pytest.raises(ConfigError, match=r"sampler.steps = 5000: .*process.timesteps"):
        cfg.replace(sampler={"steps": 5000})  # checks across sections run too


# --------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("optimizer.lr=2e-4", ("optimizer", "lr", 2e-4)),
    ("train.steps = 10", ("train", "steps", 10)),
    ("model.channel_mult=[1,2]", ("model", "channel_mult", [1, 2])),
    ('sampler.noise="lanczos"', ("sampler", "noise", "lanczos")),
    ("sampler.noise=lanczos", ("sampler", "noise", "lanczos")),
    ("data.random_flip=false", ("data", "random_flip", False)),
    ("data.path=/data/x y", ("data", "path", "/data/x y")),
    ("data.path=", ("data", "path", "")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_overrides(tmp_path):
    path = write(tmp_path, MINIMAL, "base.toml")
    cfg = load_pipeline(path, [
        "optimizer.lr=2e-4", "model.channel_mult=[1,2,2,2]", "model.base_channels=64",
        "sampler.noise=lanczos", 'data.source="folder"', "data.path=/tmp/imgs",
        "data.random_flip=false", "run.name=2024", "optimizer.grad_clip=0",
        "train.milestones=[1000, 2000]",
    ])
    assert cfg.optimizer.lr == 2e-4
    assert cfg.model.channel_mult == (1, 2, 2, 2) and cfg.model.base_channels == 64
    assert cfg.sampler.noise == "lanczos"
    assert cfg.data.source == "folder" and cfg.data.path == "/tmp/imgs"
    assert cfg.data.random_flip is False
    assert cfg.run.name == "2024"  # a number given for a string key stays a string
    assert cfg.optimizer.grad_clip == 0.0
    assert cfg.train.milestones == (1000, 2000)
    # the file itself is untouched by overrides
    assert load_pipeline(path).optimizer.lr == 1e-4
    # a later override wins
    assert load_pipeline(path, ["train.steps=5", "train.steps=7"]).train.steps == 7


@pytest.mark.parametrize("override, parts", [
    ("model.chanel_mult=[1,2]", ["--set model.chanel_mult=[1,2]", "unknown key",
                                 "did you mean model.channel_mult"]),
    ("modle.base_channels=64", ["[modle]", "unknown section", "did you mean [model]"]),
    ("train.lr=1e-3", ["train.lr = 0.001", "did you mean optimizer.lr"]),
    ("lr=1e-3", ["--set lr=1e-3", "section.key=value"]),
    ("optimizer.lr", ["--set optimizer.lr", "section.key=value"]),
    ("process.levels=7", ["--set process.levels=7", "process.levels = 7",
                          "len(model.channel_mult) = 4"]),
    ("optimizer.lr=fast", ['optimizer.lr = "fast"', "expected a number"]),
    ("sampler.noise=gauss", ['sampler.noise = "gauss"', '"exact", "lanczos"']),
])
def test_bad_overrides(tmp_path, override, parts):
    path = write(tmp_path, MINIMAL, "base.toml")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, [override])
    msg = str(info.value)
    assert str(path) in msg
    for part in parts:
        assert part in msg


# --------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.stem)
def test_round_trip(tmp_path, path):
    cfg = load_pipeline(path)
    saved = cfg.save(tmp_path / "config.toml")
    again = load_pipeline(saved)
    assert again == cfg
    assert again.run.name == cfg.run.name  # the saved name wins over the file stem
    assert again.to_toml() == cfg.to_toml()
    assert from_dict(cfg.to_dict()) == cfg


def test_round_trip_odd_values(tmp_path):
    cfg = load_pipeline(write(tmp_path, MINIMAL), [
        "data.source=folder", 'data.path="C:\\\\data\\\\\\"quoted\\" dir\\tτ"', "optimizer.lr=1e-17",
        "optimizer.epsilon=1.5e300", "model.dropout=0", "model.attention_resolutions=[]",
        "train.milestones=[5, 1]",
    ])
    assert cfg.data.path == 'C:\\data\\"quoted" dir\tτ'
    text = cfg.to_toml()
    again = load_pipeline(write(tmp_path, text, "saved.toml"))
    assert again == cfg
    assert again.data.path == cfg.data.path
    assert again.optimizer.lr == 1e-17 and again.model.attention_resolutions == ()


def test_to_toml_mentions_every_key(tmp_path):
    cfg = load_pipeline(PIPELINES / "quickstart.toml")
    text = cfg.to_toml()
    for name, cls in SECTIONS.items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} = " in text


# --------------------------------------------------------------------------------------
# bad configs: (file text, substrings the message must contain besides the file name)
# --------------------------------------------------------------------------------------

M4 = MINIMAL  # image_size 64, levels 4, channel_mult [1, 2, 3, 4]
BAD = {
    "syntax": ("[process\nimage_size = 64\n", ["TOML syntax error", "line 1"]),
    "syntax_value": ("[process]\nimage_size = 64\nlevels = four\n", ["TOML syntax error", "line 3"]),
    "unknown_section": (M4 + "[modle]\nbase_channels = 64\n",
                        ["[modle]", "unknown section", "did you mean [model]"]),
    "section_not_table": ("model = 3\n" + M4, ["model = 3", "must be a table [model], not an integer"]),
    "unknown_key": (M4 + "[model]\nchanel_mult = [1, 2]\n",
                    ["model.chanel_mult = [1, 2]", "did you mean model.channel_mult"]),
    "key_in_wrong_section": (M4 + "[train]\nlr = 0.001\n",
                             ["train.lr = 0.001", "did you mean optimizer.lr"]),
    "missing_image_size": ("[process]\nlevels = 2\n", ["process.image_size", "required"]),
    "missing_process": ("[run]\nseed = 1\n", ["process.image_size", "process.levels", "required"]),
    "levels_too_many": (M4.replace("levels = 4", "levels = 7"),
                        ["process.levels = 7", "len(model.channel_mult) = 4", "[64, 32, 16, 8]"]),
    "levels_zero": (M4.replace("levels = 4", "levels = 0"), ["process.levels = 0", ">= 1"]),
    "levels_float": (M4.replace("levels = 4", "levels = 2.0"),
                     ["process.levels = 2.0", "expected an integer"]),
    "image_size_odd": (M4.replace("64", "60"), ["process.image_size = 60", "divisible by 8"]),
    "image_size_str": (M4.replace("64", '"64"'), ['process.image_size = "64"', "expected an integer"]),
    "image_size_negative": (M4.replace("64", "-64"), ["process.image_size = -64", "> 0"]),
    "timesteps_bool": (M4 + "timesteps = true\n", ["process.timesteps = true", "got a boolean"]),
    "noise_schedule": (M4 + 'noise_schedule = "quadratic"\n',
                       ['process.noise_schedule = "quadratic"', '"linear", "cosine"']),
    "resolution_schedule": (M4 + 'resolution_schedule = "Linear-2"\n',
                            ['process.resolution_schedule = "Linear-2"', "ConvexDecay"]),
    "resolution_schedule_no_g": (M4 + 'resolution_schedule = "ConvexDecay"\n',
                                 ['process.resolution_schedule = "ConvexDecay"', "parameter"]),
    "too_few_timesteps": (M4 + "timesteps = 3\n[sampler]\nsteps = 2\n",
                          ["process.resolution_schedule", "T = 3"]),
    "random_flip_int": (M4 + "[data]\nrandom_flip = 1\n",
                        ["data.random_flip = 1", "expected true or false, got an integer"]),
    "source_enum": (M4 + '[data]\nsource = "web"\n',
                    ['data.source = "web"', '"digits", "folder", "tfds"']),
    "folder_without_path": (M4 + '[data]\nsource = "folder"\n', ['data.path = ""', "folder"]),
    "tfds_without_name": (M4 + '[data]\nsource = "tfds"\n', ['data.tfds_name = ""', "tfds"]),
    "path_with_digits": (M4 + '[data]\npath = "images"\n',
                         ['data.path = "images"', 'only used with data.source = "folder"',
                          'data.source = "digits"']),
    "tfds_dir_with_folder": (M4 + '[data]\nsource = "folder"\npath = "x"\ntfds_data_dir = "d"\n',
                             ['data.tfds_data_dir = "d"', 'only used with data.source = "tfds"']),
    "on_bad_image": (M4 + '[data]\non_bad_image = "warn"\n', ['data.on_bad_image = "warn"', '"skip"']),
    "limit_negative": (M4 + "[data]\nlimit = -1\n", ["data.limit = -1", ">= 0"]),
    "channel_mult_float": (M4 + "[model]\nchannel_mult = [1, 2.5]\n",
                           ["model.channel_mult = [1, 2.5]", "list of integers"]),
    "channel_mult_bool": (M4 + "[model]\nchannel_mult = [1, true]\n",
                          ["model.channel_mult = [1, true]", "list of integers"]),
    "channel_mult_str": (M4 + '[model]\nchannel_mult = "1,2"\n',
                         ['model.channel_mult = "1,2"', "list of integers"]),
    "channel_mult_empty": (M4 + "[model]\nchannel_mult = []\n",
                           ["model.channel_mult = []", "must not be empty"]),
    "channel_mult_zero": (M4 + "[model]\nchannel_mult = [1, 0, 2, 2]\n",
                          ["model.channel_mult = [1, 0, 2, 2]", "> 0"]),
    "groupnorm": (M4 + "[model]\nbase_channels = 48\n", ["model.base_channels = 48", "32"]),
    "attention_not_a_level": (M4 + "[model]\nattention_resolutions = [16, 5]\n",
                              ["model.attention_resolutions = [16, 5]", "5 is not a feature",
                               "[64, 32, 16, 8]"]),
    "attention_too_small": (M4 + "[model]\nattention_resolutions = [4]\n",
                            ["model.attention_resolutions = [4]", "4 is not a feature"]),
    "num_heads": (M4 + "[model]\nnum_heads = 3\n", ["model.num_heads = 3", "not divisible"]),
    "num_head_channels_zero": (M4 + "[model]\nnum_head_channels = 0\n",
                               ["model.num_head_channels = 0", "-1"]),
    "num_head_channels": (M4 + "[model]\nnum_head_channels = 96\n",
                          ["model.num_head_channels = 96", "512 channels", "8x8"]),
    "dropout_one": (M4 + "[model]\ndropout = 1.0\n", ["model.dropout = 1.0", "< 1.0"]),
    "dropout_bool": (M4 + "[model]\ndropout = true\n", ["model.dropout = true", "expected a number"]),
    "target_enum": (M4 + '[loss]\ntarget = "v"\n', ['loss.target = "v"', '"x0", "eps"']),
    "eps_with_levels": (M4 + '[loss]\ntarget = "eps"\n',
                        ['loss.target = "eps"', "process.levels = 1", "got 4"]),
    "gamma_negative": (M4 + "[loss]\nmin_snr_gamma = -1\n", ["loss.min_snr_gamma = -1.0", ">= 0"]),
    "fixed_large_ssd": (M4 + '[sampler]\nvariance = "fixed_large"\n',
                        ['sampler.variance = "fixed_large"', "levels = 1"]),
    "sampler_method": (M4 + '[sampler]\nmethod = "ddpm"\n',
                       ['sampler.method = "ddpm"', '"ancestral", "ddim"']),
    "sampler_eta_big": (M4 + "[sampler]\neta = 1.5\n", ["sampler.eta = 1.5", "<= 1.0"]),
    "sampler_eta_negative": (M4 + "[sampler]\neta = -0.1\n", ["sampler.eta = -0.1", ">= 0"]),
    "sampler_eta_string": (M4 + '[sampler]\neta = "zero"\n', ["sampler.eta", "expected a number"]),
    "lr_negative": (M4 + "[optimizer]\nlr = -1e-4\n", ["optimizer.lr = -0.0001", "> 0"]),
    "lr_zero": (M4 + "[optimizer]\nlr = 0\n", ["optimizer.lr = 0.0", "> 0"]),
    "lr_nan": (M4 + "[optimizer]\nlr = nan\n", ["optimizer.lr = nan", "finite"]),
    "beta2_one": (M4 + "[optimizer]\nbeta2 = 1.0\n", ["optimizer.beta2 = 1.0", "< 1"]),
    "grad_clip_negative": (M4 + "[optimizer]\ngrad_clip = -1.0\n", ["optimizer.grad_clip = -1.0"]),
    "ema_rate_one": (M4 + "[ema]\nrate = 1.0\n", ["ema.rate = 1.0", "< 1.0"]),
    "ema_rate_negative": (M4 + "[ema]\nrate = -0.1\n", ["ema.rate = -0.1", ">= 0"]),
    "batch_zero": (M4 + "[train]\nbatch_size = 0\n", ["train.batch_size = 0", "> 0"]),
    "precision": (M4 + '[train]\nprecision = "float16"\n',
                  ['train.precision = "float16"', '"mixed_bfloat16"']),
    "milestones": (M4 + "[train]\nmilestones = [0, 100]\n", ["train.milestones = [0, 100]", "> 0"]),
    "on_nonfinite": (M4 + '[train]\non_nonfinite = "ignore"\n', ['train.on_nonfinite = "ignore"']),
    "loss_scale_not_power_of_2": (M4 + "[train]\nloss_scale_init = 1000.0\n",
                                  ["train.loss_scale_init = 1000.0", "power of 2"]),
    "loss_scale_below_one": (M4 + "[train]\nloss_scale_init = 0.5\n",
                             ["train.loss_scale_init = 0.5", "power of 2 >= 1"]),
    "loss_scale_growth_zero": (M4 + "[train]\nloss_scale_growth_interval = 0\n",
                               ["train.loss_scale_growth_interval = 0", ">= 1"]),
    "bucket_negative": (M4 + "[train]\nallreduce_bucket_mb = -1\n",
                        ["train.allreduce_bucket_mb = -1.0", ">= 0"]),
    "sample_every_negative": (M4 + "[train]\nsample_every = -1\n", ["train.sample_every = -1"]),
    "sampler_steps_too_many": (M4 + "[sampler]\nsteps = 2000\n",
                               ["sampler.steps = 2000", "process.timesteps = 1000"]),
    "sampler_steps_vs_timesteps": (M4 + "timesteps = 500\n[sampler]\nsteps = 1000\n",
                                   ["sampler.steps = 1000", "process.timesteps = 500"]),
    "sampler_steps_one": (M4 + "[sampler]\nsteps = 1\n", ["sampler.steps = 1", ">= 2"]),
    "sampler_noise": (M4 + '[sampler]\nnoise = "gaussian"\n',
                      ['sampler.noise = "gaussian"', '"exact", "lanczos"']),
    "lanczos_iterations": (M4 + "[sampler]\nlanczos_iterations = 0\n",
                           ["sampler.lanczos_iterations = 0"]),
    "run_name_path": (M4 + '[run]\nname = "a/b"\n', ['run.name = "a/b"', "directory name"]),
    "run_seed": (M4 + "[run]\nseed = -1\n", ["run.seed = -1", ">= 0"]),
    "output_dir_empty": (M4 + '[run]\noutput_dir = ""\n', ['run.output_dir = ""', "empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config(tmp_path, case):
    text, parts = BAD[case]
    path = write(tmp_path, text, f"{case}.toml")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert isinstance(info.value, ValueError)
    # one problem, one message (no follow-on errors)
    assert len(info.value.errors) == (2 if case == "missing_process" else 1), msg


def test_all_field_errors_reported_together(tmp_path):
    path = write(tmp_path, M4 + "[optimizer]\nlr = 0\n[ema]\nrate = 2.0\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert len(info.value.errors) == 2
    assert all(line.startswith(f"{path}: ") for line in info.value.errors)
    assert "optimizer.lr" in info.value.errors[0] and "ema.rate" in info.value.errors[1]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "nope.toml")


@pytest.mark.parametrize("extra", [
    '[sampler]\nvariance = "fixed_large"\n',                            # DDPM-x0, fixed large
    '[loss]\ntarget = "eps"\nmin_snr_gamma = 0\n[sampler]\nvariance = "fixed_large"\n',
    '[process]\nimage_size = 64\nlevels = 1\nresolution_schedule = "Equal"\n',
    '[data]\nsource = "folder"\npath = "imgs"\n',
    '[data]\nsource = "tfds"\ntfds_name = "cifar10"\n',
    "[model]\nnum_head_channels = 64\n",
    "[model]\nattention_resolutions = []\n",
])
def test_valid_edge_configs(tmp_path, extra):
    text = extra if extra.startswith("[process]") else "[process]\nimage_size = 64\nlevels = 1\n" + extra
    load_pipeline(write(tmp_path, text, "ok.toml"))


@pytest.mark.parametrize("name", ["Equal", "ConvexDecay-0.5", "ConvexDecay_0.5",
                                  "TanhLikeDecay-2", "SigmoidLikeDecay-2"])
def test_resolution_schedule_names(name):
    from_dict({"process": {"image_size": 64, "levels": 4, "resolution_schedule": name}})


# --------------------------------------------------------------------------------------
# resume compatibility
# --------------------------------------------------------------------------------------


def test_incompatible_keys():
    base = load_pipeline(PIPELINES / "celeba64_4L.toml")
    assert incompatible_keys(base, base) == []
    training_only = base.replace(optimizer={"lr": 2e-4}, train={"steps": 10, "batch_size": 8},
                                 sampler={"steps": 50, "noise": "lanczos"}, ema={"rate": 0.99},
                                 loss={"min_snr_gamma": 1.0}, data={"limit": 5},
                                 run={"name": "other"})
    assert incompatible_keys(base, training_only) == []
    changed = base.replace(process={"levels": 2, "resolution_schedule": "Equal"},
                           model={"base_channels": 64, "dropout": 0.1})
    assert incompatible_keys(base, changed) == [
        "process.levels", "process.resolution_schedule", "model.base_channels", "model.dropout"]
    ddpm = load_pipeline(PIPELINES / "celeba64_ddpm_x0.toml")
    eps = load_pipeline(PIPELINES / "celeba64_ddpm_eps.toml")
    assert incompatible_keys(ddpm, eps) == ["loss.target"]
    # the saved (dict) form works too
    assert incompatible_keys(base.to_dict(), changed) == incompatible_keys(base, changed)


def test_fingerprint_keys():
    keys = PipelineConfig.model_fingerprint_keys()
    assert keys == list(MODEL_FINGERPRINT_KEYS)
    assert "loss.target" in keys and "loss.min_snr_gamma" not in keys
    assert {k.split(".")[0] for k in keys} == {"process", "model", "loss"}
    assert "model.channel_mult" in keys and "process.image_size" in keys


# --------------------------------------------------------------------------------------
# the sections are keyword arguments of the modules that consume them
# --------------------------------------------------------------------------------------


def test_process_section_matches_scale_space_process():
    from ssd_keras import process

    params = inspect.signature(process.ScaleSpaceProcess).parameters
    for f in dataclasses.fields(ProcessConfig):
        assert f.name in params


@pytest.mark.parametrize("module, attr, section", [
    ("ssd_keras.data", "make_dataset", "data"),
    ("ssd_keras.nn", "FlexiUNet", "model"),
])
def test_section_matches_consumer(module, attr, section):
    import importlib

    fn = getattr(importlib.import_module(module), attr)
    params = inspect.signature(fn).parameters
    missing = [f.name for f in dataclasses.fields(SECTIONS[section]) if f.name not in params]
    assert not missing, f"{module}.{attr} does not take {missing}"


def test_small_images_skip_is_accepted_as_the_data_module_documents_it(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[data]\nsmall_images = "skip"\n[process]\nimage_size = 16\nlevels = 1\n')
    assert load_pipeline(path).data.small_images == "skip"


# --------------------------------------------------------------------------------------
# the validator: pydantic underneath, this module's messages on top
# --------------------------------------------------------------------------------------


def test_a_config_saved_by_the_old_writer_still_loads():
    """Run directories hold config.toml files written by 0.1's hand-written TOML writer
    (inline arrays, its own string escapes); they load as the config they were saved from."""
    saved = Path(__file__).resolve().parent / "data" / "config_written_by_0.1.toml"
    cfg = load_pipeline(saved)
    assert cfg == load_pipeline(PIPELINES / "quickstart.toml", [
        "data.source=folder", 'data.path="C:\\\\data\\\\\\"quoted\\" dir\\tτ"', "train.milestones=[500, 1000]",
        "optimizer.epsilon=1.5e300"])
    assert cfg.data.path == 'C:\\data\\"quoted" dir\tτ' and cfg.train.milestones == (500, 1000)


def test_sections_are_validated_when_built_directly():
    from ssd_keras.config import ModelConfig, SamplerConfig

    with pytest.raises(ConfigError) as info:
        ModelConfig(channel_mult=[1, 2.5], dropout=True, chanel_mult=3)
    assert info.value.errors == [
        "<config>: model.channel_mult = [1, 2.5]: expected a list of integers, got an item 2.5 (float)",
        "<config>: model.dropout = true: expected a number, got a boolean",
        "<config>: model.chanel_mult = 3: unknown key in [model]; did you mean model.channel_mult? "
        "valid keys: base_channels, channel_mult, num_res_blocks, attention_resolutions, "
        "num_heads, num_head_channels, dropout, full_res_change_via_upsample, num_classes, "
        "null_class",
    ]
    with pytest.raises(ConfigError, match=r'^<config>: sampler.noise = "x": must be one of "exact", "lanczos"$'):
        SamplerConfig(100, "x")  # positional arguments are named too
    assert ModelConfig(channel_mult=[1, 2]).channel_mult == (1, 2)
    assert isinstance(ModelConfig(dropout=0).dropout, float)


def test_every_problem_of_every_section_is_one_line(tmp_path):
    path = write(tmp_path, M4 + "[optimizer]\nlr = 0\nbeta1 = true\n[model]\nchanel = 3\n"
                                "channel_mult = [1, 0]\n[data]\nsource = 3\n[foo]\na = 1\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    lines = info.value.errors
    assert str(info.value) == "\n".join(lines)
    assert [line.split(": ")[1].split(" = ")[0] for line in lines] == [
        "[foo]", "data.source", "model.channel_mult", "model.chanel", "optimizer.lr", "optimizer.beta1"]
    assert all(line.startswith(f"{path}: ") and "\n" not in line for line in lines)
    assert "did you mean model.channel_mult" in lines[3] and "valid keys: base_channels" in lines[3]
    # nothing of pydantic's own report reaches the user
    assert not any(word in str(info.value) for word in ("validation error", "pydantic", "input_value",
                                                        "For further information"))


def test_configs_are_hashable_and_picklable():
    import copy
    import pickle

    cfg = load_pipeline(PIPELINES / "quickstart.toml")
    assert hash(cfg) == hash(copy.deepcopy(cfg))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert len({cfg, cfg.replace(train={"steps": 10}), copy.deepcopy(cfg)}) == 2
