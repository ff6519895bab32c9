"""pipe.load_custom_diffusion: generation equals diffusers' pipeline with the Custom
Diffusion attention processors (``load_attn_procs``' own parsing) and
``load_textual_inversion`` of the modifier token, on the tiny SD1 model: crossattn_kv and
crossattn files, safetensors and ``.bin``; with a ControlNet; with a LoRA (whose adapters add
onto the replaced projections); unload; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import controldiff as cd
import pipes
from hostile import Evil
from pipes import ours

TOL = 1e-4
KW = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
PROMPT = "a <new1> dog on a hill"
SAFE, BIN = "pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin"


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def set_custom_diffusion(unet, folder, weight_name):
    """diffusers' processors from the file (``_process_custom_diffusion``, what
    ``load_attn_procs`` builds), the default one where the file has none (a safetensors file
    lists only the cross-attention sites)."""
    from diffusers.models.attention_processor import AttnProcessor

    file = folder / weight_name
    state = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(str(file), weights_only=True)
    procs = unet._process_custom_diffusion(state)
    unet.set_attn_processor({k: procs.get(k, AttnProcessor()) for k in unet.attn_processors})


def make_files(model, folder, train_q_out=False, seed=0):
    """A Custom Diffusion output as diffusers' script writes it: the processors' weights
    (base + noise) with save_attn_procs (safetensors and .bin), and ``<new1>.safetensors``."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    unet = pipes.reference("StableDiffusionPipeline", model).unet
    g = gen(seed)
    procs = {}
    for name, attn in ((n.rsplit(".processor", 1)[0], n) for n in unet.attn_processors):
        module = unet.get_submodule(name)
        cross = name.endswith("attn2")
        p = CustomDiffusionAttnProcessor(train_kv=cross, train_q_out=cross and train_q_out,
                                         hidden_size=module.to_q.out_features,
                                         cross_attention_dim=module.to_k.in_features if cross else None)
        for k, v in p.state_dict().items():
            base = {"to_k_custom_diffusion.weight": module.to_k.weight, "to_v_custom_diffusion.weight": module.to_v.weight,
                    "to_q_custom_diffusion.weight": module.to_q.weight,
                    "to_out_custom_diffusion.0.weight": module.to_out[0].weight,
                    "to_out_custom_diffusion.0.bias": module.to_out[0].bias}[k]
            v.data.copy_(base.data + 0.3 * torch.randn(base.shape, generator=g))
        procs[attn] = p
    unet.set_attn_processor(procs)
    folder.mkdir(exist_ok=True)
    unet.save_attn_procs(str(folder), safe_serialization=True)
    unet.save_attn_procs(str(folder), safe_serialization=False)
    width = unet.config.cross_attention_dim
    save_file({"<new1>": torch.randn(width, generator=g) * 2}, str(folder / "<new1>.safetensors"))
    return folder


def reference(model, folder, weight_name, cls="StableDiffusionPipeline", **kw):
    ref = pipes.reference(cls, model, **kw)
    set_custom_diffusion(ref.unet, folder, weight_name)
    ref.load_textual_inversion(str(folder / "<new1>.safetensors"))
    return ref


@pytest.mark.parametrize("train_q_out,weight_name", [(False, SAFE), (True, SAFE), (False, BIN)],
                         ids=["crossattn_kv", "crossattn", "bin"])
def test_generation_equals_diffusers(tiny_model, tmp_path, train_q_out, weight_name):
    model = tiny_model("sd1")
    folder = make_files(model, tmp_path / "cd", train_q_out)
    mine = ours(model)
    before = mine(PROMPT, generator=gen(), **KW).images
    assert mine.load_custom_diffusion(folder, weight_name=weight_name) == ["<new1>"]
    expected = reference(model, folder, weight_name)(PROMPT, negative_prompt="blurry", generator=gen(), **KW).images
    got = mine(PROMPT, negative_prompt="blurry", generator=gen(), **KW).images
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - before).max() > 1e-3  # the weights do something
    mine.unload_custom_diffusion()  # the base model again
    assert np.abs(mine(PROMPT, generator=gen(), **KW).images - before).max() == 0
    assert "<new1>" not in mine.tokenizers[0].get_vocab()


def test_with_a_controlnet(tiny_model, tmp_path):
    import diffusers
    from test_controlnet import control_image, make_controlnet

    model = tiny_model("sd1")
    folder = make_files(model, tmp_path / "cd", seed=1)
    net = make_controlnet(model, tmp_path / "cn", seed=1)
    ref = reference(model, folder, SAFE, "StableDiffusionControlNetPipeline", controlnet=net)
    image = control_image(2)
    kw = dict(KW, height=64, width=64)
    expected = ref(PROMPT, image=image, controlnet_conditioning_scale=0.8, generator=gen(3), **kw).images
    mine = ours(model)
    mine.load_custom_diffusion(folder / SAFE)  # the file: the token file beside it is found
    control = cd.ControlNet(cd.load_controlnet(tmp_path / "cn"), image, scale=0.8)
    got = mine(PROMPT, controls=[control], generator=gen(3), **kw).images
    assert np.abs(got - expected).max() <= TOL


