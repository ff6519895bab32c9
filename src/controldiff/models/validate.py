"""Checking model configs where they are read, before any module is built or any step runs.

A ``config.json`` with a wrong type or an impossible value (0 heads, channels the norm
groups do not divide, a string scaling factor, 0 training timesteps) would otherwise fail
deep inside a constructor with a message naming neither file nor key, or only after
sampling. Each check raises ``ValueError("<file>: <key>: expected ..., got ...")``; the
checks the model constructors make (unsupported options) run here too, with the file
named. ``where`` is the file (or a description) the config came from.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..checks import is_number
from .config import Config

__all__ = ["check_unet_config", "check_vae_config", "check_controlnet_config", "check_t2i_adapter_config",
           "check_scheduler_config", "check_text_encoder_config"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _fail(where, key: str, expected: str, value: Any):
    raise ValueError(f"{where}: {key}: expected {expected}, got {value!r}")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _positive(cfg: Mapping, key: str, where, optional: bool = False) -> None:
    v = cfg.get(key)
    if optional and v is None:
        return
    if not _is_int(v) or v < 1:
        _fail(where, key, "a positive integer" + (" or null" if optional else ""), v)


def _channels(cfg: Mapping, key: str, where) -> list[int]:
    v = cfg.get(key)
    if not isinstance(v, list) or not v or not all(_is_int(c) and c > 0 for c in v):
        _fail(where, key, "a non-empty list of positive integers", v)
    return v


def _names(cfg: Mapping, key: str, where) -> None:
    v = cfg.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
        _fail(where, key, "a non-empty list of block names", v)


def _per_block(cfg: Mapping, key: str, n: int, where, optional: bool = False) -> list:
    """A positive integer, or a list of ``n`` of them (diffusers' per-block form)."""
    v = cfg.get(key)
    if optional and v is None:
        return []
    items = v if isinstance(v, list) else [v]
    flat = [x for i in items for x in (i if isinstance(i, list) else [i])]  # SDXL nests per-layer lists
    if not flat or not all(_is_int(x) and x > 0 for x in flat) or (isinstance(v, list) and len(v) != n):
        _fail(where, key, f"a positive integer or a list of {n}", v)
    return [v] * n if not isinstance(v, list) else v


def _groups(cfg: Mapping, channels: list[int], where, key: str = "norm_num_groups") -> None:
    g = cfg.get(key)
    if not _is_int(g) or g < 1:
        _fail(where, key, "a positive integer", g)
    if any(c % g for c in channels):
        _fail(where, key, f"a divisor of every entry of block_out_channels {channels} (GroupNorm)", g)


def _sample_size(cfg: Mapping, where) -> None:
    v = cfg.get("sample_size")
    ok = (_is_int(v) and v > 0) or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v))
    if not ok:
        _fail(where, "sample_size", "a positive integer or [height, width]", v)


def _heads(cfg: Mapping, channels: list[int], where) -> None:
    heads = _per_block(cfg, "attention_head_dim", len(channels), where)
    for c, h in zip(channels, heads):
        if _is_int(h) and h > c:
            _fail(where, "attention_head_dim", f"at most the block's {c} channels (it is the number of heads)", h)


def _constructor_check(check, config: Config, where) -> None:
    try:
        check(config)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _object(cfg: Any, where) -> None:
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got a {type(cfg).__name__}")


def _encoder_common(cfg: Mapping, where) -> list[int]:
    """Keys the UNet and the ControlNet share (the ControlNet is the UNet's encoder)."""
    _positive(cfg, "in_channels", where)
    channels = _channels(cfg, "block_out_channels", where)
    _names(cfg, "down_block_types", where)
    _per_block(cfg, "layers_per_block", len(channels), where)
    _per_block(cfg, "cross_attention_dim", len(channels), where)
    _per_block(cfg, "transformer_layers_per_block", len(channels), where)
    _heads(cfg, channels, where)
    _groups(cfg, channels, where)
    if not is_number(cfg.get("norm_eps")) or cfg["norm_eps"] <= 0:
        _fail(where, "norm_eps", "a positive number", cfg.get("norm_eps"))
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        _positive(cfg, key, where, optional=True)
    return channels


def check_unet_config(config: Mapping[str, Any], where) -> None:
    """A ``unet/config.json`` (missing keys take diffusers' defaults)."""
    from . import unet

    _object(config, where)
    cfg = Config.with_defaults(unet.DEFAULTS, config)
    _positive(cfg, "out_channels", where)
    _sample_size(cfg, where)  # the default image size: the pipeline needs it
    _encoder_common(cfg, where)
    _names(cfg, "up_block_types", where)
    _constructor_check(unet._check, cfg, where)


