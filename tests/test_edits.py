"""Scale-space edits (docs/scale_space_edits.md): the math against the process's dense
references, then `ssd-run upsample`, `vary` and `interpolate` end to end on a tiny model."""

import numpy as np
import pytest
from keras import ops
from PIL import Image

from ssd_keras import edits
from ssd_keras.cli import main
from ssd_keras.operators import SeparableOperator
from test_end_to_end import TINY, write_images
from test_process import DenseChain, small_process

np_ = ops.convert_to_numpy


def dense(op: SeparableOperator) -> np.ndarray:
    return np.kron(op.mh, op.mw)


def null_vector(p, r_y, rng, channels):
    """A full-resolution image in the null space of ``D_{r_max -> r_y}``."""
    op = p.operator(p.image_size, r_y)
    z = rng.standard_normal((p.image_size**2, channels))
    d = dense(op)
    z = z - np.linalg.pinv(d) @ (d @ z)
    return z.reshape(1, p.image_size, p.image_size, channels)


# ---------------------------------------------------------------------- the math
@pytest.mark.parametrize("r_y", [2, 4])
def test_start_state_is_q_of_x_t_given_every_x0_that_downsamples_to_y(r_y):
    p = small_process()  # 8 px, levels 2, 4, 8, T = 40, float64 below
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (1, 8, 8, 2))
    x0_other = x0 + null_vector(p, r_y, rng, 2)  # a different image with the same downsample
    y = np_(p.degrade(x0, r_y))
    assert np.allclose(np_(p.degrade(x0_other, r_y)), y, atol=1e-12)
    assert not np.allclose(x0_other, x0)
    chain = DenseChain(p)
    t_lo, t_hi = edits.level_steps(p, r_y)
    for t in sorted({t_lo, (t_lo + t_hi) // 2, t_hi}):
        eps = rng.standard_normal((1, r_y, r_y, 2))
        start = np_(edits.start_state(p, ops.convert_to_tensor(y), t, ops.convert_to_tensor(eps, "float64")))
        # same noise through both: the forward process's own sample, for both images
        for x in (x0, x0_other):
            assert np.allclose(start, np_(p.q_sample(x, [t], eps)), atol=1e-12, rtol=0)
        # mean and covariance: the start is a_t y + sigma_t eps; the dense chain's marginal
        # (built from the per-step transitions) is N(mean, cov) per channel
        for x in (x0, x0_other):
            for c in range(2):
                mean, cov = chain.marginal(x[0, :, :, c].reshape(-1), t)
                assert np.allclose(mean, p.signal[t] * y[0, :, :, c].reshape(-1), atol=1e-12)
                assert np.allclose(cov, p.noise_std[t] ** 2 * np.eye(r_y**2), atol=1e-12)


def test_start_step_spans_the_level_from_its_least_to_its_noisiest_step():
    p = small_process(image_size=16, timesteps=100, resolution_schedule="ConvexDecay-0.5")
    for r in edits.input_levels(p):
        t_lo, t_hi = edits.level_steps(p, r)
        assert p.r[t_lo] == p.r[t_hi] == r and p.r[t_lo - 1] == 2 * r  # t_lo is a change step
        assert t_hi == p.timesteps - 1 or p.r[t_hi + 1] == r // 2
        starts = [edits.start_step(p, r, s) for s in (0.0, 0.25, 0.5, 1.0)]
        assert starts[0] == t_lo and starts[-1] == t_hi and starts == sorted(starts)
    with pytest.raises(edits.EditError, match="strength"):
        edits.start_step(p, 8, 1.5)
    with pytest.raises(edits.EditError, match="4, 8, 16"):
        edits.level_steps(p, 6)


@pytest.mark.parametrize("steps", [None, 7])
def test_chain_from_a_start_step_keeps_the_resolution_rule(steps):
    p = small_process(image_size=16, timesteps=100, resolution_schedule="ConvexDecay-0.5")
    for r in edits.input_levels(p):
        for strength in (0.0, 0.3, 1.0):
            t0 = edits.start_step(p, r, strength)
            pairs = p.reverse_steps(steps, start=t0)
            assert pairs[0][0] == t0 and pairs[-1][1] == 0
            assert all(p.r[s] == p.r[t - 1] and s < t for t, s in pairs)
            kept = set(p.respace(steps or p.timesteps))
            assert {s for _, s in pairs} <= kept and set(p.change_steps) & set(range(1, t0 + 1)) <= {
                t for t, _ in pairs}


def replacement_map(p, obs, y, s):
    """``b, K, N`` of ``x_s' = b + K x_s + N eps`` (one channel), read off the implementation."""
    r = int(p.r[s])
    n = r * r
    a, sigma = float(p.signal[s]), float(p.noise_std[s])

    def run(x, eps):
        yb = np.repeat(y, x.shape[0], 0)
        return np_(obs.replace(ops.convert_to_tensor(x), ops.convert_to_tensor(yb), a, sigma,
                               ops.convert_to_tensor(eps))).reshape(x.shape[0], n)

    zero = np.zeros((1, r, r, 1))
    basis = np.eye(n).reshape(n, r, r, 1)
    b = run(zero, zero)[0]
    k = (run(basis, np.repeat(zero, n, 0)) - b).T
    nn = (run(np.repeat(zero, n, 0), basis) - b).T
    return b, k, nn


@pytest.mark.parametrize("r_y", [2, 4])
def test_consistency_replacement_keeps_q_of_x_s_and_sets_the_observed_part(r_y):
    p = small_process()
    rng = np.random.default_rng(1)
    chain = DenseChain(p)
    obs = edits.Observation(p, r_y)
    x0 = rng.uniform(-1, 1, (1, 8, 8, 1))
    y = np_(p.degrade(x0, r_y))
    checked = set()
    for s in range(p.timesteps):
        r = int(p.r[s])
        if r < r_y or (r, s in p.change_steps) in checked:
            continue
        checked.add((r, s in p.change_steps))
        b, k, nn = replacement_map(p, obs, y, s)
        mean, cov = chain.marginal(x0[0, :, :, 0].reshape(-1), s)
        # x_s ~ q(x_s | x0) in, x_s' ~ q(x_s | x0) out, for x0 consistent with y
        assert np.allclose(b + k @ mean, mean, atol=1e-12)
        assert np.allclose(k @ cov @ k.T + nn @ nn.T, cov, atol=1e-12)
        # the observed part is a_s y + sigma_s P eps, whatever x_s was
        pm = dense(p.operator(r, r_y)) if r > r_y else np.eye(r * r)
        assert np.allclose(pm @ k, 0, atol=1e-12)
        assert np.allclose(pm @ b, p.signal[s] * y[0, :, :, 0].reshape(-1), atol=1e-12)
        assert np.allclose(pm @ nn, p.noise_std[s] * pm, atol=1e-12)
        # and the rest of x_s is kept: K is the projector onto the null space of P
        proj = np.linalg.pinv(pm) @ pm
        assert np.allclose(k, np.eye(r * r) - proj, atol=1e-12)
    assert len(checked) >= 3


@pytest.mark.parametrize("r_y", [4, 8])
def test_final_projection_meets_the_derived_float32_tolerance(r_y):
    p = small_process(image_size=16, timesteps=100)
    rng = np.random.default_rng(2)
    obs = edits.Observation(p, r_y)
    x0 = rng.uniform(-1, 1, (3, 16, 16, 3))
    y = np_(p.degrade(x0, r_y)).astype(np.float32)
    x = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)  # any image, e.g. a network's guess
    out = np_(obs.replace(ops.convert_to_tensor(x), ops.convert_to_tensor(y), 1.0, 0.0, None))
    assert out.dtype == np.float32
    d = p.operator(16, r_y)
    err = np.abs(np.einsum("ih,jw,bhwc->bijc", d.mh, d.mw, out.astype(np.float64)) - y).max()
    tol = edits.consistency_tolerance(obs, np.abs(x).max(), np.abs(y).max())
    before = np.abs(np.einsum("ih,jw,bhwc->bijc", d.mh, d.mw, x.astype(np.float64)) - y).max()
    assert err <= tol < 1e-4 * before  # the bound is far below the inconsistency it removes
    # the projection only moves x within the row space: its null-space part is kept
    null = lambda v: v - np.einsum("hi,wj,bijc->bhwc", np.linalg.pinv(d.mh), np.linalg.pinv(d.mw),
                                   np.einsum("ih,jw,bhwc->bijc", d.mh, d.mw, v))
    assert np.abs(null(out.astype(np.float64)) - null(x.astype(np.float64))).max() < 10 * tol


def test_slerp_ends_are_exact_and_the_norm_of_orthogonal_vectors_is_kept():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 1, 4, 4, 3))
    assert np.array_equal(edits.slerp(a, b, 0.0), a) and np.array_equal(edits.slerp(a, b, 1.0), b)
    b_perp = b - np.vdot(a, b) / np.vdot(a, a) * a
    b_perp *= np.linalg.norm(a) / np.linalg.norm(b_perp)
    for alpha in (0.25, 0.5, 0.9):
        assert np.isclose(np.linalg.norm(edits.slerp(a, b_perp, alpha)), np.linalg.norm(a), rtol=1e-12)


