"""DiffEdit: ``pipe.diffedit_mask`` and the ``DiffEdit`` control.

Parity on SD1 with diffusers' ``StableDiffusionDiffEditPipeline`` (``generate_mask`` in
several settings, and the whole edit: mask + ``invert`` + ``__call__`` with
``inpaint_strength``), DDIM for both. No reference exists for SD2 (v-prediction) and
SDXL: behaviour tests there, that fail if the feature is wrong: the mask lies where the
two prompts' predictions differ (a UNet whose prompt only matters in one quadrant), the
edit keeps the inverted image outside the mask exactly, an all-ones mask equals plain
generation from the inversion. Composition with SAG, PAG, ControlNet, LoRA, textual
inversion and weighted prompts in one call; errors before step 0.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
import diffusers
from controldiff.controls.diffedit import DiffEdit
from pipes import ours, reference
from tiny_models import build_controlnet
from pictures import photo

TOL = 1e-4


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return tiny_model("sd1")


@pytest.fixture(scope="module")
def ref(sd1):
    pipe = reference("StableDiffusionDiffEditPipeline", sd1)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.inverse_scheduler = diffusers.DDIMInverseScheduler.from_config(pipe.scheduler.config)
    return pipe


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("images, source, target, kw", [
    (photo(1), "a cat", "a dog", dict(num_maps_per_mask=3, mask_encode_strength=0.5, mask_thresholding_ratio=3.0,
                                      guidance_scale=7.5, num_inference_steps=10)),
    (photo(2), "a cat", "a dog", dict(num_maps_per_mask=1, mask_encode_strength=1.0, mask_thresholding_ratio=1.5,
                                      guidance_scale=2.0, num_inference_steps=4)),
    (photo(3), "a bowl of fruit", "a bowl of pears", dict(num_maps_per_mask=5, mask_encode_strength=0.3,
                                                          mask_thresholding_ratio=2.0, guidance_scale=5.0,
                                                          num_inference_steps=10)),
    (photo(1), ["a cat", "a bowl"], ["a dog", "a vase"], dict(num_maps_per_mask=2, mask_thresholding_ratio=2.5,
                                                              num_inference_steps=8)),
    ([photo(1), photo(4, 48)], ["a cat", "a bowl"], ["a dog", "a vase"], dict(num_maps_per_mask=2,
                                                                              num_inference_steps=6)),
])
def test_mask_equals_generate_mask(ref, sd1, images, source, target, kw):
    expected = ref.generate_mask(image=images, source_prompt=source, target_prompt=target, generator=gen(2), **kw)
    got = ours(sd1).diffedit_mask(images, source, target, seed=2, **kw)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (len(as_list(target)), 8, 8)
    assert 0 < expected.mean() < 1, "a trivial mask compares nothing"
    assert (got - torch.from_numpy(expected).float()).abs().max() <= TOL


def test_mask_with_a_generator_per_draw_equals_generate_mask(ref, sd1):
    images, source, target = [photo(1), photo(2)], ["a cat", "a bowl"], ["a dog", "a vase"]
    kw = dict(num_maps_per_mask=3, num_inference_steps=6, mask_thresholding_ratio=2.0)
    expected = ref.generate_mask(image=images, source_prompt=source, target_prompt=target,
                                 generator=[gen(i) for i in range(6)], **kw)
    got = ours(sd1).diffedit_mask(images, source, target, generator=[gen(i) for i in range(6)], **kw)
    assert 0 < expected.mean() < 1 and torch.equal(got, torch.from_numpy(expected).float())


def as_list(p):
    return [p] if isinstance(p, str) else p


def test_reference_swaps_each_prompt_with_its_negative(ref, sd1):
    """The reference unpacks ``encode_prompt``'s (prompt, negative) as (negative, prompt): it
    guides from each prompt towards its negative prompt. With equal negatives (the default)
    that only scales the difference, which the relative threshold cancels; with different
    ones its mask is ours with the roles swapped."""
    kw = dict(num_inference_steps=10, num_maps_per_mask=2, mask_thresholding_ratio=2.0)
    expected = ref.generate_mask(image=photo(1), source_prompt="a cat", target_prompt="a dog",
                                 source_negative_prompt="blurry", target_negative_prompt="dark", generator=gen(2), **kw)
    pipe = ours(sd1)
    swapped = pipe.diffedit_mask(photo(1), "blurry", "dark", source_negative_prompt="a cat",
                                 target_negative_prompt="a dog", seed=2, **kw)
    mine = pipe.diffedit_mask(photo(1), "a cat", "a dog", source_negative_prompt="blurry",
                              target_negative_prompt="dark", seed=2, **kw)
    assert torch.equal(swapped, torch.from_numpy(expected).float())
    assert not torch.equal(mine, swapped)


@pytest.mark.parametrize("strength", [0.8, 0.5])
def test_edit_equals_diffedit_pipeline(ref, sd1, strength):
    images, source, target, steps = [photo(1), photo(2)], ["a cat", "a bowl"], ["a dog", "a vase"], 6
    mask_ref = ref.generate_mask(image=images, source_prompt=source, target_prompt=target, num_maps_per_mask=2,
                                 num_inference_steps=steps, generator=gen(3))
    inv_ref = ref.invert(prompt=source, image=images, num_inference_steps=steps, inpaint_strength=strength,
                         guidance_scale=3.0, generator=gen(4)).latents
    expected = ref(prompt=target, mask_image=mask_ref, image_latents=inv_ref, inpaint_strength=strength,
                   num_inference_steps=steps, guidance_scale=7.5, output_type="np").images

    pipe = ours(sd1)
    mask = pipe.diffedit_mask(images, source, target, num_maps_per_mask=2, num_inference_steps=steps, seed=3)
    inv = pipe.invert(images, source, num_inference_steps=steps, strength=strength, guidance_scale=3.0, seed=4)
    got = pipe(target, inversion=inv, controls=[DiffEdit(mask, inv)], guidance_scale=7.5, output_type="np").images
    plain = pipe(target, inversion=inv, guidance_scale=7.5, output_type="np").images
    assert torch.equal(mask, torch.from_numpy(mask_ref).float()) and 0 < mask.mean() < 1
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - plain).max() > 1e-2, "DiffEdit had no effect"


def test_masks_as_pil_arrays_and_pixel_size(sd1):
    """The mask may be edited or made by hand: a latent-size array, or a pixel-size PIL
    image (resized to the latents by nearest neighbour) give the same edit."""
    pipe = ours(sd1)
    inv = pipe.invert(photo(1), "a cat", num_inference_steps=4, strength=0.8, seed=0)
    latent = torch.zeros(8, 8)
    latent[2:6, 1:5] = 1.0
    pil = PIL.Image.fromarray((latent.numpy() * 255).astype(np.uint8)).resize((64, 64), PIL.Image.NEAREST)
    kw = dict(inversion=inv, output_type="latent")
    out = [pipe("a dog", controls=[DiffEdit(m, inv)], **kw).images
           for m in (latent, latent.numpy(), pil, np.asarray(pil) / 255.0, latent[None, None])]
    for other in out[1:]:
        assert torch.equal(other, out[0])
    assert torch.equal(out[0][..., latent == 0], inv.trajectory[:, -1][..., latent == 0])


# ---------------------------------------------------------------------------- behaviour
FAMILIES = [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")]


def localise_prompts(pipe, window: torch.Tensor, monkeypatch):
    """Make the UNet's prompt matter only inside ``window`` (latent pixels): outside it the
    prediction is the one for a fixed prompt, so two prompts' predictions differ only there."""
    fixed = pipe.prompt_encoder.encode(["a photo"]).to(pipe.device, pipe.dtype)
    forward = pipe.unet.forward

    def local(x, t, embeds, *, added_cond_kwargs=None, **kw):
        n = x.shape[0]
        base_kw = dict(added_cond_kwargs) if added_cond_kwargs else None
        if base_kw:
            base_kw["text_embeds"] = fixed.pooled.expand(n, -1)
        out = forward(x, t, embeds, added_cond_kwargs=added_cond_kwargs, **kw)
        base = forward(x, t, fixed.embeds.expand(n, -1, -1), added_cond_kwargs=base_kw, **kw)
        return torch.where(window.to(x.device), out, base)

    monkeypatch.setattr(pipe.unet, "forward", local)