def test_with_a_lora(tiny_model, tmp_path):
    """The LoRA adds onto the replaced projections: the reference is diffusers' pipeline on
    the model whose cross-attention projections are the file's, with the LoRA loaded."""
    from test_lora import make_lora

    model = tiny_model("sd1")
    folder = make_files(model, tmp_path / "cd", train_q_out=True, seed=2)
    lora = make_lora(model, "sd1", tmp_path / "lora", seed=4, text=False)
    ref = pipes.reference("StableDiffusionPipeline", model)
    state = ref.unet.state_dict()
    for key, value in load_file(str(folder / SAFE)).items():
        site, _, param = key.partition(".processor.")
        target = {"to_k_custom_diffusion.weight": "to_k.weight", "to_v_custom_diffusion.weight": "to_v.weight",
                  "to_q_custom_diffusion.weight": "to_q.weight", "to_out_custom_diffusion.0.weight": "to_out.0.weight",
                  "to_out_custom_diffusion.0.bias": "to_out.0.bias"}[param]
        state[f"{site}.{target}"] = value
    ref.unet.load_state_dict(state)
    ref.load_textual_inversion(str(folder / "<new1>.safetensors"))
    ref.load_lora_weights(str(lora), adapter_name="x")
    expected = ref(PROMPT, generator=gen(5), **KW).images
    mine = ours(model)
    mine.load_lora(lora, name="x")        # either order
    mine.load_custom_diffusion(folder)
    got = mine(PROMPT, generator=gen(5), **KW).images
    assert np.abs(got - expected).max() <= TOL
    other = ours(model)
    other.load_custom_diffusion(folder)
    other.load_lora(lora, name="x")
    assert np.abs(other(PROMPT, generator=gen(5), **KW).images - got).max() <= TOL


def test_errors(tiny_model, tmp_path):
    model = tiny_model("sd1")
    pipe = ours(model)
    with pytest.raises(FileNotFoundError, match="pytorch_custom_diffusion_weights"):
        pipe.load_custom_diffusion(tmp_path)
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.zeros(2, 32)},
              str(lora))
    with pytest.raises(ValueError, match="not a Custom Diffusion tensor"):
        pipe.load_custom_diffusion(lora)
    wrong = tmp_path / "wrong" / SAFE
    wrong.parent.mkdir()
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight":
               torch.zeros(3, 3), "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor."
               "to_v_custom_diffusion.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ValueError, match="another model"):
        pipe.load_custom_diffusion(wrong.parent)
    evil = tmp_path / "evil" / BIN
    evil.parent.mkdir()
    marker = tmp_path / "unpickled"
    torch.save({"x.processor.to_k_custom_diffusion.weight": Evil(str(marker))}, str(evil))
    with pytest.raises(ValueError, match="refused"):
        pipe.load_custom_diffusion(evil.parent, weight_name=BIN)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weight_name"):
        pipe.load_custom_diffusion(wrong, weight_name=SAFE)


def test_a_refused_token_changes_nothing(tiny_model, tmp_path):
    model = tiny_model("sd1")
    folder = make_files(model, tmp_path / "cd")
    pipe = ours(model)
    pipe.load_textual_inversion(folder / "<new1>.safetensors")
    before = pipe(PROMPT, generator=gen(), **KW).images
    with pytest.raises(ValueError, match="<new1>"):
        pipe.load_custom_diffusion(folder)
    assert np.abs(pipe(PROMPT, generator=gen(), **KW).images - before).max() == 0


def test_with_pag(tiny_model, tmp_path):
    """An attention-processor control (PAG) on the model with Custom Diffusion weights."""
    import diffusers
    from controldiff.controls.pag import PAG

    model = tiny_model("sd1")
    folder = make_files(model, tmp_path / "cd", train_q_out=True, seed=3)
    ref = diffusers.StableDiffusionPAGPipeline.from_pretrained(model, enable_pag=True, safety_checker=None,
                                                              requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    set_custom_diffusion(ref.unet, folder, SAFE)
    ref.load_textual_inversion(str(folder / "<new1>.safetensors"))
    ref.set_pag_applied_layers(["mid", "up_blocks.1"])
    expected = ref(PROMPT, pag_scale=2.0, generator=gen(4), **KW).images
    mine = ours(model)
    mine.load_custom_diffusion(folder)
    got = mine(PROMPT, controls=[PAG(2.0, ("mid", "up_blocks.1"))], generator=gen(4), **KW).images
    assert np.abs(got - expected).max() <= TOL
