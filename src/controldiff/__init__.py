"""controldiff: composable controlled generation for Stable Diffusion-family models.

    pipe = controldiff.Pipeline.from_pretrained("path/to/model")
    out = pipe("a photo of a cat", num_inference_steps=30, seed=1)
    out.images[0].save("cat.png")
"""
from .pipeline import Output, Pipeline
from .sampling.control import Branch, Context, Control, ModelCall, Step
from .schedulers import NAMES as SCHEDULERS

__all__ = ["Pipeline", "Output", "Control", "Branch", "Context", "ModelCall", "Step", "SCHEDULERS"]
__version__ = "0.1.0"
