"""A1111 prompt editing ``[a:b:when]``, alternation ``[a|b]`` and ``AND``.

The parser is compared with A1111's own functions (``reference/a1111_prompt_parser.py``, its
lark grammar); generation with a reference loop written from diffusers' UNet, ControlNet,
scheduler and prompt encoding that switches and sums the conditioning per step as A1111's
``CFGDenoiser`` does (``reconstruct_cond_batch`` / ``reconstruct_multicond_batch``, then
``uncond + sum_i (cond_i - uncond) * w_i * cfg``).
"""
from __future__ import annotations

import random

import pytest
import torch

import controldiff as cd
from controldiff.schedulers import DIFFUSERS_EQUIVALENT
from controldiff.text.prompt_schedule import prompt_schedule, split_and

import diffusers  # the oracle
from pipes import ours
from reference.a1111_prompt_parser import (get_learned_conditioning_prompt_schedules, get_multicond_prompt_list,
                                           schedule_index)
from tiny_models import build_controlnet

TOL = 1e-4

# A1111's doctests, and prompts as people write them
PROMPTS = [
    "test", "a [b:3]", "a [b: 3]", "a [[[b]]:2]", "[(a:2):3]", "a [b : c : 1] d", "a[b:[c:d:2]:1]e",
    "a [unbalanced", "a [b:.5] c", "a [{b|d{:.5] c", "((a][:b:c [d:3]", "[a|(b:1.1)]", "[fe|]male",
    "[fe|||]male", "a [b:1.5] c",
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
    "[ in background:0.25] [shoddy:masterful:0.5]",
    "a photo of a [cat:dog:10], (masterpiece:1.2), [[detailed]]", "[red|green|blue] ball", "[a:b:1.0]",
    "[a:b:0]", "[a:b:-3]", "[a:b:1e1]", "[a:b:0.5 ]", "a | b", "(a|b)", "[a|b", "\\[a:b:2\\]", "[a\\:b:c:2]",
    "trailing \\", "[[cat|dog]:[bird|fish]:0.5]", "(a [b|c]:1.3)", "[a::3] [b:c:5]", "[(x:1.2):(y:0.8):4]",
    "line\n[break:here:2]", "a [b:c:1]]", "[[a:b:2]", "[a:b:c]", "[a:b]", "[:b:3]", "[a::]", "[|]",
]


def _well_formed(rng: random.Random, depth: int = 0) -> str:
    """Random nested editing, alternation and emphasis: prompts with one reading in the grammar."""
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(["a", "b c", " ", "x\\[", "\\)", "1.5", ",", "AND", "\n", "\\:", "e"])
    if r < 0.45:
        return (f"[{_well_formed(rng, depth + 1)}:{_well_formed(rng, depth + 1)}:"
                + rng.choice(["2", " .5", "0.3 ", "7", "1e1", "-1", "0", "1.", "+3"]) + "]")
    if r < 0.55:
        return f"[{_well_formed(rng, depth + 1)}:" + rng.choice(["3", " 0.5 ", "2"]) + "]"
    if r < 0.65:
        return "[" + "|".join(_well_formed(rng, depth + 1) for _ in range(rng.randint(1, 3))) + "]"
    if r < 0.75:
        return "(" + _well_formed(rng, depth + 1) + rng.choice(["", ":1.2", ":" + _well_formed(rng, depth + 1)]) + ")"
    if r < 0.8:
        return f"[{_well_formed(rng, depth + 1)}]"
    if r < 0.85:
        return f"[{_well_formed(rng, depth + 1)}::" + rng.choice(["4", "0.25"]) + "]"
    return _well_formed(rng, depth + 1) + _well_formed(rng, depth + 1)


def _a1111(prompt, steps):
    return [tuple(entry) for entry in get_learned_conditioning_prompt_schedules([prompt], steps)[0]]


@pytest.mark.parametrize("steps", [1, 4, 10, 20])
def test_schedules_equal_a1111(steps):
    for p in PROMPTS:
        assert prompt_schedule(p, steps) == _a1111(p, steps), p


