"""Does the official code accept ``ssd-run export --format official``? (docs/finetune.md)

Exports a run's EMA weights with ``ssd_keras.export``, builds the official FlexiUNet
(github prateksha/ScaleSpaceDiffusion, a checkout kept outside the repo; see
benchmarks/_official.py), zeroes all its parameters, loads the exported file with
``load_state_dict(torch.load(file), strict=True)`` and compares every path's output with
the ssd_keras model's on the same random inputs. The test suite never imports the
official code; this script is the check against it.

    python benchmarks/check_export_official.py --official PATH [--run runs/quickstart]

Measured (quickstart run at step 816, torch backend, CPU): 172 tensors, "All keys
matched successfully" (2 copies of the shared adapter, the 12 tensors of output_blocks.5
zeros); max |ours - official| per path 2.7e-7 (4->4), 8.3e-7 (4->8), 6.6e-7 (8->8),
6.6e-7 (8->16), 7.8e-7 (16->16), on outputs of scale ~1 (float32 rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of the official code")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart")
    args = ap.parse_args()

    import torch
    import torch._dynamo  # noqa: F401  (before _official stubs pandas, which dynamo probes)
    from keras import ops

    import _official
    from ssd_keras.export import export_run
    from ssd_keras.runs import load_run, model_with_weights

    official = _official.load(args.official)
    cfg, groups, meta, path = load_run(args.run)
    model = model_with_weights(cfg, groups, meta, ema=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export.pt"
        report = export_run(args.run, "official", out)
        twin = _official.OfficialTwin(official, cfg, model)
        with torch.no_grad():
            for p in twin.model.parameters():
                p.zero_()
        result = twin.model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    print(f"{path}: {report.tensors} tensors; load_state_dict(strict=True): {result}")
    print(f"  filled: {len(report.fill['copied'])} adapter copies, {len(report.fill['zeros'])} "
          f"zeros ({sorted({'.'.join(k.split('.')[:2]) for k in report.fill['zeros']})})")
    rng = np.random.default_rng(0)
    worst = 0.0
    for key in model.path_keys:
        r_in, r_out = key
        x = rng.standard_normal((4, r_in, r_in, 3)).astype(np.float32)
        t = rng.integers(0, cfg.process.timesteps, 4).astype(np.float32)
        ours = ops.convert_to_numpy(model.path(r_in, r_out)([x, t], training=False))
        theirs = twin.path_output(x, t, key)
        diff = float(np.abs(ours - theirs).max())
        worst = max(worst, diff)
        print(f"  path {r_in}->{r_out}: max |ours - official| = {diff:.2e} "
              f"(output scale {float(np.abs(theirs).max()):.2f})")
    print(f"largest difference over all paths: {worst:.2e}")


if __name__ == "__main__":
    main()
