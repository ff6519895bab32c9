"""The loop's groundwork for gradient and attention controls: the step's noise level and
x0/eps conversion, the run's timesteps, differentiable decode/encode on the context,
token positions of words, and ``teardown``."""
from __future__ import annotations

import pytest
import torch

import controldiff as cd
from controldiff.schedulers.prediction import KINDS, to_output, x0_eps
from pipes import ours


class Recorder(cd.Control):
    """Keeps what a control sees: x0 from the step's level, the scheduler's own x0 after the step."""

    def __init__(self):
        self.ours, self.scheduler, self.timesteps, self.levels = [], [], None, []

    def setup(self, ctx):
        self.timesteps = ctx.timesteps.clone()

    def combine(self, ctx, step, preds, pred):
        x = step.call.x[step.call.rows("cond"), :pred.shape[1]]
        self.ours.append(step.x0_eps(pred, x)[0])
        self.levels.append((step.alpha, step.sigma))
        return pred

    def after_step(self, ctx, step, latents):
        self.scheduler.append(ctx.scheduler.pred_original_sample)
        return latents


@pytest.mark.parametrize("kind", KINDS)
def test_x0_eps_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    alpha = torch.tensor(0.6)
    sigma = (1 - alpha**2) ** 0.5
    x = alpha * x0 + sigma * eps
    out = to_output(kind, x0, eps, alpha, sigma)
    back = x0_eps(kind, out, x, alpha, sigma)
    assert torch.allclose(back[0], x0, atol=1e-5) and torch.allclose(back[1], eps, atol=1e-5)


# (model evaluations in 4 steps): the midpoint samplers evaluate twice per step but the last
CALLS = {"ddim": 4, "euler": 4, "lms": 4, "dpmpp_2m": 4, "dpmpp_2m_karras": 4, "unipc": 4, "ddpm": 4,
         "dpmpp_sde": 7, "dpmpp_sde_karras": 7, "dpmpp_2s_a": 7, "dpmpp_2s_a_karras": 7}


@pytest.mark.parametrize("scheduler", list(CALLS))
@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_step_x0_equals_the_schedulers(tiny_model, scheduler, family, prediction):
    """Step.x0_eps on the model input gives the x0 each scheduler computes itself, at every
    model evaluation (the midpoint samplers' second calls included)."""
    pipe = ours(tiny_model(family, prediction_type=prediction))
    rec = Recorder()
    pipe("a cat", num_inference_steps=4, guidance_scale=1.0, scheduler=scheduler, seed=1, controls=[rec],
         output_type="latent", height=64, width=64)
    assert len(rec.ours) == CALLS[scheduler]
    for mine, theirs in zip(rec.ours, rec.scheduler):
        assert (mine - theirs).abs().max() < 1e-4


def test_img2img_levels_start_part_way(pipe):
    """img2img: the level of step 0 is that of the first timestep run, not of the schedule's first."""
    import PIL.Image

    image = PIL.Image.new("RGB", (64, 64), (120, 30, 200))
    full, part = Recorder(), Recorder()
    pipe("a cat", num_inference_steps=6, scheduler="euler", seed=2, controls=[full], output_type="latent",
         height=64, width=64)
    pipe("a cat", image=image, strength=0.5, num_inference_steps=6, scheduler="euler", seed=2, controls=[part],
         output_type="latent")
    assert len(part.timesteps) == 3 and torch.equal(part.timesteps, full.timesteps[3:])
    for (a, s), (a_full, s_full) in zip(part.levels, full.levels[3:]):
        assert torch.allclose(a, a_full) and torch.allclose(s, s_full)
    assert full.levels[0][1] > full.levels[-1][1]  # the noise level falls


class Probe(cd.Control):
    """Reads the context's decode/encode and token lookup once, in setup."""

    def __init__(self, fn):
        self.fn, self.value = fn, None

    def setup(self, ctx):
        self.value = self.fn(ctx)


