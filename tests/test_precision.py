"""dtype="auto": bfloat16 on CPUs with native bf16 (float16 on CUDA, float32 elsewhere), with the
latents and the scheduler's arithmetic kept in float32, and images within bf16 tolerance.

Thresholds, measured on the tiny models (torch 2.13, AVX512-BF16 CPU):
- Image PSNR of bfloat16 vs float32 runs, 8 steps: 42.7-53.3 dB over SD1/SD2/SDXL and euler,
  euler_a, ddim, dpmpp_2m; 40 dB (an RMS error of 2.5 of 255 levels) is the bar. Wrong images
  fall far below it: a UNet that outputs zeros gives 21-25 dB, another seed 11-13 dB.
- Latents after 30 SDXL euler steps, relative RMS error vs float32: 4.6e-3 with float32
  latents; rounding the latents to bf16 around each scheduler step (diffusers' way) gives
  1.5e-2. The bar, 8e-3, fails the latter.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import controldiff as cd
from controldiff import cli, precision
from controldiff.precision import resolve_dtype

from pipes import ours

PSNR_MIN = 40.0
LATENT_ERR_MAX = 8e-3
BF16 = torch.bfloat16


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of images in [0, 1], in dB."""
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-20))


@pytest.fixture
def native_bf16(monkeypatch):
    """Set what the CPU detection answers."""
    def answer(value: bool):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)
    return answer


@pytest.fixture(scope="module")
def pipes(tiny_model):
    """(float32, bfloat16) pipelines per family, the bfloat16 one loaded with dtype="auto"."""
    made = {}

    def get(family="sd1", in_channels=4):
        key = (family, in_channels)
        if key not in made:
            path = tiny_model(family, in_channels=in_channels)
            with pytest.MonkeyPatch.context() as m:
                m.setattr(precision, "cpu_has_native_bf16", lambda: True)
                auto = cd.Pipeline.from_pretrained(path, dtype="auto")
            auto.progress = False
            made[key] = ours(path), auto
        return made[key]
    return get


# ----------------------------------------------------------------------------- choosing the dtype


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_the_detection(native_bf16, native, expected):
    native_bf16(native)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("auto", "cuda") == torch.float16       # CUDA: float16 whatever the CPU
    assert resolve_dtype("auto", "cuda:1") == torch.float16
    assert resolve_dtype("auto", "meta") == torch.float32       # other devices: float32


def test_explicit_dtypes_pass_through(native_bf16):
    native_bf16(True)
    for name, dtype in precision.NAMES.items():
        assert resolve_dtype(name, "cpu") == resolve_dtype(dtype, "cuda") == dtype


@pytest.mark.parametrize("caps, expected", [
    ({"avx512_bf16": True, "avx512_f": True}, True),
    ({"amx_bf16": True}, True),
    ({"bf16": True, "architecture": "arm64"}, True),   # ARM's BF16 extension
    ({"avx512_f": True, "avx512_bw": True}, False),    # oneDNN emulates bf16 here: slower than float32
    ({}, False),
])
def test_detection_reads_torch_cpu_capabilities(monkeypatch, caps, expected):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert precision.cpu_has_native_bf16() is expected
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if expected else torch.float32)


def test_environment_variable_forces_the_answer(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    monkeypatch.setenv(precision.FORCE_ENV, "0")
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
    monkeypatch.setenv(precision.FORCE_ENV, "1")
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setenv(precision.FORCE_ENV, "yes")
    with pytest.raises(ValueError, match=precision.FORCE_ENV):
        resolve_dtype("auto", "cpu")


@pytest.mark.parametrize("bad", ["half", "int8", "", None, torch.int8, torch.float64, 16])
def test_unknown_dtype_is_an_error_naming_dtype(bad):
    with pytest.raises(ValueError, match=r"^dtype: expected .*auto"):
        resolve_dtype(bad, "cpu")


def test_from_pretrained_checks_dtype_before_loading(tiny_model, monkeypatch):
    from controldiff.loading import folder

    monkeypatch.setattr(folder, "load_components", lambda *a, **k: pytest.fail("loaded before checking dtype"))
    with pytest.raises(ValueError, match="^dtype: "):
        cd.Pipeline.from_pretrained(tiny_model("sd1"), dtype="half")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_from_pretrained_auto(tiny_model, native_bf16, native, expected):
    native_bf16(native)
    pipe = cd.Pipeline.from_pretrained(tiny_model("sd1"), dtype="auto")
    assert pipe.dtype == pipe.vae.dtype == pipe.text_encoders[0].dtype == expected


def test_sdxl_vae_stays_float32_in_float16_where_its_config_asks(tiny_model, tmp_path):
    """The SDXL VAE overflows in float16 (diffusers upcasts it, ``force_upcast``); bfloat16 has
    float32's range, so there it stays bfloat16 (decode PSNR vs float32: 47 dB at SD1.5 size)."""
    path = tiny_model("sdxl")
    half = cd.Pipeline.from_pretrained(path, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert cd.Pipeline.from_pretrained(path, dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    copy = shutil.copytree(path, tmp_path / "no_upcast")
    cfg_file = copy / "vae" / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), force_upcast=False)))
    assert cd.Pipeline.from_pretrained(copy, dtype=torch.float16).vae.dtype == torch.float16


