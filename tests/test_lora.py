"""LoRA: parity with diffusers' load_lora_weights + set_adapters on tiny models, with LoRA
files generated here with peft (peft/diffusers format) and renamed to kohya names (with
alphas, SDXL also in the original-SD "input_blocks" naming); fuse/unfuse/unload; errors."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pipes
from original_layout import unet_key
from pipes import ours

TOL = 1e-4
KW = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def reference(path, family):
    return pipes.reference("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline", path)


def make_lora(model, family, out_dir, seed=0, rank=4, text=True, alpha=None):
    """A peft-format LoRA file with random nonzero up and down matrices, saved by diffusers
    (``alpha``: lora_alpha != rank, stored in the file's adapter metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = reference(model, family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=UNET_TARGETS,
                                         init_lora_weights=False))
        layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
        metadata = {"unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict()} if alpha else {}
        if text:
            encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
            for name in encoders:
                enc = getattr(pipe, name)
                enc.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TE_TARGETS, init_lora_weights=False))
                layers[f"{name}_lora_layers"] = get_peft_model_state_dict(enc)
    # scale the random matrices so the LoRA changes the images clearly but not wildly
    layers = {k: {n: t * 0.5 for n, t in v.items()} for k, v in layers.items()}
    type(pipe).save_lora_weights(out_dir, **layers, **metadata)
    return out_dir / "pytorch_lora_weights.safetensors"


def to_kohya(peft_file, out, family, alpha=2.0, unet_config=None):
    """Rename a peft LoRA to kohya names (lora_unet_*, lora_te*_*), with .alpha tensors; with
    ``unet_config`` the UNet by its original-SD paths, as kohya names SDXL LoRAs."""
    state = load_file(str(peft_file))
    te = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    new = {}
    for key, t in state.items():
        component, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
        if component == "unet":
            if unet_config:
                module = unet_key(module + ".weight", unet_config)[:-len(".weight")]
            flat = "lora_unet_" + module.replace(".", "_")
        else:
            if not module.startswith("text_model."):
                module = "text_model." + module
            flat = te[component] + module.replace(".", "_")
        new[f"{flat}.{part}"] = t
        new[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(new, str(out))
    return out


@pytest.fixture(scope="module")
def sd1_loras(tiny_model, tmp_path_factory):
    model = tiny_model("sd1")
    root = tmp_path_factory.mktemp("loras")
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "c").mkdir()
    a = make_lora(model, "sd1", root / "a", seed=1)
    b = make_lora(model, "sd1", root / "b", seed=2, rank=2)
    c = make_lora(model, "sd1", root / "c", seed=4, alpha=8, text=False)
    return model, a, b, to_kohya(a, root / "a_kohya.safetensors", "sd1", alpha=2.0), c


@pytest.mark.parametrize("fmt", ["peft", "kohya", "peft_alpha"])
def test_parity_sd1(sd1_loras, fmt):
    model, a, _, kohya, c = sd1_loras
    file = {"peft": a, "kohya": kohya, "peft_alpha": c}[fmt]
    ref, mine = reference(model, "sd1"), ours(model)
    base = mine("a cat", generator=gen(), **KW).images
    ref.load_lora_weights(str(file), adapter_name="x")
    assert mine.load_lora(file, name="x") == "x"
    expected = ref("a cat", generator=gen(), **KW).images
    got = mine("a cat", generator=gen(), **KW).images
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - base).max() > 1e-3  # the LoRA does something
    # the text encoder LoRA alone changes the prompt embeddings as diffusers' does
    ids = ref.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    emb = mine.prompt_encoder.encode(["a cat"]).embeds
    assert (emb - ref.text_encoder(ids)[0]).abs().max() <= 1e-5


def test_several_loras_weights_parity_sd1(sd1_loras):
    model, a, b, kohya, _ = sd1_loras
    ref, mine = reference(model, "sd1"), ours(model)
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    mine.load_lora(a, weight=1.0)
    name_b = mine.load_lora(b, weight=1.0, name="b")
    assert name_b == "b" and set(mine.loras) == {"pytorch_lora_weights", "b"}
    mine.set_lora_weights({"pytorch_lora_weights": 0.7, "b": -0.4})
    expected = ref("a cat", generator=gen(), **KW).images
    assert np.abs(mine("a cat", generator=gen(), **KW).images - expected).max() <= TOL


def test_fuse_unfuse_unload(sd1_loras):
    model, a, b, kohya, _ = sd1_loras
    pipe = ours(model)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_original = {k: v.clone() for k, v in pipe.text_encoders[0].state_dict().items()}
    base = pipe("a cat", generator=gen(), **KW).images
    pipe.load_lora(kohya, weight=0.8, name="k")
    pipe.load_lora(b, weight=0.5, name="b")
    unfused = pipe("a cat", generator=gen(), **KW).images
    pipe.fuse_lora()
    fused = pipe("a cat", generator=gen(), **KW).images
    assert np.abs(fused - unfused).max() <= TOL
    assert np.abs(fused - base).max() > 1e-3
    pipe.set_lora_weights({"b": 0.0})  # re-fused with the new weight
    only_k_fused = pipe("a cat", generator=gen(), **KW).images
    pipe.unfuse_lora()
    assert np.abs(pipe("a cat", generator=gen(), **KW).images - only_k_fused).max() <= TOL
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.set_lora_weights({"k": 0.0})  # both weights zero: the base model's output
    assert np.abs(pipe("a cat", generator=gen(), **KW).images - base).max() <= TOL
    pipe.set_lora_weights({"k": 0.8})
    pipe.fuse_lora()
    pipe.unload_lora("k")  # unloading a fused LoRA unfuses it
    pipe.unload_lora()
    assert pipe.loras == {}
    state = pipe.unet.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    te = pipe.text_encoders[0].state_dict()
    assert te.keys() == te_original.keys() and all(torch.equal(te[k], te_original[k]) for k in te_original)
    assert not any(type(m).__name__ == "LoraLayer" for m in pipe.unet.modules())
    assert np.array_equal(pipe("a cat", generator=gen(), **KW).images, base)


