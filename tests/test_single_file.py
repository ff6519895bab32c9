"""Single-file (original LDM/sgm layout) checkpoints.

The files are written from the tiny diffusers folders by ``original_layout.to_original``, an inverse
converter written independently of the library's (diffusers names -> original names), with
the extras real files carry (EMA/schedule buffers, position ids, SD2's unused last OpenCLIP
layer and projection). Loading them must give exactly the folder's images, and diffusers'
own ``from_single_file`` (the oracle) the same within 1e-4.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import controldiff as cd
from controldiff.loading.single_file import detect_checkpoint
from controldiff.loading import convert_ldm

from original_layout import to_original, unet_key, vae_item
from hostile import Evil


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory):
    cache = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            folder = tiny_model(**kw)
            path = tmp_path_factory.mktemp("single") / "model.safetensors"
            save_file(to_original(folder), str(path))
            cache[key] = (folder, path)
        return cache[key]

    return make


# ----------------------------------------------------------------------------- helpers

def _images(pipe, seed=0, **kw):
    args = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    args.update(kw)
    if isinstance(pipe, cd.Pipeline):
        pipe.progress = False
        return pipe("a red cube", generator=torch.Generator().manual_seed(seed), **args).images
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cube", generator=torch.Generator().manual_seed(seed), **args).images


def _diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# ----------------------------------------------------------------------------- tokenizer

def test_clip_tokenizer_from_bundled_bpe():
    from controldiff.loading.clip_vocab import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407
    bang = clip_tokenizer(pad_token="!")  # SD2 / SDXL's second tokenizer
    ids = bang("a cat", padding="max_length", max_length=8).input_ids
    assert ids == [49406, 320, 2368, 49407, 0, 0, 0, 0]


# ----------------------------------------------------------------------------- parity

CASES = [
    ("sd1", "StableDiffusionPipeline", {}),
    ("sd2", "StableDiffusionPipeline", {"prediction_type": "v_prediction"}),
    ("sdxl", "StableDiffusionXLPipeline", {}),
]


@pytest.mark.parametrize("family,ref_class,extra", CASES, ids=[c[0] for c in CASES])
def test_single_file_equals_folder_and_diffusers(single_file, family, ref_class, extra):
    import diffusers

    folder, path = single_file(family=family, **extra)
    mine = cd.Pipeline.from_single_file(path, config=folder)
    assert mine.info.family == family
    assert mine.info.prediction_type == extra.get("prediction_type", "epsilon")
    got = _images(mine)
    assert _diff(got, _images(cd.Pipeline.from_pretrained(folder))) <= 1e-5

    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    ref = getattr(diffusers, ref_class).from_single_file(str(path), config=str(folder), local_files_only=True,
                                                         **kwargs)
    te2 = getattr(ref, "text_encoder_2", None)
    if te2 is not None and any(p.is_meta for p in te2.parameters()):
        # diffusers 0.42.1 with transformers 5 leaves the SDXL OpenCLIP encoder of a single file
        # on the meta device (its weights never load); use the folder's, which ours equals above
        from transformers import CLIPTextModelWithProjection

        ref.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    assert _diff(got, _images(ref)) <= 1e-4


def test_ckpt_loads_the_same_as_safetensors(single_file, tmp_path):
    folder, path = single_file(family="sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 470000}, ckpt)
    a = _images(cd.Pipeline.from_single_file(path, config=folder))
    b = _images(cd.Pipeline.from_single_file(ckpt, config=folder))
    assert _diff(a, b) == 0.0


def test_dtype_auto_and_names(single_file, monkeypatch):
    from controldiff import precision

    folder, path = single_file(family="sd1")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert cd.Pipeline.from_single_file(path, config=folder, dtype="auto").dtype == torch.bfloat16
    assert cd.Pipeline.from_single_file(path, config=folder, dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        cd.Pipeline.from_single_file(path, config=folder, dtype="float8")


def test_prediction_type_argument_overrides(single_file):
    folder, path = single_file(family="sd1")
    pipe = cd.Pipeline.from_single_file(path, config=folder, prediction_type="v_prediction")
    assert pipe.info.prediction_type == "v_prediction"
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        cd.Pipeline.from_single_file(path, config=folder, prediction_type="v")


# ----------------------------------------------------------------------------- detection

def test_shapes_tell_the_folder_config(single_file):
    """What the loader infers from shapes agrees with the configs the files were made from."""
    for family in ("sd1", "sd2", "sdxl"):
        folder, path = single_file(family=family)
        state = load_file(str(path))
        unet = json.loads((folder / "unet" / "config.json").read_text())
        got = convert_ldm.infer_unet_config(convert_ldm.sub_state(state, "model.diffusion_model."))
        for k in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                  "cross_attention_dim", "in_channels", "projection_class_embeddings_input_dim"):
            assert got.get(k) == unet.get(k), (family, k)
        assert got["use_linear_projection"] == unet.get("use_linear_projection", False)
        depth = unet.get("transformer_layers_per_block", 1)
        depth = [depth] * 2 if isinstance(depth, int) else depth
        assert [d for d, t in zip(got["transformer_layers_per_block"], got["down_block_types"]) if "Attn" in t] == \
            [d for d, t in zip(depth, unet["down_block_types"]) if "Attn" in t]
        vae = json.loads((folder / "vae" / "config.json").read_text())
        got = convert_ldm.infer_vae_config(convert_ldm.sub_state(state, "first_stage_model."))
        for k in ("block_out_channels", "layers_per_block", "latent_channels"):
            assert got[k] == vae[k], (family, k)


@pytest.mark.parametrize("family,bundled", [("sd1", "sd15"), ("sd2", "sd2_inpaint")])
def test_inpainting_detected(single_file, family, bundled):
    folder, path = single_file(family=family, in_channels=9)
    ck = detect_checkpoint(load_file(str(path)), path)
    assert (ck.family, ck.in_channels, ck.bundled) == (family, 9, bundled)
    pipe = cd.Pipeline.from_single_file(path, config=folder)
    assert (pipe.info.kind, pipe.info.in_channels) == ("inpaint", 9)


def test_family_detection_from_names(single_file):
    assert detect_checkpoint(load_file(str(single_file(family="sd2")[1])), Path("x")).bundled == "sd21"
    ck = detect_checkpoint(load_file(str(single_file(family="sdxl")[1])), Path("x"))
    assert (ck.family, ck.refiner, ck.bundled) == ("sdxl", False, "sdxl_base")


# ----------------------------------------------------------------------------- errors and safety

def test_malicious_ckpt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": Evil(str(marker))}}, f)
    with pytest.raises(ValueError, match="evil.ckpt"):
        cd.Pipeline.from_single_file(path)
    assert not marker.exists()


def test_truncated_file_names_the_file(single_file, tmp_path):
    _, path = single_file(family="sd1")
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        cd.Pipeline.from_single_file(cut)


def test_unknown_architecture_names_the_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"other\.safetensors.*unknown architecture"):
        cd.Pipeline.from_single_file(path)
    control = tmp_path / "control.safetensors"
    save_file({"control_model.time_embed.0.weight": torch.zeros(2, 2)}, str(control))
    with pytest.raises(ValueError, match=r"control\.safetensors.*ControlNet"):
        cd.Pipeline.from_single_file(control)


def test_unet_without_text_encoder_is_unknown(single_file, tmp_path):
    _, path = single_file(family="sd1")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("cond_stage_model.")}
    bad = tmp_path / "no_text.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match=r"no_text\.safetensors.*text encoder"):
        cd.Pipeline.from_single_file(bad)


@pytest.mark.parametrize("bundled,family,refiner", [("sd15", "sd1", False), ("sd21", "sd2", False),
                                                    ("sdxl_base", "sdxl", False), ("sdxl_refiner", "sdxl", True)])
def test_real_architectures_convert_without_config(bundled, family, refiner):
    """Full-size SD1.5/SD2.1/SDXL layouts (meta tensors, no memory): the names convert one to
    one and the shapes plus bundled defaults give back the real configs."""
    from controldiff.loading.single_file import CONFIGS_DIR, Checkpoint, _unet_config
    from controldiff.models.unet import UNet2DConditionModel
    from controldiff.models.vae import AutoencoderKL

    cfg = json.loads((CONFIGS_DIR / bundled / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(cfg)
    state = {"model.diffusion_model." + unet_key(k, cfg): v for k, v in unet.state_dict().items()}
    inferred = convert_ldm.infer_unet_config(convert_ldm.sub_state(state, "model.diffusion_model."))
    got = _unet_config(dict(cfg), inferred, Checkpoint(family, refiner, 4, bundled, ()), False,
                       1280 if family == "sdxl" else None)
    for k in ("attention_head_dim", "block_out_channels", "cross_attention_dim", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim", "down_block_types", "up_block_types", "layers_per_block"):
        assert got.get(k) == cfg.get(k), k
    assert set(convert_ldm.unet_sources(state, got["layers_per_block"])) == set(unet.state_dict())
    vcfg = json.loads((CONFIGS_DIR / bundled / "vae" / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL(vcfg)
    vstate = dict(vae_item(k, t, vcfg) for k, t in vae.state_dict().items())
    assert set(convert_ldm.vae_sources({"first_stage_model." + k: t for k, t in vstate.items()})) == set(vae.state_dict())
