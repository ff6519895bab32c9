"""Original-layout (lllyasviel ``control_model.*``) ControlNet files.

Tiny diffusers ControlNets are written in the original layout by ``to_original`` below (an
inverse converter written independently of the library's, diffusers names -> original
names); ``load_controlnet(file)`` must give exactly the tensors of
``load_controlnet(diffusers folder)`` and the same images.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

import controldiff as cd
from controldiff.loading import convert_controlnet as conv
from controldiff.loading.single_file import CONFIGS_DIR
from controldiff.models.config import Config
from controldiff.models.controlnet import DEFAULTS, ControlNetModel

from original_layout import unet_key  # the UNet part of the independent inverse converter

import diffusers  # the oracle
from hostile import Evil

COND_CHANNELS = (8, 8, 16, 16)  # -> input_hint_block.{0, 2, ..., 12, 14}, like the real (16, 16, 32, 32, 96, 96, 256)


def original_key(k: str, cfg: dict) -> str:
    p = k.split(".")
    if p[0] == "controlnet_cond_embedding":
        n_blocks = 2 * (len(cfg["conditioning_embedding_out_channels"]) - 1)
        idx = {"conv_in": 0, "conv_out": 2 * n_blocks + 2}.get(p[1])
        if idx is None:
            idx = 2 * (int(p[2]) + 1)
        return f"input_hint_block.{idx}.{p[-1]}"
    if p[0] == "controlnet_down_blocks":
        return f"zero_convs.{p[1]}.0.{p[2]}"
    if p[0] == "controlnet_mid_block":
        return f"middle_block_out.0.{p[1]}"
    return unet_key(k, cfg)


def to_original(folder: Path, prefix: str = "control_model.") -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    out = {prefix + original_key(k, cfg): v.contiguous() for k, v in sd.items()}
    assert len(out) == len(sd)
    return out


@pytest.fixture(scope="module")
def controlnets(tiny_model, tmp_path_factory):
    """family -> (model folder, diffusers ControlNet folder, original .safetensors)."""
    cache = {}

    def make(family: str):
        if family not in cache:
            folder = tiny_model(family)
            tmp = tmp_path_factory.mktemp(f"cn-{family}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(3)
                unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
                cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
                for p in cn.parameters():  # diffusers zero-initialises the zero convs
                    p.data += 0.05 * torch.randn_like(p)
            cn.save_pretrained(tmp / "diffusers")
            save_file(to_original(tmp / "diffusers"), str(tmp / "control.safetensors"))
            cache[family] = (folder, tmp / "diffusers", tmp / "control.safetensors")
        return cache[family]

    return make


def assert_same_tensors(a: ControlNetModel, b: ControlNetModel):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_original_file_equals_diffusers_folder(controlnets, family):
    folder, cn_dir, path = controlnets(family)
    ref = cd.load_controlnet(cn_dir)
    got = cd.load_controlnet(path, config=folder)  # the model folder's unet config: heads, norm groups
    assert_same_tensors(got, ref)
    for k in ("block_out_channels", "layers_per_block", "down_block_types", "transformer_layers_per_block",
              "cross_attention_dim", "use_linear_projection", "attention_head_dim", "norm_num_groups",
              "conditioning_channels", "conditioning_embedding_out_channels", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "upcast_attention"):
        a, b = got.config[k], ref.config[k]
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        if k == "transformer_layers_per_block" and not isinstance(b, (list, tuple)):
            b = [b] * len(ref.config["block_out_channels"])
        assert norm(a) == norm(b), k
    # config= a diffusers ControlNet folder (or its config dict) works the same
    assert_same_tensors(cd.load_controlnet(path, config=cn_dir), ref)
    assert_same_tensors(cd.load_controlnet(path, config=json.loads((cn_dir / "config.json").read_text())), ref)


def test_original_file_gives_the_same_images(controlnets):
    folder, cn_dir, path = controlnets("sd1")
    pipe = cd.Pipeline.from_pretrained(folder)
    pipe.progress = False
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np", height=64, width=64)

    def run(model):
        return pipe("a red cube", generator=torch.Generator().manual_seed(0),
                    controls=[cd.ControlNet(model, image)], **kw).images

    expected = run(cd.load_controlnet(cn_dir))
    got = run(cd.load_controlnet(path, config=folder))
    assert float(np.abs(np.asarray(got) - np.asarray(expected)).max()) <= 1e-6
    plain = pipe("a red cube", generator=torch.Generator().manual_seed(0), **kw).images
    assert float(np.abs(np.asarray(plain) - np.asarray(expected)).max()) > 1e-3  # the control does something


def test_without_prefix_and_pth_state_dict_wrapper(controlnets, tmp_path):
    folder, cn_dir, path = controlnets("sd1")
    ref = cd.load_controlnet(cn_dir)
    bare = tmp_path / "bare.safetensors"
    save_file(to_original(cn_dir, prefix=""), str(bare))
    assert_same_tensors(cd.load_controlnet(bare, config=folder), ref)
    # an old full checkpoint: the SD model's tensors next to control_model.*, in a state_dict wrapper
    pth = tmp_path / "control_sd15_full.pth"
    state = dict(load_file(str(path)))
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(16, 4, 3, 3)
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2)
    torch.save({"state_dict": state, "global_step": 1}, pth)
    got = cd.load_controlnet(pth, config=folder, dtype=torch.float16)
    assert got.conv_in.weight.dtype == torch.float16
    assert_same_tensors(got, ref.half())


def test_bundled_defaults_and_errors_name_the_file(controlnets, tmp_path):
    folder, _, path = controlnets("sd1")
    # tiny widths do not fit the bundled SD1.5 norm groups: say so, and point to config=
    with pytest.raises(ValueError, match=r"control\.safetensors.*config="):
        cd.load_controlnet(path)
    state = load_file(str(path))
    bad = tmp_path / "odd.safetensors"
    save_file({**state, "control_model.extra_head.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match=r"odd\.safetensors.*'control_model\.extra_head\.weight'"):
        cd.load_controlnet(bad, config=folder)
    short = tmp_path / "short.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("control_model.zero_convs.2.")}, str(short))
    with pytest.raises(ValueError, match=r"short\.safetensors.*controlnet_down_blocks\.2"):
        cd.load_controlnet(short, config=folder)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match=r"other\.safetensors.*not an original-layout ControlNet"):
        cd.load_controlnet(other)
    with pytest.raises(ValueError, match="config= is for single-file"):
        cd.load_controlnet(folder / "unet", config=folder)


def test_malicious_pth_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"control_model.input_hint_block.0.weight": Evil(str(marker))}, f)
    with pytest.raises(ValueError, match=r"evil\.pth.*refused"):
        cd.load_controlnet(path)
    assert not marker.exists()


@pytest.mark.parametrize("bundled", ["sd15", "sd21", "sdxl_base"])
def test_real_architectures_convert_without_config(bundled):
    """Full-size SD1.5 / SD2.1 / SDXL ControlNets (meta tensors, no memory): the names convert
    one to one and the shapes plus bundled defaults give back the real config (real hint
    block: 16, 32, 96, 256 -> input_hint_block.{0..14})."""
    unet_cfg = json.loads((CONFIGS_DIR / bundled / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in unet_cfg.items() if k != "up_block_types"}
    if bundled == "sd15":
        cfg["attention_head_dim"] = 8
    else:
        cfg["attention_head_dim"] = [c // 64 for c in cfg["block_out_channels"]]
    with torch.device("meta"):
        model = ControlNetModel(cfg)
    full = {**model.config, "up_block_types": unet_cfg["up_block_types"]}
    state = {"control_model." + original_key(k, full): v for k, v in model.state_dict().items()}
    assert "control_model.input_hint_block.14.weight" in state
    cn = {k.removeprefix("control_model."): v for k, v in state.items()}
    got = Config.with_defaults(DEFAULTS, conv.controlnet_config(conv.infer_controlnet_config(cn)))
    n = len(model.config["block_out_channels"])
    for k, want in model.config.items():
        if k.startswith("_"):
            continue
        have = got[k]
        if k == "transformer_layers_per_block":
            want, have = ([v] * n if isinstance(v, int) else list(v) for v in (want, have))
        assert have == want, k
    sources = conv.controlnet_sources(cn, got["layers_per_block"], "control_model.")
    assert set(sources) == set(model.state_dict())
    assert {s.key for s in sources.values()} == set(state)
