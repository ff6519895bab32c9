"""controldiff: composable controlled generation for Stable Diffusion-family models.

    pipe = controldiff.Pipeline.from_pretrained("path/to/model")
    out = pipe("a photo of a cat", num_inference_steps=30, seed=1,
               controls=[controldiff.SAG(0.75), controldiff.PAG(3.0)])
    out.images[0].save("cat.png")
"""
from .controls.attend_excite import AttendAndExcite
from .controls.clip_guidance import CLIPGuidance
from .controls.controlnet import ControlNet
from .controls.deepcache import DeepCache
from .controls.depth import Depth
from .controls.diffedit import DiffEdit
from .controls.fabric import FABRIC
from .controls.instruct_pix2pix import InstructPix2Pix
from .controls.ledits import LEdits
from .controls.multidiffusion import MultiDiffusion
from .controls.regions import Region, Regions
from .controls.pag import PAG
from .controls.pix2pix_zero import Pix2PixZero
from .controls.sag import SAG
from .controls.sega import SEGA, Concept
from .controls.t2i_adapter import T2IAdapter
from .controls.tome import ToMe
from .loading.control_models import load_controlnet, load_t2i_adapter
from .inversion import Inversion
from .pipeline import Output, Pipeline
from .sampling.control import Branch, Context, Control, ModelCall, Step, View
from .schedulers import NAMES as SCHEDULERS

__all__ = [
    "Pipeline", "Output", "Inversion", "SCHEDULERS",
    "SEGA", "Concept", "SAG", "PAG", "ControlNet", "T2IAdapter", "load_controlnet", "load_t2i_adapter",
    "MultiDiffusion", "Regions", "Region", "InstructPix2Pix", "Depth",
    "AttendAndExcite", "FABRIC", "CLIPGuidance", "Pix2PixZero", "DiffEdit", "LEdits", "DeepCache",
    "ToMe",
    "Control", "Branch", "Context", "ModelCall", "Step", "View",
]
__version__ = "0.1.0"