def test_random_well_formed_prompts_equal_a1111():
    rng = random.Random(0)
    for _ in range(400):
        p = "".join(_well_formed(rng) for _ in range(rng.randint(1, 4)))
        steps = rng.choice([1, 3, 10, 20])
        assert prompt_schedule(p, steps) == _a1111(p, steps), p


def test_random_short_strings_equal_a1111():
    """Brackets, colons, pipes, numbers and escapes in any order, stray ones included."""
    rng = random.Random(1)
    alphabet = list("ab ") + ["[", "]", "(", ")", ":", "|", "1", "0.5", "3", " 2 ", "\\", "e", "-", "."]
    for _ in range(1500):
        p = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        steps = rng.choice([1, 4, 10])
        assert prompt_schedule(p, steps) == _a1111(p, steps), p


def test_and_split_equals_a1111():
    prompts = ["a cat AND a dog", "a cat:1.2 AND a dog : 0.5", "a cat AND", "AND", "ANDROID AND x:-1",
               "a [b AND c:3]", "a cat:2", "weight at end: 1.", "x:.5 AND y:+2 AND z", "multi\nline:0.3",
               "(a:1.1) AND [b:c:2]:0.9", "BAND ANDY"]
    indexes, flat, _ = get_multicond_prompt_list(prompts)
    for p, entries in zip(prompts, indexes):
        assert split_and(p) == [(flat[i], w) for i, w in entries], p


# ---------------------------------------------------------------------------- generation
FAMILY_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module")
def models(tiny_model):
    cache = {}

    def get(family):
        if family not in cache:
            kw = {"prediction_type": "v_prediction"} if family == "sd2" else {}
            path = tiny_model(family, **kw)
            ref = getattr(diffusers, FAMILY_CLASS[family]).from_pretrained(
                path, **({} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}))
            cache[family] = (path, ref, ours(path))
        return cache[family]

    return get