def test_interpolated_noise_draws_what_the_seeds_draw_and_mixes_each_component():
    p = small_process(image_size=16, timesteps=100, resolution_schedule="ConvexDecay-0.5")
    alphas = np.linspace(0, 1, 5)
    source = edits.InterpolatedNoise(p, 7, 8, alphas, channels=3)
    ts = [p.timesteps - 1] + [t - 1 for t in sorted(p.change_steps, reverse=True)]  # ddim eta 0's draws
    draws = [source(range(0, 5), t) for t in ts]
    for seed, frame in ((7, 0), (8, 4)):
        rng = np.random.default_rng(seed)
        for t, d in zip(ts, draws):
            r = p.r[t]
            assert np.array_equal(d[frame], rng.standard_normal((1, r, r, 3))[0])
    # a second batch of frames gets the same draws (one sequence per seed, whatever the batches)
    again = edits.InterpolatedNoise(p, 7, 8, alphas, channels=3)
    part = [again(range(2, 4), t) for t in ts]
    for d, q in zip(draws, part):
        assert np.allclose(d[2:4], q, atol=1e-12)
    # a change span's draw: its null-space part is the slerp of A's and B's null-space parts
    t, a, b = ts[1], draws[1][0:1], draws[1][4:5]
    vh, vw, row = source._bases(int(p.r[t]))
    coords = lambda v: np.einsum("ih,jw,bhwc->bijc", vh, vw, v)[:, ~row]
    assert np.allclose(coords(draws[1][2:3]), edits.slerp(coords(a), coords(b), 0.5), atol=1e-10)


