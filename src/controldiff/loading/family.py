"""Which model family a folder holds, decided from its configs only (never its name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["ModelInfo", "detect_family", "KINDS"]

#: UNet input channels -> what the extra channels carry.
KINDS = {4: "txt2img", 5: "depth", 8: "instruct_pix2pix", 9: "inpaint"}


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction" (| "sample")
    in_channels: int
    kind: str  # "txt2img" | "inpaint" | "depth" | "instruct_pix2pix"
    latent_factor: int  # pixels per latent, from the VAE's block_out_channels
    refiner: bool = False  # SDXL refiner: only text_encoder_2, aesthetic-score time ids

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)  # a transformers config object


def detect_family(
    unet_config: Mapping[str, Any],
    text_encoder_configs: Sequence[Mapping[str, Any] | None],
    scheduler_config: Mapping[str, Any] | None,
    vae_config: Mapping[str, Any],
    where: Any = "unet/config.json",
) -> ModelInfo:
    """Detect family, prediction type and UNet kind from the component configs.

    ``text_encoder_configs`` is in folder order (``text_encoder``, ``text_encoder_2``), with
    ``None`` for a slot the folder does not have (an SDXL refiner has no ``text_encoder``).

    * SDXL: the UNet has ``addition_embed_type == "text_time"``; a refiner when the first text
      encoder is absent or the added time ids are 5 (with aesthetic score) instead of 6.
    * SD2: a text encoder uses ``hidden_act == "gelu"`` (OpenCLIP) or the UNet's
      ``cross_attention_dim`` is 1024.
    * SD1 otherwise.

    ``where`` names the UNet config in errors.
    """
    in_channels = int(_get(unet_config, "in_channels", 4))
    if in_channels not in KINDS:
        raise ValueError(
            f"{where}: in_channels = {in_channels} is not supported; expected "
            + ", ".join(f"{n} ({k})" for n, k in sorted(KINDS.items()))
        )
    kind = KINDS[in_channels]

    blocks = _get(vae_config, "block_out_channels", [128, 256, 512, 512])
    latent_factor = 2 ** (len(blocks) - 1)

    prediction_type = _get(scheduler_config, "prediction_type", None) or "epsilon"

    encoders = list(text_encoder_configs)
    present = [c for c in encoders if c is not None]
    refiner = False
    if _get(unet_config, "addition_embed_type") == "text_time":
        family = "sdxl"
        if encoders and encoders[0] is None:
            refiner = True
        else:
            time_dim = _get(unet_config, "addition_time_embed_dim")
            proj_in = _get(unet_config, "projection_class_embeddings_input_dim")
            pooled = _get(present[-1], "projection_dim") if present else None
            if time_dim and proj_in and pooled:
                refiner = (proj_in - pooled) == 5 * time_dim
    elif any(_get(c, "hidden_act") == "gelu" for c in present) or _get(unet_config, "cross_attention_dim") == 1024:
        family = "sd2"
    else:
        family = "sd1"
    return ModelInfo(
        family=family,
        prediction_type=prediction_type,
        in_channels=in_channels,
        kind=kind,
        latent_factor=latent_factor,
        refiner=refiner,
    )