def test_decode_is_differentiable_and_encode_matches(pipe):
    def use(ctx):
        latents = torch.randn(1, 4, 8, 8, requires_grad=True)
        with torch.enable_grad():
            image = ctx.decode(latents)
            image.mean().backward()
        again = ctx.encode_image(image.detach().clamp(-1, 1), torch.Generator().manual_seed(0))
        return image, latents.grad, again

    probe = Probe(use)
    pipe("a cat", num_inference_steps=1, controls=[probe], output_type="latent", height=64, width=64)
    image, grad, again = probe.value
    assert image.shape == (1, 3, 64, 64)
    assert grad is not None and grad.abs().sum() > 0
    expected = pipe._encode_image(image.detach().clamp(-1, 1), torch.Generator().manual_seed(0))
    assert again.shape == (1, 4, 8, 8) and torch.equal(again, expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_token_indices_of_words(tiny_model, family):
    pipe = ours(tiny_model(family))
    found = {}

    def use(ctx):
        found["cat"] = ctx.token_indices("cat")
        found["dog"] = ctx.token_indices("dog", row=1)
        found["none"] = ctx.token_indices("giraffe")
        found["ids"] = ctx.text["cond"].ids

    pipe(["a cat and a (cat:1.3)", "a dog " * 50 + "BREAK dog"], num_inference_steps=1, controls=[Probe(use)],
         output_type="latent", height=64, width=64)
    tok = pipe.tokenizers[0]

    def n(word):
        return len(tok(word, add_special_tokens=False)["input_ids"])

    first = 1 + n("a")                             # BOS at 0, then "a"
    second = first + n("cat") + n("and") + n("a")
    assert found["cat"] == [*range(first, first + n("cat")), *range(second, second + n("cat"))]
    assert found["none"] == []
    ids = found["ids"]
    dog = tok("dog", add_special_tokens=False)["input_ids"]
    chunks = -(-(50 * len(dog) + n("a") * 50) // 75) + 1   # the long prompt's chunks, then BREAK's
    assert ids.shape[1] == chunks * 77               # the short prompt is padded with no tokens
    assert (ids[0, 77:] == -1).all() and ids[0, 0] == -1 and ids[0, first] != -1   # BOS holds no prompt token
    dogs = found["dog"]
    # every "dog" is found, also those cut by a chunk boundary; the one after BREAK opens a new chunk
    assert len(dogs) == 51 * len(dog) and dogs[-len(dog)] == (chunks - 1) * 77 + 1
    assert [ids[1, p].item() for p in dogs] == dog * 51


class Tracks(cd.Control):
    def __init__(self, log, name, fail_setup=False, fail_step=False):
        self.log, self.name, self.fail_setup, self.fail_step = log, name, fail_setup, fail_step

    def setup(self, ctx):
        if self.fail_setup:
            raise ValueError(f"{self.name}: refused")
        self.log.append(f"setup {self.name}")

    def teardown(self, ctx):
        self.log.append(f"teardown {self.name}")

    def after_step(self, ctx, step, latents):
        if self.fail_step:
            raise RuntimeError("boom")
        return latents


def test_teardown_always_runs_in_reverse(pipe):
    log = []
    pipe("a cat", num_inference_steps=2, controls=[Tracks(log, "a"), Tracks(log, "b")], output_type="latent",
         height=64, width=64)
    assert log == ["setup a", "setup b", "teardown b", "teardown a"]

    log.clear()  # a failing setup: only the controls set up before it are torn down
    with pytest.raises(ValueError, match="c: refused"):
        pipe("a cat", num_inference_steps=2, controls=[Tracks(log, "a"), Tracks(log, "c", fail_setup=True),
                                                      Tracks(log, "d")], output_type="latent", height=64, width=64)
    assert log == ["setup a", "teardown a"]

    log.clear()  # a failing step and a cancelled run
    with pytest.raises(RuntimeError, match="boom"):
        pipe("a cat", num_inference_steps=2, controls=[Tracks(log, "a", fail_step=True)], output_type="latent",
             height=64, width=64)
    out = pipe("a cat", num_inference_steps=3, controls=[Tracks(log, "b")], output_type="latent", height=64,
               width=64, callback=lambda i, t, x: False)
    assert out.cancelled and log == ["setup a", "teardown a", "setup b", "teardown b"]
