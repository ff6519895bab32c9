"""Pix2Pix-Zero: parity with diffusers' ``StableDiffusionPix2PixZeroPipeline`` (its
``invert()`` then ``__call__``, against ``pipe.invert`` then ``pipe(inversion=...)``), and
behaviour on SD2 (v-prediction) and SDXL, where the properties below must hold:

- source == target: the direction is zero and the reference pass's maps equal the edit
  pass's, so the loss and its gradient are exactly zero every step and the image is the
  plain regeneration from the inversion;
- a real edit changes the image, and the guidance keeps it closer to the regeneration and
  its attention maps closer to the reference's than the embedding move alone.
"""
from __future__ import annotations

import pytest
import torch

import diffusers
from controldiff.controls.pix2pix_zero import Pix2PixZero, attention_sites
from pipes import ours, reference
from tiny_models import build_controlnet
from pictures import photo

TOL = 1e-4
CAPTION = "a cat sitting on the grass"


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def as_list(p):
    return [p] if isinstance(p, str) else list(p)


def with_ddim(ref):
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.inverse_scheduler = diffusers.DDIMInverseScheduler.from_config(ref.scheduler.config)
    return ref


@pytest.fixture(scope="module")
def sd1(tiny_model):
    path = tiny_model("sd1")
    return with_ddim(reference("StableDiffusionPix2PixZeroPipeline", path)), ours(path)


def reference_edit(ref, caption, image, source, target, amount, guidance, steps, seed, reg=0, negative=None):
    """The reference's invert() then __call__ on its own inverted latents."""
    inverted = ref.invert(caption, image, num_inference_steps=steps, generator=gen(seed), num_reg_steps=reg,
                          output_type="np").latents
    source = ref.get_embeds(as_list(source)) if not torch.is_tensor(source) else source
    target = ref.get_embeds(as_list(target)) if not torch.is_tensor(target) else target
    return ref(caption, source_embeds=source, target_embeds=target, latents=inverted, num_inference_steps=steps,
               guidance_scale=guidance, negative_prompt=negative, cross_attention_guidance_amount=amount,
               output_type="latent").images


SETTINGS = {
    # prompt lists averaged, the documented example's negative prompt (the caption)
    "lists": dict(source=["a cat", "a cat on grass"], target=["a dog", "a dog on grass"], amount=0.1,
                  guidance=7.5, steps=4, seed=0, negative=CAPTION),
    # get_embeds tensors, a stronger step, a regularised inversion
    "tensors": dict(source="embeds:a cat", target="embeds:a tiger", amount=0.5, guidance=3.0, steps=4, seed=1,
                    reg=1),
    # single prompts, a non-square image, more steps
    "strings": dict(source="a cat", target="a dog", amount=0.1, guidance=5.0, steps=5, seed=2, size=(48, 64)),
}


def check(ref, mine, source, target, amount, guidance, steps, seed, reg=0, negative=None, size=(64, 64)):
    image = photo(seed, size)
    if isinstance(source, str) and source.startswith("embeds:"):
        source, target = ref.get_embeds([source[7:]]), ref.get_embeds([target[7:]])
    expected = reference_edit(ref, CAPTION, image, source, target, amount, guidance, steps, seed, reg, negative)
    inv = mine.invert(image, CAPTION, num_inference_steps=steps, seed=seed, num_reg_steps=reg)
    kw = dict(inversion=inv, guidance_scale=guidance, negative_prompt=negative, output_type="latent")
    got = mine(CAPTION, controls=[Pix2PixZero(source, target, amount)], **kw).images
    moved_only = mine(CAPTION, controls=[Pix2PixZero(source, target, 0.0)], **kw).images
    diff = float((got - expected).abs().max())
    assert diff <= TOL, diff
    assert float((got - moved_only).abs().max()) > 5 * TOL, "the attention guidance had no effect"
    return diff


@pytest.mark.parametrize("name", list(SETTINGS))
def test_parity_sd1(sd1, name):
    check(*sd1, **SETTINGS[name])


def test_parity_sd2_v_prediction(tiny_model):
    path = tiny_model("sd2", prediction_type="v_prediction")
    ref, mine = with_ddim(reference("StableDiffusionPix2PixZeroPipeline", path)), ours(path)
    check(ref, mine, source="a cat", target="a dog", amount=2.0, guidance=7.5, steps=4, seed=3)