def check_controlnet_config(config: Mapping[str, Any], where) -> None:
    """A ControlNet ``config.json``."""
    from . import controlnet

    _object(config, where)
    cfg = Config.with_defaults(controlnet.DEFAULTS, config)
    _positive(cfg, "conditioning_channels", where)
    _channels(cfg, "conditioning_embedding_out_channels", where)
    _encoder_common(cfg, where)
    _constructor_check(controlnet._check, cfg, where)


def check_vae_config(config: Mapping[str, Any], where) -> None:
    """A ``vae/config.json``; the scaling factor is checked here, not after sampling."""
    from . import vae

    _object(config, where)
    cfg = Config.with_defaults(vae.DEFAULTS, config)
    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
        _positive(cfg, key, where)
    channels = _channels(cfg, "block_out_channels", where)
    _names(cfg, "down_block_types", where)
    _names(cfg, "up_block_types", where)
    _groups(cfg, channels, where)
    _sample_size(cfg, where)
    if not is_number(cfg.scaling_factor) or cfg.scaling_factor <= 0:
        _fail(where, "scaling_factor", "a positive number", cfg.scaling_factor)
    if cfg.shift_factor is not None and not is_number(cfg.shift_factor):
        _fail(where, "shift_factor", "a number or null", cfg.shift_factor)
    for key in ("latents_mean", "latents_std"):
        v = cfg[key]
        if v is not None and (not isinstance(v, list) or len(v) != cfg.latent_channels
                              or not all(is_number(x) for x in v)):
            _fail(where, key, f"null or a list of {cfg.latent_channels} numbers (one per latent channel)", v)
    if cfg.latents_std is not None and any(x == 0 for x in cfg.latents_std):
        _fail(where, "latents_std", "non-zero numbers", cfg.latents_std)
    _constructor_check(vae._check, cfg, where)


def check_t2i_adapter_config(config: Mapping[str, Any], where) -> None:
    """A T2I-Adapter ``config.json``."""
    from . import t2i_adapter

    _object(config, where)
    cfg = Config.with_defaults(t2i_adapter.DEFAULTS, config)
    for key in ("in_channels", "num_res_blocks", "downscale_factor"):
        _positive(cfg, key, where)
    _channels(cfg, "channels", where)
    if cfg.adapter_type not in t2i_adapter.ADAPTER_TYPES:
        _fail(where, "adapter_type", f"one of {t2i_adapter.ADAPTER_TYPES}", cfg.adapter_type)


def check_scheduler_config(config: Mapping[str, Any], where) -> None:
    """A ``scheduler/scheduler_config.json``: only the keys it has (each class has its own defaults)."""
    _object(config, where)
    if "num_train_timesteps" in config:
        _positive(config, "num_train_timesteps", where)
    for key in ("beta_start", "beta_end"):
        if key in config and (not is_number(config[key]) or not 0 < config[key] < 1):
            _fail(where, key, "a number in (0, 1)", config[key])
    if "steps_offset" in config and (not _is_int(config["steps_offset"]) or config["steps_offset"] < 0):
        _fail(where, "steps_offset", "an integer >= 0", config["steps_offset"])
    if config.get("prediction_type") is not None and config["prediction_type"] not in PREDICTION_TYPES:
        _fail(where, "prediction_type", f"one of {PREDICTION_TYPES}", config["prediction_type"])
    betas = config.get("trained_betas")
    if betas is not None and (not isinstance(betas, list) or not betas or not all(is_number(b) for b in betas)):
        _fail(where, "trained_betas", "null or a list of numbers", betas)
    for key in ("beta_schedule", "timestep_spacing"):
        if key in config and not isinstance(config[key], str):
            _fail(where, key, "a name", config[key])


def check_text_encoder_config(config: Mapping[str, Any], where) -> None:
    """A CLIP text encoder ``config.json`` (the keys transformers divides and indexes by)."""
    _object(config, where)
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "max_position_embeddings", "projection_dim"):
        if key in config:
            _positive(config, key, where)
    h, n = config.get("hidden_size"), config.get("num_attention_heads")
    if _is_int(h) and _is_int(n) and h % n:
        _fail(where, "num_attention_heads", f"a divisor of hidden_size ({h})", n)
