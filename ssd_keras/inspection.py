"""What a pipeline costs before any training: levels, r(t), parameters, FLOPs vs DDPM."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .builders import build_model, build_process
from .config import PipelineConfig


@dataclass
class PipelineReport:
    text: str
    r: np.ndarray
    step_flops: np.ndarray  # FLOPs of the network call at each t (per sample)
    full_flops: int
    data: dict = field(default_factory=dict)


def sampling_flops(process, path_flops: dict, num_steps: int) -> tuple[int, int]:
    """``(network calls, FLOPs per image)`` of a respaced sampling run."""
    kept = process.respace(num_steps)
    return len(kept), int(sum(path_flops[process.path_at(t)] for t in kept))


def describe_pipeline(cfg: PipelineConfig) -> PipelineReport:
    from .nn.flops import cost_table, format_cost_table

    process = build_process(cfg)
    model = build_model(cfg, precision="float32")
    rows = cost_table(model)
    path_flops = {row["path"]: row["flops"] for row in rows}
    full = path_flops[(cfg.process.image_size, cfg.process.image_size)]
    T = process.timesteps
    step_flops = np.array([path_flops[process.path_at(t)] for t in range(T)], dtype=np.float64)

    lines = [f"pipeline {cfg.source}: {cfg.run.name}"]
    lines.append(f"  levels {process.resolutions}, T = {T}, noise {cfg.process.noise_schedule}, "
                 f"r(t) {cfg.process.resolution_schedule}")
    lines.append(f"  change steps {process.change_steps}")
    lines.append("  steps per level: " + ", ".join(
        f"{r}px: {int((process.r == r).sum())}" for r in reversed(process.resolutions)))
    params = model.count_params()
    lines.append(f"  parameters {params:,} ({params * 4 / 2**20:.1f} MiB in float32)")
    lines.append("")
    lines.append(format_cost_table(rows))
    lines.append("")
    lines.append("  expected cost per image, as a ratio to the one-level DDPM of the same network")
    lines.append(f"  {'run':>22} {'calls':>6} {'GFLOPs':>10} {'DDPM GFLOPs':>12} {'speedup':>8}")
    data = {"params": params, "paths": rows}
    for k in sorted({T, min(250, T)}, reverse=True):
        calls, flops = sampling_flops(process, path_flops, k)
        ddpm = k * full
        data[f"sampling_{k}"] = {"calls": calls, "flops": flops, "ddpm_flops": ddpm}
        lines.append(f"  {f'sampling, {k} steps':>22} {calls:>6} {flops / 1e9:>10.2f} {ddpm / 1e9:>12.2f} "
                     f"{ddpm / flops:>7.2f}x")
    train_avg = float(step_flops.mean())
    data["train_step_flops"] = train_avg
    lines.append(f"  {'training step (avg)':>22} {'':>6} {train_avg / 1e9:>10.3f} {full / 1e9:>12.3f} "
                 f"{full / train_avg:>7.2f}x   (forward per sample; backward ~2x more)")
    return PipelineReport("\n".join(lines), process.r, step_flops, full, data)


def plot_schedule(report: PipelineReport, path: str | Path) -> Path:
    """r(t) and the per-step network cost relative to DDPM, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(report.r))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax1.step(t, report.r, where="post")
    ax1.set_ylabel("r(t) [px]")
    ax1.set_yscale("log", base=2)
    ax1.set_title("resolution schedule")
    ax2.step(t, report.step_flops / report.full_flops, where="post", color="tab:orange")
    ax2.set_ylabel("FLOPs / DDPM step")
    ax2.set_xlabel("t")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
