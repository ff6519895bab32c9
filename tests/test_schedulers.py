"""Our schedulers against diffusers (the oracle), step for step."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import diffusers  # the oracle: part of the test extra
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

from controldiff import schedulers as S  # noqa: E402
from controldiff.schedulers.lms import lms_coefficient  # noqa: E402
from controldiff.tiny import scheduler_config  # noqa: E402

REFERENCE = {
    name: (lambda cfg, cls=cls, extra=extra: getattr(diffusers, cls).from_config(cfg, **extra))
    for name, (cls, extra) in S.DIFFUSERS_EQUIVALENT.items()
}
NAMES = tuple(REFERENCE)  # the k-diffusion-only ones (no diffusers class): test_schedulers_sde.py


def _configs() -> dict[str, dict]:
    sd1 = scheduler_config("sd1")
    return {
        "sd1": sd1,
        "sd2_v": scheduler_config("sd2", prediction_type="v_prediction"),
        "sd2_eps": scheduler_config("sd2", prediction_type="epsilon"),
        "sdxl": scheduler_config("sdxl"),
        "trailing": {**sd1, "timestep_spacing": "trailing"},
        "linspace": {**sd1, "timestep_spacing": "linspace"},
    }


CONFIGS = _configs()
STEPS = (1, 2, 7, 25)
SHAPE = (2, 4, 8, 8)
ATOL = 1e-5


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """Smooth, non-trivial, timestep-dependent stand-in for a UNet."""
    t = float(t)
    return 0.8 * torch.tanh(0.5 * x) + 0.3 * np.cos(t / 137.0) * torch.sin(x) + 0.05 * (t / 1000.0)


def _start(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _pipeline_kwargs(ref, gen, kw: dict) -> dict:
    """What a diffusers pipeline passes: the generator and ``eta`` (default 0.0) where the
    step takes them (TCD's step default of 0.3 is never seen through a pipeline)."""
    params = inspect.signature(ref.step).parameters
    if getattr(ref, "noise_sampler", 0) is None and ref.noise_sampler_seed is None:
        # DPMSolverSDE seeds its Brownian tree from the global RNG, ours from the generator:
        # give the reference our draw (test_schedulers_sde.py tests the seed semantics)
        ref.noise_sampler_seed = torch.randint(0, 2**63 - 1, [], generator=gen).item()
    out = dict(kw)
    if "generator" in params:
        out["generator"] = gen
    if "eta" in params:
        out.setdefault("eta", 0.0)
    return out


def _ref_step(ref, out, t, x, gen, **kw):
    return ref.step(out, t, x, **_pipeline_kwargs(ref, gen, kw)).prev_sample


def _close(a, b, what: str, relative: bool = False) -> None:
    """max abs diff <= 1e-5; ``relative``: per unit of the reference's magnitude, for
    schedules whose samples are in the hundreds (float32 spacing there exceeds 1e-5)."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    finite = torch.isfinite(b)
    # where the reference itself blows up (an option pushed past sigma 0), blow up the same way
    assert torch.equal(torch.isfinite(a), finite), f"{what}: non-finite values differ"
    assert torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()), f"{what}: non-finite values differ"
    a, b = a[finite], b[finite]
    if b.numel() == 0:
        return
    err = (a - b).abs().max().item()
    tol = ATOL * max(1.0, b.abs().max().item()) if relative else ATOL
    assert err <= tol, f"{what}: max abs diff {err} (tolerance {tol})"


def _check_schedule(ours, ref, what: str) -> None:
    assert ours.timesteps.dtype == ref.timesteps.dtype, f"{what}: dtype {ours.timesteps.dtype} != {ref.timesteps.dtype}"
    assert torch.equal(ours.timesteps.cpu(), ref.timesteps.cpu()), f"{what}: {ours.timesteps} != {ref.timesteps}"
    if isinstance(getattr(ref, "sigmas", None), torch.Tensor) and ref.num_inference_steps is not None:
        _close(ours.sigmas.cpu(), ref.sigmas, f"{what} sigmas")
    _close(ours.init_noise_sigma, ref.init_noise_sigma, f"{what} init_noise_sigma")


def _run_lockstep(ours, ref, timesteps, x, what: str, seed: int = 1, relative: bool = False, **step_kw) -> torch.Tensor:
    """Same inputs to both at every step; compare scaled input, x0 (where given) and prev sample."""
    g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ours, x_ref = x.clone(), x.clone()
    for i, t in enumerate(timesteps):
        inp_o = ours.scale_model_input(x_ours, t)
        inp_r = ref.scale_model_input(x_ref, t)
        _close(inp_o, inp_r, f"{what} scale_model_input step {i}", relative)
        out = fake_model(inp_r, t)
        res = ref.step(out, t, x_ref, **_pipeline_kwargs(ref, g_ref, step_kw))
        x_ours = ours.step(out, t, x_ours, generator=g_ours, **step_kw)
        x_ref = res.prev_sample
        _close(x_ours, x_ref, f"{what} sample after step {i} (t={float(t)})", relative)
        ref_x0 = getattr(res, "pred_original_sample", None)
        if ref_x0 is not None:
            _close(ours.pred_original_sample, ref_x0, f"{what} pred_original_sample step {i}", relative)
        x_ours = x_ref.clone()  # keep both on the reference trajectory: errors cannot compound
    return x_ref


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name, config_name):
    cfg = CONFIGS[config_name]
    for n in STEPS:
        ours, ref = S.create(name, cfg), REFERENCE[name](cfg)
        what = f"{name}/{config_name}/{n} steps"
        if name == "pndm" and not ref.config.skip_prk_steps and n < 4:
            continue  # the reference cannot build a Runge-Kutta warm-up shorter than 4 steps
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        _check_schedule(ours, ref, what)
        assert ours.order == ref.order
        x = _start() * ref.init_noise_sigma
        _run_lockstep(ours, ref, ref.timesteps, x, what)


@pytest.mark.parametrize("config_name", ["sd1", "sd2_v", "sdxl", "trailing"])
@pytest.mark.parametrize("name", NAMES)
def test_free_running_trajectory(name, config_name):
    """Each scheduler on its own trajectory for 25 steps (state carried between steps)."""
    cfg = CONFIGS[config_name]
    ours, ref = S.create(name, cfg), REFERENCE[name](cfg)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    x = _start() * ref.init_noise_sigma
    x_o, x_r = x.clone(), x.clone()
    g_o, g_r = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x_o = ours.step(fake_model(ours.scale_model_input(x_o, t), t), t, x_o, generator=g_o)
        x_r = _ref_step(ref, fake_model(ref.scale_model_input(x_r, t), t), t, x_r, g_r)
    # float32 rounding compounds over 25 free steps (LMS's quadrature differs at 1e-7 relative)
    _close(x_o, x_r, f"{name}/{config_name} final sample", relative=True)
    assert x_r.abs().max() > 0.1


def test_config_filled_like_diffusers():
    """from_config semantics: accepted keys taken, the rest the class's defaults."""
    for name in NAMES:
        for config_name, cfg in CONFIGS.items():
            ours, ref = S.create(name, cfg), REFERENCE[name](cfg)
            expected = {k: v for k, v in ref.config.items() if not k.startswith("_")}
            assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == expected, f"{name}/{config_name}"
            assert ours.config["_class_name"] == type(ref).__name__
            _close(ours.alphas_cumprod, ref.alphas_cumprod, f"{name}/{config_name} alphas_cumprod")


def test_config_round_trip_keeps_other_classes_keys():
    """A PNDM config through Euler and back keeps skip_prk_steps, as in diffusers."""
    sd1 = scheduler_config("sd1")
    ours = S.create("pndm", S.create("euler", sd1).config)
    ref = diffusers.PNDMScheduler.from_config(diffusers.EulerDiscreteScheduler.from_config(sd1).config)
    assert ours.config.skip_prk_steps is True and ref.config.skip_prk_steps is True
    # a carried-over key must not change a class that does not accept it
    euler_a = S.create("euler_a", {**sd1, "use_karras_sigmas": True, "thresholding": True})
    ref_a = diffusers.EulerAncestralDiscreteScheduler.from_config({**sd1, "use_karras_sigmas": True})
    euler_a.set_timesteps(6)
    ref_a.set_timesteps(6)
    _check_schedule(euler_a, ref_a, "euler_a with foreign keys")
    for name in ("dpmpp_2m_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "euler_karras"):
        assert S.from_config(S.create(name, sd1).config).name == name


def test_use_default_values_are_dropped():
    cfg = {**scheduler_config("sd1"), "timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]}
    ours = S.create("euler", cfg)
    assert ours.config.timestep_spacing == diffusers.EulerDiscreteScheduler.from_config(cfg).config.timestep_spacing


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("config_name", ["sd1", "sd2_v", "sdxl"])
def test_img2img_path(name, config_name):
    """Pipeline img2img: slice timesteps from t_start*order, set_begin_index, add_noise, steps."""
    cfg = CONFIGS[config_name]
    for n, strength in ((10, 0.6), (25, 0.3)):
        ours, ref = S.create(name, cfg), REFERENCE[name](cfg)
        what = f"{name}/{config_name} img2img {n}x{strength}"
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        t_start = max(n - min(int(n * strength), n), 0)
        begin = t_start * ref.order
        ts_o, ts_r = ours.timesteps[begin:], ref.timesteps[begin:]
        assert torch.equal(ts_o, ts_r)
        ours.set_begin_index(begin)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(begin)
        x0, noise = _start(5), _start(6)
        latent_t = ts_r[:1].repeat(SHAPE[0])
        noisy_o = ours.add_noise(x0, noise, ts_o[:1].repeat(SHAPE[0]))
        noisy_r = ref.add_noise(x0, noise, latent_t)
        _close(noisy_o, noisy_r, f"{what} add_noise")
        _run_lockstep(ours, ref, ts_r, noisy_r, what)
        # add_noise after steps uses the current step index (sigma schedulers)
        _close(ours.add_noise(x0, noise, ts_o[-1:]), ref.add_noise(x0, noise, ts_r[-1:]), f"{what} late add_noise")


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_lookup_without_begin_index(name):
    cfg = CONFIGS["sdxl"]
    ours, ref = S.create(name, cfg), REFERENCE[name](cfg)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x0, noise = _start(7), _start(8)
    ts = ref.timesteps[[3, 9]]
    _close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), f"{name} add_noise lookup")


def test_ddim_eta_with_generator():
    for config_name in ("sd2_v", "sd2_eps", "trailing"):
        cfg = CONFIGS[config_name]
        ours, ref = S.create("ddim", cfg), REFERENCE["ddim"](cfg)
        ours.set_timesteps(12)
        ref.set_timesteps(12)
        _run_lockstep(ours, ref, ref.timesteps, _start(), f"ddim eta/{config_name}", seed=11, eta=0.7)


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_tcd_gamma_with_generator(gamma):
    """TCD's eta (gamma) > 0 re-noises from the intermediate timestep with generator noise."""
    for config_name in ("sd1", "sd2_v", "sdxl"):
        cfg = CONFIGS[config_name]
        for n in (1, 4, 8):
            ours, ref = S.create("tcd", cfg), REFERENCE["tcd"](cfg)
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            _check_schedule(ours, ref, f"tcd {config_name} {n}")
            _run_lockstep(ours, ref, ref.timesteps, _start(), f"tcd gamma={gamma}/{config_name}/{n}", seed=4, eta=gamma)
    with pytest.raises(ValueError, match="eta"):
        ours.step(torch.zeros(SHAPE), ours.timesteps[0], torch.zeros(SHAPE), eta=1.5)


def test_lcm_schedule_options():
    """original_inference_steps and timestep_scaling change the schedule and boundary scalings."""
    cfg = {**CONFIGS["sdxl"], "original_inference_steps": 20, "timestep_scaling": 5.0}
    for name in ("lcm", "tcd"):
        ours, ref = S.create(name, cfg), REFERENCE[name](cfg)
        ours.set_timesteps(6)
        ref.set_timesteps(6)
        _check_schedule(ours, ref, f"{name} options")
        _run_lockstep(ours, ref, ref.timesteps, _start(), f"{name} options", seed=2)
        with pytest.raises(ValueError, match="num_inference_steps"):
            S.create(name, cfg).set_timesteps(21)


def test_pndm_runge_kutta_warmup():
    cfg = {k: v for k, v in CONFIGS["sd1"].items() if k != "skip_prk_steps"}
    for n in (7, 25):
        ours, ref = S.create("pndm", cfg), REFERENCE["pndm"](cfg)
        assert not ref.config.skip_prk_steps
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        _check_schedule(ours, ref, f"pndm prk {n}")
        _run_lockstep(ours, ref, ref.timesteps, _start(), f"pndm prk {n}")


@pytest.mark.parametrize("extra", [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"prediction_type": "sample"},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"use_exponential_sigmas": True, "timestep_spacing": "trailing"},
    {"use_beta_sigmas": True, "timestep_spacing": "trailing"},
    {"use_karras_sigmas": True, "timestep_spacing": "trailing"},
    {"use_exponential_sigmas": True, "sigma_min": 0.1, "sigma_max": 8.0},
    {"use_beta_sigmas": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "leading"},
    {"final_sigmas_type": "sigma_min"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"solver_order": 3, "timestep_spacing": "leading"},
    {"solver_type": "heun", "algorithm_type": "sde-dpmsolver++"},
    {"interpolation_type": "log_linear"},
    {"timestep_type": "continuous", "prediction_type": "v_prediction"},
    {"set_alpha_to_one": True, "clip_sample": True, "steps_offset": 0},
    {"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()},
    {"lower_order_final": False, "euler_at_final": True},
    {"predict_x0": False, "solver_type": "bh1", "disable_corrector": [2]},
    {"variance_type": "fixed_large"},
])
@pytest.mark.parametrize("name", NAMES)
def test_other_options(name, extra):
    """Non-default options the reference supports: equal; those we do not: ValueError."""
    cfg = {**CONFIGS["sd1"], **extra}
    try:
        ref = REFERENCE[name](cfg)
        ref.set_timesteps(8)
        x = _start() * ref.init_noise_sigma
        g = torch.Generator().manual_seed(0)
        for t in ref.timesteps:
            _ref_step(ref, fake_model(ref.scale_model_input(x, t), t), t, x, g)
        ref = REFERENCE[name](cfg)
    except Exception:
        # the reference cannot run this combination: ours must refuse it too, not run garbage
        with pytest.raises((ValueError, NotImplementedError)):
            ours = S.create(name, cfg)
            ours.set_timesteps(8)
            x = _start() * ours.init_noise_sigma
            for t in ours.timesteps:
                x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x)
        return
    try:  # we may refuse an option (or a degenerate schedule, e.g. repeated timesteps) by name
        ours = S.create(name, cfg)
        ours.set_timesteps(8)
    except ValueError as e:
        assert any(k in str(e) for k in extra), str(e)
        return
    ref.set_timesteps(8)
    _check_schedule(ours, ref, f"{name} {extra}")
    _run_lockstep(ours, ref, ref.timesteps, _start() * ref.init_noise_sigma, f"{name} {extra}", relative=True)


