"""What a pipeline costs before any training: levels, r(t), parameters, FLOPs and memory.

Everything here is counted, not measured: FLOPs per path come from
:mod:`ssd_keras.nn.flops` (2 x multiply-accumulates, one sample, one forward pass);
memory comes from variable shapes and from the tensor shapes of each path's graph.

- **Sampling** with ``K`` respaced steps calls the network once per kept timestep of
  ``process.respace(K)`` (the kept ``t`` with their original indices, change steps
  included; the last call is ``t = 0``), on the path ``process.path_at(t)``. The one-level
  DDPM of the same network runs ``K`` calls of the full-resolution path.
- **Training** draws one path per batch; every ``t`` has marginal probability ``1/T``
  (``process.sample_training_timesteps``), so the expected forward cost per sample is the
  mean of the per-step cost over ``t``. A training step costs ~3x its forward pass
  (backward ~2x forward), for SSD and DDPM alike, so the ratio is that of the forward.
- **Memory of a training step** (see :func:`training_memory`): weights, AdamW moments
  and the EMA copy (all trainable variables, float32), gradients of the path's own
  variables (float32), and activations kept for the backward pass at the pipeline's batch
  size, in the compute precision (4 bytes in float32, 2 under mixed_bfloat16/float16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .builders import build_model, build_process
from .config import PipelineConfig
from .nn.flops import graph_nodes
from .official import model_tensor_shapes, official_parameter_count

#: bytes per element of activations under each ``train.precision``
ACTIVATION_BYTES = {"float32": 4, "mixed_bfloat16": 2, "mixed_float16": 2}
VARIABLE_BYTES = 4  # Keras keeps variables (and so gradients, moments, EMA) in float32
TRAIN_FLOPS_FACTOR = 3  # forward + backward (~2x forward)

MEMORY_NOTE = (
    "activations counted from the path graph: every tensor between blocks (inputs, "
    "block outputs, skips, concatenations) plus the intermediates each block keeps for "
    "its backward pass (ResBlock: GN/SiLU outputs, conv outputs, dropout output + 1-byte "
    "mask; attention: GN output, qkv, attention output and per-row log-sum-exp of a "
    "flash/memory-efficient kernel, torch's default; a math kernel, e.g. XLA's, also "
    "keeps the heads x T x T probabilities: given separately); upsample: the upsampled conv input; head: GN/SiLU "
    "outputs). Not counted: activation gradients live during backward, allocator "
    "overhead, framework workspaces, data pipeline buffers."
)


@dataclass
class PipelineReport:
    text: str
    r: np.ndarray
    step_flops: np.ndarray  # FLOPs of the network call at each t (per sample)
    full_flops: int
    data: dict = field(default_factory=dict)
    change_steps: list = field(default_factory=list)


# ------------------------------------------------------------------------------ FLOPs
def sampling_flops(process, path_flops: dict, num_steps: int) -> tuple[int, int]:
    """``(network calls, FLOPs per image)`` of a respaced sampling run."""
    kept = process.respace(num_steps)
    return len(kept), int(sum(path_flops[process.path_at(t)] for t in kept))


def path_probabilities(process) -> dict:
    """``{(r_in, r_out): fraction of timesteps using it}``: the training path distribution."""
    counts: dict = {}
    for t in range(process.timesteps):
        key = process.path_at(t)
        counts[key] = counts.get(key, 0) + 1
    return {key: n / process.timesteps for key, n in counts.items()}


# ----------------------------------------------------------------------------- memory
def _prod(shape) -> int:
    return int(math.prod(int(d) for d in shape))


def _block_internals(layer, in_shapes, out_shapes, act_bytes: int, attention_probs=False) -> int:
    """Bytes per sample a block keeps internally for its backward pass (see MEMORY_NOTE).

    ``attention_probs=True``: only the attention probabilities a math attention kernel
    would keep in addition (0 for other layers).
    """
    from .nn import layers as L

    if attention_probs and not isinstance(layer, L.AttentionBlock):
        return 0
    if isinstance(layer, L.ResBlock):
        hw = int(in_shapes[0][1]) * int(in_shapes[0][2])
        c_in, c = int(in_shapes[0][-1]), layer.out_channels
        emb = int(in_shapes[1][-1])
        # GN1 out, SiLU1 out (c_in each); conv1 out, GN2 out, scale-shift out, SiLU2 out (c)
        elems = hw * (2 * c_in + 4 * c) + emb + layer.emb_linear.units
        extra = 0
        if layer.dropout > 0:
            elems += hw * c  # dropout output (the conv input)
            extra = hw * c  # bool mask, one byte per element
        return elems * act_bytes + extra
    if isinstance(layer, L.AttentionBlock):
        t, c = int(in_shapes[0][1]) * int(in_shapes[0][2]), int(in_shapes[0][-1])
        heads = layer.heads_for(c)
        # GN out, qkv (3c), attention output (c), per-row log-sum-exp (heads x t, float32);
        # a math kernel keeps the softmax probabilities (heads x t x t) as well
        if attention_probs:
            return heads * t * t * act_bytes
        return t * c * 5 * act_bytes + heads * t * 4
    if isinstance(layer, L.Upsample):
        return 4 * _prod(in_shapes[0][1:]) * act_bytes  # the repeated conv input
    if isinstance(layer, L.Downsample):
        return 0  # the strided conv pads internally and keeps only its input, the block's
    if isinstance(layer, L.OutputHead):
        return 2 * _prod(in_shapes[0][1:]) * act_bytes  # GN out, SiLU out
    if isinstance(layer, L.TimestepEmbedding):
        return (layer.model_channels + 2 * layer.embed_dim) * act_bytes
    return 0


def activation_bytes(path_model, act_bytes: int = 4) -> dict:
    """Activation memory per sample of one training step of a path, counted from its graph.

    Returns ``{"graph", "internal", "total", "attention_probs"}`` in bytes: ``graph`` sums
    the tensors of the Functional graph that the backward pass needs (inputs of blocks and
    convolutions, skip tensors, concatenations, the output; not those only concatenated,
    upsampled or resized), ``internal`` the intermediates inside blocks
    (MEMORY_NOTE) with a flash / memory-efficient attention kernel (torch's default), and
    ``attention_probs`` what a math attention kernel (e.g. XLA's) keeps on top of that.
    """
    import keras

    from .nn import layers as L

    nodes = graph_nodes(path_model)
    # a graph tensor is kept for the backward pass if a consumer needs it (a convolution or
    # norm reads its input again), or if it is the path's output (the loss keeps it);
    # concatenation, nearest upsampling, resizing and zero skips need only shapes
    shape_only = (keras.layers.Concatenate, L.ZeroSkip, L.ResizeInput, keras.layers.InputLayer)
    kept = {id(t) for t in path_model.outputs}
    for node in nodes:
        if not isinstance(node.operation, shape_only):
            kept.update(id(t) for t in node.arguments.keras_tensors)
    tensors = list(path_model.inputs) + [t for node in nodes for t in node.outputs]
    graph = sum(_prod(t.shape[1:]) for t in tensors if id(t) in kept) * act_bytes
    internal = probs = 0
    for node in nodes:
        ins = [tuple(t.shape) for t in node.arguments.keras_tensors]
        outs = [tuple(t.shape) for t in node.outputs]
        internal += _block_internals(node.operation, ins, outs, act_bytes)
        probs += _block_internals(node.operation, ins, outs, act_bytes, attention_probs=True)
    return {"graph": int(graph), "internal": int(internal), "total": int(graph + internal),
            "attention_probs": int(probs)}


def training_memory(cfg: PipelineConfig, model, process=None, batch_size: int | None = None) -> dict:
    """Memory estimate (bytes) of training a pipeline; see the module docstring.

    Keys: ``weights``, ``adamw`` (two moments), ``ema``, ``grads_max`` (largest path's
    variables), ``activations_max`` / ``activations_avg`` (per batch, the largest path and
    the expectation over the training path distribution), ``total_max``, ``total_avg``,
    ``per_path`` ({path: {"params", "activations"}}), ``batch_size``, ``precision``.
    """
    process = process or build_process(cfg)
    batch = int(batch_size or cfg.train.batch_size)
    precision = cfg.train.precision
    act = ACTIVATION_BYTES[precision]
    trainable = sum(_prod(v.shape) for v in model.trainable_variables)
    every = int(model.count_params())  # weights (not the dropout layers' seed states)
    probs = path_probabilities(process)
    per_path = {}
    for key in process.paths:
        path = model.path(*key)
        per_path[key] = {
            "params": int(sum(_prod(v.shape) for v in path.trainable_variables)),
            "activations": activation_bytes(path, act),
        }
    biggest = max(per_path, key=lambda k: per_path[k]["activations"]["total"])
    out = {
        "batch_size": batch,
        "precision": precision,
        "activation_bytes_per_element": act,
        "weights": every * VARIABLE_BYTES,
        "adamw": 2 * trainable * VARIABLE_BYTES,
        "ema": trainable * VARIABLE_BYTES,
        "grads_max": max(p["params"] for p in per_path.values()) * VARIABLE_BYTES,
        "grads_avg": sum(probs[k] * per_path[k]["params"] for k in per_path) * VARIABLE_BYTES,
        "largest_path": biggest,
        "activations_max": per_path[biggest]["activations"]["total"] * batch,
        "activations_max_graph": per_path[biggest]["activations"]["graph"] * batch,
        "attention_probs_max": per_path[biggest]["activations"]["attention_probs"] * batch,
        "activations_avg": sum(probs[k] * per_path[k]["activations"]["total"] for k in per_path) * batch,
        "per_path": per_path,
    }
    fixed = out["weights"] + out["adamw"] + out["ema"]
    out["total_max"] = fixed + out["grads_max"] + out["activations_max"]
    out["total_avg"] = fixed + out["grads_avg"] + out["activations_avg"]
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


# ----------------------------------------------------------------------------- report
def describe_pipeline(cfg: PipelineConfig, *, steps=(1000, 250), memory: bool = True) -> PipelineReport:
    """The text report of ``ssd-run inspect`` and its numbers (``report.data``)."""
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
    lines.append(f"  change steps {process.change_steps} (r(t) > r(t-1) there)")
    lines.append("  steps per level: " + ", ".join(
        f"{r}px: {int((process.r == r).sum())}" for r in reversed(process.resolutions)))
    m = cfg.model
    lines.append(f"  model: base {m.base_channels}, channel_mult {list(m.channel_mult)}, "
                 f"{m.num_res_blocks} res blocks, attention at {list(m.attention_resolutions)}, "
                 f"{m.num_heads} heads")
    params = model.count_params()
    lines.append(f"  parameters {params:,} ({params * 4 / 2**20:.1f} MiB in float32) run by the "
                 f"paths; an official checkpoint of this network holds "
                 f"{official_parameter_count(model_tensor_shapes(m, cfg.process.image_size)):,} "
                 f"(blocks and adapters no path runs included)")
    lines.append("")
    lines.append("  FLOPs = 2 x multiply-accumulates of one forward pass of one sample")
    lines.append(format_cost_table(rows))
    lines.append("")

    data = {"params": params, "paths": rows, "path_flops": path_flops, "full_flops": full}
    ddpm_ref = T * full  # DDPM with all T steps
    lines.append("  expected cost per image, as a ratio to the one-level DDPM of the same network")
    lines.append(f"  {'run':>22} {'calls':>6} {'GFLOPs':>10} {'DDPM GFLOPs':>12} {'vs DDPM':>8} "
                 f"{f'vs DDPM@{T}':>12}")
    for k in sorted({min(int(s), T) for s in steps}, reverse=True):
        calls, flops = sampling_flops(process, path_flops, k)
        ddpm = k * full
        data[f"sampling_{k}"] = {"calls": calls, "flops": flops, "ddpm_flops": ddpm,
                                 "speedup": ddpm / flops, "speedup_vs_ddpm_full": ddpm_ref / flops}
        lines.append(f"  {f'sampling, {k} steps':>22} {calls:>6} {flops / 1e9:>10.2f} {ddpm / 1e9:>12.2f} "
                     f"{ddpm / flops:>7.2f}x {ddpm_ref / flops:>11.2f}x")
    train_avg = float(step_flops.mean())
    batch = cfg.train.batch_size
    data["train_step_flops"] = train_avg  # forward, per sample
    data["train_step_speedup"] = full / train_avg
    lines.append(f"  {'training step (avg)':>22} {'':>6} {TRAIN_FLOPS_FACTOR * batch * train_avg / 1e9:>10.1f} "
                 f"{TRAIN_FLOPS_FACTOR * batch * full / 1e9:>12.1f} {full / train_avg:>7.2f}x")
    lines.append("  sampling: one network call per kept step of process.respace(K) (change steps added);")
    lines.append(f"  'vs DDPM@{T}': against DDPM with all {T} steps. training: batch {batch}, forward +")
    lines.append(f"  backward ~ {TRAIN_FLOPS_FACTOR}x forward, path drawn as in training (each t with probability 1/T).")

    if memory:
        mem = training_memory(cfg, model, process)
        data["memory"] = mem
        lines.append("")
        lines.append(f"  memory of training (estimate; variables float32, activations "
                     f"{mem['precision']} = {mem['activation_bytes_per_element']} bytes/element, "
                     f"batch {mem['batch_size']})")
        lines.append(f"    weights              {_gib(mem['weights'])}")
        lines.append(f"    AdamW moments (m, v) {_gib(mem['adamw'])}")
        lines.append(f"    EMA                  {_gib(mem['ema'])}")
        lines.append(f"    gradients            {_gib(mem['grads_max'])}   (largest path's variables)")
        lp = mem["largest_path"]
        lines.append(f"    activations, largest path {lp}: {_gib(mem['activations_max']).strip()} "
                     f"(graph tensors alone {_gib(mem['activations_max_graph']).strip()})")
        lines.append(f"    activations, average path:     {_gib(mem['activations_avg']).strip()}")
        lines.append(f"    (a math attention kernel, e.g. XLA's, adds "
                     f"{mem['attention_probs_max'] / 2**30:.2f} GiB of attention probabilities "
                     f"on the largest path)")
        lines.append(f"    total, largest path  {_gib(mem['total_max'])}")
        lines.append(f"    total, average path  {_gib(mem['total_avg'])}")
        per = [f"{k[0]}->{k[1]} {v['activations']['total'] * mem['batch_size'] / 2**30:.2f}"
               for k, v in mem["per_path"].items()]
        lines.append("    activations per path [GiB]:")
        for i in range(0, len(per), 4):
            lines.append("      " + ", ".join(per[i:i + 4]))
        for chunk in _wrap(MEMORY_NOTE, 88):
            lines.append(f"    {chunk}")
    return PipelineReport("\n".join(lines), process.r, step_flops, full, data,
                          list(process.change_steps))


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


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
    levels = sorted({int(v) for v in report.r})
    ax1.set_yticks(levels, [str(v) for v in levels])
    ax1.minorticks_off()
    ax1.set_title("resolution schedule")
    rel = report.step_flops / report.full_flops
    ax2.step(t, rel, where="post", color="tab:orange")
    ax2.axhline(rel.mean(), color="tab:gray", linestyle="--", linewidth=1,
                label=f"mean {rel.mean():.3f} (DDPM/SSD = {1 / rel.mean():.2f}x)")
    for ax in (ax1, ax2):
        for c in report.change_steps:
            ax.axvline(c, color="tab:red", linewidth=0.6, alpha=0.5)
    ax2.set_ylabel("FLOPs / DDPM step")
    ax2.set_xlabel("t")
    ax2.set_ylim(0, 1.05)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
