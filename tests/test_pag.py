"""PAG: parity with diffusers' PAG pipelines (SD and SDXL); SEGA + SAG + PAG together."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from controldiff.controls.pag import PAG, match_layers
from controldiff.controls.sag import SAG
from controldiff.controls.sega import SEGA, Concept

import diffusers  # the oracle
from pipes import ours

TOL = 1e-4


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def reference(cls, path, **kw):
    pipe = cls.from_pretrained(path, enable_pag=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check(ref, mine, ref_layers, layers, guidance, scale, adaptive, **kw):
    ref.set_pag_applied_layers(ref_layers)
    kw = dict(num_inference_steps=3, guidance_scale=guidance, output_type="np", **kw)
    expected = ref("a cat", generator=gen(2), pag_scale=scale, pag_adaptive_scale=adaptive, **kw).images
    got = mine("a cat", generator=gen(2), controls=[PAG(scale, layers, adaptive)], **kw).images
    plain = mine("a cat", generator=gen(2), **kw).images
    assert np.abs(got - plain).max() > 1e-3, "PAG had no effect"
    assert float(np.abs(got - expected).max()) <= TOL


SD1_CASES = [
    # reference layers, ours (same meaning; older identifiers on our side), cfg, scale, adaptive
    (["mid"], ("mid",), 7.5, 3.0, 0.0),
    (["down_blocks.0", "up_blocks.1.attentions.0"], ("down.block_0", "up.block_1.attentions_0"), 1.0, 2.0, 0.0),
    (["mid", "up"], ["mid", "up"], 5.0, 1.5, 0.004),   # adaptive scale reaches 0 at the last step
    (["down_blocks.(0|1)"], "down_blocks.(0|1)", 1.0, 3.0, 0.001),
]


@pytest.fixture(scope="module")
def sd1(tiny_model):
    path = tiny_model("sd1")
    return reference(diffusers.StableDiffusionPAGPipeline, path, safety_checker=None,
                     requires_safety_checker=False), ours(path)


@pytest.mark.parametrize("case", range(len(SD1_CASES)))
def test_parity_sd1(sd1, case):
    check(*sd1, *SD1_CASES[case])


def test_parity_sdxl(tiny_model):
    path = tiny_model("sdxl")
    ref, mine = reference(diffusers.StableDiffusionXLPAGPipeline, path), ours(path)
    check(ref, mine, ["mid"], ("mid",), 6.0, 3.0, 0.0)
    check(ref, mine, ["down_blocks.1", "up_blocks.0.attentions.1"], ("down.block_1", "up.block_0.attentions_1"),
          1.0, 2.0, 0.002)


def test_zero_scale_equals_no_control(sd1):
    _, mine = sd1
    batches = []
    handle = mine.unet.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np", scheduler="ddim")
    try:
        plain = mine("a cat", generator=gen(1), **kw).images
        got = mine("a cat", generator=gen(1), controls=[PAG(0.0)], **kw).images
    finally:
        handle.remove()
    assert np.array_equal(got, plain)
    assert batches == [2, 2, 2, 2]  # no perturbed branch evaluated


def test_layer_matching_rules():
    names = [f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn1" for i in (1, 10)]
    names.append("mid_block.attentions.0.transformer_blocks.0.attn1")
    assert match_layers(names, ["down.block_1"]) == names[:1]        # not down_blocks.10
    assert match_layers(names, ["down_blocks.1"]) == names[:2]       # diffusers' regex: both
    assert match_layers(names, ["mid", "down_blocks.10"]) == [names[2], names[1]]
    with pytest.raises(ValueError, match="layers"):
        match_layers(names, ["up"])


def test_errors(sd1):
    _, mine = sd1
    with pytest.raises(ValueError, match="layers"):
        mine("a cat", num_inference_steps=1, controls=[PAG(layers=("up_blocks.7",))])
    with pytest.raises(ValueError, match="scale"):
        PAG(scale=-1)
    with pytest.raises(ValueError, match="layers"):
        PAG(layers=(3,))
    p = PAG()
    assert (p.scale, p.layers, p.adaptive_scale) == (3.0, ("mid",), 0.0)


def _each_matters(mine, prompt, **kw):
    def make():
        return {"sega": SEGA([Concept("smiling", warmup=0)]), "sag": SAG(0.75), "pag": PAG(2.0, ("mid", "up"))}

    batches = []
    handle = mine.unet.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        full = mine(prompt, generator=gen(6), controls=list(make().values()), **kw).images
    finally:
        handle.remove()
    assert np.isfinite(full).all()
    # per step: one call with uncond, cond, concept, perturbed; one SAG re-run on the uncond rows
    assert batches[:2] == [4, 1]
    for name in ("sega", "sag", "pag"):
        rest = [c for k, c in make().items() if k != name]
        without = mine(prompt, generator=gen(6), controls=rest, **kw).images
        assert np.abs(full - without).max() > 1e-3, f"removing {name} changed nothing"


def test_sega_sag_pag_together_sd1(sd1):
    _, mine = sd1
    _each_matters(mine, "a face", num_inference_steps=3, guidance_scale=7.5, output_type="np", scheduler="ddim")


def test_sega_sag_pag_together_sdxl(tiny_model):
    _each_matters(ours(tiny_model("sdxl")), "a face", num_inference_steps=3, guidance_scale=7.5, output_type="np")
