"""Training (``controldiff train``): one loop for every method; methods differ only in what
is trainable and what is saved. Implemented: LoRA, DreamBooth, textual inversion, Custom Diffusion."""
from .custom_diffusion import CustomDiffusion
from .data import Example, read_folder
from .dreambooth import DreamBooth
from .lora import LoRA
from .objective import Objective, compute_snr
from .textual_inversion import TextualInversion
from .trainer import FORMATS, TrainConfig, TrainResult, train
from .transforms import ImageTransform

__all__ = ["CustomDiffusion", "Example", "read_folder", "DreamBooth", "LoRA", "TextualInversion", "Objective", "compute_snr", "FORMATS", "TrainConfig", "TrainResult",
           "train", "ImageTransform", "METHODS"]

#: every method name of the CLI; the ones without a class are not implemented yet
METHODS = {"lora": LoRA, "dreambooth": DreamBooth, "textual-inversion": TextualInversion, "custom-diffusion": CustomDiffusion}
