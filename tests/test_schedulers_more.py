"""DPM++ 2S (singlestep) and DEIS against their diffusers classes, step for step and in a
full txt2img run (constructed directly: registration in ``schedulers`` is separate)."""
from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import pytest
import torch

import diffusers  # the oracle: part of the test extra
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

import pipes  # noqa: E402
from controldiff.schedulers.deis import DEIS  # noqa: E402
from controldiff.schedulers.dpm_singlestep import DPMSolverSinglestep, order_list  # noqa: E402
from controldiff.tiny import scheduler_config  # noqa: E402
from test_schedulers import CONFIGS, _check_schedule, _close, _run_lockstep, _start, fake_model  # noqa: E402

OURS = {"dpmpp_2s": DPMSolverSinglestep, "deis": DEIS}
REF = {"dpmpp_2s": diffusers.DPMSolverSinglestepScheduler, "deis": diffusers.DEISMultistepScheduler}
STEPS = (1, 2, 3, 7, 10, 25)

OPTIONS = [
    {},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 9.0},  # bounds carried over from another class
    {"solver_order": 3},
    {"solver_order": 1},
    {"prediction_type": "sample"},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"lower_order_final": False},
]
SINGLESTEP_ONLY = [
    {"solver_type": "heun"},
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False, "solver_order": 3},
    {"final_sigmas_type": "sigma_min", "solver_type": "heun", "solver_order": 3},
    {"lambda_min_clipped": -2.0},  # clips the noisiest timesteps (scaled_linear reaches -2.7)
    {"use_karras_sigmas": True, "solver_order": 3, "solver_type": "heun"},
]
DEIS_ONLY = [
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"solver_order": 3, "timestep_spacing": "trailing"},
]


def _pair(name, cfg):
    return OURS[name](cfg), REF[name].from_config(cfg)


def _lockstep(name, cfg, n, what, seed=1):
    ours, ref = _pair(name, cfg)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    _check_schedule(ours, ref, what)
    assert ours.order == ref.order
    assert ours.config["lower_order_final"] == ref.config.lower_order_final, what
    _run_lockstep(ours, ref, ref.timesteps, _start() * ref.init_noise_sigma, what, seed=seed)
    return ours, ref


@pytest.mark.parametrize("config_name", ["sd1", "sd2_v", "sdxl", "trailing"])
@pytest.mark.parametrize("name", list(OURS))
def test_lockstep_per_config(name, config_name):
    for n in STEPS:
        _lockstep(name, CONFIGS[config_name], n, f"{name}/{config_name}/{n} steps")


@pytest.mark.parametrize("name,extra", [(n, e) for n in OURS for e in OPTIONS]
                         + [("dpmpp_2s", e) for e in SINGLESTEP_ONLY] + [("deis", e) for e in DEIS_ONLY], ids=str)
def test_lockstep_options(name, extra):
    for prediction_type in ("epsilon", "v_prediction"):
        cfg = {**scheduler_config("sd1"), "prediction_type": prediction_type, **extra}
        for n in (4, 7, 12, 20):
            _lockstep(name, cfg, n, f"{name} {extra} {prediction_type} {n} steps")


@pytest.mark.parametrize("name", list(OURS))
def test_free_running_trajectory(name):
    """State carried across steps (the saved group start, the epsilon history)."""
    for cfg in (scheduler_config("sd1"), {**scheduler_config("sd1"), "use_karras_sigmas": True, "solver_order": 3}):
        ours, ref = _pair(name, cfg)
        ours.set_timesteps(25)
        ref.set_timesteps(25)
        x_o, x_r = _start(), _start()
        for t in ref.timesteps:
            x_o = ours.step(fake_model(x_o, t), t, x_o)
            x_r = ref.step(fake_model(x_r, t), t, x_r).prev_sample
        _close(x_o, x_r, f"{name} free run", relative=True)
        assert x_r.abs().max() > 0.1


def test_sde_singlestep_noise():
    """sde-dpmsolver++ draws its noise from the generator, as the reference."""
    cfg = {**scheduler_config("sd1"), "algorithm_type": "sde-dpmsolver++"}
    for solver_order in (2, 3):
        _lockstep("dpmpp_2s", {**cfg, "solver_order": solver_order}, 9, f"sde order {solver_order}", seed=4)


def test_singlestep_groups_differ_from_multistep():
    """A second-order singlestep step starts from the group's first sample, not the last one:
    the result is not DPM++ 2M's (the feature is really there)."""
    from controldiff.schedulers.dpmsolver import DPMSolverMultistep
    cfg = scheduler_config("sd1")
    single, multi = DPMSolverSinglestep(cfg), DPMSolverMultistep(cfg)
    single.set_timesteps(8)
    multi.set_timesteps(8)
    assert single.order_list == [1, 2, 1, 2, 1, 2, 1, 1]
    x_s, x_m = _start(), _start()
    for t in single.timesteps:
        x_s = single.step(fake_model(x_s, t), t, x_s)
        x_m = multi.step(fake_model(x_m, t), t, x_m)
    assert (x_s - x_m).abs().max() > 1e-3


def test_order_list_matches_reference():
    for order in (1, 2, 3):
        for lower in (True, False):
            for zero in (True, False):
                for steps in range(1, 14):
                    if not lower and (steps % order or zero):
                        continue  # the reference switches lower_order_final on first
                    ref = diffusers.DPMSolverSinglestepScheduler(
                        solver_order=order, lower_order_final=lower,
                        final_sigmas_type="zero" if zero else "sigma_min")
                    assert order_list(steps, order, lower, zero) == ref.get_order_list(steps), (order, lower, zero, steps)


