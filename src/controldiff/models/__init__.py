"""Our own UNet, VAE and attention, with diffusers' parameter names (no diffusers import)."""
from .attention import Attention, AttentionSite, Processor, use_processors
from .config import Config
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "Attention",
    "AttentionSite",
    "AutoencoderKL",
    "Config",
    "DiagonalGaussian",
    "Processor",
    "UNet2DConditionModel",
    "use_processors",
]