def test_two_images_in_one_batch_equal_the_reference_per_image(sd1):
    """The reference is right for one image only (its direction goes to row 1 of
    [negative; caption], its loss is averaged over the batch): ours in one batch equals the
    reference run once per image."""
    ref, mine = sd1
    captions, images = ["a cat sitting", "a cat lying"], [photo(4), photo(5)]
    src, tgt = ["a cat", "a small cat"], ["a dog", "a small dog"]
    expected = torch.cat([reference_edit(ref, c, im, src, tgt, 0.5, 6.0, 4, seed)
                          for c, im, seed in zip(captions, images, (4, 5))])
    inv = mine.invert(images, captions, num_inference_steps=4, generator=[gen(4), gen(5)])
    got = mine(captions, inversion=inv, guidance_scale=6.0, controls=[Pix2PixZero(src, tgt, 0.5)],
               output_type="latent").images
    assert float((got - expected).abs().max()) <= TOL


def test_without_guidance_the_caption_is_edited_too(sd1):
    """Without CFG the reference's ``prompt_embeds_edit[1:2]`` is empty for one image: it
    edits nothing. Ours moves the caption."""
    ref, mine = sd1
    inv = mine.invert(photo(), CAPTION, num_inference_steps=3, seed=0)
    kw = dict(num_inference_steps=3, guidance_scale=1.0, latents=inv.latents.clone(), output_type="latent")
    cat, dog = ref.get_embeds(["a cat"]), ref.get_embeds(["a dog"])
    ref_edit = ref(CAPTION, source_embeds=cat, target_embeds=dog, **kw).images
    ref_plain = ref(CAPTION, source_embeds=cat, target_embeds=cat, **kw).images
    assert float((ref_edit - ref_plain).abs().max()) <= TOL          # the reference's bug
    plain = mine(CAPTION, inversion=inv, guidance_scale=1.0, output_type="latent").images
    edit = mine(CAPTION, inversion=inv, guidance_scale=1.0, controls=[Pix2PixZero("a cat", "a dog")],
                output_type="latent").images
    assert float((edit - plain).abs().max()) > 1e-2


# ---------------------------------------------------------------------------- behaviour
@pytest.fixture(scope="module", params=[("sd2", "v_prediction"), ("sdxl", "epsilon")], ids=["sd2", "sdxl"])
def family(request, tiny_model):
    pipe = ours(tiny_model(request.param[0], prediction_type=request.param[1]))
    inv = pipe.invert([photo(6), photo(7)], ["a cat sitting", "a cat lying"], num_inference_steps=5, seed=0)
    kw = dict(inversion=inv, guidance_scale=5.0, output_type="latent")
    return pipe, kw, pipe(["a cat sitting", "a cat lying"], **kw).images


def test_source_equal_to_target_regenerates_the_image(family):
    pipe, kw, plain = family
    control = Pix2PixZero(["a cat", "a tabby cat"], ["a cat", "a tabby cat"], 0.5)
    got = pipe(["a cat sitting", "a cat lying"], controls=[control], **kw).images
    assert len(control.losses) == 5 and max(float(x) for x in control.losses) <= 1e-12   # grad exactly ~0
    assert float((got - plain).abs().max()) <= 1e-6


def test_edit_changes_the_image_and_keeps_the_maps(family):
    """The tiny random models' attention gradients are small: a large step shows the pull
    (the loss of the embedding move alone is read with a negligible step)."""
    pipe, kw, plain = family
    prompts = ["a cat sitting", "a cat lying"]
    loose, guided = Pix2PixZero("a cat", "a dog", 1e-9), Pix2PixZero("a cat", "a dog", 10.0)
    moved = pipe(prompts, controls=[loose], **kw).images
    edit = pipe(prompts, controls=[guided], **kw).images
    assert float((edit - plain).abs().max()) > 0.1                                    # an edit
    assert float((edit - moved).abs().max()) > 1e-2                                   # guided
    assert float(guided.losses[0]) == float(loose.losses[0]) > 0                      # same start
    assert all(float(g) < float(l) for g, l in zip(guided.losses[1:], loose.losses[1:]))  # maps closer


def test_stochastic_schedulers_share_the_noise(sd1):
    """The reference pass draws the same noise as the edit pass (and gets eta): with
    source == target an ancestral or eta > 0 run is its plain regeneration."""
    _, mine = sd1
    for scheduler, extra in (("euler_a", {}), ("ddim", dict(eta=0.7)), ("dpmpp_2m", {})):
        kw = dict(num_inference_steps=3, scheduler=scheduler, height=64, width=64, guidance_scale=6.0,
                  output_type="latent", **extra)
        plain = mine("a cat", seed=1, **kw).images
        got = mine("a cat", seed=1, controls=[Pix2PixZero("a cat", "a cat", 0.5)], **kw).images
        assert torch.equal(got, plain), scheduler