@pytest.mark.parametrize("name", list(OURS))
def test_img2img_path(name):
    """Start part-way (set_begin_index, possibly inside a singlestep group), add_noise, steps."""
    cfg = scheduler_config("sd1")
    for n, strength in ((10, 0.6), (9, 0.5), (25, 0.3)):
        ours, ref = _pair(name, cfg)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        begin = max(n - min(int(n * strength), n), 0) * ref.order
        ours.set_begin_index(begin)
        ref.set_begin_index(begin)
        ts = ref.timesteps[begin:]
        x0, noise = _start(5), _start(6)
        noisy_o = ours.add_noise(x0, noise, ts[:1].repeat(2))
        noisy_r = ref.add_noise(x0, noise, ts[:1].repeat(2))
        _close(noisy_o, noisy_r, f"{name} add_noise")
        _run_lockstep(ours, ref, ts, noisy_r, f"{name} img2img {n}x{strength}")


@pytest.mark.parametrize("name", list(OURS))
def test_config_filled_like_diffusers(name):
    for cfg in CONFIGS.values():
        ours, ref = _pair(name, cfg)
        assert {k: v for k, v in ours.settings.items()} == {k: ref.config[k] for k in ours.DEFAULTS}
        assert set(ours.DEFAULTS) == set(inspect.signature(REF[name].__init__).parameters) - {"self"}
        _close(ours.alphas_cumprod, ref.alphas_cumprod, f"{name} alphas_cumprod")
        ours.set_timesteps(5)
        ref.set_timesteps(5)
        assert ours.settings == {k: ref.config[k] for k in ours.DEFAULTS}  # the singlestep's lower_order_final switch


def test_errors_name_the_option():
    sd1 = scheduler_config("sd1")
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverSinglestep({**sd1, "solver_order": 4})
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverSinglestep({**sd1, "algorithm_type": "dpmsolver"})
    with pytest.raises(ValueError, match="thresholding"):
        DEIS({**sd1, "thresholding": True})
    with pytest.raises(ValueError, match="solver_order"):
        DEIS({**sd1, "solver_order": 4})
    with pytest.raises(ValueError, match="prediction_type"):
        DEIS({**sd1, "prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        DPMSolverSinglestep({**sd1, "use_flow_sigmas": True})
    with pytest.raises(ValueError, match="only one of"):
        DEIS({**sd1, "use_karras_sigmas": True, "use_beta_sigmas": True})
    with pytest.raises(ValueError, match="repeats its first timestep"):  # the reference fails with an IndexError
        DPMSolverSinglestep({**sd1, "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}).set_timesteps(8)
    # other solvers' names map to these classes' own, as the reference
    assert DEIS({**sd1, "algorithm_type": "dpmsolver++", "solver_type": "bh2"}).config.algorithm_type == "deis"
    assert DPMSolverSinglestep({**sd1, "solver_type": "logrho"}).config.solver_type == "midpoint"


PIPELINE_CASES = [
    ("dpmpp_2s", "epsilon", {}), ("dpmpp_2s", "v_prediction", {"use_karras_sigmas": True}),
    ("dpmpp_2s", "epsilon", {"algorithm_type": "sde-dpmsolver++"}),  # noise from the call's generator
    ("deis", "epsilon", {}), ("deis", "v_prediction", {"use_karras_sigmas": True}),
    ("deis", "epsilon", {"solver_order": 3}),
]


def _patched(path, name, extra):
    """Our pipeline with this scheduler (patched in: not registered by name here)."""
    mine = pipes.ours(path)
    mine.make_scheduler = lambda name_=None: OURS[name](mine.scheduler_config, **extra)
    return mine


@pytest.mark.parametrize("name,prediction_type,extra", PIPELINE_CASES, ids=str)
def test_txt2img_matches_diffusers_pipeline(tiny_model, name, prediction_type, extra):
    """Equals StableDiffusionPipeline with the diffusers class, end to end."""
    path = tiny_model("sd1", prediction_type=prediction_type)
    ref = pipes.reference("StableDiffusionPipeline", path)
    ref.scheduler = REF[name].from_config(ref.scheduler.config, **extra)
    mine = _patched(path, name, extra)
    for seed, steps, scale in ((0, 5, 7.5), (3, 4, 1.0)):
        kw = dict(num_inference_steps=steps, guidance_scale=scale, output_type="np", height=32, width=32)
        expected = ref("a red cube", generator=torch.Generator().manual_seed(seed), **kw).images
        got = mine("a red cube", generator=torch.Generator().manual_seed(seed), **kw).images
        diff = float(np.abs(got - expected).max())
        assert diff <= 1e-4, f"{name} {prediction_type} {extra} seed={seed}: max abs diff {diff}"


@pytest.mark.parametrize("name", list(OURS))
def test_img2img_matches_diffusers_pipeline(tiny_model, name):
    """Part-way start: 9 steps at strength 0.5 begins on a singlestep group's second step."""
    path = tiny_model("sd1")
    ref = pipes.reference("StableDiffusionImg2ImgPipeline", path)
    ref.scheduler = REF[name].from_config(ref.scheduler.config)
    mine = _patched(path, name, {})
    init = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    for seed, steps, strength in ((0, 9, 0.5), (1, 6, 0.7)):
        kw = dict(num_inference_steps=steps, strength=strength, guidance_scale=6.0, output_type="np")
        expected = ref("a cat", image=init, generator=torch.Generator().manual_seed(seed), **kw).images
        got = mine("a cat", image=init, generator=torch.Generator().manual_seed(seed), **kw).images
        diff = float(np.abs(got - expected).max())
        assert diff <= 1e-4, f"{name} img2img {steps}x{strength} seed={seed}: max abs diff {diff}"