@pytest.mark.parametrize("family, prediction", FAMILIES)
def test_mask_lies_where_the_prompts_differ(tiny_model, monkeypatch, family, prediction):
    pipe = ours(tiny_model(family, prediction_type=prediction))
    kw = dict(num_maps_per_mask=2, num_inference_steps=10, seed=1)
    free = pipe.diffedit_mask(photo(1), "a cat", "a dog", **kw)
    # the threshold is relative: a larger ratio keeps a subset of the pixels
    loose = pipe.diffedit_mask(photo(1), "a cat", "a dog", mask_thresholding_ratio=1.5, **kw)
    assert bool((free <= loose).all()) and loose.sum() > free.sum() > 0
    # identical prompts: nothing differs, nothing to repaint (the reference's 0/0 marks everything)
    assert pipe.diffedit_mask(photo(1), "a cat", "a cat", **kw).sum() == 0
    for rows, cols in ((slice(0, 4), slice(0, 4)), (slice(4, 8), slice(3, 7))):
        window = torch.zeros(8, 8, dtype=torch.bool)
        window[rows, cols] = True
        with monkeypatch.context() as m:
            localise_prompts(pipe, window, m)
            mask = pipe.diffedit_mask(photo(1), "a cat", "a dog", **kw)[0]
        assert mask[~window].sum() == 0, "mask outside the region where the prompts matter"
        assert mask[window].mean() >= 0.5, mask