def test_one_loop_three_evaluations_per_step_only_cross_attention(sd1):
    """Each step: the reference pass, the loss pass, the edit pass; processors only on the
    cross-attention sites, and nothing left attached."""
    _, mine = sd1
    calls, sites = [], []
    hook = mine.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    real = mine.unet.attention_processors

    def spy(processors):
        sites.append(sorted(processors))
        return real(processors)

    mine.unet.attention_processors = spy
    try:
        mine("a cat", num_inference_steps=3, scheduler="ddim", height=64, width=64, seed=0,
             controls=[Pix2PixZero("a cat", "a dog", 0.1)], output_type="latent")
    finally:
        hook.remove()
        del mine.unet.attention_processors
    cross = sorted(attention_sites(mine.unet))
    assert len(calls) == 3 * 3
    assert [s for s in sites if s] == [cross] * 6   # two passes of ours per step; the loop's own call has none
    assert not any(a.processor for a in mine.unet.attention_sites().values())


def test_settings_and_zero_amount(sd1):
    _, mine = sd1
    kw = dict(num_inference_steps=2, scheduler="ddim", height=64, width=64, seed=0, output_type="latent")
    out = mine("a cat", controls=[Pix2PixZero(["a cat"], "a dog", 0.0)], **kw)
    assert out.settings["controls"] == [{"name": "Pix2PixZero", "source": ["a cat"], "target": "a dog",
                                         "cross_attention_guidance_amount": 0.0}]
    same = mine("a cat", controls=[Pix2PixZero("a cat", "a cat", 0.0)], **kw).images
    assert torch.equal(same, mine("a cat", **kw).images)
    desc = Pix2PixZero(torch.zeros(1, 77, 32), "a dog").describe()
    assert "source" not in desc and desc["target"] == "a dog"


# ---------------------------------------------------------------------------- composition
@pytest.fixture(scope="module")
def controlnet(tiny_model, tmp_path_factory):
    import controldiff as cd

    return cd.load_controlnet(build_controlnet(tiny_model("sd1"), tmp_path_factory.mktemp("p2pz-cn")))


def test_composes_with_controlnet_sag_and_pag(sd1, controlnet):
    import controldiff as cd

    _, mine = sd1
    inv = mine.invert(photo(), CAPTION, num_inference_steps=3, seed=0)
    kw = dict(inversion=inv, guidance_scale=6.0, output_type="latent")
    others = lambda: [cd.ControlNet(controlnet, photo(9), scale=0.8), cd.SAG(0.8), cd.PAG(2.0)]  # noqa: E731
    plain = mine(CAPTION, controls=others(), **kw).images
    noop = mine(CAPTION, controls=[Pix2PixZero("a cat", "a cat", 0.0), *others()], **kw).images
    assert torch.equal(noop, plain)
    edit = mine(CAPTION, controls=[Pix2PixZero("a cat", "a dog", 0.5), *others()], **kw).images
    alone = mine(CAPTION, controls=[Pix2PixZero("a cat", "a dog", 0.5)], **kw).images
    assert torch.isfinite(edit).all()
    assert float((edit - plain).abs().max()) > 1e-2 and float((edit - alone).abs().max()) > 1e-2
    # SAG and PAG read or perturb the loop's own call only: their order does not matter
    a = mine(CAPTION, controls=[Pix2PixZero("a cat", "a dog", 0.5), cd.SAG(0.8), cd.PAG(2.0)], **kw).images
    b = mine(CAPTION, controls=[cd.PAG(2.0), cd.SAG(0.8), Pix2PixZero("a cat", "a dog", 0.5)], **kw).images
    assert float((a - b).abs().max()) <= 1e-5
    assert not any(x.processor for x in mine.unet.attention_sites().values())


