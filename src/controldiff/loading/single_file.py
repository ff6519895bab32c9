"""Single-file checkpoints in the original layout (SD1.x, SD2.x eps/v, SDXL base/refiner).

``Pipeline.from_single_file(path)``: the architecture is detected from tensor names and
shapes, keys are converted to diffusers names (:mod:`.convert_ldm`), configs come from the
file's shapes plus either ``config=`` (a diffusers folder) or the bundled real-model
configs under ``controldiff/configs/`` (never the network), and the CLIP tokenizer is
built from the bundled BPE merges (:mod:`.clip_vocab`). Files are read by
:func:`.weights.load_state_dict`: safetensors, or ``torch.load(weights_only=True)``.

Prediction type (SD2): ``prediction_type=`` wins, then ``config=``'s scheduler; otherwise,
like diffusers (which loads every non-inpainting SD2 file with SD2.1-768's config), SD2
txt2img files are v-prediction and SD2 inpainting/depth/pix2pix files epsilon. SD2-base
(512, epsilon) files therefore need ``prediction_type="epsilon"``: nothing in their tensors
tells them apart (diffusers' legacy path looked at a ``global_step == 875000`` entry,
which safetensors files do not carry).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..models.config import read_json
from ..models.validate import (PREDICTION_TYPES, check_scheduler_config, check_text_encoder_config,
                               check_unet_config, check_vae_config)
from . import convert_ldm as ldm
from .family import KINDS, ModelInfo, detect_family
from .weights import _materialise_buffers, _meta_tensors, load_state_dict

__all__ = ["SingleFileMixin", "load_single_file", "single_file_configs", "detect_checkpoint", "CONFIGS_DIR"]

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class TextSlot:
    prefix: str
    open_clip: bool  # OpenCLIP layout (fused in_proj) rather than transformers' CLIP
    with_projection: bool  # CLIPTextModelWithProjection (SDXL's second encoder)


@dataclass(frozen=True)
class Checkpoint:
    """What the tensor names tell: family, bundled defaults and text encoder slots."""

    family: str  # sd1 | sd2 | sdxl
    refiner: bool
    in_channels: int
    bundled: str  # folder under configs/
    text: tuple  # TextSlot | None per slot, in diffusers folder order


def detect_checkpoint(state: Mapping[str, Tensor], path: Path) -> Checkpoint:
    """Family and kind from tensor names and shapes; a ``ValueError`` naming the file otherwise."""
    conv_in = ldm.UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in state:
        if any(k.startswith("control_model.") for k in state):
            raise ValueError(f"{path}: is a ControlNet checkpoint (control_model.* tensors), not a Stable "
                             "Diffusion model; load it with controldiff.load_controlnet")
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in state):
            raise ValueError(f"{path}: holds a diffusers-layout UNet alone, not a whole original-layout "
                             "checkpoint; use a diffusers model folder with Pipeline.from_pretrained")
        first = ", ".join(repr(k) for k in list(state)[:3]) or "none"
        raise ValueError(f"{path}: unknown architecture: no {conv_in!r} tensor, so not an original-layout "
                         f"SD1/SD2/SDXL checkpoint (first tensors: {first})")
    in_channels = int(state[conv_in].shape[1])
    if in_channels not in KINDS:
        raise ValueError(f"{path}: tensor {conv_in!r} has {in_channels} input channels; expected "
                         + ", ".join(f"{n} ({k})" for n, k in sorted(KINDS.items())))

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    if has("conditioner.embedders.1.model."):
        text = (TextSlot("conditioner.embedders.0.transformer.", False, False),
                TextSlot("conditioner.embedders.1.model.", True, True))
        return Checkpoint("sdxl", False, in_channels, "sdxl_base", text)
    if has("conditioner.embedders.0.model."):
        return Checkpoint("sdxl", True, in_channels, "sdxl_refiner", (None, TextSlot("conditioner.embedders.0.model.", True, True)))
    if has("cond_stage_model.model."):
        bundled = "sd21" if in_channels == 4 else "sd2_inpaint"
        return Checkpoint("sd2", False, in_channels, bundled, (TextSlot("cond_stage_model.model.", True, False),))
    if has("cond_stage_model.transformer."):
        return Checkpoint("sd1", False, in_channels, "sd15", (TextSlot("cond_stage_model.transformer.", False, False),))
    raise ValueError(f"{path}: unknown architecture: a UNet but no text encoder I recognise; expected "
                     "cond_stage_model.transformer.* (SD1), cond_stage_model.model.* (SD2) or "
                     "conditioner.embedders.* (SDXL) tensors")


# ----------------------------------------------------------------------------- loading


def _fit(value: Tensor, shape: torch.Size) -> Optional[Tensor]:
    """``value`` in ``shape`` when they differ only by size-1 dimensions (1x1 conv <-> linear)."""
    if tuple(value.shape) == tuple(shape):
        return value
    squeeze = lambda s: [d for d in s if d != 1]  # noqa: E731
    return value.reshape(shape) if squeeze(value.shape) == squeeze(shape) else None


def load_converted(build, sources: Mapping[str, ldm.Source], state: Mapping[str, Tensor], path: Path, what: str,
                   *, device="cpu", dtype: Optional[torch.dtype] = torch.float32) -> nn.Module:
    """Build ``build()`` on meta and fill it from converted tensors; errors name the file,
    the original tensor and the diffusers name (like :func:`.weights.load_model`)."""
    with torch.device("meta"):
        model = build()
    expected = model.state_dict(keep_vars=True)
    if any(k.startswith("text_model.") for k in expected):  # CLIPTextModelWithProjection keeps the level
        sources = {(k if k in expected or k.startswith("text_projection") else "text_model." + k): v
                   for k, v in sources.items()}
    missing = [k for k in expected if k not in sources]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: the {what} has no tensor for {missing[0]!r}{more}; the file does not match "
                         "the config (pass config= a diffusers folder of this model)")
    unexpected = [k for k in sources if k not in expected]
    if unexpected:
        src = sources[unexpected[0]].key
        raise ValueError(f"{path}: tensor {src!r} (the {what}'s {unexpected[0]!r}) is not in the {what} built "
                         "from the config; the file does not match the config")
    loaded = {}
    for name, ref in expected.items():
        src = sources[name]
        value = _fit(src.get(state), ref.shape)
        if value is None:
            raise ValueError(f"{path}: tensor {src.key!r} (the {what}'s {name!r}) has shape "
                             f"{tuple(state[src.key].shape)}, the {what} expects {tuple(ref.shape)}")
        if value.is_floating_point():
            value = value.to(dtype if dtype is not None else ref.dtype)
        loaded[name] = value
    model.load_state_dict(loaded, strict=True, assign=True)
    leftover = [n for n in _meta_tensors(model) if n not in loaded]  # loaded ones are meta when state is
    if leftover:  # non-persistent buffers (e.g. CLIP's position ids)
        _materialise_buffers(model, build, leftover)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- configs


def _read(path: Path) -> Optional[dict]:
    return read_json(path) if path.is_file() else None


def _component_config(folder: Path, bundled: Path, name: str, file: str = "config.json") -> dict:
    cfg = _read(folder / name / file) if folder is not None else None
    if cfg is None:
        cfg = _read(bundled / name / file)
    if cfg is None:
        raise FileNotFoundError(f"{(folder or bundled) / name / file}: config file not found")
    if cfg.get("model_type") == "clip" and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    return cfg


def _unet_config(base: dict, inferred: dict, ck: Checkpoint, given: bool, pooled_dim: Optional[int]) -> dict:
    cfg = {**base, **inferred}
    if not given:  # heads are not in the shapes: SD1 uses 8 heads, SD2/SDXL 64-wide heads
        ch = cfg["block_out_channels"]
        cfg["attention_head_dim"] = 8 if ck.family == "sd1" else [max(1, c // 64) for c in ch]
    if ck.family == "sdxl" and pooled_dim and "projection_class_embeddings_input_dim" in inferred:
        n_ids = 5 if ck.refiner else 6  # refiner: aesthetic score instead of the target size
        rest = inferred["projection_class_embeddings_input_dim"] - pooled_dim
        if rest > 0 and rest % n_ids == 0:
            cfg["addition_time_embed_dim"] = rest // n_ids
    return cfg


def _text_config(base: dict, inferred: dict, ck: Checkpoint, slot: TextSlot, given: bool) -> dict:
    cfg = {**base, **inferred}
    if given or ck.family == "sd2":
        # SD2 conditions on the penultimate OpenCLIP layer: diffusers keeps 23 of 24 layers
        layers = base["num_hidden_layers"] if given else inferred["num_hidden_layers"] - 1
        cfg["num_hidden_layers"] = min(layers, inferred["num_hidden_layers"])
    if not given:
        cfg["num_attention_heads"] = max(1, cfg["hidden_size"] // 64)
        cfg["hidden_act"] = "gelu" if slot.open_clip else "quick_gelu"
    cfg["architectures"] = ["CLIPTextModelWithProjection" if slot.with_projection else "CLIPTextModel"]
    return cfg


def _tokenizer(folder: Optional[Path], bundled: Path, name: str, default_pad: str):
    from .clip_vocab import clip_tokenizer
    from .folder import load_tokenizer

    if folder is not None and ((folder / name / "vocab.json").is_file() or (folder / name / "tokenizer.json").is_file()):
        return load_tokenizer(folder / name)
    cfg = _read(bundled / name / "tokenizer_config.json") or {}
    return clip_tokenizer(pad_token=cfg.get("pad_token", default_pad))


# ----------------------------------------------------------------------------- the loader


def _check_arguments(config, prediction_type: Optional[str]) -> Optional[Path]:
    """``config=`` as a folder (or None), after checking it and ``prediction_type``."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    folder = Path(config) if config is not None else None
    if folder is not None and not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{folder}: config= must be a diffusers model folder (with unet/, vae/, ...)")
    return folder


