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
- ``backend``    the only package that knows which Keras backend runs; its ``Execution``
                 decides how each path runs on this device
- ``cli``        the ``ssd-run`` command
"""

import os as _os

# torch is the default backend (Keras itself would default to tensorflow, an optional
# extra here). An explicit KERAS_BACKEND always wins.
_os.environ.setdefault("KERAS_BACKEND", "torch")
# (OMP_WAIT_POLICY, which torch reads when it is imported, is set by the command-line
# entry point, ssd_keras.cli: importing the library changes no other environment)

__version__ = "0.1.0"