def _encode(ref, text):
    """diffusers' encoding of one plain text: (embeds (1, 77, D), pooled or None)."""
    out = ref.encode_prompt(text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out[0], (out[2] if len(out) == 4 else None)


def reference_loop(ref, prompts, negatives, steps, cfg, latents, scheduler, size, controlnet=None):
    """A1111's composable, scheduled conditioning on diffusers parts (k-diffusion's denoised
    is affine in the model output, so combining model outputs combines denoised)."""
    cls, extra = DIFFUSERS_EQUIVALENT[scheduler]
    sched = getattr(diffusers, cls).from_config(ref.scheduler.config, **extra)
    sched.set_timesteps(steps)
    indexes, flat, _ = get_multicond_prompt_list(prompts)
    cond_schedules = get_learned_conditioning_prompt_schedules(flat, steps)
    neg_schedules = get_learned_conditioning_prompt_schedules(negatives, steps)
    cache = {}

    def enc(text):
        if text not in cache:
            cache[text] = _encode(ref, text)
        return cache[text]

    def pick(schedule, i):
        return enc(schedule[schedule_index(schedule, i)][1])

    x = latents * sched.init_noise_sigma
    h, w = size
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            rows, weights, owner = [], [], []
            for b, entries in enumerate(indexes):
                for index, weight in entries:
                    rows.append(pick(cond_schedules[index], i))
                    weights.append(weight)
                    owner.append(b)
            uncond = [pick(s, i) for s in neg_schedules]
            texts = rows + uncond
            x_in = torch.cat([x[b:b + 1] for b in owner] + [x])
            x_in = sched.scale_model_input(x_in, t)
            embeds = torch.cat([e for e, _ in texts])
            kw = {}
            if texts[0][1] is not None:
                pooled = torch.cat([p for _, p in texts])
                kw["added_cond_kwargs"] = {"text_embeds": pooled,
                                           "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * len(texts), dtype=x.dtype)}
            if controlnet is not None:
                net, image, scale = controlnet
                down, mid = net(x_in, t, encoder_hidden_states=embeds, controlnet_cond=image.repeat(len(texts), 1, 1, 1),
                                conditioning_scale=scale, return_dict=False, **kw)
                kw.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out = ref.unet(x_in, t, encoder_hidden_states=embeds, return_dict=False, **kw)[0]
            u = out[len(rows):]
            pred = u.clone()
            for k, (b, weight) in enumerate(zip(owner, weights)):
                pred[b] += (out[k] - u[b]) * (weight * cfg)
            x = sched.step(pred, t, x).prev_sample
    return x


def _latents(batch, seed=0, size=(64, 64)):
    return torch.randn(batch, 4, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(seed))


CASES = {
    # editing, both ways of writing when, nested, with a scheduled negative prompt
    "edit": (["a red [cat:dog:0.5] on a [mat:2]"], ["[blurry:ugly:1]"], 7.0, "euler"),
    "nested": (["a[b c:[dog|bird]:2] [x::3]"], [""], 5.0, "ddim"),
    "alternate": (["[a cat|a dog|a bird] in snow"], ["low quality"], 6.0, "dpmpp_2m"),
    # composition: weights, a weight without AND, a batch whose prompts have different part counts
    "and": (["a cat AND a dog:0.6 AND a hat:-0.3"], [""], 7.0, "euler"),
    "and_batch": (["a cat:1.4", "[a dog:a fox:0.5] AND snow:0.5"], ["", "dark"], 5.0, "euler"),
    # a 2nd-order scheduler: A1111 counts each model evaluation as a step
    "heun": (["[a cat:a dog:2] AND [red|blue]:0.7"], [""], 6.0, "heun"),
    # composition without CFG (A1111 composes around uncond even at scale 1)
    "and_cfg1": (["a cat AND a dog:0.5"], ["ugly"], 1.0, "euler"),
}


# every case on SD1; editing and composition on SD2 (v-prediction) and SDXL
RUNS = [(c, "sd1") for c in CASES] + [(c, f) for f in ("sd2", "sdxl") for c in ("edit", "and_batch")]


@pytest.mark.parametrize("case, family", RUNS)
def test_generation_equals_reference_loop(models, case, family):
    path, ref, pipe = models(family)
    prompts, negatives, cfg, scheduler = CASES[case]
    steps = 4
    x = _latents(len(prompts))
    expected = reference_loop(ref, prompts, negatives, steps, cfg, x, scheduler, (64, 64))
    got = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=cfg,
               scheduler=scheduler, latents=x, output_type="latent").images
    plain_text = [p.replace("[", "").replace("]", "").replace("AND", "and") for p in prompts]
    plain = pipe(plain_text, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=cfg,
                 scheduler=scheduler, latents=x, output_type="latent").images
    assert (got - plain).abs().max() > 1e-3, "the syntax was read as plain text"
    assert float((got - expected).abs().max()) <= TOL


# ---------------------------------------------------------------------------- composition
def _run(pipe, prompt, x, **kw):
    kw = {"num_inference_steps": 4, "guidance_scale": 6.0, "scheduler": "euler", "output_type": "latent", **kw}
    return pipe(prompt, latents=x, **kw).images


def _control_tensor(size=(64, 64), seed=0):
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt", ["a [red:blue:0.5] [cat|dog]", "a cat AND [snow:rain:2]:0.7"])
def test_with_controlnet_equals_reference_loop(models, tmp_path, prompt):
    path, ref, pipe = models("sd1")
    net_dir = build_controlnet(path, tmp_path / "cn")
    image = _control_tensor()
    x = _latents(1)
    expected = reference_loop(ref, [prompt], ["ugly"], 4, 6.0, x, "euler", (64, 64),
                              controlnet=(diffusers.ControlNetModel.from_pretrained(net_dir), image, 0.8))
    got = _run(pipe, prompt, x, negative_prompt="ugly", controls=[cd.ControlNet(cd.load_controlnet(net_dir), image,
                                                                                scale=0.8)])
    assert float((got - expected).abs().max()) <= TOL


class _Probe(cd.Control):
    """Records the "cond" text each step's branches are built from."""

    def __init__(self):
        self.seen = []

    def branches(self, ctx, step):
        self.seen.append(ctx.text["cond"].embeds[0].clone())
        return []


def test_each_step_sees_its_text_with_sega(models):
    """Controls reading the prompt see the step's text; SEGA still acts on the edited prompt."""
    _, _, pipe = models("sd1")
    x = _latents(1)
    sega = [cd.SEGA([cd.Concept("smiling", scale=5.0, warmup=0)])]
    probe = _Probe()
    edited = _run(pipe, "a [cat:dog:2] on a mat", x, controls=[*sega, probe])
    a, b = (pipe.prompt_encoder.encode([t]).embeds[0] for t in ("a cat on a mat", "a dog on a mat"))
    # A1111 counts from 0: "[cat:dog:2]" reads "cat" at steps 0, 1 and 2, then "dog"
    assert [torch.equal(e, a) for e in probe.seen] == [True, True, True, False]
    assert torch.allclose(probe.seen[3], b, atol=1e-6)
    never = _run(pipe, "a [cat:dog:100] on a mat", x, controls=sega)   # "when" beyond the run: always "cat"
    torch.testing.assert_close(never, _run(pipe, "a cat on a mat", x, controls=sega), atol=1e-6, rtol=0)
    assert (edited - never).abs().max() > 1e-3
    assert (edited - _run(pipe, "a [cat:dog:2] on a mat", x)).abs().max() > 1e-3, "SEGA had no effect"


def test_and_with_a_region_covering_the_image_is_the_region_prompt(models):
    """Regions guide from the composed prediction: a weight-1 region over the whole image
    replaces the AND prompt entirely, as it replaces a plain one."""
    _, _, pipe = models("sd1")
    x = _latents(1)
    region = cd.Region("a red house", weight=1.0)
    got = _run(pipe, "a cat AND a dog:0.6", x, negative_prompt="ugly", controls=[cd.Regions([region])])
    alone = _run(pipe, "a red house", x, negative_prompt="ugly")
    torch.testing.assert_close(got, alone, atol=TOL, rtol=0)
    half = _run(pipe, "a cat AND a dog:0.6", x, negative_prompt="ugly",
                controls=[cd.Regions([cd.Region("a red house", box=(0, 0, 32, 64))])])
    assert (half - alone).abs().max() > 1e-3
    assert (half - _run(pipe, "a cat AND a dog:0.6", x, negative_prompt="ugly")).abs().max() > 1e-3


def test_and_in_multidiffusion_views_weights_each_prompt(models):
    """Views of a 2-prompt batch: without overlap each view equals generating its crop alone."""
    _, _, pipe = models("sd1")
    prompts, negatives = ["a cat AND a dog:0.4", "[a fox:a hen:1]:1.5 AND rain:-0.5"], ["", "dark"]
    x = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(2))
    wide = _run(pipe, prompts, x, negative_prompt=negatives, width=128, height=64,
                controls=[cd.MultiDiffusion(window=64, stride=64)])
    for left in (0, 8):
        crop = _run(pipe, prompts, x[..., left:left + 8].contiguous(), negative_prompt=negatives)
        torch.testing.assert_close(wide[..., left:left + 8], crop, atol=1e-5, rtol=0)