@dataclass(frozen=True)
class FileConfigs:
    """What an original-layout checkpoint is, from its tensor names and shapes alone."""

    checkpoint: Checkpoint
    unet: dict
    vae: dict
    text: list  # a CLIP config dict per slot, None where the family has no such encoder
    scheduler: dict
    model_index: dict
    info: ModelInfo
    folder: Optional[Path]  # config=, when given


def single_file_configs(state: Mapping[str, Tensor], path, *, config=None,
                        prediction_type: Optional[str] = None) -> FileConfigs:
    """The component configs of a checkpoint: shapes over ``config=`` or the bundled configs,
    each checked (errors name the file and the key). ``state`` only needs names and shapes:
    meta tensors from the header (:func:`.weights.meta_state_dict`) do."""
    path = Path(path)
    folder = _check_arguments(config, prediction_type)
    ck = detect_checkpoint(state, path)
    bundled = CONFIGS_DIR / ck.bundled
    given = folder is not None

    try:
        vae_inferred = ldm.infer_vae_config(ldm.sub_state(state, ldm.VAE_PREFIX))
        unet_inferred = ldm.infer_unet_config(ldm.sub_state(state, ldm.UNET_PREFIX))
        text_inferred = [ldm.infer_clip_config(state, s.prefix, s.open_clip) if s else None for s in ck.text]
    except KeyError as e:
        raise ValueError(f"{path}: incomplete {ck.family} checkpoint: tensor {e.args[0]!r} not found") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

    # Errors name the config= file a bad value came from, else the checkpoint (shapes and bundled configs).
    def where(name: str, file: str = "config.json"):
        return folder / name / file if given and (folder / name / file).is_file() else path

    slots = ("text_encoder", "text_encoder_2")
    text_configs = [_text_config(_component_config(folder, bundled, slots[i]), inf, ck, s, given) if s else None
                    for i, (s, inf) in enumerate(zip(ck.text, text_inferred))]
    for i, cfg in enumerate(text_configs):
        if cfg is not None:
            check_text_encoder_config(cfg, where(slots[i]))
    pooled = text_configs[-1].get("projection_dim") if ck.family == "sdxl" else None
    unet_config = _unet_config(_component_config(folder, bundled, "unet"), unet_inferred, ck, given, pooled)
    check_unet_config(unet_config, where("unet"))
    vae_config = {**_component_config(folder, bundled, "vae"), **vae_inferred}
    check_vae_config(vae_config, where("vae"))
    scheduler_config = dict(_component_config(folder, bundled, "scheduler", "scheduler_config.json"))
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    check_scheduler_config(scheduler_config, where("scheduler", "scheduler_config.json"))
    model_index = _read(folder / "model_index.json") if given else None
    model_index = model_index if model_index is not None else (_read(bundled / "model_index.json") or {})
    info = detect_family(unet_config, text_configs, scheduler_config, vae_config)
    return FileConfigs(ck, unet_config, vae_config, text_configs, scheduler_config, model_index, info, folder)


