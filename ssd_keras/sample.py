"""The reverse process (docs/math.md sections 5-7): from r_min noise to full-resolution images.

Noise is drawn with numpy's seeded generator on the host, so a seed gives the same
samples on every backend (up to float32 rounding of the network).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import backend
from .process import ScaleSpaceProcess

SAMPLING_METHODS = ("ancestral", "ddim")


@dataclass
class SampleResult:
    images: np.ndarray  # (N, H, W, C) float32 in [-1, 1]
    frames: list = field(default_factory=list)  # progression of the first batch
    network_calls: int = 0


def progression_steps(pairs: list[tuple[int, int]], change_steps, count: int = 8) -> set[int]:
    """Which reverse steps to record: ``count`` evenly spaced ones plus every change step."""
    ts = [t for t, _ in pairs]
    picks = {ts[round(i * (len(ts) - 1) / max(count - 1, 1))] for i in range(count)} if ts else set()
    return picks | (set(change_steps) & set(ts))


def sample_images(
    model,
    process: ScaleSpaceProcess,
    objective,
    *,
    num_images: int = 16,
    steps: int | None = None,
    noise: str = "exact",
    lanczos_iterations: int = 40,
    clip: bool = True,
    variance: str = "fixed_small",
    method: str = "ancestral",
    eta: float = 0.0,
    change_eta: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    channels: int = 3,
    record_progression: bool = False,
    progress: bool = True,
    graph: str = "auto",
    execution=None,
    start_step: int | None = None,
    noise_source=None,
    guide=None,
    labels=None,
    guidance: float = 1.0,
    guidance_batch: bool = True,
) -> SampleResult:
    """Draw ``num_images`` samples with ``steps`` respaced steps (default: all T).

    ``method="ancestral"`` samples the SSD posterior at every step (``noise``,
    ``variance``); ``"ddim"`` takes the marginal-preserving DDIM-style step of
    ``ScaleSpaceProcess.ddim_step`` with ``eta`` (docs/sampling.md), which ignores
    ``variance`` and needs no ``noise`` method. ``change_eta`` (Python API, for studies)
    sets a different ``eta`` on resolution-change spans; ``1.0`` there is the exact
    posterior on change steps. The network runs as ``execution`` says
    (``backend.Execution``: it keeps each path's traced or compiled function across
    calls); without one, as an execution with ``sampler.graph = graph`` (``"auto"``,
    ``"eager"``, ``"trace"``, ``"compile"``; docs/design.md "Execution layer") built for
    this call.

    Editing (``ssd_keras.edits``, docs/scale_space_edits.md): ``start_step`` starts the chain
    at that step instead of ``T-1`` (then followed by the kept steps below it);
    ``noise_source(rows, t)`` replaces the seeded generator: standard normal noise at
    ``r(t)`` for the images ``rows`` (a ``range`` of indices into the ``num_images``), drawn
    in the chain's order; ``guide`` (``edits.Guide``) maps the first noise to the starting
    state (``guide.start``), may replace part of each new state (``guide.state``) and of the
    final image (``guide.final``).

    Class-conditional models (``model.num_classes``): ``labels`` holds one class index per
    image (default: the null class, i.e. unconditional samples), ``guidance`` the
    classifier-free guidance scale w: the x0 prediction is ``x0_null + w (x0_y - x0_null)``
    before clipping (docs/sampling.md, "Classifier-free guidance"); w = 1 is the
    conditional model alone, w = 0 the null-class model alone (one network call each).
    Otherwise both predictions are needed: one call at double batch
    (``guidance_batch=True``) or two calls.
    """
    from keras import ops

    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(SAMPLING_METHODS)}")
    for name, value in (("eta", eta), ("change_eta", eta if change_eta is None else change_eta)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")

    rng = np.random.default_rng(seed)
    if execution is None:
        execution = backend.Execution(sample_graph=graph)
    labels, guidance = _check_labels(model, labels, float(guidance), num_images)

    def normal(b: int, t: int):
        """Standard normal noise for ``b`` images at resolution ``r(t)``, from the seeded host RNG
        (or ``noise_source``, told the images of the batch being sampled, ``rows``)."""
        r = int(process.r[t])
        if noise_source is not None:
            return ops.convert_to_tensor(np.asarray(noise_source(rows, t)), dtype="float32")
        return ops.convert_to_tensor(rng.standard_normal((b, r, r, channels)), dtype="float32")

    denoise = denoiser(model, process, objective, execution=execution, clip=clip,
                       guidance=guidance, guidance_batch=guidance_batch)

    def reverse_step(x0_hat, x, t, s):
        """``x_t -> x_s`` for the kept pair ``t > s`` (docs/math.md section 7)."""
        change = int(process.r[s]) != int(process.r[t])
        with backend.no_grad():
            if method == "ddim":  # keeps q(x_s | x0) (docs/sampling.md eq. 1, sections 2-3)
                step_eta = eta if change_eta is None or not change else change_eta
                xi = normal(x.shape[0], s) if change or step_eta > 0 else None
                return process.ddim_step(x0_hat, x, xi, t, s, eta=step_eta)
            # ancestral: the posterior mean (eq. 10) plus noise of covariance (eq. 11), drawn
            # from xi exactly (eq. 13) or by Lanczos (eq. 12); DDPM's own step off change steps
            xi = normal(x.shape[0], s)
            return process.posterior_mean(x0_hat, x, t, s) + process.posterior_noise(
                xi, t, s, method=noise, iterations=lanczos_iterations, variance=variance)

    pairs = process.reverse_steps(steps or process.timesteps, start=start_step)  # respaced (section 7)
    record_at = progression_steps(pairs, process.change_steps) if record_progression else set()
    batches = [min(batch_size, num_images - i) for i in range(0, num_images, batch_size)]
    bar = tqdm(total=(len(pairs) + 1) * len(batches), desc="sampling", unit="step",
               disable=not progress, leave=False)
    outputs, frames, calls = [], [], 0
    for i, b in enumerate(batches):
        rows = range(sum(len(o) for o in outputs), sum(len(o) for o in outputs) + b)
        y = None if labels is None else labels[i * batch_size: i * batch_size + b]
        # x_T ~ N(0, I) at r(T-1), the coarsest resolution: the forward marginal (eq. 8)
        # there, where a_t is almost 0 (a guide starts from q(x_t | x0) at its own step)
        x = normal(b, pairs[0][0] if pairs else 0)
        if guide is not None:
            x = guide.start(x, pairs[0][0] if pairs else 0, rows)
        for t, s in pairs:
            x0_hat = denoise(x, t, y)
            if t in record_at and not outputs:
                frames.append({"t": t, "x_t": _np(x), "x0_hat": _np(x0_hat)})
            x = reverse_step(x0_hat, x, t, s)
            if guide is not None:
                x = guide.state(x, s, rows, normal)
            bar.update(1)
        final = denoise(x, 0, y)  # the last step returns the clipped x0 prediction, no noise (section 5)
        if guide is not None:
            final = guide.final(final, rows)
        calls += len(pairs) + 1
        bar.update(1)
        if record_progression and not outputs:
            frames.append({"t": 0, "x_t": _np(x), "x0_hat": _np(final)})
        outputs.append(_np(final))
    bar.close()
    return SampleResult(np.concatenate(outputs, 0), frames, calls)


def denoiser(model, process, objective, *, execution, clip: bool = True,
             guidance: float = 1.0, guidance_batch: bool = True):
    """``denoise(x, t, y=None)``: the network's x0 prediction at ``r(s)`` (docs/math.md
    eq. 9), guided, clipped (section 5).

    With labels ``y`` (class-conditional models) and guidance w (docs/sampling.md,
    "Classifier-free guidance"): ``x0_null + w (x0_y - x0_null)``, where ``x0_null`` is the
    prediction for the null class; w = 1 is one call with ``y``, w = 0 one call with the
    null class, any other w one call on ``[x, x]`` with labels ``[y, null]``
    (``guidance_batch``) or two calls. The network runs as ``execution``
    (``backend.Execution``) says.
    """
    from keras import ops

    def predict(x, t, y):
        network = execution.forward(model.path(*process.path_at(t)))  # kept per path
        cond = () if y is None else (ops.convert_to_tensor(y, dtype="int32"),)
        pred = network(x, ops.full((x.shape[0],), float(t), dtype="float32"), *cond)
        return objective.to_x0(ops.cast(pred, "float32"), x, t)

    def denoise(x, t, y=None):
        if y is None or guidance == 1.0:
            x0_hat = predict(x, t, y)
        elif guidance == 0.0:
            x0_hat = predict(x, t, np.full_like(y, model.null_label))
        else:
            null = np.full_like(y, model.null_label)
            if guidance_batch:  # one call on [x, x] with labels [y, null]
                both = predict(ops.concatenate([x, x], axis=0), t, np.concatenate([y, null]))
                cond, uncond = both[: x.shape[0]], both[x.shape[0]:]
            else:
                cond, uncond = predict(x, t, y), predict(x, t, null)
            x0_hat = uncond + guidance * (cond - uncond)
        return ops.clip(x0_hat, -1.0, 1.0) if clip else x0_hat

    return denoise


def _check_labels(model, labels, guidance: float, num_images: int):
    """``(labels as int32 array or None, guidance)``, or a ValueError naming the problem."""
    classes = int(getattr(model, "num_classes", 0) or 0)
    if not classes:
        if labels is not None:
            raise ValueError("labels given, but the model is unconditional (model.num_classes = 0)")
        if guidance != 1.0:
            raise ValueError(f"guidance {guidance:g} needs a class-conditional model")
        return None, 1.0
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance:g}")
    null = model.null_label
    if labels is None:
        if null is None:
            raise ValueError("this class-conditional model has no null class (an official "
                             "checkpoint): give a class for every image")
        return np.full(num_images, null, np.int32), 1.0
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected {num_images} integer class indices, got shape "
                         f"{labels.shape} of {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is not a class of this model (0..{classes - 1})")
    if guidance != 1.0 and null is None:
        raise ValueError(f"guidance {guidance:g} needs a null-class row, which this model "
                         "(model.null_class = false, e.g. an official checkpoint) does not "
                         "have; use guidance 1")
    return labels.astype(np.int32), guidance


def _np(x) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(x), dtype=np.float32)