def test_images_per_prompt_follow_their_prompt(models):
    _, _, pipe = models("sd1")
    prompts = ["a cat AND a dog:0.4", "[a fox|a hen]"]
    x = _latents(4, seed=5)
    got = _run(pipe, prompts, x, num_images_per_prompt=2)
    torch.testing.assert_close(got, _run(pipe, [prompts[0]] * 2 + [prompts[1]] * 2, x), atol=1e-6, rtol=0)


def test_img2img_counts_from_the_first_step_run(models):
    """As A1111: the schedule spans num_inference_steps and its counter starts at the first step run."""
    _, _, pipe = models("sd1")
    from pictures import photo
    kw = dict(image=photo(0), strength=0.5, num_inference_steps=8, seed=3, scheduler="euler", output_type="latent")
    # 4 of 8 steps run: "[cat:dog:0.5]" switches after step 4, so "cat" throughout
    torch.testing.assert_close(pipe("a [cat:dog:0.5]", **kw).images, pipe("a cat", **kw).images, atol=1e-6, rtol=0)
    assert (pipe("a [cat:dog:2]", **kw).images - pipe("a cat", **kw).images).abs().max() > 1e-3


def test_other_syntaxes_read_it_as_text(models):
    """With the "none" or "compel" syntax the brackets and AND are the prompt's text at every step."""
    _, _, pipe = models("sd1")
    prompt = "a [cat:dog:2] AND b"
    try:
        for syntax in ("none", "compel"):
            pipe.prompt_syntax = syntax
            probe = _Probe()
            _run(pipe, prompt, _latents(1), controls=[probe])
            literal = pipe.prompt_encoder.encode([prompt]).embeds[0]
            assert len(probe.seen) == 4 and all(torch.equal(e, literal) for e in probe.seen), syntax
    finally:
        pipe.prompt_syntax = "a1111"
    probe = _Probe()
    _run(pipe, prompt, _latents(1), controls=[probe])
    assert not torch.equal(probe.seen[0], probe.seen[3])   # the a1111 syntax switches "cat" to "dog"


