"""DPM++ SDE against diffusers' DPMSolverSDEScheduler (its Brownian-tree seeds included) and
DPM++ 2S a against k-diffusion's own ``sample_dpmpp_2s_ancestral`` (vendored in
tests/reference/), step for step and through the pipeline on tiny models.

The generic scheduler tests (every config, img2img, options) run dpmpp_sde too, from
test_schedulers.py; here: the seed semantics, what those tests cannot reach, and 2S a."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

import diffusers  # the oracle: part of the test extra
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

import pipes  # noqa: E402
import reference.k_diffusion_dpmpp_2s_ancestral as K  # noqa: E402
from controldiff import cli  # noqa: E402
from controldiff import schedulers as S  # noqa: E402
from controldiff.noise import randn_tensor  # noqa: E402
from controldiff.schedulers.a1111 import TO_A1111, from_a1111  # noqa: E402
from controldiff.tiny import scheduler_config  # noqa: E402
from pipes import ours  # noqa: E402
from test_pipeline_parity import _image, _mask, assert_close, gen  # noqa: E402
from test_schedulers import CONFIGS, _check_schedule, _close, _run_lockstep, _start, fake_model  # noqa: E402

SDE = ("dpmpp_sde", "dpmpp_sde_karras")
TWO_S_A = tuple(S.K_DIFFUSION_EQUIVALENT)
SEED_LIMIT = 2**63 - 1


def ref_sde(name, cfg, **kw):
    cls, extra = S.DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, cls).from_config(cfg, **extra, **kw)


def twin_seed(seed: int) -> int:
    """The tree seed ours draws from a generator seeded ``seed`` (nothing drawn before)."""
    return torch.randint(0, SEED_LIMIT, [], generator=gen(seed)).item()


def run_sde(sched, x, generator, steps=6):
    """Ours (given ``generator``) or diffusers' scheduler (which takes none) on the fake model."""
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        out = fake_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=generator) if isinstance(sched, S.Scheduler) else \
            sched.step(out, t, x).prev_sample
    return x


# ----------------------------------------------------------------------------- DPM++ SDE: seeds


def test_registry_and_a1111_names():
    for name in (*SDE, *TWO_S_A):
        assert name in S.NAMES and S.create(name, scheduler_config("sd1")).name == name
    assert set(S.NAMES) == set(S.DIFFUSERS_EQUIVALENT) | set(S.K_DIFFUSION_EQUIVALENT)
    assert S.from_config({**scheduler_config("sd1"), "_class_name": "DPMSolverSDEScheduler"}).name == "dpmpp_sde"
    assert S.from_config({**scheduler_config("sd1"), "_class_name": "DPMSolverSDEScheduler",
                          "use_karras_sigmas": True}).name == "dpmpp_sde_karras"
    for ours_name, sampler, schedule in (("dpmpp_sde", "DPM++ SDE", None), ("dpmpp_sde_karras", "DPM++ SDE", "Karras"),
                                         ("dpmpp_2s_a", "DPM++ 2S a", None),
                                         ("dpmpp_2s_a_karras", "DPM++ 2S a", "Karras")):
        assert TO_A1111[ours_name] == (sampler, schedule)
        assert from_a1111(sampler, schedule) == ours_name
        assert from_a1111(sampler, "Automatic" if schedule is None else schedule) == ours_name
        assert from_a1111(f"{sampler} Karras" if schedule else sampler) == ours_name  # A1111 before 1.9
        args = cli.build_parser().parse_args(["generate", "-p", "x", "--scheduler",
                                              f"{sampler} {schedule}" if schedule else sampler])
        assert args.scheduler == ours_name
        assert cli.build_parser().parse_args(["generate", "-p", "x", "--sampler", ours_name]).scheduler == ours_name


