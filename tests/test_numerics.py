"""Numerics: non-finite values are refused where they first appear (text encoder, UNet
step N, VAE), guidance scales and prompt weights are checked before any model runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import controldiff as cd
from controldiff.sampling.finite import StepWatch
from controldiff.text.weighting import MAX_WEIGHT, parse


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("seed", 0)
    kw.setdefault("output_type", "np")
    kw.setdefault("scheduler", "euler")
    return pipe(kw.pop("prompt", "a cat"), **kw)


# ---------------------------------------------------------------------------- stages
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_vae_non_finite_output_is_refused(pipe, monkeypatch, value):
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full_like(decode(z), value))
    with pytest.raises(FloatingPointError, match="VAE decode.*(NaN|infinite)"):
        run(pipe)


def test_deferred_watch_names_the_first_bad_step():
    """On accelerators the loop keeps the first bad step on the device (no read-back per
    step) and reports it after the loop: the same step as the immediate check."""
    steps = torch.tensor([999, 666, 333, 0])
    watch = StepWatch(steps, torch.float32, defer=True)
    good, bad = torch.zeros(2), torch.tensor([0.0, float("inf")])
    for i, x in enumerate((good, bad, torch.full((2,), float("nan")), good)):
        watch.see(i, x)  # nothing raised while the loop runs
    with pytest.raises(FloatingPointError, match=r"UNet step 2 of 4 \(t=666\)"):
        watch.check()
    fine = StepWatch(steps, torch.float32, defer=True)
    for i in range(4):
        fine.see(i, good)
    fine.check()


def test_unet_non_finite_names_the_step(pipe, monkeypatch):
    forward, calls = pipe.unet.forward, []

    def second_call_overflows(*args, **kwargs):
        calls.append(1)
        out = forward(*args, **kwargs)
        return out * float("inf") if len(calls) == 2 else out

    monkeypatch.setattr(pipe.unet, "forward", second_call_overflows)
    seen = []
    with pytest.raises(FloatingPointError, match=r"UNet step 2 of 3 \(t=") as e:
        run(pipe, callback=lambda i, t, x: seen.append(i))
    assert seen == [0]  # the callback never saw the broken latents
    assert "float32" in str(e.value)


def test_latent_output_is_checked_too(pipe):
    class Poison(cd.Control):
        def after_step(self, ctx, step, latents):
            return latents * float("nan") if step.index == 1 else latents

    with pytest.raises(FloatingPointError, match="UNet step 2 of 3.*NaN"):
        run(pipe, output_type="latent", controls=[Poison()])


def test_text_encoder_non_finite_is_named(pipe):
    encoder = pipe.text_encoders[0]

    def poison(module, args, kwargs, output):
        output[0].fill_(float("nan"))
        return output

    handle = encoder.register_forward_hook(poison, with_kwargs=True)
    try:
        with pytest.raises(FloatingPointError, match=r"text encoder \(prompt\)"):
            run(pipe)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), "7", True])
def test_guidance_scale_must_be_finite(pipe, no_work, scale):
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number"):
        run(pipe, guidance_scale=scale)


def test_guidance_at_most_one_still_disables_cfg(pipe):
    """The diffusers-compatible rule stays: <= 1 means no unconditional branch."""
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        run(pipe, guidance_scale=1.0, num_inference_steps=1)
        run(pipe, guidance_scale=-3.0, num_inference_steps=1)
    finally:
        handle.remove()
    assert rows == [1, 1]


@pytest.mark.parametrize("make, name", [
    (lambda v: cd.InstructPix2Pix(np.zeros((8, 8, 3), np.float32), image_guidance_scale=v), "image_guidance_scale"),
    (lambda v: cd.Region("a dog", weight=v), "Region.weight"),
    (lambda v: cd.Concept("a dog", scale=v), "Concept.scale"),
])
def test_control_scales_must_be_finite(make, name):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{name}: expected a finite number"):
            make(bad)


@pytest.mark.parametrize("name", ["eta", "aesthetic_score"])
def test_other_scales_must_be_finite(tiny_model, name):
    xl = cd.Pipeline.from_pretrained(tiny_model("sdxl"))
    with pytest.raises(ValueError, match=f"{name}: expected a finite number"):
        xl("x", num_inference_steps=1, **{name: float("nan")})


# ---------------------------------------------------------------------------- prompt weights
@pytest.mark.parametrize("argument", ["prompt", "negative_prompt"])
def test_overflowing_a1111_weights_are_refused_before_encoding(pipe, no_work, argument):
    deep = "a " + "(" * 1000 + "cat" + ")" * 1000
    kw = {"prompt": "a dog", argument: deep}
    with pytest.raises(ValueError, match=rf"^{argument}: the weight of 'cat' is .*e\+41"):
        run(pipe, **kw)


def test_overflowing_compel_weights_are_refused(pipe, no_work):
    pipe.prompt_syntax = "compel"
    try:
        with pytest.raises(ValueError, match=r"prompt: the weight of 'cat' is"):
            run(pipe, prompt="a cat" + "+" * 500)
        with pytest.raises(ValueError, match=r"negative_prompt: the weight of 'dog'"):
            run(pipe, negative_prompt="(" * 300 + "dog" + ")+" * 300)
        with pytest.raises(ValueError, match=r"prompt: unclosed '\('"):
            run(pipe, prompt="(" * 5000 + "cat")
    finally:
        pipe.prompt_syntax = "a1111"


def test_deep_compel_nesting_parses_without_recursion():
    """Grouping alone does not weigh: 5000 nested groups are one fragment of weight 1."""
    text = "(" * 5000 + "a cat" + ")" * 5000
    conj = parse(text, "compel")
    assert [(f.text, f.weight) for f in conj.prompts[0]] == [("a cat", 1.0)]
    conj = parse('("a (b)1.2 c", "d").and()', "compel")
    assert [[(f.text, round(f.weight, 6)) for f in p] for p in conj.prompts] == [[("a", 1.0), ("b", 1.2), ("c", 1.0)],
                                                                                [("d", 1.0)]]


@pytest.mark.parametrize("text, syntax", [
    ("(cat:%g)" % (MAX_WEIGHT * 2), "a1111"),
    ("(cat:1.2.3)", "a1111"),
    ('("a", "b").blend(1, -1)', "compel"),
    ('("a", "b").blend(1e300, 1)', "compel"),
    ('("a", "b").and(1, 1e300)', "compel"),
])
def test_bad_weights_name_the_argument(text, syntax):
    with pytest.raises(ValueError, match="^negative_prompt: "):
        parse(text, syntax, "negative_prompt")


def test_ordinary_weights_still_work(pipe):
    plain = run(pipe).images
    weighted = run(pipe, prompt="a (cat:1.5) [dog] (((big)))").images
    assert np.isfinite(weighted).all() and np.abs(weighted - plain).max() > 1e-4