@pytest.mark.parametrize("kind", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde"])
def test_sigma_schedules(name, kind):
    """Karras, exponential and beta sigmas, also with sigma_min/max carried over from an
    Euler config (the reference reads them whichever class saved them)."""
    carried = {**CONFIGS["sdxl"], "sigma_min": 0.3, "sigma_max": 9.0}
    for config_name, cfg in (("sd1", CONFIGS["sd1"]), ("sd2_v", CONFIGS["sd2_v"]), ("trailing", CONFIGS["trailing"]),
                             ("carried", carried)):
        for n in (3, 10):
            ours, ref = S.create(name, {**cfg, kind: True}), REFERENCE[name]({**cfg, kind: True})
            what = f"{name} {kind} {config_name} {n}"
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            _check_schedule(ours, ref, what)
            _run_lockstep(ours, ref, ref.timesteps, _start() * ref.init_noise_sigma, what, relative=True)
    with pytest.raises(ValueError, match="only one of"):
        S.create(name, {**CONFIGS["sd1"], "use_karras_sigmas": True, "use_exponential_sigmas": True, kind: True})


def test_lms_coefficient_matches_quadrature():
    from scipy import integrate
    sigmas = np.array([14.6, 9.1, 5.3, 2.2, 0.9, 0.3, 0.0])
    for t in range(len(sigmas) - 1):
        for order in range(1, min(t + 1, 4) + 1):
            for j in range(order):
                def basis(tau):
                    prod = 1.0
                    for k in range(order):
                        if k != j:
                            prod *= (tau - sigmas[t - k]) / (sigmas[t - j] - sigmas[t - k])
                    return prod
                expected = integrate.quad(basis, sigmas[t], sigmas[t + 1], epsrel=1e-10)[0]
                assert abs(lms_coefficient(sigmas, order, t, j) - expected) < 1e-6


def test_from_config_picks_class():
    assert S.from_config(scheduler_config("sd1")).name == "pndm"
    assert S.from_config(scheduler_config("sd2", "v_prediction")).name == "ddim"
    assert S.from_config(scheduler_config("sdxl")).name == "euler"
    dpm = {**scheduler_config("sd1"), "_class_name": "DPMSolverMultistepScheduler"}
    assert S.from_config(dpm).name == "dpmpp_2m"
    assert S.from_config({**dpm, "use_karras_sigmas": True}).name == "dpmpp_2m_karras"
    assert S.from_config({**dpm, "algorithm_type": "sde-dpmsolver++"}).name == "dpmpp_2m_sde"
    assert S.from_config({**dpm, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}).name \
        == "dpmpp_2m_sde_karras"
    for cls, name in S.CLASS_NAMES.items():
        assert S.from_config({**scheduler_config("sd1"), "_class_name": cls}).name == name


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="euler_a"):
        S.create("nope", scheduler_config("sd1"))
    with pytest.raises(ValueError, match="FancyScheduler.*PNDMScheduler"):
        S.from_config({**scheduler_config("sd1"), "_class_name": "FancyScheduler"})
    with pytest.raises(ValueError, match="thresholding"):
        S.create("ddim", {**scheduler_config("sd1"), "thresholding": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        S.create("euler", {**scheduler_config("sd1"), "beta_schedule": "weird"})
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.create("ddim", {**scheduler_config("sd1"), "timestep_spacing": "odd"}).set_timesteps(4)
    assert set(S.NAMES) == set(REFERENCE) | set(S.K_DIFFUSION_EQUIVALENT)


def test_api_surface():
    for name in S.NAMES:
        s = S.create(name, scheduler_config("sdxl"))
        assert s.name == name
        s.set_timesteps(4, device="cpu")
        assert s.timesteps.device.type == "cpu"
        assert s.config.num_train_timesteps == 1000
        assert len(s.alphas_cumprod) == 1000


def test_tcd_pipeline_passes_eta_as_gamma(tiny_model):
    """Our pipeline's eta reaches TCD's step as gamma, as diffusers' pipeline passes it."""
    import pipes
    path = tiny_model("sd1")
    ref, mine = pipes.reference("StableDiffusionPipeline", path), pipes.ours(path)
    ref.scheduler = diffusers.TCDScheduler.from_config(ref.scheduler.config)
    kw = dict(num_inference_steps=4, guidance_scale=2.0, output_type="np")
    got = {}
    for eta in (0.0, 0.3):
        expected = ref("a cube", generator=torch.Generator().manual_seed(0), eta=eta, **kw).images
        got[eta] = mine("a cube", generator=torch.Generator().manual_seed(0), eta=eta, scheduler="tcd", **kw).images
        assert np.abs(got[eta] - expected).max() <= 1e-4, f"tcd eta={eta}"
    assert np.abs(got[0.0] - got[0.3]).max() > 1e-3  # gamma changes the result
