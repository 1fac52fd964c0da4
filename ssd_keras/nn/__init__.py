"""ADM blocks and the Flexi-UNet (docs/architecture.md).

- ``layers``      ADM / guided-diffusion blocks as Keras layers (NHWC)
- ``flexi_unet``  ``FlexiUNet``: shared layers, one Functional sub-model per path
- ``flops``       parameters and FLOPs per path (``path_cost``, ``cost_table``)
"""

from ssd_keras.nn.flexi_unet import FlexiUNet, PathError

__all__ = ["FlexiUNet", "PathError"]
