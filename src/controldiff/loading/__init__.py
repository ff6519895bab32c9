"""Loading weights and model folders, safe by default (no arbitrary unpickling)."""
from .family import KINDS, ModelInfo, detect_family
from .folder import Components, load_components, load_text_encoder, load_tokenizer
from .weights import WEIGHT_EXTENSIONS, align_prefix, find_weights, load_model, load_state_dict

__all__ = [
    "Components",
    "KINDS",
    "ModelInfo",
    "WEIGHT_EXTENSIONS",
    "align_prefix",
    "detect_family",
    "find_weights",
    "load_components",
    "load_model",
    "load_state_dict",
    "load_text_encoder",
    "load_tokenizer",
]
