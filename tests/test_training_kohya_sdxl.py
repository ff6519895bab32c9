"""The kohya file of an SDXL LoRA names the UNet as kohya sd-scripts does: by the original
(sgm) layout of its own SDXL UNet (``library/sdxl_original_unet.py``), ``lora_unet_`` + the
module path with underscores (``networks/lora.py``), e.g. ``lora_unet_input_blocks_4_1_...``;
and it loads alike in our Pipeline and in diffusers, equal to the diffusers-format file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pipes
from original_layout import unet_key
from test_training import config, photos
from controldiff.training import LoRA, train

KW = dict(num_inference_steps=2, guidance_scale=7.5, negative_prompt="blurry", output_type="np")
PROMPT = "a photo of sks"


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A tiny SDXL LoRA on the UNet and both text encoders, alpha != rank, in both formats."""
    out = tmp_path_factory.mktemp("xl")
    train(tiny_model("sdxl"), LoRA(rank=4, alpha=2, train_text_encoder=True),
          config(photos(out / "data"), out / "lora", steps=6, batch_size=1, center_crop=True))
    lora = out / "lora"
    return lora / "pytorch_lora_weights.safetensors", lora / "lora.safetensors"


def test_unet_names_are_kohyas_sdxl_names(trained, tiny_model):
    diffusers_file, kohya_file = trained
    theirs, kohya = load_file(str(diffusers_file)), load_file(str(kohya_file))
    cfg = json.loads((tiny_model("sdxl") / "unet" / "config.json").read_text())
    # kohya's rule on the original module path (an inverse written apart from the library's)
    expected = {}
    for key in theirs:
        if key.startswith("unet.") and key.endswith(".lora.down.weight"):
            path = key[len("unet."):-len(".lora.down.weight")]
            expected["lora_unet_" + unet_key(path + ".weight", cfg)[:-len(".weight")].replace(".", "_")] = path
    names = {k.split(".")[0] for k in kohya if k.startswith("lora_unet_")}
    assert names == set(expected)
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
            "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0",
            "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_v"} <= names
    for name, path in expected.items():  # each tensor under the name of its own module
        assert torch.equal(kohya[f"{name}.lora_down.weight"], theirs[f"unet.{path}.lora.down.weight"])
        assert torch.equal(kohya[f"{name}.lora_up.weight"], theirs[f"unet.{path}.lora.up.weight"])
        assert kohya[f"{name}.alpha"].item() == 2.0
    text = {k.split(".")[0] for k in kohya if not k.startswith("lora_unet_")}
    assert {n[:9] for n in text} == {"lora_te1_", "lora_te2_"}
    assert all(n[9:].startswith("text_model_encoder_layers_") for n in text)
    assert len(text) == sum(k.endswith("lora_linear_layer.down.weight") for k in theirs)


def test_kohya_file_loads_alike_in_our_pipeline_and_diffusers(trained, tiny_model):
    diffusers_file, kohya_file = trained
    model = tiny_model("sdxl")
    images = {}
    for fmt, file in (("diffusers", diffusers_file), ("kohya", kohya_file)):
        ours = pipes.ours(model)
        ours.load_lora(file)
        ref = pipes.reference("StableDiffusionXLPipeline", model)
        ref.load_lora_weights(str(file))
        images["ours", fmt] = ours(PROMPT, seed=0, **KW).images
        images["ref", fmt] = ref(PROMPT, generator=torch.Generator().manual_seed(0), **KW).images
    for k, v in images.items():
        assert np.abs(v - images["ours", "diffusers"]).max() <= 1e-4, k
    plain = pipes.ours(model)(PROMPT, seed=0, **KW).images
    assert np.abs(images["ours", "kohya"] - plain).max() > 1e-2  # the LoRA is applied
