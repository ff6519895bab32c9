"""FABRIC: parity with diffusers' community FabricPipeline (vendored in tests/reference) on
SD1; on SD2 and SDXL, behaviour the method guarantees on any weights; composition; errors.

The reference draws the feedback images' noise with ``torch.randn_like`` and steps an
ancestral scheduler without a generator (torch's global RNG); ours draws both from the
call's generator, in the same order. The parity runs route the reference's two draws
through the generator it is given, so both sides see the same numbers.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np
import PIL.Image
import pytest
import torch

from controldiff.controls.fabric import FABRIC, attend_with, level_weights
from controldiff.controls.pag import PAG
from controldiff.controls.sag import SAG
from controldiff.images import preprocess_image
from controldiff.models.attention import Attention
from controldiff.sampling.control import Step
from controldiff.schedulers import DIFFUSERS_EQUIVALENT

import diffusers  # the oracle
import reference.pipeline_fabric as community
from pipes import ours, reference

TOL = 1e-4
SIZE = dict(height=64, width=64)


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(n)]


IMAGES = _images(3)


@pytest.fixture(scope="module")
def sd1(tiny_model):
    path = tiny_model("sd1")
    sd = reference("StableDiffusionPipeline", path)
    ref = community.FabricPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.scheduler)
    ref.set_progress_bar_config(disable=True)
    return ref, sd.scheduler.config, ours(path)


def run_reference(ref, config, scheduler, monkeypatch, seed, **kw):
    """The community pipeline, its global-RNG draws taken from the call's generator."""
    cls = getattr(diffusers, DIFFUSERS_EQUIVALENT[scheduler][0]) if scheduler else diffusers.PNDMScheduler
    ref.scheduler = cls.from_config(config)
    g = gen(seed)
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", lambda t, **_: torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device))
        if "generator" in inspect.signature(ref.scheduler.step).parameters:
            m.setattr(ref.scheduler, "step", functools.partial(ref.scheduler.step, generator=g))
        if scheduler == "euler":
            # the reference's bug, patched: only Euler-ancestral inputs are noised in model-input
            # form; Euler's add_noise (x0 + sigma * eps, unscaled) is not what the UNet takes
            m.setattr(community, "EulerAncestralDiscreteScheduler",
                      (diffusers.EulerAncestralDiscreteScheduler, diffusers.EulerDiscreteScheduler))
        return ref(generator=g, output_type="np", **SIZE, **kw).images