def build_models(state: Mapping[str, Tensor], path, c: FileConfigs, *, device="cpu",
                 dtype: Optional[torch.dtype] = torch.float32) -> tuple:
    """(unet, vae, text encoders) filled from ``state``; with meta tensors and
    ``device="meta"`` this checks every shape and counts parameters without reading data."""
    import transformers

    from ..models.unet import UNet2DConditionModel
    from ..models.vae import AutoencoderKL

    path, ck = Path(path), c.checkpoint

    def sources(what, fn):
        try:
            return fn()
        except KeyError as e:
            raise ValueError(f"{path}: tensor {e.args[0]!r} has no counterpart in the diffusers {what}; "
                             f"not a supported {ck.family} layout") from None

    unet = load_converted(lambda: UNet2DConditionModel(c.unet),
                          sources("UNet", lambda: ldm.unet_sources(state, c.unet["layers_per_block"])),
                          state, path, "UNet", device=device, dtype=dtype)
    vae = load_converted(lambda: AutoencoderKL(c.vae), sources("VAE", lambda: ldm.vae_sources(state)),
                         state, path, "VAE", device=device, dtype=dtype)
    text_encoders = []
    for i, (slot, cfg) in enumerate(zip(ck.text, c.text)):
        if slot is None:
            text_encoders.append(None)
            continue
        cls = getattr(transformers, cfg["architectures"][0])
        tc = transformers.CLIPTextConfig.from_dict(cfg)
        if slot.open_clip:
            src = sources(f"text encoder {i + 1}", lambda: ldm.open_clip_sources(
                state, slot.prefix, cfg["num_hidden_layers"], slot.with_projection))
        else:
            src = sources(f"text encoder {i + 1}", lambda: ldm.clip_sources(state, slot.prefix))
            src = {k: v for k, v in src.items() if not _beyond(k, cfg["num_hidden_layers"])}
        text_encoders.append(load_converted(lambda: cls(tc), src, state, path, f"text encoder {i + 1}",
                                            device=device, dtype=dtype))
    return unet, vae, text_encoders