# ---------------------------------------------------------------------- a tiny model end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    write_images(root / "data")
    pipeline = root / "tiny.toml"
    # eager sampling: chains of a few steps call each path a few times, fewer than a trace pays for
    pipeline.write_text(TINY.format(out=root / "runs", data=root / "data") + 'graph = "eager"\n')
    assert main([str(pipeline), "--set", "train.steps=2", "--set", "train.sample_every=0",
                 "--no-progress"]) == 0
    return root, root / "runs" / "tiny"


def write_small(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"in{i}_{size}.png")
    return folder


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_upsampled_images_downsample_to_the_input_within_the_derived_tolerance(tiny_run, method):
    from ssd_keras.runs import load_sampling_model

    _, run_dir = tiny_run
    model, process, objective = load_sampling_model(run_dir)
    rng = np.random.default_rng(6)
    for r_y in edits.input_levels(process):
        y = np.clip(rng.normal(0, 0.6, (2, r_y, r_y, 3)), -1, 1).astype(np.float32)
        kw = dict(steps=5, method=method, batch_size=4, progress=False, graph="eager")
        images, result = edits.upsample(model, process, objective, y, num_samples=2, strength=0.5, **kw)
        assert images.shape == (2, 2, 16, 16, 3) and result.network_calls > 0
        obs = edits.Observation(process, r_y)
        d = process.operator(16, r_y)
        err = np.abs(np.einsum("ih,jw,bnhwc->bnijc", d.mh, d.mw, images.astype(np.float64)) - y[:, None]).max()
        assert err <= edits.consistency_tolerance(obs, 1.0, 1.0)
        free, _ = edits.upsample(model, process, objective, y, num_samples=2, strength=0.5,
                                 consistency=False, **kw)
        err_free = np.abs(np.einsum("ih,jw,bnhwc->bnijc", d.mh, d.mw, free.astype(np.float64)) - y[:, None]).max()
        assert err_free > 100 * edits.consistency_tolerance(obs, 1.0, 1.0)  # the check can fail


def test_interpolation_end_frames_are_the_plain_samples_of_the_seeds(tiny_run):
    from ssd_keras.runs import load_sampling_model
    from ssd_keras.sample import sample_images

    _, run_dir = tiny_run
    model, process, objective = load_sampling_model(run_dir)
    kw = dict(steps=5, batch_size=1, progress=False, graph="eager")
    frames = edits.interpolate(model, process, objective, 3, 11, 4, **kw).images
    for seed, frame in ((3, frames[0]), (11, frames[-1])):
        plain = sample_images(model, process, objective, num_images=1, method="ddim", eta=0.0, seed=seed, **kw)
        assert np.array_equal(plain.images[0], frame)
    assert not np.allclose(frames[1], frames[0]) and not np.allclose(frames[1], frames[-1])


