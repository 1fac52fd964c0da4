"""Which Keras backend runs, and its framework imported once for the package's modules."""

from __future__ import annotations

import keras

BACKEND = keras.backend.backend()

if BACKEND == "torch":
    import torch  # noqa: F401
elif BACKEND == "jax":
    import jax  # noqa: F401
elif BACKEND == "tensorflow":
    import tensorflow as tf  # noqa: F401
