"""Host cost of one step at batch 1 on the small paths: ssd_keras vs the official code (CPU proxy).

    python benchmarks/bench_host_overhead.py --official /path/to/ScaleSpaceDiffusion
    python benchmarks/bench_host_overhead.py            # ours only (eager and trace)

At batch 1 on the smallest path the arithmetic is a few MFLOPs: what a step costs is
the host's work, Python, Keras, the dispatcher and one kernel per op. On a GPU the same host
work is what bounds small-path speed unless CUDA graphs or fusion remove it, and every
dispatched compute op is one kernel launch. This script measures both proxies on the CPU,
on the network of ``bench_vs_official.py`` (32 px, 3 levels 8/16/32, base 32, channel_mult
1,2,2, 1 res block, attention at 16 px), one torch thread:

- **ms per call**: medians of ``--rounds`` interleaved rounds (each round runs every
  contender once, in an order that alternates), after warm-up calls;
- **ops dispatched per call**: every aten op that reaches the dispatcher below autograd,
  counted with a ``TorchDispatchMode``, split into compute ops (one kernel launch each on
  a GPU), views and other aliasing ops (no kernel), and scalar reads
  (``_local_scalar_dense``, i.e. ``.item()``/``int()``: a device sync when the tensor is on
  the GPU, none when it is a host scalar such as a traced shape). A ``torch.jit.trace``
  replay dispatches its ops the same way.
  Next to it, the ``aten::`` events of ``torch.profiler`` (issue 28's count), which also
  record the composite ops that only call others.

Contenders, per path:

- forward (inference, no autograd): ours eager (``sampler.graph = "eager"``), ours traced
  (``"trace"``), the official ``FlexiUNet`` in eval mode;
- training step (forward, Min-SNR x0 loss, backward, AdamW, EMA): ours through
  ``Trainer.train_step`` with ``train.graph`` eager and trace; the official
  ``training_losses`` + ``torch.optim.AdamW(foreach=True)`` (what AdamW picks on CUDA;
  on the CPU it would loop per tensor) + its per-tensor ``update_ema``; and the same
  inside its ``TrainLoop``'s ``MixedPrecisionTrainer`` (float32), which adds a
  gradient and a weight norm per tensor, each read with ``.item()`` (a device sync per
  tensor on a GPU).

The weights are the same on both sides (``_official.OfficialTwin`` copies them); the kernels
a fresh ADM network sets to zero are randomised first so that the outputs compared are
not zero. ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def op_counter():
    """A ``TorchDispatchMode`` that counts the aten ops dispatched under it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()
            self.views = 0
            self.scalar_reads = 0
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.total += 1
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            if func.is_view or name in ("detach", "alias", "lift_fresh"):
                self.views += 1
            elif name == "_local_scalar_dense":
                self.scalar_reads += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def count_ops(fn) -> dict:
    """Ops dispatched by one call of ``fn``: below autograd (``TorchDispatchMode``), and the
    ``aten::`` events ``torch.profiler`` records (these include the composite ops that
    call others, e.g. ``aten::linear`` around ``aten::addmm``, so they count more)."""
    from torch.profiler import ProfilerActivity, profile

    counter = op_counter()
    with counter:
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return {"ops": counter.total, "view_ops": counter.views, "scalar_reads": counter.scalar_reads,
            "compute_ops": counter.total - counter.views - counter.scalar_reads,
            "profiler_aten_events": events,
            "top": counter.ops.most_common(8)}