PARITY = {
    # name: (scheduler, steps, images per prompt, FABRIC arguments)
    "liked": (None, 4, 1, dict(liked=IMAGES[:1])),
    "disliked": (None, 4, 1, dict(disliked=IMAGES[1:2])),
    "both": (None, 4, 1, dict(liked=IMAGES[:2], disliked=IMAGES[2:])),
    "ratios and weights": (None, 5, 1, dict(liked=IMAGES[:1], disliked=IMAGES[1:2], feedback_start_ratio=0.0,
                                            feedback_end_ratio=0.4, min_weight=0.0, max_weight=1.5, neg_scale=0.8,
                                            pos_bottleneck_scale=0.3, neg_bottleneck_scale=2.0)),
    "2 per prompt": (None, 4, 2, dict(liked=IMAGES[:2], disliked=IMAGES[2:], min_weight=0.2)),
    "ddim": ("ddim", 4, 1, dict(liked=IMAGES[:1], disliked=IMAGES[1:2], feedback_start_ratio=0.5,
                                feedback_end_ratio=1.0, max_weight=3.0, pos_bottleneck_scale=0.0)),
    "euler_a": ("euler_a", 4, 1, dict(liked=IMAGES[:1], disliked=IMAGES[1:2])),
    "euler (reference patched)": ("euler", 4, 1, dict(liked=IMAGES[:2], disliked=IMAGES[2:], max_weight=2.0)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_parity_sd1(sd1, monkeypatch, case):
    ref, config, mine = sd1
    scheduler, steps, n, fabric = PARITY[case]
    common = dict(negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=steps)
    expected = run_reference(ref, config, scheduler, monkeypatch, 3, prompt="a cat", num_images=n, **common, **fabric)
    ours_kw = dict(common, num_images_per_prompt=n, scheduler=scheduler, output_type="np", **SIZE)
    got = mine("a cat", generator=gen(3), controls=[FABRIC(**fabric)], **ours_kw).images
    plain = mine("a cat", generator=gen(3), **ours_kw).images
    assert np.abs(got - plain).max() > 1e-3, "FABRIC had no effect"
    diff = float(np.abs(got - expected).max())
    print(f"FABRIC parity {case}: max abs {diff:.1e}")
    assert diff <= TOL


def test_parity_no_feedback(sd1, monkeypatch):
    """No images: the reference runs the plain UNet; ours attaches nothing."""
    ref, config, mine = sd1
    common = dict(negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=3)
    expected = run_reference(ref, config, None, monkeypatch, 1, prompt="a cat", num_images=1, **common)
    got = mine("a cat", generator=gen(1), controls=[FABRIC()], output_type="np", **SIZE, **common).images
    assert float(np.abs(got - expected).max()) <= TOL


def test_image_forms_agree(sd1, tmp_path):
    """A path, a PIL image and a uint8 array of the same picture give the same result."""
    _, _, mine = sd1
    path = tmp_path / "liked.png"
    IMAGES[0].save(path)
    kw = dict(num_inference_steps=3, guidance_scale=6.0, output_type="np", **SIZE)
    disliked = [np.asarray(IMAGES[1])]
    runs = [mine("a cat", generator=gen(2), controls=[FABRIC(liked=form, disliked=disliked)], **kw).images
            for form in ([str(path)], [IMAGES[0]], np.asarray(IMAGES[0]))]
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[1], runs[2])


# ---------------------------------------------------------------- the mechanism, on any model
@torch.no_grad()
def test_weight_mixes_own_and_reference_attention():
    """The reference tokens' weight moves each row's self-attention from its own tokens (w=0)
    towards attending only to the feedback image's tokens (w -> inf), monotonically; w=1 is
    plain attention over both token sets."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    h, ref = torch.randn(2, 5, 8), torch.randn(1, 7, 8)
    q, _, _ = attn.project_qkv(h)
    _, rk, rv = attn.project_qkv(ref)
    only_ref = attn.project_out(attn.attend(q, rk.expand(2, -1, -1, -1), rv.expand(2, -1, -1, -1)))
    assert torch.allclose(attend_with(attn, h, ref, 0.0), attn.default(h), atol=1e-6)
    both = attn.default(h, torch.cat([h, ref.expand(2, -1, -1)], dim=1))
    assert torch.allclose(attend_with(attn, h, ref, 1.0), both, atol=1e-6)
    distances = [float((attend_with(attn, h, ref, w) - only_ref).norm()) for w in (0.0, 0.5, 1.0, 4.0, 1e3, 1e7)]
    assert all(a > b for a, b in zip(distances, distances[1:])) and distances[-1] < 1e-4


def test_weight_schedule():
    """The reference's schedule: round(n * ratio) bounds, inclusive; linspace per UNet level."""
    f = FABRIC(liked=IMAGES[:1], min_weight=0.1, max_weight=0.9)
    weights = [f.weight(Step(index=i, t=torch.tensor(0), count=4)) for i in range(4)]
    assert weights == [0.1, 0.9, 0.9, 0.9]  # round(1.32) = 1, round(2.64) = 3
    levels = level_weights(4, 0.8, 0.5)
    assert np.allclose(levels["down"], [0.8, 0.7, 0.6, 0.5]) and levels["mid"] == [0.4]
    assert levels["up"] == levels["down"][::-1]


@pytest.fixture(scope="module", params=[("sd2", "v_prediction"), ("sdxl", "epsilon")], ids=["sd2", "sdxl"])
def other(request, tiny_model):
    family, prediction = request.param
    return ours(tiny_model(family, prediction_type=prediction))


def _feedback_pass_input(pipe, image, seed):
    """The latents FABRIC's feedback pass will see at the first step of a 1-step DDIM run
    with one feedback image: its VAE sample, noised with the generator's next draw."""
    g = gen(seed)
    z = pipe._encode_image(preprocess_image(image, 64, 64).contiguous(), g)  # as FABRIC lays it out
    noise = torch.randn(z.shape, generator=g)
    sched = pipe.make_scheduler("ddim")
    sched.set_timesteps(1)
    alpha, sigma = sched.noise_level(0)
    return alpha * z + sigma * noise


@pytest.mark.parametrize("which, guidance", [("liked", 1.0), ("liked", 5.0), ("disliked", 5.0)])
def test_feedback_on_the_image_being_denoised_changes_nothing(other, which, guidance):
    """When the step denoises exactly what the feedback pass sees (same latents, the empty
    prompt, SDXL's time ids), the feedback tokens duplicate the row's own: the attention is
    unchanged whatever the weight. A different feedback image does change it. This checks
    what the feedback pass is given and where it records, on SD2 (v-prediction, linear
    projections) and SDXL (added conditioning, several transformer layers)."""
    x = _feedback_pass_input(other, IMAGES[0], 5)
    kw = dict(negative_prompt="", latents=x, num_inference_steps=1, scheduler="ddim", guidance_scale=guidance,
              output_type="latent", **SIZE)
    plain = other("", generator=gen(5), **kw).images
    same = other("", generator=gen(5), controls=[FABRIC(**{which: IMAGES[:1]}, max_weight=20.0)], **kw).images
    changed = other("", generator=gen(5), controls=[FABRIC(**{which: IMAGES[1:2]}, max_weight=20.0)], **kw).images
    assert float((same - plain).abs().max()) <= 1e-6           # seen: 3e-8
    assert float((changed - plain).abs().max()) > 3e-5         # seen: 1e-4 (SD2, one step) to 2e-3


def test_empty_feedback_equals_no_control(other):
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="latent", **SIZE)
    plain = other("a cat", generator=gen(0), **kw).images
    for control in (FABRIC(), FABRIC(liked=[], disliked=None),
                    FABRIC(liked=IMAGES[:1], disliked=IMAGES[1:2], min_weight=0.0, max_weight=0.0)):
        assert torch.equal(other("a cat", generator=gen(0), controls=[control], **kw).images, plain)