@pytest.mark.parametrize("name", SDE)
def test_config_seed_equals_diffusers_whatever_the_generator(name):
    """noise_sampler_seed in the config seeds the tree, as in diffusers (the generator is unused)."""
    for config_name in ("sd1", "sd2_v", "sdxl"):
        cfg = {**CONFIGS[config_name], "noise_sampler_seed": 1234}
        x = _start() * ref_sde(name, cfg).init_noise_sigma
        expected = run_sde(ref_sde(name, cfg), x.clone(), None)
        _close(run_sde(S.create(name, cfg), x.clone(), gen(9)), expected, f"{name} {config_name} config seed")
        _close(run_sde(S.create(name, cfg), x.clone(), None), expected,
               f"{name} {config_name} config seed, no generator")
    other = run_sde(ref_sde(name, {**cfg, "noise_sampler_seed": 1235}), x.clone(), None)
    assert (other - expected).abs().max() > 1e-3, "the seed must change the noise"


@pytest.mark.parametrize("name", SDE)
def test_generator_seeds_the_tree(name):
    """Ours: one draw from the step's generator; diffusers given that seed equals it, and a
    generator seeded differently gives different noise."""
    cfg = CONFIGS["sd1"]
    x = _start() * ref_sde(name, cfg).init_noise_sigma
    got = run_sde(S.create(name, cfg), x.clone(), gen(5))
    expected = run_sde(ref_sde(name, cfg, noise_sampler_seed=twin_seed(5)), x.clone(), None)
    _close(got, expected, f"{name} generator seed")
    assert (run_sde(S.create(name, cfg), x.clone(), gen(6)) - got).abs().max() > 1e-3


@pytest.mark.parametrize("name", SDE)
def test_no_generator_draws_from_the_global_rng_as_diffusers(name):
    cfg = CONFIGS["sdxl"]
    x = _start() * ref_sde(name, cfg).init_noise_sigma
    torch.manual_seed(77)
    expected = run_sde(ref_sde(name, cfg), x.clone(), None)
    torch.manual_seed(77)
    _close(run_sde(S.create(name, cfg), x.clone(), None), expected, f"{name} global RNG")


def test_generator_list_gives_each_image_its_own_tree():
    """A list of generators: one tree per image (diffusers' batched tree with a list of seeds),
    so an image does not depend on the rest of the batch."""
    cfg = CONFIGS["sd1"]
    x = _start() * ref_sde("dpmpp_sde", cfg).init_noise_sigma
    batch = run_sde(S.create("dpmpp_sde", cfg), x.clone(), [gen(3), gen(4)])
    expected = run_sde(ref_sde("dpmpp_sde", cfg, noise_sampler_seed=[twin_seed(3), twin_seed(4)]), x.clone(), None)
    _close(batch, expected, "generator list")
    for row, seed in ((0, 3), (1, 4)):
        _close(batch[row:row + 1], run_sde(S.create("dpmpp_sde", cfg), x[row:row + 1].clone(), gen(seed)),
               f"row {row} alone")
    with pytest.raises(ValueError, match="generator"):
        run_sde(S.create("dpmpp_sde", cfg), x.clone(), [gen(3), gen(4), gen(5)])


@pytest.mark.parametrize("kind", ["use_exponential_sigmas", "use_beta_sigmas"])
def test_sde_other_sigma_schedules(kind):
    """Exponential and beta sigmas, also with sigma_min/max carried over from another config."""
    carried = {**CONFIGS["sdxl"], "sigma_min": 0.3, "sigma_max": 9.0}
    for cfg in (CONFIGS["sd1"], CONFIGS["trailing"], carried):
        for n in (3, 10):
            cfg_k = {**cfg, kind: True}
            ours, ref = S.create("dpmpp_sde", cfg_k), ref_sde("dpmpp_sde", cfg_k)
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            _check_schedule(ours, ref, f"sde {kind} {n}")
            _run_lockstep(ours, ref, ref.timesteps, _start() * ref.init_noise_sigma, f"sde {kind} {n}", relative=True)