def test_pix2pix_zero_refuses_a_changing_prompt_before_the_unet_runs(models, monkeypatch):
    _, _, pipe = models("sd1")

    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran before the combination was refused")

    monkeypatch.setattr(pipe.unet, "forward", forbidden)
    with pytest.raises(ValueError, match="Pix2PixZero.*prompt editing"):
        pipe("a cat AND a dog", num_inference_steps=2, controls=[cd.Pix2PixZero("cat", "dog")])


def test_errors_before_any_work(models, monkeypatch):
    path, _, pipe = models("sdxl")

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(pipe.unet, "forward", forbidden)
    for encoder in pipe.text_encoders:
        monkeypatch.setattr(encoder, "forward", forbidden)
    with pytest.raises(ValueError, match="prompt_2"):
        pipe("a [cat:dog:2]", prompt_2="a cat", num_inference_steps=2)
    with pytest.raises(ValueError, match="negative_prompt"):  # a step's text with a weight beyond the limit
        pipe("a cat", negative_prompt="[x:(y:1000):1]", num_inference_steps=2)


def test_editing_and_composition_with_every_kind_of_control(models, tmp_path):
    """Editing, alternation and AND in one call with guidance, structure and speed controls:
    finite, and leaving out any one control (or the syntax) changes the result."""
    path, _, pipe = models("sd1")
    net = cd.load_controlnet(build_controlnet(path, tmp_path / "cn"))
    prompt = "a [cat:dog:0.5] on a [mat|rug] AND snow:0.5"

    def make():
        return {"SEGA": cd.SEGA([cd.Concept("smiling", scale=4.0, warmup=0)]), "PAG": cd.PAG(scale=2.0),
                "ControlNet": cd.ControlNet(net, _control_tensor(), scale=0.8),
                "DeepCache": cd.DeepCache(cache_interval=2), "ToMe": cd.ToMe(ratio=0.5, seed=0)}

    x = _latents(1)
    full = _run(pipe, prompt, x, controls=list(make().values()))
    assert torch.isfinite(full).all()
    for name in make():
        rest = [c for n, c in make().items() if n != name]
        assert (full - _run(pipe, prompt, x, controls=rest)).abs().max() > 1e-4, f"removing {name} changed nothing"
    plain = _run(pipe, "a cat on a mat, snow", x, controls=list(make().values()))
    assert (full - plain).abs().max() > 1e-3