@pytest.mark.parametrize("family, prediction", FAMILIES)
def test_edit_keeps_the_image_outside_the_mask(tiny_model, family, prediction):
    pipe = ours(tiny_model(family, prediction_type=prediction))
    inv = pipe.invert(photo(2), "a red house", num_inference_steps=5, strength=0.8, seed=0)
    mask = pipe.diffedit_mask(photo(2), "a red house", "a blue boat", num_maps_per_mask=2, num_inference_steps=5,
                              mask_thresholding_ratio=2.0, seed=0)
    assert 0 < mask.mean() < 1
    kw = dict(inversion=inv, output_type="latent", guidance_scale=5.0)
    edit = pipe("a blue boat", controls=[DiffEdit(mask, inv)], **kw).images
    plain = pipe("a blue boat", **kw).images
    keep, repaint = mask[0] == 0, mask[0] == 1
    last = inv.trajectory[:, -1]
    assert torch.equal(edit[..., keep], last[..., keep])             # the image, exactly
    assert (edit[..., repaint] - last[..., repaint]).abs().max() > 1e-2  # the edit
    assert (plain[..., keep] - last[..., keep]).abs().max() > 1e-2       # without DiffEdit it would change
    assert torch.equal(pipe("a blue boat", controls=[DiffEdit(torch.ones(8, 8), inv)], **kw).images, plain)
    assert torch.equal(pipe("a blue boat", controls=[DiffEdit(torch.zeros(8, 8), inv)], **kw).images, last)


def test_batch_and_images_per_prompt(sd1):
    """Each inverted image keeps its own mask; one inverted image spreads over several images."""
    pipe = ours(sd1)
    inv = pipe.invert([photo(1), photo(2)], ["a cat", "a bowl"], num_inference_steps=4, seed=0)
    mask = torch.zeros(2, 8, 8)
    mask[0, :4], mask[1, :, 4:] = 1, 1
    out = pipe(["a dog", "a vase"], inversion=inv, controls=[DiffEdit(mask, inv)], output_type="latent",
               seed=0).images
    for r in range(2):
        keep = mask[r] == 0
        assert torch.equal(out[r][:, keep], inv.trajectory[r, -1][:, keep])
    one = pipe.invert(photo(1), "a cat", num_inference_steps=4, seed=0)
    out = pipe("a dog", inversion=one, controls=[DiffEdit(mask[:1], one)], num_images_per_prompt=2,
               output_type="latent", seed=0).images
    keep = mask[0] == 0
    assert out.shape[0] == 2 and all(torch.equal(out[r][:, keep], one.trajectory[0, -1][:, keep]) for r in range(2))


