"""Dynamic loss scaling for ``mixed_float16``, and the verdict on a step's numbers.

One job: decide, from whether a step's loss and its gradients are finite, whether the
update is applied, skipped as a float16 overflow (the loss scale backs off), or handed to
``train.on_nonfinite``; and keep the loss scale between steps (docs/math.md "Mixed
precision").

The scale follows the rules of ``torch.amp.GradScaler``: it starts at
``train.loss_scale_init`` (2^16), is halved and the step skipped whenever the scaled
gradients hold an inf or NaN, and doubles after ``train.loss_scale_growth_interval``
consecutive clean steps. The loss is scaled through the per-image weights of the loss (the
loss is linear in them), so no compiled function changes; the gradients are unscaled and
checked for finiteness in one pass (``backend.unscale_and_check``), the same check that
``train.on_nonfinite`` uses for every precision. Under ``float32`` and ``mixed_bfloat16``
the scale is fixed at 1 (bfloat16 has float32's exponent range: nothing underflows that
float32 keeps).
"""

from __future__ import annotations

#: the scale never goes below this: an overflow at scale 1 (no scaling at all) is not a
#: scale problem, and ``train.on_nonfinite`` decides
MIN_SCALE = 1.0

APPLY = "apply"        # finite loss and gradients: the update is applied
OVERFLOW = "overflow"  # float16 overflow: step skipped, scale halved
NONFINITE = "nonfinite"  # train.on_nonfinite decides (stop or skip)


class LossScale:
    """The loss scale of a run: ``scale`` (a power of 2) and ``good_steps``, the clean
    steps since the last change; fixed at 1 unless ``dynamic``."""

    def __init__(self, dynamic: bool, initial: float = 2.0 ** 16, growth_interval: int = 2000):
        self.dynamic = dynamic
        self.initial = float(initial) if dynamic else 1.0
        self.growth_interval = int(growth_interval)
        self.scale = self.initial
        self.good_steps = 0

    @classmethod
    def from_config(cls, train_cfg) -> "LossScale":
        return cls(train_cfg.precision == "mixed_float16", train_cfg.loss_scale_init,
                   train_cfg.loss_scale_growth_interval)

    def verdict(self, loss_finite: bool, grads_finite: bool) -> str:
        """What to do with a step (``APPLY``, ``OVERFLOW`` or ``NONFINITE``), and the
        scale's update for it (as GradScaler.update: back off on an overflow, grow after
        ``growth_interval`` clean steps)."""
        if loss_finite and grads_finite:
            self.good_steps += 1
            if self.dynamic and self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0
            return APPLY
        self.good_steps = 0
        if loss_finite and self.dynamic and self.scale > MIN_SCALE:
            self.scale = max(self.scale * 0.5, MIN_SCALE)
            return OVERFLOW
        return NONFINITE

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict | None:
        """What a checkpoint keeps (``meta["loss_scale"]``); ``None`` for a fixed scale."""
        return {"scale": self.scale, "good_steps": self.good_steps} if self.dynamic else None

    def restore(self, state) -> None:
        """Take over a checkpoint's scale; a checkpoint without one (older, or written
        under another precision) starts from the initial scale."""
        if not self.dynamic or not isinstance(state, dict):
            return
        scale, good = state.get("scale"), state.get("good_steps")
        if (isinstance(scale, (int, float)) and scale >= MIN_SCALE and scale != float("inf")
                and isinstance(good, int) and good >= 0):
            self.scale, self.good_steps = float(scale), good
