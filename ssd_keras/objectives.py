"""What the network predicts and how it is weighted (docs/math.md section 4).

An objective turns a clean batch into (network input, regression target, per-sample
weight), and turns a network output back into an x0 prediction when sampling. The SSD
objective predicts ``x0`` at the output resolution ``r(t-1)``; the DDPM-eps baseline
predicts the noise (one level only).
"""

from __future__ import annotations

import numpy as np

from .process import ScaleSpaceProcess


class X0Objective:
    """Predict ``D_{1:s} x0`` with weight ``min(SNR(t), gamma)`` (L_simple + Min-SNR-gamma)."""

    name = "x0"

    def __init__(self, process: ScaleSpaceProcess, min_snr_gamma: float = 5.0):
        self.process = process
        self.gamma = min_snr_gamma

    def training_example(self, x0, t: np.ndarray, noise):
        x_t = self.process.q_sample(x0, t, noise)
        return x_t, self.process.x0_target(x0, t), self.process.loss_weight(t, self.gamma)

    def to_x0(self, prediction, x_t, t: int):
        return prediction


class EpsObjective:
    """Predict the noise ``eps`` (DDPM-eps); weight ``min(SNR, gamma)/SNR``, 1 for gamma=0."""

    name = "eps"

    def __init__(self, process: ScaleSpaceProcess, min_snr_gamma: float = 0.0):
        if process.levels != 1:
            raise ValueError("the eps objective needs a single level (plain DDPM)")
        self.process = process
        self.gamma = min_snr_gamma

    def training_example(self, x0, t: np.ndarray, noise):
        from keras import ops

        x_t = self.process.q_sample(x0, t, noise)
        weight = self.process.loss_weight(t, self.gamma) / (
            self.process.snr(t) if self.gamma and self.gamma > 0 else 1.0
        )
        return x_t, ops.convert_to_tensor(noise, dtype=x_t.dtype), weight

    def to_x0(self, prediction, x_t, t: int):
        p = self.process
        return (x_t - p.noise_std[t] * prediction) / p.signal[t]


def make_objective(process: ScaleSpaceProcess, target: str, min_snr_gamma: float):
    if target == "x0":
        return X0Objective(process, min_snr_gamma)
    if target == "eps":
        return EpsObjective(process, min_snr_gamma)
    raise ValueError(f"unknown loss target {target!r}; valid: x0, eps")