def test_missing_torchsde_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'controldiff\[sde\]'"):
        S.create("dpmpp_sde", scheduler_config("sd1"))
    S.create("dpmpp_2s_a", scheduler_config("sd1"))  # the others do not need it


# ----------------------------------------------------------------------------- DPM++ SDE: pipelines


def ref_pipe(cls_name, path, name):
    pipe = pipes.reference(cls_name, path)
    cls, extra = S.DIFFUSERS_EQUIVALENT[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    return pipe


@pytest.mark.parametrize("name", SDE)
def test_sde_txt2img_equals_diffusers_with_the_global_generator(tiny_model, name):
    """diffusers with ``generator=torch.manual_seed(s)`` (the global generator, which its
    scheduler also draws the tree seed from) == ours with ``torch.Generator().manual_seed(s)``."""
    path = tiny_model("sd1")
    ref, mine = ref_pipe("StableDiffusionPipeline", path, name), ours(path)
    for seed, steps, scale, prompt in ((0, 4, 7.5, "a red cube"), (3, 3, 1.0, ["a", "b"])):
        kw = dict(num_inference_steps=steps, guidance_scale=scale, output_type="np")
        expected = ref(prompt, generator=torch.manual_seed(seed), **kw).images
        got = mine(prompt, generator=gen(seed), scheduler=name, **kw).images
        assert_close(got, expected, f"{name} seed={seed}")
    again = mine("a red cube", seed=0, scheduler=name, num_inference_steps=4, output_type="np").images
    assert_close(again, mine("a red cube", seed=0, scheduler=name, num_inference_steps=4, output_type="np").images)
    other = mine("a red cube", seed=1, scheduler=name, num_inference_steps=4, output_type="np").images
    assert np.abs(other - again).max() > 1e-3


def test_sde_img2img_and_inpaint_equal_diffusers(tiny_model):
    init, mask = _image(64, 64), _mask(64, 64)
    path = tiny_model("sd1")
    ref, mine = ref_pipe("StableDiffusionImg2ImgPipeline", path, "dpmpp_sde"), ours(path)
    for seed, strength, scale in ((0, 0.6, 7.5), (1, 1.0, 1.0)):
        kw = dict(num_inference_steps=5, guidance_scale=scale, output_type="np", strength=strength)
        assert_close(mine("a cat", image=init, generator=gen(seed), scheduler="dpmpp_sde", **kw).images,
                     ref("a cat", image=init, generator=torch.manual_seed(seed), **kw).images, f"img2img {strength}")
    for channels in (4, 9):
        path = tiny_model("sd1", in_channels=channels)
        ref, mine = ref_pipe("StableDiffusionInpaintPipeline", path, "dpmpp_sde_karras"), ours(path)
        kw = dict(num_inference_steps=4, guidance_scale=7.5, output_type="np", strength=0.75)
        assert_close(mine("a cat", image=init, mask_image=mask, generator=gen(2), scheduler="dpmpp_sde_karras",
                          **kw).images,
                     ref("a cat", image=init, mask_image=mask, generator=torch.manual_seed(2), **kw).images,
                     f"inpaint {channels}")


def test_sde_folder_scheduler_with_seed_equals_diffusers(tiny_model, tmp_path):
    """A folder saved with DPMSolverSDEScheduler and noise_sampler_seed: both load its scheduler;
    the config's seed wins over the generator in both."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model("sd1"), folder)
    diffusers.DPMSolverSDEScheduler.from_pretrained(folder / "scheduler", noise_sampler_seed=42,
                                                    use_karras_sigmas=True).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DPMSolverSDEScheduler"]}))
    ref, mine = pipes.reference("StableDiffusionPipeline", folder), ours(folder)
    assert type(ref.scheduler).__name__ == "DPMSolverSDEScheduler"
    assert mine.make_scheduler().name == "dpmpp_sde_karras"
    kw = dict(num_inference_steps=4, guidance_scale=6.0, output_type="np")
    assert_close(mine("a cat", generator=gen(1), **kw).images, ref("a cat", generator=gen(1), **kw).images,
                 "folder scheduler")


def test_sde_generator_list_in_a_pipeline(tiny_model):
    path = tiny_model("sd1")
    mine = ours(path)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", scheduler="dpmpp_sde")
    both = mine(["a", "b"], generator=[gen(1), gen(2)], **kw).images
    assert_close(both[1:], mine(["b"], generator=gen(2), **kw).images, "second image alone")


# ----------------------------------------------------------------------------- DPM++ 2S a vs k-diffusion


def euler_sigmas(name, cfg, n):
    """The reference's sigmas: diffusers' Euler schedule with the name's options."""
    euler = diffusers.EulerDiscreteScheduler.from_config(cfg, **S.K_DIFFUSION_EQUIVALENT[name][1])
    euler.set_timesteps(n)
    return euler


class FakeCompVis:
    """What k-diffusion's CompVisDenoiser wraps: ``alphas_cumprod`` and ``apply_model``."""

    def __init__(self, alphas_cumprod, fn):
        self.alphas_cumprod, self.fn = alphas_cumprod, fn

    def apply_model(self, x, t, cond):
        return self.fn(x, t, cond)


def denoiser(inner, prediction_type):
    return (K.CompVisVDenoiser if prediction_type == "v_prediction" else K.CompVisDenoiser)(inner)


def k_diffusion_run(name, cfg, n, x, seed, begin=0):
    """k-diffusion's sampler on the fake model; the x at the start of each step, and the end."""
    euler = euler_sigmas(name, cfg, n)
    model = denoiser(FakeCompVis(euler.alphas_cumprod, lambda x, t, cond: fake_model(x, t[0])),
                     euler.config.prediction_type)
    g = gen(seed)
    starts = []
    end = K.sample_dpmpp_2s_ancestral(model, x, euler.sigmas[begin:], disable=True, extra_args={"cond": None},
                                      noise_sampler=lambda s, s_next: randn_tensor(x.shape, generator=g),
                                      callback=lambda d: starts.append(d["x"]))
    return starts[1:] + [end], euler


def ours_run(sched, x, seed, timesteps=None):
    g = gen(seed)
    ends = []
    for t in sched.timesteps if timesteps is None else timesteps:
        x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x, generator=g)
        if sched.state_in_first_order:
            ends.append(x)
    return ends


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", TWO_S_A)
def test_2s_a_equals_k_diffusion(name, config_name):
    cfg = CONFIGS[config_name]
    for n in (1, 2, 7, 25):
        sched = S.create(name, cfg)
        sched.set_timesteps(n)
        euler = euler_sigmas(name, cfg, n)
        expected, _ = k_diffusion_run(name, cfg, n, _start() * euler.init_noise_sigma, seed=3)
        _close(sched.step_sigmas, euler.sigmas, f"{name} sigmas")
        _close(sched.init_noise_sigma, euler.init_noise_sigma, f"{name} init_noise_sigma")
        assert len(sched.timesteps) == 2 * n - 1 and sched.order == 2
        got = ours_run(sched, _start() * sched.init_noise_sigma, seed=3)
        assert len(got) == len(expected) == n
        for i, (a, b) in enumerate(zip(got, expected)):
            _close(a, b, f"{name}/{config_name}/{n} steps: after step {i}", relative=True)


