"""ssd_keras: Scale Space Diffusion in Keras 3.

Modules, one job each:

- ``schedules``  noise schedules and resolution schedules r(t) (numpy, float64)
- ``operators``  separable linear degradations (antialiased bilinear resize matrices)
- ``process``    the SSD forward process, posterior and noise samplers, respacing
- ``nn``         ADM blocks and the Flexi-UNet
- ``data``       dataset sources and preprocessing
- ``config``     TOML pipelines -> typed, validated config
- ``train``      the Trainer: training loop, EMA, checkpoints
- ``training``   the Trainer's parts: run directory, state, step, log, signals
- ``sample``     reverse process, grids and progression figures
- ``backend``    the only module that knows which Keras backend runs
- ``cli``        the ``ssd-run`` command
"""

import os as _os

# torch is the default backend (Keras itself would default to tensorflow, an optional
# extra here). An explicit KERAS_BACKEND always wins.
_os.environ.setdefault("KERAS_BACKEND", "torch")
# OpenMP's default wait policy made 2 torch threads 3-5x slower than one on small CPU
# machines (docs/design.md); ACTIVE (spinning) fixed that on an idle machine but was ~6x slower
# than PASSIVE as soon as another process shared the cores. PASSIVE is the safe default.
# It must be set before torch is imported; an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