# ---------------------------------------------------------------------------- composition
@pytest.fixture(scope="module")
def controlnet(tiny_model, tmp_path_factory):
    import controldiff as cd

    return cd.load_controlnet(build_controlnet(tiny_model("sd1"), tmp_path_factory.mktemp("cn-diffedit")))


def test_composes_with_sag_pag_controlnet_lora_embeddings_and_weights(sd1, controlnet, tmp_path):
    from safetensors.torch import save_file
    from test_composition import _control_image, _kohya_lora

    pipe = ours(sd1)
    lora = pipe.load_lora(_kohya_lora(pipe, tmp_path / "style.safetensors"), weight=0.8)
    save_file({"<toy>": torch.randn(2, 32, generator=gen(7)) * 2}, str(tmp_path / "toy.safetensors"))
    pipe.load_textual_inversion(tmp_path / "toy.safetensors")
    source, target = "a <toy> on a mat", "a (<toy>:1.3) dog on a [mat]"
    inv = pipe.invert(photo(1), source, num_inference_steps=4, strength=0.8, seed=0)
    mask = pipe.diffedit_mask(photo(1), source, target, num_maps_per_mask=2, num_inference_steps=4, seed=0,
                              mask_thresholding_ratio=1.5)
    assert 0 < mask.mean() < 1
    edit = DiffEdit(mask, inv)
    others = {"SAG": cd.SAG(scale=0.8), "PAG": cd.PAG(scale=2.0),
              "ControlNet": cd.ControlNet(controlnet, _control_image((64, 64)), scale=0.8)}
    kw = dict(inversion=inv, output_type="latent", seed=0)
    out = pipe(target, controls=[edit, *others.values()], **kw)
    full, keep = out.images, mask[0] == 0
    assert torch.equal(full[..., keep], inv.trajectory[:, -1][..., keep])
    assert out.settings["controls"][0]["name"] == "DiffEdit"
    for name in others:
        rest = [c for n, c in others.items() if n != name]
        assert (pipe(target, controls=[edit, *rest], **kw).images - full).abs().max() > 1e-4, name
    unweighted = pipe("a <toy> dog on a mat", controls=[edit, *others.values()], **kw).images
    assert (unweighted - full).abs().max() > 1e-4
    pipe.set_lora_weights({lora: 0.0})
    assert (pipe(target, controls=[edit, *others.values()], **kw).images - full).abs().max() > 1e-4
    # zero strengths equal no control
    zero = [cd.SAG(scale=0.0), cd.PAG(scale=0.0), cd.ControlNet(controlnet, _control_image((64, 64)), scale=0.0)]
    torch.testing.assert_close(pipe(target, controls=[edit, *zero], **kw).images,
                               pipe(target, controls=[edit], **kw).images, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    (dict(num_maps_per_mask=0), "num_maps_per_mask: expected a positive integer"),
    (dict(mask_encode_strength=0.0), r"mask_encode_strength: expected a value in \(0, 1\]"),
    (dict(mask_encode_strength=1.5), r"mask_encode_strength: expected a value in \(0, 1\]"),
    (dict(mask_encode_strength=0.05, num_inference_steps=10), "mask_encode_strength: 0.05 with 10 steps"),
    (dict(mask_thresholding_ratio=0.0), "mask_thresholding_ratio: expected a number > 0"),
    (dict(mask_thresholding_ratio=float("nan")), "mask_thresholding_ratio: expected a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale: expected a finite number"),
    (dict(num_inference_steps=0), "num_inference_steps: expected a positive integer"),
    (dict(source_prompt=["a", "b", "c"]), "source_prompt: got 3 prompts for 2 target prompts"),
    (dict(source_negative_prompt=["a", "b", "c"]), "source_negative_prompt: got 3 prompts"),
    (dict(image=[photo(1)] * 3), "image: got 3 images for 2 target prompts"),
    (dict(scheduler="ddim2"), "scheduler: unknown name"),
    (dict(seed=1, generator=gen(1)), "generator, seed: pass one"),
    (dict(generator=[gen(1)] * 3), "generator: got a list of 3 generators"),
    (dict(target_prompt=3), "target_prompt: expected a string"),
    (dict(target_prompt=["a \udcff dog", "b"]), "target_prompt: not valid UTF-8"),
    (dict(source_negative_prompt="\udcff"), "source_negative_prompt: not valid UTF-8"),
])
def test_bad_mask_arguments(pipe, no_work, kw, match):
    args = {**dict(image=photo(1), source_prompt="a cat", target_prompt=["a dog", "a cow"]), **kw}
    with pytest.raises(ValueError, match=match):
        pipe.diffedit_mask(**args)