def test_upsample_vary_interpolate_through_the_cli(tiny_run, capsys):
    root, run_dir = tiny_run
    inputs = write_small(root / "small", [4, 8, 8])
    out = root / "up"
    code = main(["upsample", str(run_dir), str(inputs), "--out", str(out), "-n", "2", "--steps", "5",
                 "--strength", "0.5", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    said = capsys.readouterr()
    assert "4 px" in said.out and "8 px" in said.out and "s/image" in said.out
    assert "warning: --strength 0.5 changes nothing with consistency on" in said.err
    made = sorted(p.name for p in (out / "images").glob("*.png"))
    assert made == sorted(f"in{i}_{s}_{k}.png" for i, s in enumerate([4, 8, 8]) for k in range(2))
    assert np.asarray(Image.open(out / "images" / made[0])).shape == (16, 16, 3)
    assert (out / "grid.png").is_file() and (out / "progression_4px.png").is_file()
    assert (out / "progression_8px.png").is_file()
    # ddim, without consistency, one file
    code = main(["upsample", str(run_dir), str(inputs / "in1_8.png"), "--out", str(root / "up2"),
                 "--method", "ddim", "--no-consistency", "--steps", "5", "--no-progress"])
    assert code == 0 and (root / "up2" / "images" / "in1_8_0.png").is_file()

    full = root / "full"
    write_images(full, n=1, size=16)
    code = main(["vary", str(run_dir), str(full / "0.png"), "--level", "8", "--strength", "1", "-n", "3",
                 "--steps", "5", "--out", str(root / "vary"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert len(list((root / "vary" / "images").glob("*.png"))) == 3 and (root / "vary" / "grid.png").is_file()

    code = main(["interpolate", str(run_dir), "--seeds", "3", "11", "--frames", "4", "--steps", "5",
                 "--batch-size", "1", "--out", str(root / "interp"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    frames = sorted((root / "interp" / "frames").glob("*.png"))
    assert len(frames) == 4 and (root / "interp" / "strip.png").is_file()
    gif = Image.open(root / "interp" / "interpolation.gif")
    assert gif.n_frames == 6  # 4 forward, 2 back
    # the end frames are the plain ddim samples of the seeds, as `ssd-run sample` writes them
    for seed, frame in ((3, frames[0]), (11, frames[-1])):
        sample_out = root / f"plain{seed}"
        assert main(["sample", str(run_dir), "--seed", str(seed), "-n", "1", "--method", "ddim", "--eta", "0",
                     "--steps", "5", "--out", str(sample_out), "--no-progress"]) == 0
        assert np.array_equal(np.asarray(Image.open(sample_out / "images" / "00000.png")),
                              np.asarray(Image.open(frame)))


@pytest.mark.parametrize("argv, message", [
    (["upsample", "{run}", "{root}/bad/odd.png"], "odd.png is 6x6; this run upsamples images of 4x4, 8x8 px"),
    (["upsample", "{run}", "{root}/bad/full.png"], "use `ssd-run vary`"),
    (["upsample", "{run}", "{root}/bad/wide.png"], "wide.png is 8x4"),
    (["upsample", "{run}", "{root}/missing.png"], "missing.png: no such file or folder"),
    (["upsample", "{run}", "{root}/empty"], "no images"),
    (["upsample", "{run}", "{root}/bad/notimage.png"], "not a readable image"),
    (["upsample", "{run}", "{root}/good/in0_8.png", "--strength", "1.5"], "--strength 1.5: must lie in [0, 1]"),
    (["upsample", "{run}", "{root}/good/in0_8.png", "-n", "0"], "--num-samples 0"),
    (["vary", "{run}", "{root}/bad/full.png", "--level", "16"], "--level 16: must be one of this run's levels "
                                                                "below full resolution: 4, 8 px"),
    (["vary", "{run}", "{root}/bad/full.png", "--level", "3"], "--level 3"),
    (["vary", "{run}", "{root}/good/in0_8.png", "--level", "4"], "`vary` takes images of the run's full"),
    (["interpolate", "{run}", "--seeds", "1", "2", "--frames", "1"], "--frames 1: must be >= 2"),
])
def test_bad_inputs_are_one_line_errors(tiny_run, capsys, argv, message):
    root, run_dir = tiny_run
    bad = root / "bad"
    if not bad.exists():
        bad.mkdir()
        rng = np.random.default_rng(0)
        for name, shape in (("odd", (6, 6)), ("full", (16, 16)), ("wide", (4, 8))):
            Image.fromarray(rng.integers(0, 255, shape + (3,), dtype=np.uint8)).save(bad / f"{name}.png")
        (bad / "notimage.png").write_text("not an image")
        (root / "empty").mkdir()
        write_small(root / "good", [8])
    argv = [a.format(run=run_dir, root=root) for a in argv]
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
