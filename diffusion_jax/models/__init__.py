"""Networks: the Efficient U-Net (Imagen) and its layers."""

from diffusion_jax.models.unet import PRESETS, Level, UNet, UNetConfig, count_params

__all__ = ["PRESETS", "Level", "UNet", "UNetConfig", "count_params"]