@pytest.mark.parametrize("fmt", ["peft", "kohya_sgm"])
def test_parity_sdxl(tiny_model, tmp_path, fmt):
    model = tiny_model("sdxl")
    file = make_lora(model, "sdxl", tmp_path, seed=3)
    if fmt == "kohya_sgm":
        cfg = json.loads((model / "unet" / "config.json").read_text())
        file = to_kohya(file, tmp_path / "xl_kohya.safetensors", "sdxl", alpha=3.0, unet_config=cfg)
    ref, mine = reference(model, "sdxl"), ours(model)
    ref.load_lora_weights(str(file), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.6])
    mine.load_lora(file, weight=0.6)
    kw = dict(KW, negative_prompt="blurry")
    expected = ref("a cat", generator=gen(), **kw).images
    got = mine("a cat", generator=gen(), **kw).images
    assert np.abs(got - expected).max() <= TOL
    mine.unload_lora()
    assert np.abs(mine("a cat", generator=gen(), **kw).images - got).max() > 1e-3


def test_errors(sd1_loras, tmp_path):
    model, a, _, kohya, _ = sd1_loras
    pipe = ours(model)
    state = load_file(str(kohya))
    bad = dict(state, **{"lora_unet_down_blocks_0_nothing_here.lora_down.weight": torch.zeros(4, 16),
                         "lora_unet_down_blocks_0_nothing_here.lora_up.weight": torch.zeros(16, 4)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*lora_unet_down_blocks_0_nothing_here.*matches no"):
        pipe.load_lora(tmp_path / "bad.safetensors")
    peft = load_file(str(a))
    key = next(k for k in peft if k.endswith("to_q.lora_A.weight"))
    save_file(dict(peft, **{key: torch.zeros(4, 7)}), str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"shape\.safetensors.*" + re.escape(key) + ".*do not fit"):
        pipe.load_lora(tmp_path / "shape.safetensors")
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ValueError, match="loha.safetensors.*LyCORIS"):
        pipe.load_lora(tmp_path / "loha.safetensors")
    assert pipe.loras == {} and not any(type(m).__name__ == "LoraLayer" for m in pipe.unet.modules())
    pipe.load_lora(a, name="x")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora(a, name="x")
    with pytest.raises(ValueError, match="no LoRA named"):
        pipe.set_lora_weights({"y": 1.0})
    with pytest.raises(ValueError, match="no LoRA named"):
        pipe.unload_lora("y")


def test_any_file_name_is_a_lora_name(sd1_loras, tmp_path):
    """File stems with dots (``detail_v1.0``) and names of module attributes (``eval``) work:
    loaded, equal to the same LoRA under a plain name, fused, unloaded."""
    import shutil

    model, a, _, _, _ = sd1_loras
    pipe = ours(model)
    base = pipe("a cat", generator=gen(), **KW).images
    pipe.load_lora(a, name="plain")
    expected = pipe("a cat", generator=gen(), **KW).images
    pipe.unload_lora("plain")
    dotted = shutil.copy(a, tmp_path / "detail_v1.0.safetensors")
    assert pipe.load_lora(dotted, weight=0.5) == "detail_v1.0"
    assert pipe.load_lora(a, weight=0.5, name="eval") == "eval"
    assert np.abs(pipe("a cat", generator=gen(), **KW).images - expected).max() <= 1e-5
    pipe.fuse_lora()
    assert np.abs(pipe("a cat", generator=gen(), **KW).images - expected).max() <= 1e-4
    pipe.unfuse_lora()
    pipe.unload_lora("detail_v1.0")
    pipe.unload_lora("eval")
    assert np.abs(pipe("a cat", generator=gen(), **KW).images - base).max() == 0


def test_textual_inversion_and_lora_combined(sd1_loras, tmp_path):
    """TI + LoRA in one call with CFG (the default control): each changes the output."""
    model, a, _, _, _ = sd1_loras
    pipe = ours(model)
    save_file({"<tok>": torch.randn(2, 32, generator=gen(5)) * 2}, str(tmp_path / "emb.safetensors"))
    prompt = "a <tok> cat"
    kw = dict(KW, negative_prompt="blurry", controls=[])
    plain = pipe(prompt, generator=gen(), **kw).images
    pipe.load_textual_inversion(tmp_path / "emb.safetensors")
    ti = pipe(prompt, generator=gen(), **kw).images
    pipe.load_lora(a, weight=0.9)
    both = pipe(prompt, generator=gen(), **kw).images
    pipe.unload_textual_inversion()
    lora = pipe(prompt, generator=gen(), **kw).images
    assert np.abs(ti - plain).max() > 1e-3 and np.abs(both - ti).max() > 1e-3
    assert np.abs(both - lora).max() > 1e-3 and np.abs(lora - plain).max() > 1e-3
    pipe.unload_lora()
    assert np.array_equal(pipe(prompt, generator=gen(), **kw).images, plain)