@pytest.mark.parametrize("native, shown", [(True, "bfloat16"), (False, "float32")])
def test_cli_dtype_auto_resolves_and_is_shown(tiny_model, native_bf16, tmp_path, capsys, native, shown):
    native_bf16(native)
    assert cli._device_and_dtype("cpu", "auto")[1] == getattr(torch, shown)
    rc = cli.main(["generate", str(tiny_model("sd1")), "-p", "a cat", "--steps", "2", "--width", "64",
                   "--height", "64", "--seed", "1", "-o", str(tmp_path / "a.png")])  # --dtype auto: the default
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"sd1, txt2img, {shown})" in out


def test_cli_unknown_dtype_names_the_argument(capsys):
    assert cli.main(["generate", "-p", "x", "--dtype", "half"]) == 2
    assert "--dtype" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what bf16 computes


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_bf16_images_within_tolerance_of_float32(pipes, family, scheduler):
    full, auto = pipes(family)
    assert auto.dtype == torch.bfloat16
    kw = dict(num_inference_steps=8, scheduler=scheduler, output_type="np")
    ref = full("a cat on a hill", seed=0, **kw).images
    got = auto("a cat on a hill", seed=0, **kw).images
    assert psnr(got, ref) >= PSNR_MIN
    assert psnr(full("a cat on a hill", seed=1, **kw).images, ref) < PSNR_MIN   # the bar tells images apart


@pytest.mark.parametrize("task", ["img2img", "inpaint_blend", "inpaint_concat", "sag"])
def test_bf16_other_tasks_within_tolerance(pipes, task):
    """Image latents, masks and concatenated channels meet float32 latents; SAG re-runs the
    UNet through ``ctx.run_unet``."""
    full, auto = pipes("sd1", 9 if task == "inpaint_concat" else 4)
    g = np.random.default_rng(0)
    image = g.random((1, 64, 64, 3)).astype(np.float32)
    mask = np.zeros((1, 64, 64, 1), np.float32)
    mask[:, 16:48, 16:48] = 1.0
    kw = dict(num_inference_steps=6, output_type="np", seed=0, scheduler="euler")
    if task == "img2img":
        kw.update(image=image, strength=0.7)
    elif task.startswith("inpaint"):
        kw.update(image=image, mask_image=mask)
    else:
        kw.update(controls=[cd.SAG(scale=0.75)], height=64, width=64)
    assert psnr(auto("a cat", **kw).images, full("a cat", **kw).images) >= PSNR_MIN


def test_latents_and_scheduler_stay_float32_around_a_bf16_unet(pipes, monkeypatch):
    _, auto = pipes("sd1")
    seen = {"unet": set(), "step": set()}
    make = auto.make_scheduler

    def recording(name=None):
        sched = make(name)
        step = sched.step

        def watched(model_output, t, sample, **kw):
            seen["step"].add((model_output.dtype, sample.dtype))
            out = step(model_output, t, sample, **kw)
            seen["step"].add((out.dtype,))
            return out
        sched.step = watched
        return sched

    monkeypatch.setattr(auto, "make_scheduler", recording)
    hook = auto.unet.register_forward_pre_hook(lambda m, args: seen["unet"].add(args[0].dtype))
    try:
        for scheduler in ("euler", "dpmpp_2m", "ddim"):
            out = auto("a cat", num_inference_steps=3, scheduler=scheduler, seed=0, output_type="latent")
            assert out.images.dtype == torch.float32
    finally:
        hook.remove()
    assert seen["unet"] == {BF16}
    assert seen["step"] == {(torch.float32, torch.float32), (torch.float32,)}


def test_float32_latents_keep_a_bf16_run_close(pipes, monkeypatch):
    """The point of float32 latents: rounding them to bf16 around each step (diffusers' way,
    simulated here) triples the error after 30 steps."""
    full, auto = pipes("sdxl")
    kw = dict(num_inference_steps=30, scheduler="euler", seed=0, output_type="latent")
    ref = full("a cat", **kw).images

    def rel_err(pipe):
        got = pipe("a cat", **kw).images
        return float((got.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())

    assert rel_err(auto) <= LATENT_ERR_MAX
    make = auto.make_scheduler

    def rounding(name=None):
        sched = make(name)
        step = sched.step
        sched.step = lambda out, t, x, **k: step(out.to(BF16), t, x.to(BF16), **k)
        return sched

    monkeypatch.setattr(auto, "make_scheduler", rounding)
    assert rel_err(auto) > LATENT_ERR_MAX


def test_bfloat16_draws_what_float32_draws_by_the_judge():
    """The embedded model's held-out captions in bfloat16 and float32: the judge's accuracies
    agree (issue 14's judged check), and the pictures are close (PSNR)."""
    from controldiff.demo import default_model_path, measure
    from controldiff.demo.judge import judge, summarize

    singles = measure.held_out_captions()[0][:20]
    verdicts, images = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = cd.Pipeline.from_pretrained(default_model_path(), dtype=dtype)
        pipe.progress = False
        images[dtype] = [measure._generate(pipe, c, 0) for c in singles]
        verdicts[dtype] = summarize(judge(img, c) for img, c in zip(images[dtype], singles))
    mse = np.mean([((a.astype(float) - b.astype(float)) ** 2).mean()
                   for a, b in zip(images[torch.float32], images[torch.bfloat16])])
    psnr = 10 * np.log10(255 ** 2 / mse)
    print(verdicts, f"PSNR {psnr:.1f} dB")
    assert all(abs(verdicts[torch.float32][k] - verdicts[torch.bfloat16][k]) <= 0.1 for k in verdicts[torch.float32])
    assert psnr > 27
