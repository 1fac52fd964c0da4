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

    def normal(b: int, t: int):
        """Standard normal noise for ``b`` images at resolution ``r(t)``, from the seeded host RNG
        (or ``noise_source``, told the images of the batch being sampled, ``rows``)."""
        r = int(process.r[t])
        if noise_source is not None:
            return ops.convert_to_tensor(np.asarray(noise_source(rows, t)), dtype="float32")
        return ops.convert_to_tensor(rng.standard_normal((b, r, r, channels)), dtype="float32")

    def denoise(x, t):
        """The network's x0 prediction at ``r(s)`` (docs/math.md eq. 9), clipped (section 5)."""
        network = execution.forward(model.path(*process.path_at(t)))  # kept per path
        pred = network(x, ops.full((x.shape[0],), float(t), dtype="float32"))
        x0_hat = objective.to_x0(ops.cast(pred, "float32"), x, t)
        return ops.clip(x0_hat, -1.0, 1.0) if clip else x0_hat

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
    for b in batches:
        rows = range(sum(len(o) for o in outputs), sum(len(o) for o in outputs) + b)
        # x_T ~ N(0, I) at r(T-1), the coarsest resolution: the forward marginal (eq. 8)
        # there, where a_t is almost 0 (a guide starts from q(x_t | x0) at its own step)
        x = normal(b, pairs[0][0] if pairs else 0)
        if guide is not None:
            x = guide.start(x, pairs[0][0] if pairs else 0, rows)
        for t, s in pairs:
            x0_hat = denoise(x, t)
            if t in record_at and not outputs:
                frames.append({"t": t, "x_t": _np(x), "x0_hat": _np(x0_hat)})
            x = reverse_step(x0_hat, x, t, s)
            if guide is not None:
                x = guide.state(x, s, rows, normal)
            bar.update(1)
        final = denoise(x, 0)  # the last step returns the clipped x0 prediction, no noise (section 5)
        if guide is not None:
            final = guide.final(final, rows)
        calls += len(pairs) + 1
        bar.update(1)
        if record_progression and not outputs:
            frames.append({"t": 0, "x_t": _np(x), "x0_hat": _np(final)})
        outputs.append(_np(final))
    bar.close()
    return SampleResult(np.concatenate(outputs, 0), frames, calls)


def _np(x) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(x), dtype=np.float32)
