"""Regenerate tests/data/official_classcond_16px_3L.{pt,npz}: a class-conditional official
FlexiUNet with random weights and its outputs on every path.

    python benchmarks/make_classcond_fixture.py --official /path/to/ScaleSpaceDiffusion

The network is the official code's FlexiUNet built with ``num_classes`` (ADM's
``label_emb``, added to the time embedding) for the pipeline
tests/data/official_classcond_16px_3L.toml (16 px, levels 4/8/16, base 32,
channel_mult 1,1,2, one res block, attention at 4x4, 10 classes). Every tensor is drawn
at random (also the ones ADM zero-initialises), the state_dict is saved with
``torch.save`` as the released checkpoints are, and the ``.npz`` holds, for every path
``(r_in, r_out)``, inputs ``x`` (NCHW), ``t``, labels ``y`` and the official network's
output, computed as its sampler calls it (``cond_rs`` = r_out on a change step; the
full-resolution change upsamples x first). tests/test_classcond.py checks our
network against it. Only this script needs the official code; the test does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

NAME = "official_classcond_16px_3L"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="checkout of the official SSD code")
    parser.add_argument("--out", default=str(ROOT / "tests" / "data"))
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from _official import load
    from ssd_keras.config import load_pipeline

    out = Path(args.out)
    cfg = load_pipeline(out / f"{NAME}.toml")
    p, m = cfg.process, cfg.model
    official = load(args.official)
    resolutions = list(p.resolutions)
    torch.manual_seed(args.seed)
    model = official["unet"].FlexiUNet(
        image_size=p.image_size, in_channels=3, model_channels=m.base_channels, out_channels=3,
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(p.image_size // r for r in m.attention_resolutions),
        dropout=0.0, channel_mult=tuple(float(c) for c in m.channel_mult),
        num_classes=m.num_classes, num_heads=m.num_heads, num_head_channels=m.num_head_channels,
        use_scale_shift_norm=True, unet_res_layer_map={r: r for r in resolutions},
    )
    with torch.no_grad():  # random values everywhere, zero-initialised convs included
        for name, tensor in model.state_dict().items():
            scale = 1.0 if name == "label_emb.weight" else 0.2
            tensor.copy_(torch.randn(tensor.shape) * scale)
    model.eval()
    torch.save(model.state_dict(), out / f"{NAME}.pt")

    rng = np.random.default_rng(args.seed)
    arrays, paths = {}, []
    for i, r_in in enumerate(resolutions):
        for r_out in [r_in] + resolutions[i + 1: i + 2]:
            x = rng.standard_normal((args.batch, 3, r_in, r_in)).astype(np.float32)
            t = rng.integers(0, p.timesteps, args.batch).astype(np.float32)
            y = rng.integers(0, m.num_classes, args.batch).astype(np.int64)
            xt = torch.from_numpy(x)
            cond = None
            if r_out != r_in:
                if r_out == p.image_size:  # the official full-resolution change exception
                    xt = official["ssd_utils"].torch_resize_batch(xt, r_out)
                else:
                    cond = torch.full((args.batch,), float(r_out))
            with torch.no_grad():
                result = model(xt, torch.from_numpy(t), cond, y=torch.from_numpy(y)).numpy()
            key = f"{r_in}_{r_out}"
            arrays.update({f"x_{key}": x, f"t_{key}": t, f"y_{key}": y, f"out_{key}": result})
            paths.append([r_in, r_out])
    config = {"paths": paths, "num_classes": m.num_classes, "seed": args.seed,
              "generator": "benchmarks/make_classcond_fixture.py"}
    np.savez_compressed(out / f"{NAME}.npz", config_json=json.dumps(config), **arrays)
    size = (out / f"{NAME}.pt").stat().st_size
    print(f"wrote {out / NAME}.pt ({size / 1e6:.1f} MB, "
          f"{sum(v.numel() for v in model.state_dict().values()):,} values) and .npz "
          f"({len(paths)} paths)")


if __name__ == "__main__":
    main()
