"""The conditional UNet of SD 1.x / 2.x / XL, with diffusers' parameter names.

Built from a diffusers ``unet/config.json`` dict; ``state_dict()`` keys equal diffusers',
so weights load with ``load_state_dict(strict=True)``. Attention modules are addressable
by name (:meth:`UNet2DConditionModel.attention_sites`) and take processors for the
duration of a ``with`` (:meth:`UNet2DConditionModel.attention_processors`). A
:class:`SkipCache` lets an evaluation record, or reuse, the up path's input at one skip
branch (DeepCache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, Processor, find_sites, use_processors
from .config import Config, check_options
from .embeddings import TimestepEmbedding, Timesteps
from .unet_blocks import DOWN_BLOCKS, UP_BLOCKS, UNetMidBlock2DCrossAttn
from .module import Model

# diffusers' UNet2DConditionModel.__init__ defaults (0.42), tuples as JSON lists.
DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# Options whose non-default values select architectures we do not implement.
_UNSUPPORTED = (
    "encoder_hid_dim", "encoder_hid_dim_type", "num_attention_heads", "dual_cross_attention", "class_embed_type",
    "num_class_embeds", "resnet_time_scale_shift", "resnet_skip_time_act", "time_embedding_type",
    "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "attention_type",
    "class_embeddings_concat", "cross_attention_norm",
)
_ALLOWED = {
    "addition_embed_type": (None, "text_time"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
    "act_fn": ("silu", "swish"),
    "mid_block_only_cross_attention": (None, False),
}


def _check(config: Config) -> None:
    check_options(config, "unet", DEFAULTS, _UNSUPPORTED, _ALLOWED)
    if config.norm_num_groups is None:
        raise ValueError("unet config: norm_num_groups=None is not supported")
    for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for name in config[key]:
            if name not in table:
                raise ValueError(f"unet config: {key} entry {name!r} is not supported (expected one of {list(table)})")
    n = len(config.down_block_types)
    if len(config.up_block_types) != n or len(config.block_out_channels) != n:
        raise ValueError(
            f"unet config: down_block_types, up_block_types and block_out_channels must have the same length "
            f"(got {n}, {len(config.up_block_types)}, {len(config.block_out_channels)})"
        )
    if config.addition_embed_type == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if config[key] is None:
                raise ValueError(f"unet config: addition_embed_type='text_time' needs {key}")


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@dataclass
class SkipCache:
    """The up path's input at one skip branch, kept between UNet evaluations (DeepCache).

    The branch is the ``layer``-th skip of resolution level ``level`` (0 = the finest;
    layer 0 = the level's input, k = after its k-th layer). Passed as ``skip_cache=`` it
    serves one evaluation, then ``used`` is set (re-runs that copy the call's keyword
    arguments, as SAG's, run in full and leave it alone). With ``feature`` None the
    evaluation runs in full and records it; with ``feature`` set only the shallow part runs:
    the down path to that skip, then the up path from it, ``feature`` standing for
    everything deeper (deeper down layers, mid block, deeper up layers).
    """

    level: int
    layer: int
    feature: Optional[torch.Tensor] = None
    used: bool = False


class UNet2DConditionModel(Model):
    """``unet(sample, timestep, encoder_hidden_states, ...) -> noise prediction`` (a tensor)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = cfg = Config.with_defaults(DEFAULTS, config)
        _check(cfg)
        channels = list(cfg.block_out_channels)
        n = len(channels)
        # diffusers' historical naming: `attention_head_dim` is really the number of heads.
        heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)
        cross_dim = _per_block(cfg.cross_attention_dim, n)
        layers = _per_block(cfg.layers_per_block, n)
        depth = _per_block(cfg.transformer_layers_per_block, n)
        up_depth = (
            list(cfg.reverse_transformer_layers_per_block)
            if cfg.reverse_transformer_layers_per_block is not None
            else list(reversed(depth))
        )
        temb_dim = channels[0] * 4
        common = dict(temb_channels=temb_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout)
        attn = dict(use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention)

        pad_in = (cfg.conv_in_kernel - 1) // 2
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=cfg.conv_in_kernel, padding=pad_in)
        self.time_proj = Timesteps(channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        if cfg.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(DOWN_BLOCKS[kind](
                in_ch, out_ch, num_layers=layers[i], add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, heads=heads[i], cross_attention_dim=cross_dim[i],
                transformer_layers=depth[i], **common, **attn,
            ))

        self.mid_block = None
        if cfg.mid_block_type is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], temb_dim, cfg.norm_num_groups, cfg.norm_eps, heads[-1], cross_dim[-1],
                transformer_layers=depth[-1], output_scale_factor=cfg.mid_block_scale_factor, dropout=cfg.dropout,
                **attn,
            )

        self.up_blocks = nn.ModuleList()
        rev_ch, rev_heads, rev_cross, rev_layers = (list(reversed(v)) for v in (channels, heads, cross_dim, layers))
        out_ch = rev_ch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out_ch = out_ch, rev_ch[i]
            self.up_blocks.append(UP_BLOCKS[kind](
                rev_ch[min(i + 1, n - 1)], prev, out_ch, num_layers=rev_layers[i] + 1, add_upsample=i < n - 1,
                heads=rev_heads[i], cross_attention_dim=rev_cross[i], transformer_layers=up_depth[i], **common, **attn,
            ))
        self.num_upsamplers = n - 1

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        pad_out = (cfg.conv_out_kernel - 1) // 2
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, kernel_size=cfg.conv_out_kernel, padding=pad_out)
        self._sites = find_sites(self)

    @property
    def gradient_checkpointing(self) -> bool:
        """Training memory: the down, mid and up blocks recompute their resnets and transformers
        in the backward pass instead of keeping their activations (in training mode, with grad)."""
        return any(b.gradient_checkpointing for b in self._blocks())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        for b in self._blocks():
            b.gradient_checkpointing = bool(on)

    def _blocks(self) -> list:
        return [*self.down_blocks, *([self.mid_block] if self.mid_block is not None else []), *self.up_blocks]

    # ---- attention sites ----

    def attention_sites(self) -> dict[str, Attention]:
        """Every transformer attention module by module path, in execution order; each has ``.site``."""
        return dict(self._sites)

    def attention_processors(self, processors: Mapping[str, Optional[Processor]]):
        """``with unet.attention_processors({name: proc}):`` - attached for the body only."""
        return use_processors(self._sites, processors)

    # ---- forward ----

    def time_embed(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """diffusers' rules: a Python number becomes a float64/int64 tensor, a 0-d tensor gets a
        batch axis, then it is broadcast to the batch; features are cast to ``sample.dtype``."""
        if not torch.is_tensor(timestep):
            mps = sample.device.type in ("mps", "npu")
            if isinstance(timestep, float):
                dtype = torch.float32 if mps else torch.float64
            else:
                dtype = torch.int32 if mps else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(sample.shape[0])
        return self.time_embedding(self.time_proj(timestep).to(dtype=sample.dtype))

    def added_embed(self, emb: torch.Tensor, added_cond_kwargs: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """SDXL's micro-conditioning: pooled text embeds + sinusoidal features of ``time_ids``."""
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("added_cond_kwargs: this UNet (addition_embed_type='text_time') needs "
                             "{'text_embeds': ..., 'time_ids': ...}")
        text_embeds = added_cond_kwargs["text_embeds"]
        time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())
        time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
        add = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
        return self.add_embedding(add)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        *,
        added_cond_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
        down_block_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
        mid_block_additional_residual: Optional[torch.Tensor] = None,
        down_intrablock_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
        skip_cache: Optional[SkipCache] = None,
    ) -> torch.Tensor:
        """Residuals as in diffusers: ControlNet's ``down_block_additional_residuals`` (one per
        skip) and ``mid_block_additional_residual`` are added to the skips and the mid output;
        T2I-Adapter's ``down_intrablock_additional_residuals`` are added inside the down blocks
        (one per block, plus one for the mid block if the shapes match, as for T2I-Adapter-XL).
        ``skip_cache``: see :class:`SkipCache` (residuals then act on the skips that run)."""
        cfg = self.config
        cache = skip_cache if skip_cache is not None and not skip_cache.used else None
        reuse = cache is not None and cache.feature is not None
        if cache is not None:
            cache.used = True
            cut_block = len(self.up_blocks) - 1 - cache.level   # the up block holding the branch
        context = encoder_hidden_states
        up_factor = 2**self.num_upsamplers
        forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embed(sample, timestep)
        if cfg.addition_embed_type == "text_time":
            emb = emb + self.added_embed(emb, added_cond_kwargs)

        is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        intrablock = list(down_intrablock_additional_residuals) if down_intrablock_additional_residuals is not None else None
        if intrablock is None and mid_block_additional_residual is None and down_block_additional_residuals is not None:
            intrablock = list(down_block_additional_residuals)  # diffusers' legacy T2I-Adapter calling convention

        sample = self.conv_in(sample)
        skips = [sample]
        for i, block in enumerate(self.down_blocks):
            if reuse and i > cache.level:
                break
            extra = intrablock.pop(0) if intrablock else None
            stop = cache.layer if reuse and i == cache.level else None
            sample, block_skips = block(sample, emb, context, extra, stop=stop)
            skips.extend(block_skips)

        if is_controlnet:  # (a shallow pass has fewer skips: the first ones)
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

        if reuse:
            sample = cache.feature
            if sample.shape[0] != skips[0].shape[0]:
                raise ValueError(f"skip_cache: the cached feature has batch {sample.shape[0]}, "
                                 f"this evaluation {skips[0].shape[0]}")
        elif self.mid_block is not None:
            sample = self.mid_block(sample, emb, context)
            if intrablock and sample.shape == intrablock[0].shape:
                sample = sample + intrablock.pop(0)
        if is_controlnet and not reuse:
            sample = sample + mid_block_additional_residual

        last = len(self.up_blocks) - 1
        for i, block in enumerate(self.up_blocks):
            if reuse and i < cut_block:
                continue
            at_branch = cache is not None and i == cut_block
            cut = len(block.resnets) - 1 - cache.layer if at_branch else 0   # this block's layers below the branch
            start = cut if reuse else 0
            n = len(block.resnets) - start
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < last else None
            if at_branch and not reuse:   # record the up path's input at the branch
                sample = block(sample, block_skips[n - cut:], emb, context, stop=cut)
                cache.feature = sample
                block_skips, start = block_skips[:n - cut], cut
            sample = block(sample, block_skips, emb, context, upsample_size, start=start)

        sample = F.silu(self.conv_norm_out(sample))
        return self.conv_out(sample)