@pytest.fixture
def counted(pipe, monkeypatch):
    """Counts UNet evaluations: the control's errors come before step 0."""
    calls = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def test_bad_control_arguments(pipe):
    inv = pipe.invert(photo(1), "a cat", num_inference_steps=4, seed=0)
    with pytest.raises(ValueError, match=r"mask: size \(5, 5\) \(h, w\) is neither the inverted image's \(64, 64\)"):
        DiffEdit(torch.ones(5, 5), inv)
    with pytest.raises(ValueError, match=r"mask: size \(48, 48\)"):  # an image and a mask of different sizes
        DiffEdit(photo(1, 48).convert("L"), inv)
    with pytest.raises(ValueError, match="mask: expected values in"):
        DiffEdit(torch.full((8, 8), 2.0), inv)
    with pytest.raises(ValueError, match="inversion: expected what pipe.invert"):
        DiffEdit(torch.ones(8, 8), inv.latents)
    ddpm = pipe.invert(photo(1), "a cat", num_inference_steps=2, method="ddpm", seed=0)
    with pytest.raises(ValueError, match="inversion: DiffEdit follows a DDIM inversion's trajectory"):
        DiffEdit(torch.ones(8, 8), ddpm)


def test_generation_must_be_the_inversions(pipe, tiny_model, counted):
    inv = pipe.invert(photo(1), "a cat", num_inference_steps=4, strength=0.5, seed=0)
    small = pipe.invert(photo(1, 32), "a cat", num_inference_steps=4, strength=0.5, seed=0)
    longer = pipe.invert(photo(1), "a cat", num_inference_steps=6, strength=0.5, seed=0)
    other = ours(tiny_model("sd1", seed=1)).invert(photo(1), "a cat", num_inference_steps=4, strength=0.5, seed=0)
    mask = torch.ones(8, 8)
    counted.clear()
    steps = r"inversion: DiffEdit's inversion has 2 steps \(4 at strength 0.5\), this generation runs"
    cases = [  # (the control's inversion, the generation's arguments, the error)
        (inv, dict(), "inversion: DiffEdit's inversion was made for the scheduler 'ddim', this generation uses 'pndm'"),
        (inv, dict(scheduler="ddim"), steps + " 50"),
        (inv, dict(inversion=small), "inversion: DiffEdit's inversion is 64x64, this generation 32x32"),
        (inv, dict(inversion=longer), steps + " 3"),
        (other, dict(inversion=inv), "inversion: this generation does not start from DiffEdit's inversion"),
        (inv, dict(scheduler="ddim", num_inference_steps=4, image=photo(1), strength=0.5),
         "inversion: this generation does not start from DiffEdit's inversion"),
        (inv, dict(inversion=other), "inversion: made with the model"),
        (inv, dict(inversion=inv, num_inference_steps=5), "num_inference_steps: 5 differs from the inversion's 4"),
    ]
    for control_inv, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe("a dog", controls=[DiffEdit(mask, control_inv)], **kw)
    assert counted == [], "a UNet evaluation ran before the error"
    with pytest.raises(ValueError, match="mask: 3 images cannot be spread over a batch of 2"):
        pipe(["a dog", "a cow"], inversion=inv, controls=[DiffEdit(torch.ones(3, 8, 8), inv)])
    assert counted == []