@pytest.mark.parametrize("name", TWO_S_A)
def test_2s_a_img2img_equals_k_diffusion_from_part_way(name):
    """img2img: set_begin_index(2 * t_start) and add_noise equal k-diffusion started at
    sigmas[t_start] from ``x0 + noise * sigma``."""
    for config_name in ("sd1", "sd2_v", "sdxl"):
        cfg = CONFIGS[config_name]
        for n, strength in ((10, 0.6), (25, 0.3)):
            sched = S.create(name, cfg)
            sched.set_timesteps(n)
            t_start = n - int(n * strength)
            begin = t_start * sched.order
            sched.set_begin_index(begin)
            x0, noise = _start(5), _start(6)
            timesteps = sched.timesteps[begin:]
            noisy = sched.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
            euler = euler_sigmas(name, cfg, n)
            _close(noisy, x0 + noise * euler.sigmas[t_start], f"{name} add_noise")
            expected, _ = k_diffusion_run(name, cfg, n, noisy.clone(), seed=4, begin=t_start)
            got = ours_run(sched, noisy.clone(), seed=4, timesteps=timesteps)
            assert len(got) == len(expected) == n - t_start
            _close(got[-1], expected[-1], f"{name}/{config_name} img2img {n}x{strength}", relative=True)


def test_2s_a_noise_is_drawn_from_the_generator():
    cfg = CONFIGS["sd1"]
    a, b, c = (S.create("dpmpp_2s_a", cfg) for _ in range(3))
    for s in (a, b, c):
        s.set_timesteps(5)
    x = _start() * a.init_noise_sigma
    ra, rb, rc = ours_run(a, x, seed=1), ours_run(b, x, seed=1), ours_run(c, x, seed=2)
    assert torch.equal(ra[-1], rb[-1]) and (ra[-1] - rc[-1]).abs().max() > 1e-3