def load_single_file(path, *, device="cpu", dtype: Optional[torch.dtype] = torch.float32, config=None,
                     prediction_type: Optional[str] = None):
    """Every component of an original-layout checkpoint, as :class:`.folder.Components`."""
    from .folder import Components

    path = Path(path)
    _check_arguments(config, prediction_type)  # before reading gigabytes
    state = load_state_dict(path)
    c = single_file_configs(state, path, config=config, prediction_type=prediction_type)
    unet, vae, text_encoders = build_models(state, path, c, device=device, dtype=dtype)
    del state
    tokenizers = []
    for i, te in enumerate(text_encoders):
        family = c.checkpoint.family
        pad = "<|endoftext|>" if family == "sd1" or (family == "sdxl" and i == 0) else "!"
        tokenizers.append(None if te is None else _tokenizer(c.folder, CONFIGS_DIR / c.checkpoint.bundled,
                                                             ("tokenizer", "tokenizer_2")[i], pad))
    return Components(unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                      scheduler_config=c.scheduler, info=c.info, path=path, model_index=c.model_index)


def _beyond(name: str, layers: int) -> bool:
    """A CLIP layer past the config's count (when config= trims a model)."""
    p = name.split(".")
    return len(p) > 2 and p[0] == "encoder" and p[1] == "layers" and int(p[2]) >= layers


class SingleFileMixin:
    """Mixed into :class:`controldiff.Pipeline`."""

    @classmethod
    def from_single_file(cls, path, device="cpu", dtype=torch.float32, config=None,
                         prediction_type: Optional[str] = None):
        """Load an original-layout SD1/SD2/SDXL checkpoint (``.safetensors``, or a plain-tensor
        ``.ckpt``/``.pt``). ``config``: a diffusers folder whose configs (and tokenizers) to use
        for what the shapes do not tell; default: the bundled configs of the detected family.
        ``prediction_type``: overrides the scheduler's (see the module docstring for SD2).
        ``dtype``: a torch dtype, its name or "auto" (as :meth:`Pipeline.from_pretrained`)."""
        from ..precision import resolve_dtype

        c = load_single_file(path, device=device, dtype=resolve_dtype(dtype, device), config=config, prediction_type=prediction_type)
        return cls(c.unet, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config, c.info, c.model_index,
                   Path(path))