def interleaved(contenders: dict, rounds: int, warmup: int) -> dict:
    """``{name: median seconds}`` over ``rounds`` rounds that each run every contender once."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, default=None,
                    help="checkout of github prateksha/ScaleSpaceDiffusion (outside the repository)")
    ap.add_argument("--paths", default="8-8,16-16,32-32", help="paths r_in-r_out to measure")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved rounds per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from bench_vs_official import PIPELINE, path_timesteps
    from device_check import wake_zero_kernels

    from ssd_keras import backend
    from ssd_keras.config import from_dict
    from ssd_keras.train import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_host_overhead_")
    base = {**PIPELINE, "run": {"name": "host", "output_dir": tmp, "seed": 0},
            "train": {**PIPELINE["train"], "batch_size": 1}}
    trainers = {graph: Trainer(from_dict({**base, "run": {**base["run"], "name": f"host_{graph}"},
                                          "train": {**base["train"], "graph": graph}}), progress=False)
                for graph in ("eager", "trace")}
    model = trainers["eager"].model
    wake_zero_kernels(model)
    for v, w in zip(trainers["trace"].model.trainable_variables, model.trainable_variables):
        v.assign(w.value)
    cfg, process = trainers["eager"].cfg, trainers["eager"].process
    official = None
    if args.official is not None:
        import _official

        modules = _official.load(args.official)
        official = _official.OfficialTwin(modules, cfg, model)
        o = cfg.optimizer
        official.opt = torch.optim.AdamW(official.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                         eps=o.epsilon, weight_decay=o.weight_decay, foreach=True)
        official_loop = _official.OfficialTwin(modules, cfg, model, train_loop=True)
        official_loop.opt = torch.optim.AdamW(official_loop.mp_trainer.master_params, lr=o.lr,
                                              betas=(o.beta1, o.beta2), eps=o.epsilon,
                                              weight_decay=o.weight_decay, foreach=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, batch 1; "
          f"reference: {'official' if official else 'none'}", file=sys.stderr)
    rng = np.random.default_rng(0)
    record = {"threads": args.threads, "rounds": args.rounds, "batch": 1, "paths": {}}
    rows = []
    keys = [tuple(int(v) for v in spec.split("-")) for spec in args.paths.split(",")]

    def measure(name, kind, contenders):
        seconds = interleaved(contenders, args.rounds, args.warmup)
        entry = record["paths"].setdefault(name, {}).setdefault(kind, {})
        for who, fn in contenders.items():
            counted = count_ops(fn)
            entry[who] = {"ms": 1e3 * seconds[who], **counted}
            rows.append((name, kind, who, 1e3 * seconds[who], counted["ops"], counted["compute_ops"],
                         counted["view_ops"], counted["scalar_reads"], counted["profiler_aten_events"]))
        print(f"path {name} {kind}: done", file=sys.stderr)

    # forward passes first, on every path: training changes the weights (differently on
    # each side), and the outputs are compared before timing
    for key in keys:
        name = f"{key[0]}->{key[1]}"
        x = torch.from_numpy(rng.standard_normal((1, key[0], key[0], 3)).astype("float32"))
        t = torch.full((1,), float(path_timesteps(process, key, 1, rng)[0]))
        eager = backend.inference_fn(model.path(*key), "eager")
        traced = backend.inference_fn(model.path(*key), "trace")
        forwards = {"ours eager": lambda eager=eager, x=x, t=t: eager(x, t),
                    "ours trace": lambda traced=traced, x=x, t=t: traced(x, t)}
        if official is not None:
            official.model.eval()
            x_nchw = x.permute(0, 3, 1, 2).contiguous()

            def official_forward(x_nchw=x_nchw, t=t, r_out=key[1]):
                with torch.no_grad():
                    return official.forward(x_nchw, t, r_out)

            forwards["official"] = official_forward
            err = float((official_forward().permute(0, 2, 3, 1) - eager(x, t)).abs().max())
            if not err < 1e-4:
                raise SystemExit(f"error: path {name}: the two networks differ by {err}")
        measure(name, "forward", forwards)
    # training steps at batch 1
    for key in keys:
        name = f"{key[0]}->{key[1]}"
        x0 = np.clip(rng.standard_normal((1, cfg.process.image_size, cfg.process.image_size, 3)),
                     -1, 1).astype("float32")
        t_train = path_timesteps(process, key, 1, rng)
        steps = {f"ours train.graph={g}": (lambda tr=tr, x0=x0, t=t_train: tr.train_step(x0, t=t))
                 for g, tr in trainers.items()}
        if official is not None:
            x0_nchw = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2)))
            steps["official (AdamW foreach + update_ema)"] = (
                lambda x0=x0_nchw, t=t_train: official.train_step(x0, t))
            steps["official TrainLoop (MixedPrecisionTrainer, fp32)"] = (
                lambda x0=x0_nchw, t=t_train: official_loop.train_step(x0, t))
        measure(name, "train_step", steps)
    for trainer in trainers.values():
        trainer.close()

    print("\n| path | work | who | ms | ops dispatched | compute | views | scalar reads "
          "| profiler aten:: events |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, kind, who, ms, ops, compute, views, reads, events in rows:
        print(f"| {name} | {kind.replace('_', ' ')} | {who} | {ms:.2f} | {ops} | {compute} | {views} "
              f"| {reads} | {events} |")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