def test_2s_a_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="prediction_type"):
        S.create("dpmpp_2s_a", {**scheduler_config("sd1"), "prediction_type": "sample"})
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.create("dpmpp_2s_a_karras", {**scheduler_config("sd1"), "timestep_spacing": "odd"})


class UNetAsCompVis(FakeCompVis):
    """A diffusers pipeline's UNet as the CompVis model A1111 hands k-diffusion, with
    classifier-free guidance on the model output (as both pipelines apply it)."""

    def __init__(self, pipe, cond, uncond, scale):
        super().__init__(diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config).alphas_cumprod,
                         self._run)
        self.unet, self.cond, self.uncond, self.scale = pipe.unet, cond, uncond, scale

    def _run(self, x, t, cond):
        if self.scale <= 1:
            return self.unet(x, t, encoder_hidden_states=self.cond).sample
        out = self.unet(torch.cat([x] * 2), torch.cat([t] * 2),
                        encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample
        uncond, cond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)


def k_diffusion_pipeline(pipe, name, prompt, seed, steps, scale, size=64):
    """Text to image the A1111 way: diffusers' text encoder, UNet and VAE; k-diffusion's
    sampler and denoiser wrapper; noise from the generator, initial latents x sigma_max."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, scale > 1)
        g = gen(seed)
        latents = randn_tensor((len(prompt), 4, size // 8, size // 8), generator=g)
        sigmas = euler_sigmas(name, pipe.scheduler.config, steps).sigmas
        model = denoiser(UNetAsCompVis(pipe, cond, uncond, scale), pipe.scheduler.config.prediction_type)
        x = K.sample_dpmpp_2s_ancestral(model, latents * sigmas[0], sigmas, disable=True, extra_args={"cond": None},
                                        noise_sampler=lambda s, s_next: randn_tensor(latents.shape, generator=g))
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("name", TWO_S_A)
@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_2s_a_pipeline_equals_k_diffusion_on_diffusers_models(tiny_model, name, family, prediction):
    path = tiny_model(family, prediction_type=prediction)
    ref, mine = pipes.reference("StableDiffusionPipeline", path), ours(path)
    for seed, steps, scale, prompt in ((0, 4, 7.5, ["a red cube"]), (2, 3, 1.0, ["a", "b"])):
        expected = k_diffusion_pipeline(ref, name, prompt, seed, steps, scale)
        got = mine(prompt, generator=gen(seed), scheduler=name, num_inference_steps=steps, guidance_scale=scale,
                   output_type="np").images
        assert_close(got, expected, f"{name} {family} seed={seed}")