def test_every_row_gets_the_feedback(other):
    """Two identical rows (two prompts, one image each, same seeds) stay identical: the
    feedback reaches every row, not only the first prompt's (the reference expands the
    feedback tokens to num_images rows, so it fails with several prompts)."""
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="latent", scheduler="ddim", **SIZE)
    prompts = ["a cat", "a cat"]
    plain = other(prompts, generator=[gen(4), gen(4)], **kw).images
    got = other(prompts, generator=[gen(4), gen(4)], controls=[FABRIC(IMAGES[:2], IMAGES[2:], max_weight=2.0)],
                **kw).images
    assert float((got[0] - got[1]).abs().max()) <= 1e-5
    assert float((got - plain).abs().amax(dim=(1, 2, 3)).min()) > 1e-4


def test_one_batched_feedback_pass_per_feedback_step(sd1):
    """All feedback images go through the UNet in one call, only at steps with weight > 0."""
    _, _, mine = sd1
    calls = []
    handle = mine.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        mine("a cat", generator=gen(0), num_inference_steps=6, guidance_scale=5.0, scheduler="ddim", **SIZE,
             output_type="latent", controls=[FABRIC(IMAGES[:2], IMAGES[2:], 0.5, 0.5, min_weight=0.0)])
    finally:
        handle.remove()
    assert calls == [2, 2, 2, 3, 2, 2, 2]  # step 3 (round(6 * 0.5)) has the 3 images' pass first


# ---------------------------------------------------------------- composition
def test_cfg_off_with_liked_images(sd1):
    _, _, mine = sd1
    kw = dict(num_inference_steps=3, guidance_scale=1.0, output_type="np", **SIZE)
    plain = mine("a cat", generator=gen(0), **kw).images
    got = mine("a cat", generator=gen(0), controls=[FABRIC(IMAGES[:1])], **kw).images
    assert np.isfinite(got).all() and np.abs(got - plain).max() > 1e-3