def test_controlnet_listed_first_is_refused(sd1, controlnet):
    import controldiff as cd

    _, mine = sd1
    with pytest.raises(ValueError, match="controls: list Pix2PixZero before"):
        mine("a cat", num_inference_steps=2, scheduler="ddim", height=64, width=64, seed=0, output_type="latent",
             controls=[cd.ControlNet(controlnet, photo(9)), Pix2PixZero("a cat", "a dog")])


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    (dict(cross_attention_guidance_amount=float("nan")), "cross_attention_guidance_amount: expected a finite"),
    (dict(cross_attention_guidance_amount=float("inf")), "cross_attention_guidance_amount: expected a finite"),
    (dict(cross_attention_guidance_amount=-0.1), "cross_attention_guidance_amount: expected a finite number >= 0"),
    (dict(cross_attention_guidance_amount=True), "cross_attention_guidance_amount"),
    (dict(source=[]), "source: expected a prompt, a non-empty list"),
    (dict(target=["a dog", 3]), "target: expected a prompt"),
    (dict(source=3), "source: expected a prompt"),
    (dict(source=torch.zeros(77, 32)), r"source: expected float embeddings \(prompts, tokens, width\)"),
    (dict(target=torch.full((1, 77, 32), float("nan"))), "target: the embeddings contain NaN"),
    (dict(source=torch.zeros(1, 77, 32), target=torch.zeros(1, 77, 16)), "source, target: embeddings of shape"),
])
def test_bad_arguments(kw, match):
    args = {"source": "a cat", "target": "a dog", **kw}
    with pytest.raises(ValueError, match=match):
        Pix2PixZero(**args)


class _Counter:
    def __init__(self, pipe):
        self.n = 0
        self.hook = pipe.unet.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


def test_embedding_width_is_checked_before_step_0(sd1):
    _, mine = sd1
    counter = _Counter(mine)
    try:
        with pytest.raises(ValueError, match="source: embeddings of width 16; this model's text conditioning is 32"):
            mine("a cat", num_inference_steps=2, controls=[Pix2PixZero(torch.zeros(1, 77, 16), torch.zeros(1, 77, 16))])
    finally:
        counter.hook.remove()
    assert counter.n == 0


def test_model_without_cross_attention_is_refused_before_step_0(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "no-cross"
    shutil.copytree(tiny_model("sd1"), folder)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                                          down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
                                          mid_block_type=None, layers_per_block=1, norm_num_groups=8,
                                          cross_attention_dim=32)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    pipe = ours(folder)
    assert attention_sites(pipe.unet) == []
    counter = _Counter(pipe)
    with pytest.raises(ValueError, match="controls: Pix2PixZero reads cross-attention maps, and this UNet has no"):
        pipe("a cat", num_inference_steps=2, controls=[Pix2PixZero("a cat", "a dog")])
    assert counter.n == 0


def test_diverging_amount_is_named(sd1):
    _, mine = sd1
    with pytest.raises(ValueError, match=r"cross_attention_guidance_amount: 1e\+30 made the latents diverge "
                                         r"\(NaN or infinite at step 1 of 3"):
        mine("a cat", num_inference_steps=3, scheduler="ddim", height=64, width=64, seed=0, output_type="latent",
             controls=[Pix2PixZero("a cat", "a dog", 1e30)])


def test_with_lora_embeddings_weighted_caption_and_controlnet_in_the_inversion(tiny_model, controlnet, tmp_path):
    """The loaders and prompt syntax reach both passes and the inversion; a ControlNet may
    guide the inversion too. Each ingredient changes the edit; unloading restores it."""
    import controldiff as cd
    from safetensors.torch import save_file
    from test_composition import _kohya_lora

    mine = ours(tiny_model("sd1"))
    save_file({"<toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(7)) * 2},
              str(tmp_path / "toy.safetensors"))
    caption = "a (<toy>:1.3) cat sitting on the [grass]"

    def edit(**kw):
        inv = mine.invert(photo(), caption, num_inference_steps=3, seed=0, guidance_scale=3.0, **kw)
        return mine(caption, inversion=inv, guidance_scale=6.0, output_type="latent",
                    controls=[Pix2PixZero("a cat", "a dog", 0.5)]).images

    base = edit()
    guided = edit(controls=[cd.ControlNet(controlnet, photo(9), scale=0.8)])
    mine.load_textual_inversion(tmp_path / "toy.safetensors")
    with_ti = edit()
    mine.load_lora(_kohya_lora(mine, tmp_path / "style.safetensors"), weight=0.8)
    both = edit()
    assert torch.isfinite(both).all()
    for a, b in ((guided, base), (with_ti, base), (both, with_ti)):
        assert float((a - b).abs().max()) > 1e-3
    mine.unload_lora()
    mine.unload_textual_inversion()
    assert torch.equal(edit(), base)
