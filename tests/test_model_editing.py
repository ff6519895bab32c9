"""TIME model editing: parity with diffusers' StableDiffusionModelEditingPipeline (its layer
lookup repaired here: as shipped it finds no layer and edits nothing), SD2/SDXL widths, LoRA
composition, exact reset, errors."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

import pipes
from controldiff.model_editing import align
from pipes import ours
from test_lora import make_lora
from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_model_editing import AUGS_CONST

TOL = 1e-4
KW = dict(num_inference_steps=2, output_type="np")
ROSES = ("a pack of roses", "a pack of blue roses")
DOG = ("A dog on a couch", "A small dog on a couch")  # "A..." exercises the augmentations' lower-casing


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def projections(pipe) -> dict[str, torch.Tensor]:
    """Every cross-attention to_k/to_v weight (the base weight under a LoRA), by module path."""
    out = {}
    for name, attn in pipe.unet.attention_sites().items():
        if attn.site.kind == "cross":
            for p in ("to_k", "to_v"):
                m = getattr(attn, p)
                out[f"{name}.{p}"] = getattr(m, "lora_base", m).weight
    return out


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in projections(pipe).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def repair_lookup(ref) -> None:
    """Redo the layer lookup of the reference's ``__init__`` as it was meant. It collects modules
    whose class is named ``CrossAttention`` (diffusers 0.9; the class is ``Attention`` now) and
    keeps those with ``to_v.in_features == 768``; in 0.9 self-attention was a CrossAttention too,
    and 768 (SD1's text width) excluded it because no SD1 query width is 768. Here the tiny
    model's text width 32 equals the mid block's query width, so cross-attention is picked by
    ``is_cross_attention`` as well as by width. Lists built exactly as ``__init__`` builds them."""
    width = ref.unet.config.cross_attention_dim
    layers = [m for m in ref.unet.modules()
              if type(m).__name__ == "Attention" and m.is_cross_attention and m.to_v.in_features == width]
    ref.ca_clip_layers = layers
    ref.projection_matrices = [l.to_v for l in layers] + [l.to_k for l in layers]
    ref.og_matrices = [copy.deepcopy(l.to_v) for l in layers] + [copy.deepcopy(l.to_k) for l in layers]


def ref_weights(ref) -> dict[str, torch.Tensor]:
    """The reference's cross-attention to_k/to_v weights by module path (the same paths as ours);
    looked up by path each time, as the reference replaces the modules on restart."""
    names = [n for n, _ in ref.unet.named_modules() if n.endswith("attn2")]
    return {f"{n}.{p}": ref.unet.get_submodule(f"{n}.{p}").weight.detach().clone() for n in names
            for p in ("to_k", "to_v")}


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_reference_as_shipped_edits_nothing(tiny_model):
    """Why the parity test repairs the reference: unrepaired, it finds no layer and its edit is a no-op."""
    ref = pipes.reference("StableDiffusionModelEditingPipeline", tiny_model("sd1"))
    before = ref_weights(ref)
    assert ref.ca_clip_layers == [] and ref.projection_matrices == []
    ref.edit_model(*ROSES)
    assert max_diff(ref_weights(ref), before) == 0.0


@pytest.mark.parametrize("edits, lamb, restart", [
    ([ROSES], 0.1, True),
    ([ROSES], 0.5, True),
    ([ROSES, DOG], 0.1, False),  # the second edit accumulates on the first
    ([ROSES, DOG], 0.1, True),   # the second edit starts again from the original weights
], ids=["lamb0.1", "lamb0.5", "accumulate", "restart"])
def test_parity_sd1(tiny_model, edits, lamb, restart):
    """Edited weights and images equal the repaired reference's. The reference runs in float64:
    in float32 its inverse of (lamb I + sum k k^T) is off by ~2e-4 on these weights (ours solves
    in float64 and is within 2e-6 of the float64 reference); it is also checked in float32, at 1e-3."""
    path = tiny_model("sd1")
    mine = ours(path)
    original = snapshot(mine)
    unedited = mine(ROSES[0], generator=gen(), **KW).images

    ref32 = pipes.reference("StableDiffusionModelEditingPipeline", path)
    ref = pipes.reference("StableDiffusionModelEditingPipeline", path, dtype=torch.float64)
    repair_lookup(ref32)
    repair_lookup(ref)
    assert len(ref.projection_matrices) == len(original) == 12  # 6 cross-attention sites, to_k and to_v
    for source, destination in edits:
        mine.edit_model(source, destination, lamb=lamb, restart_params=restart)
        ref32.edit_model(source, destination, lamb=lamb, restart_params=restart)
        with default_dtype(torch.float64):  # the reference's torch.eye takes the default dtype
            ref.edit_model(source, destination, lamb=lamb, restart_params=restart)
    edited = snapshot(mine)
    assert max_diff(edited, original) > 0.1  # the edit did something
    assert max_diff(edited, ref_weights(ref)) <= TOL
    assert max_diff(edited, ref_weights(ref32)) <= 1e-3

    ref.to(torch.float32)
    for prompt in (ROSES[0], DOG[0]):
        got = mine(prompt, generator=gen(), **KW).images
        expected = ref(prompt, generator=gen(), **KW).images
        assert np.abs(got - expected).max() <= TOL
    assert np.abs(mine(ROSES[0], generator=gen(), **KW).images - unedited).max() > 1e-3


def test_restart_and_accumulate_differ(tiny_model):
    mine = ours(tiny_model("sd1"))
    mine.edit_model(*DOG)
    only_dog = snapshot(mine)
    mine.edit_model(*ROSES)
    mine.edit_model(*DOG)  # restart_params=True: the roses edit is gone
    assert max_diff(snapshot(mine), only_dog) == 0.0
    mine.edit_model(*ROSES, restart_params=False)
    assert max_diff(snapshot(mine), only_dog) > 1e-2


def test_alignment_maps_tokens_to_their_copies(tiny_model):
    tok = ours(tiny_model("sd1")).tokenizers[0]
    for source, destination in (ROSES, DOG):
        idx = align(tok, source, destination)
        src, dst = tok(source).input_ids, tok(destination).input_ids
        assert len(idx) == tok.model_max_length and idx == sorted(idx)
        assert [dst[j] for j in idx[:len(src)]] == src
        assert idx[len(src)] == idx[len(src) - 1] + 1  # then the positions after the destination's EOS


def augmented(prompt: str) -> list[str]:
    """The prompt and the reference's augmentations of it, as its edit_model builds them."""
    base = "a" + prompt[1:] if prompt[:1] == "A" else prompt
    return [prompt] + [aug + base for aug in AUGS_CONST]


def unet_inputs(pipe, prompts: list[str]) -> torch.Tensor:
    """The text embeddings the UNet receives for ``prompts`` in a pipeline call (guidance off)."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[2].detach().clone()))
    try:
        pipe(prompts, num_inference_steps=1, guidance_scale=1.0, output_type="latent", generator=gen())
    finally:
        hook.remove()
    return seen[0].double()


@pytest.mark.parametrize("family, width", [("sd2", 32), ("sdxl", 64)])  # SDXL: both encoders' 32 side by side
def test_edit_solves_time_for_what_the_unet_sees(tiny_model, family, width):
    """Each edited to_k/to_v is the minimiser of TIME's objective lamb ||W' - W||^2 + sum ||W' s - W d||^2
    over the embeddings the UNet receives in a pipeline call (s: tokens of the source prompt and its
    augmentations, d: the destination tokens they align to): the objective's gradient vanishes, and
    the residual ||W' s - W d|| shrinks. (It cannot vanish at these widths: 4 x 77 token pairs, 32 or
    64 dimensions.) Reset restores the weights exactly."""
    pipe = ours(tiny_model(family))
    assert pipe.unet.config.cross_attention_dim == width
    original = snapshot(pipe)
    sources, dests = augmented(ROSES[0]), augmented(ROSES[1])
    s_all, d_all = unet_inputs(pipe, sources), unet_inputs(pipe, dests)
    assert s_all.shape[-1] == width
    s = s_all.flatten(0, 1)
    d = torch.cat([d_all[i, align(pipe.tokenizers[0], a, b)] for i, (a, b) in enumerate(zip(sources, dests))])

    for lamb in (0.1, 0.0):
        pipe.edit_model(*ROSES, lamb=lamb)
        edited = snapshot(pipe)
        for k, w in original.items():
            w, w_new = w.double(), edited[k].double()
            grad_before = (s @ w.T - d @ w.T).T @ s
            grad_after = lamb * (w_new - w) + (s @ w_new.T - d @ w.T).T @ s
            assert grad_after.norm() <= 1e-4 * grad_before.norm(), (k, lamb)
            assert (s @ w_new.T - d @ w.T).norm() < 0.8 * (s @ w.T - d @ w.T).norm(), (k, lamb)
    pipe.reset_model_edits()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(pipe).values(), original.values()))


def test_reset(pipe):
    original = snapshot(pipe)
    image = pipe(ROSES[0], generator=gen(), **KW).images
    pipe.reset_model_edits()  # nothing to reset
    pipe.edit_model(*ROSES, lamb=0.1)
    pipe.edit_model(*DOG, restart_params=False)
    pipe.reset_model_edits()
    pipe.reset_model_edits()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(pipe).values(), original.values()))
    assert np.array_equal(pipe(ROSES[0], generator=gen(), **KW).images, image)


@pytest.fixture(scope="module")
def unet_lora(tiny_model, tmp_path_factory):
    """A LoRA on the UNet only (to_k/to_v included), so the text embeddings do not change."""
    return make_lora(tiny_model("sd1"), "sd1", tmp_path_factory.mktemp("lora"), seed=1, text=False)


def test_lora_edit_reset(tiny_model, unet_lora):
    """With a LoRA loaded the base weights are edited; reset gives exactly the LoRA-only model."""
    pipe = ours(tiny_model("sd1"))
    plain = snapshot(pipe)
    pipe.load_lora(unet_lora, weight=0.8, name="l")
    assert all(type(getattr(a, "to_k")).__name__ == "LoraLayer"
               for a in pipe.unet.attention_sites().values() if a.site.kind == "cross")
    lora_only = pipe(ROSES[0], generator=gen(), **KW).images
    pipe.edit_model(*ROSES)
    assert max_diff(snapshot(pipe), plain) > 0.1
    assert np.abs(pipe(ROSES[0], generator=gen(), **KW).images - lora_only).max() > 1e-3
    pipe.reset_model_edits()
    assert pipe.loras == {"l": 0.8}
    assert all(torch.equal(a, b) for a, b in zip(snapshot(pipe).values(), plain.values()))
    assert np.array_equal(pipe(ROSES[0], generator=gen(), **KW).images, lora_only)


def test_lora_and_edit_commute(tiny_model, unet_lora):
    """Edit then load a LoRA = load it then edit; unloading the LoRA keeps the edit, reset undoes it."""
    path = tiny_model("sd1")
    first, second = ours(path), ours(path)
    plain = snapshot(first)
    first.edit_model(*ROSES)
    first.load_lora(unet_lora, weight=0.8)
    second.load_lora(unet_lora, weight=0.8)
    second.edit_model(*ROSES)
    assert max_diff(snapshot(first), snapshot(second)) == 0.0
    a, b = (p(ROSES[0], generator=gen(), **KW).images for p in (first, second))
    assert np.array_equal(a, b)
    edited = snapshot(first)
    first.unload_lora()
    assert max_diff(snapshot(first), edited) == 0.0
    first.reset_model_edits()
    assert max_diff(snapshot(first), plain) == 0.0


def test_fused_lora_refused(tiny_model, unet_lora):
    pipe = ours(tiny_model("sd1"))
    pipe.load_lora(unet_lora)
    pipe.edit_model(*ROSES)
    pipe.fuse_lora()
    for call in (lambda: pipe.edit_model(*ROSES), pipe.reset_model_edits):
        with pytest.raises(ValueError, match="fused.*unfuse_lora"):
            call()
    pipe.unfuse_lora()
    pipe.unload_lora()
    pipe.reset_model_edits()


@pytest.mark.parametrize("kwargs, match", [
    (dict(source_prompt=""), "source_prompt: expected a non-empty string"),
    (dict(source_prompt="   "), "source_prompt: expected a non-empty string"),
    (dict(source_prompt=["a cat"]), "source_prompt: expected a non-empty string"),
    (dict(destination_prompt=None), "destination_prompt: expected a non-empty string"),
    (dict(destination_prompt="a \udc80 cat"), "destination_prompt: not valid UTF-8"),
    (dict(source_prompt="x" * 76, destination_prompt="x" * 76), "source_prompt: .* 76 tokens, more than the "
                                                                "text encoder's 75-token window"),
    # fits alone, not with the augmentation "A picture of " (10 tokens with the tiny character tokenizer)
    (dict(source_prompt="cat", destination_prompt="a cat " + "x" * 62), "destination_prompt: 'A picture of a cat"),
    (dict(destination_prompt="a pack of tulips"), "destination_prompt: must contain the tokens of source_prompt"),
    (dict(lamb=-0.1), "lamb: expected a finite number >= 0"),
    (dict(lamb=float("nan")), "lamb: expected a finite number"),
    (dict(lamb=float("inf")), "lamb: expected a finite number"),
    (dict(lamb="0.1"), "lamb: expected a finite number"),
    (dict(lamb=True), "lamb: expected a finite number"),
    (dict(restart_params="yes"), "restart_params: expected True or False"),
])
def test_errors(pipe, no_work, kwargs, match):
    """Checked before any model runs (no_work); the weights are untouched."""
    original = snapshot(pipe)
    args = {"source_prompt": ROSES[0], "destination_prompt": ROSES[1], **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.edit_model(**args)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(pipe).values(), original.values()))