def test_composes_with_pag_and_sag_on_shared_sites_in_any_order(sd1):
    """PAG perturbs its own rows and SAG reads the uncond map at the mid-block self-attention,
    where FABRIC extends the cond/uncond rows: the order of the controls does not matter."""
    _, _, mine = sd1
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", scheduler="ddim", **SIZE)
    fabric = lambda: FABRIC(IMAGES[:1], IMAGES[1:2], max_weight=2.0)  # noqa: E731
    a = mine("a cat", generator=gen(1), controls=[fabric(), PAG(2.0), SAG(0.5)], **kw).images
    b = mine("a cat", generator=gen(1), controls=[SAG(0.5), PAG(2.0), fabric()], **kw).images
    without = mine("a cat", generator=gen(1), controls=[PAG(2.0), SAG(0.5)], **kw).images
    assert np.abs(a - b).max() <= 1e-5
    assert np.abs(a - without).max() > 1e-3


def test_composes_with_multidiffusion(sd1):
    """Views: each view's rows attend to the whole feedback images' tokens."""
    from controldiff.controls.multidiffusion import MultiDiffusion

    _, _, mine = sd1
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", scheduler="ddim", height=64, width=128)
    plain = mine("a cat", generator=gen(0), controls=[MultiDiffusion(window=64, stride=32)], **kw).images
    got = mine("a cat", generator=gen(0), controls=[MultiDiffusion(window=64, stride=32), FABRIC(IMAGES[:1])],
               **kw).images
    assert np.isfinite(got).all() and np.abs(got - plain).max() > 1e-3


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(feedback_start_ratio=-0.1), "feedback_start_ratio"),
    (dict(feedback_end_ratio=1.5), "feedback_end_ratio"),
    (dict(feedback_start_ratio=0.7, feedback_end_ratio=0.6), "feedback_start_ratio"),
    (dict(feedback_end_ratio=float("nan")), "feedback_end_ratio"),
    (dict(min_weight=0.9, max_weight=0.5), "min_weight"),
    (dict(min_weight=-0.1), "min_weight"),
    (dict(max_weight=float("inf")), "max_weight"),
    (dict(neg_scale=-1.0), "neg_scale"),
    (dict(pos_bottleneck_scale=-0.5), "pos_bottleneck_scale"),
    (dict(neg_bottleneck_scale="1"), "neg_bottleneck_scale"),
    (dict(liked=[3]), r"liked\[0\]"),
    (dict(disliked=[IMAGES[0], np.zeros((4, 64, 64))]), r"disliked\[1\]"),
    (dict(liked=[np.full((8, 8, 3), 2.0)]), r"liked\[0\].*values"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FABRIC(**kwargs)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"liked\[1\]: cannot read"):
        FABRIC(liked=[IMAGES[0], bad])
    with pytest.raises(FileNotFoundError, match=r"disliked\[0\]"):
        FABRIC(disliked=[tmp_path / "missing.png"])


def _count_unet(pipe, monkeypatch):
    calls = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def test_disliked_needs_guidance_before_step_0(sd1, monkeypatch):
    _, _, mine = sd1
    calls = _count_unet(mine, monkeypatch)
    with pytest.raises(ValueError, match="disliked.*guidance_scale > 1"):
        mine("a cat", guidance_scale=1.0, num_inference_steps=2, controls=[FABRIC(disliked=IMAGES[:1])], **SIZE)
    assert calls == []


def test_refuses_extra_input_channels_before_step_0(tiny_model, monkeypatch):
    pipe = ours(tiny_model("sd1", in_channels=9))
    calls = _count_unet(pipe, monkeypatch)
    with pytest.raises(ValueError, match="9 input channels"):
        pipe("a cat", image=IMAGES[0], mask_image=PIL.Image.new("L", (64, 64), 255), num_inference_steps=2,
             controls=[FABRIC(liked=IMAGES[1:2])])
    assert calls == []


def test_describe_keeps_paths_and_settings(tmp_path):
    path = tmp_path / "a.png"
    IMAGES[0].save(path)
    d = FABRIC(liked=[str(path)], disliked=IMAGES[:1], max_weight=0.7).describe()
    assert d["name"] == "FABRIC" and d["liked"] == [str(path)] and "disliked" not in d and d["max_weight"] == 0.7
