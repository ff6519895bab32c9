"""Tiny model configs and a generated CLIP tokenizer.

Used by the tests (built with diffusers as the oracle) and by the CLI's embedded
default model (built with our own classes). Nothing here needs the network.
"""
from __future__ import annotations

import json
from pathlib import Path

from .loading.clip_vocab import byte_chars

# A byte-level CLIP BPE vocabulary with no merges: every character is its own token.
# It tokenises any text, so prompts work, and it is tiny.


def write_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>", max_length: int = 77) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json; return the vocab size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}))
    return len(vocab)


VOCAB_SIZE = 514
BOS_ID, EOS_ID = 512, 513


def text_encoder_config(hidden_size: int = 32, layers: int = 2, projection_dim: int = 32, act: str = "quick_gelu") -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": 1,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "attention_dropout": 0.0,
        "dropout": 0.0,
    }


def unet_config(family: str = "sd1", in_channels: int = 4, sample_size: int = 8, cross_attention_dim: int = 32) -> dict:
    """SD1: conv proj, one head dim; SD2: linear proj, per-block heads, upcast;
    SDXL: per-block transformer depth and text_time added conditioning."""
    cfg = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
    }
    if family == "sd2":
        cfg.update(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True)
    elif family == "sdxl":
        cfg.update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            transformer_layers_per_block=[1, 2],
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
            cross_attention_dim=64,
        )
    return cfg


def vae_config(latent_factor: int = 8, sample_size: int = 64) -> dict:
    n = {8: 4, 4: 3, 2: 2}[latent_factor]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [16, 32, 32, 32][:n],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def scheduler_config(family: str = "sd1", prediction_type: str = "epsilon") -> dict:
    """The scheduler configs the real model folders ship."""
    if family == "sdxl":
        return {
            "_class_name": "EulerDiscreteScheduler",
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
            "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
            "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        }
    if family == "sd2":
        return {
            "_class_name": "DDIMScheduler",
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": prediction_type, "steps_offset": 1,
            "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
        }
    return {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "skip_prk_steps": True,
        "set_alpha_to_one": False, "clip_sample": False, "trained_betas": None,
    }
