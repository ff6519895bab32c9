"""Textual inversion: parity with diffusers' load_textual_inversion on SD1 (diffusers and
A1111 files, single and multi-vector), SDXL clip_l/clip_g files, unloading and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hostile import Evil
import pipes
from pipes import ours

TOL = 1e-4
KW = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def vectors(n, width=32, seed=0):
    return torch.randn(n, width, generator=gen(seed)) * 2


def diffusers_file(tmp_path, token, emb):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({token: emb}, str(path))
    return path


def a1111_file(tmp_path, name, emb):
    path = tmp_path / f"{name}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": name, "step": 500,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, str(path))
    return path


def reference(path):
    return pipes.reference("StableDiffusionPipeline", path)


@pytest.mark.parametrize("fmt,n", [("diffusers", 1), ("diffusers", 3), ("a1111", 1), ("a1111", 2)])
def test_parity_with_diffusers_sd1(tiny_model, tmp_path, fmt, n):
    model = tiny_model("sd1")
    emb = vectors(n, seed=n)
    file = diffusers_file(tmp_path, "<cat-toy>", emb) if fmt == "diffusers" else a1111_file(tmp_path, "cattoy", emb)
    token = "<cat-toy>" if fmt == "diffusers" else "cattoy"
    prompt = f"a {token} on a hill"
    ref, mine = reference(model), ours(model)
    base = mine(prompt, generator=gen(), **KW).images
    ref.load_textual_inversion(str(file), token=token)
    added = mine.load_textual_inversion(file)
    assert added == [token] + [f"{token}_{i}" for i in range(1, n)]
    # embeddings equal the reference's, row for row
    ids = mine.tokenizers[0].convert_tokens_to_ids(added)
    assert ids == ref.tokenizer.convert_tokens_to_ids(added)
    ours_rows = mine.text_encoders[0].get_input_embeddings().weight[ids]
    assert torch.allclose(ours_rows, emb, atol=1e-5)
    assert torch.allclose(ref.text_encoder.get_input_embeddings().weight[ids], ours_rows, atol=1e-5)
    expected = ref(prompt, negative_prompt=f"{token} blurry", generator=gen(), **KW).images
    got = mine(prompt, negative_prompt=f"{token} blurry", generator=gen(), **KW).images
    assert np.abs(got - expected).max() <= TOL
    # the embedding is used: the image differs from the one before loading
    assert np.abs(mine(prompt, generator=gen(), **KW).images - base).max() > 1e-4


def test_several_at_once_and_unload_restores(tiny_model, tmp_path):
    model = tiny_model("sd1")
    pipe = ours(model)
    tok, enc = pipe.tokenizers[0], pipe.text_encoders[0]
    vocab, weight = dict(tok.get_vocab()), enc.get_input_embeddings().weight.clone()
    prompt = "<a> and <b>"
    before = pipe.prompt_encoder.encode([prompt]).embeds
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fa = diffusers_file(tmp_path / "a", "<a>", vectors(2, seed=1))
    fb = a1111_file(tmp_path / "b", "b", vectors(3, seed=2))
    assert pipe.load_textual_inversion([fa, fb], token=[None, "<b>"]) == ["<a>", "<a>_1", "<b>", "<b>_1", "<b>_2"]
    assert pipe.prompt_encoder.expansions == {"<a>": "<a> <a>_1", "<b>": "<b> <b>_1 <b>_2"}
    with_both = pipe.prompt_encoder.encode([prompt]).embeds
    pipe.unload_textual_inversion("<a>")
    assert "<a>" not in tok.get_vocab() and "<b>_2" in tok.get_vocab()
    assert set(pipe.prompt_encoder.expansions) == {"<b>"}
    ids = tok.convert_tokens_to_ids(["<b>", "<b>_1", "<b>_2"])
    assert torch.equal(enc.get_input_embeddings().weight[ids], vectors(3, seed=2))
    pipe.unload_textual_inversion()
    assert tok.get_vocab() == vocab and pipe.prompt_encoder.expansions == {}
    assert torch.equal(enc.get_input_embeddings().weight, weight)
    assert torch.equal(pipe.prompt_encoder.encode([prompt]).embeds, before)
    assert not torch.equal(with_both, before)
    # and it loads again after unloading
    pipe.load_textual_inversion(fa)


def test_sdxl_clip_l_clip_g(tiny_model, tmp_path):
    pipe = ours(tiny_model("sdxl"))
    l, g = vectors(2, seed=3), vectors(2, seed=4)
    f = tmp_path / "xlemb.safetensors"
    save_file({"clip_l": l, "clip_g": g}, str(f))
    prompt = "a xlemb cat"
    base = pipe(prompt, generator=gen(), **KW).images
    assert pipe.load_textual_inversion(f) == ["xlemb", "xlemb_1"]
    for tokenizer, encoder, v in zip(pipe.tokenizers, pipe.text_encoders, (l, g)):
        ids = tokenizer.convert_tokens_to_ids(["xlemb", "xlemb_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], v)
    assert np.abs(pipe(prompt, generator=gen(), **KW).images - base).max() > 1e-4
    pipe.unload_textual_inversion()
    assert np.abs(pipe(prompt, generator=gen(), **KW).images - base).max() == 0


def test_errors(tiny_model, tmp_path):
    pipe = ours(tiny_model("sd1"))
    f = diffusers_file(tmp_path, "<x>", vectors(1))
    pipe.load_textual_inversion(f)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        pipe.load_textual_inversion(f)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        pipe.load_textual_inversion(vectors(1), token="a</w>")
    wide = tmp_path / "wide.safetensors"
    save_file({"<w>": vectors(1, width=48)}, str(wide))
    with pytest.raises(ValueError, match=r"wide\.safetensors.*width 48.*expects 32"):
        pipe.load_textual_inversion(wide)
    xl = tmp_path / "xl.safetensors"
    save_file({"clip_l": vectors(1), "clip_g": vectors(1)}, str(xl))
    with pytest.raises(ValueError, match=r"xl\.safetensors.*SDXL embedding"):
        pipe.load_textual_inversion(xl)
    with pytest.raises(ValueError, match="token="):
        pipe.load_textual_inversion(vectors(1))
    with pytest.raises(ValueError, match="not a loaded"):
        pipe.unload_textual_inversion("<nope>")
    # untrusted pickles are refused, never unpickled
    evil, marker = tmp_path / "evil.pt", tmp_path / "marker"
    torch.save({"string_to_param": {"*": vectors(1)}, "obj": Evil(str(marker))}, str(evil))
    with pytest.raises(ValueError, match="evil.pt"):
        pipe.load_textual_inversion(evil)
    assert not marker.exists()
    sdxl = ours(tiny_model("sdxl"))
    with pytest.raises(ValueError, match="SD1/SD2 embedding"):
        sdxl.load_textual_inversion(diffusers_file(tmp_path, "<y>", vectors(1)))
