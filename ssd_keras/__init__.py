"""ssd_keras: Scale Space Diffusion in Keras 3.

Modules, one job each:

- ``schedules``  noise schedules and resolution schedules r(t) (numpy, float64)
- ``operators``  separable linear degradations (antialiased bilinear resize matrices)
- ``process``    the SSD forward process, posterior and noise samplers, respacing
- ``nn``         ADM blocks and the Flexi-UNet
- ``data``       dataset sources and preprocessing
- ``config``     TOML pipelines -> typed, validated config
- ``train``      training loop, EMA, checkpoints
- ``sample``     reverse process, grids and progression figures
- ``backend``    the only module that knows which Keras backend runs
- ``cli``        the ``ssd-run`` command
"""

__version__ = "0.1.0"
