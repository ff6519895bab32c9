"""The command line, run in-process through ``main([...])``, plus its helpers
(PNG parameters, output numbering, the embedded demo model)."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controldiff import cli, demo
from controldiff.png import format_parameters, read_parameters, write_png

FAST = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A home folder of the session's own (the CLI must not need one)."""
    return tmp_path_factory.mktemp("controldiff-home")


@pytest.fixture
def home(demo_home, monkeypatch):
    monkeypatch.setenv("CONTROLDIFF_HOME", str(demo_home))
    return demo_home


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- png


def test_format_parameters_a1111_layout():
    text = format_parameters("a cat, sitting", "blurry", 20, "euler_a", 7.5, 1, 512, 768, "sd15",
                             {"Denoising strength": 0.8, "Skipped": None})
    assert text.splitlines() == [
        "a cat, sitting",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 1, Size: 512x768, Model: sd15, Denoising strength: 0.8",
    ]
    no_negative = format_parameters("a cat", None, 20, "pndm", 7.5, 1, 64, 64, None, None)
    assert no_negative.splitlines() == ["a cat", "Steps: 20, Sampler: pndm, CFG scale: 7.5, Seed: 1, Size: 64x64"]


def test_png_parameters_round_trip(tmp_path):
    img = Image.new("RGB", (8, 8), "red")
    for name, text in (("a.png", "a cat\nSteps: 2"), ("u.png", "ein Kätzchen 猫\nSteps: 2")):  # u: not Latin-1, iTXt
        with open(tmp_path / name, "wb") as f:
            write_png(img, f, text)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_parameters(tmp_path / "a.png") == "a cat\nSteps: 2"
    assert read_parameters(tmp_path / "u.png") == "ein Kätzchen 猫\nSteps: 2"
    assert read_parameters(tmp_path / "plain.png") is None


# ----------------------------------------------------------------------------- demo model


def test_demo_model_is_shipped_with_its_recipe():
    from safetensors import safe_open

    from controldiff.demo import recipe

    path = demo.default_model_path()
    assert path == demo.MODEL_DIR and (path / "model_index.json").is_file()
    made = json.loads((path / "recipe.json").read_text())
    # the 2500-step snapshot of a 4000-step run: what the recipe's default steps make
    assert made["step"] == recipe.Recipe().steps and made["step"] % made["recipe"]["snapshot_every"] == 0
    assert made["log"][0]["stage"] == "vae" and made["log"][-1] == {**made["log"][-1], "stage": "model",
                                                                     "step": made["step"]}
    files = list(path.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    for f in files:  # shipped in float16
        with safe_open(f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F16"}, f
    assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 16 * 2**20
    assert "built-in demo model" in demo.DEMO_NOTICE


def test_missing_demo_model_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "MODEL_DIR", tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="controldiff.demo.recipe"):
        demo.default_model_path()


# ----------------------------------------------------------------------------- generate


def test_generate_with_demo_model_writes_png_with_parameters(home, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc, stdout, err = run(capsys, "generate", "-p", "a red cube", "-n", "blurry", "--seed", 7, "--cfg", 5,
                          "--scheduler", "euler_a", *FAST, "-o", out)
    assert rc == 0, err
    assert demo.DEMO_NOTICE in stdout
    assert str(out) in stdout and "Generated 1 image" in stdout
    with Image.open(out) as im:
        assert im.size == (64, 64)
    text = read_parameters(out)
    lines = text.splitlines()
    assert lines[0] == "a red cube" and lines[1] == "Negative prompt: blurry"
    for field in ("Steps: 2", "Sampler: Euler a", "CFG scale: 5.0", "Seed: 7", "Size: 64x64"):
        assert field in lines[2]


def test_generate_random_seed_numbered_outputs(home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run(capsys, "generate", "-p", "x", *FAST, "--num-images", 2)
    assert rc == 0, err
    seed = int(re.search(r"Seed: (\d+)", stdout).group(1))
    files = sorted((tmp_path / "outputs").iterdir())
    assert [f.name for f in files] == [f"00000-{seed}.png", f"00001-{seed + 1}.png"]
    assert f"Seed: {seed + 1}," in read_parameters(files[1])
    assert "Sampler: PLMS" in read_parameters(files[0])  # the folder's own scheduler, by A1111's name
    rc, stdout, _ = run(capsys, "generate", "-p", "x", *FAST, "--seed", seed + 1)
    assert rc == 0
    again = tmp_path / "outputs" / f"00002-{seed + 1}.png"
    assert str(Path("outputs") / again.name) in stdout
    # image i of a batch is image 0 of a run with seed + i (up to batched float rounding)
    a, b = (np.asarray(Image.open(f), dtype=np.int16) for f in (again, files[1]))
    assert np.abs(a - b).max() <= 2


def test_generate_img2img_and_inpaint(home, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    rc, _, err = run(capsys, "generate", "-p", "x", "--steps", 4, "--image", init, "--strength", 0.5,
                     "--seed", 1, "-o", tmp_path / "i2i.png")
    assert rc == 0, err
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "i2i.png")
    rc, _, err = run(capsys, "generate", "-p", "x", "--steps", 2, "--image", init, "--mask", mask,
                     "--seed", 1, "-o", tmp_path / "inp.png")
    assert rc == 0, err
    assert "Denoising strength: 1.0" in read_parameters(tmp_path / "inp.png")


def test_generate_ctrl_c_keeps_finished_images(home, tmp_path, capsys, monkeypatch):
    from controldiff import pipeline

    calls = []

    def fake_call(self, *args, callback=None, **kw):
        if calls:  # the second image: first Ctrl-C finishes the step, then stops
            signal.raise_signal(signal.SIGINT)
            calls.append(callback(0, None, None))
            return pipeline.Output(images=[], steps_done=1, cancelled=True)
        calls.append(callback(0, None, None))
        return pipeline.Output(images=[Image.new("RGB", (64, 64))], steps_done=2)

    monkeypatch.setattr(pipeline.Pipeline, "__call__", fake_call)
    before = signal.getsignal(signal.SIGINT)
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "--num-images", "3", "-o", tmp_path / "c.png")
    assert rc == 130 and calls == [True, False]
    assert "cancelled after 1 step of image 2; 1 finished image kept" in err and "Traceback" not in err
    assert (tmp_path / "c-1.png").exists() and read_parameters(tmp_path / "c-1.png")
    assert not (tmp_path / "c-2.png").exists() and not (tmp_path / "c-3.png").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    def interrupted(self, *args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Pipeline, "__call__", interrupted)
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST)
    assert rc == 130 and "interrupted" in err


def test_a_fault_in_a_later_image_says_what_was_kept(home, tmp_path, capsys, monkeypatch):
    from controldiff import pipeline

    real = pipeline.Pipeline.__call__
    calls = []

    def second_fails(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("VAE decode: the result contains NaN")
        return real(self, *args, **kw)

    monkeypatch.setattr(pipeline.Pipeline, "__call__", second_fails)
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "--num-images", "3", "--seed", "5", "-o", tmp_path / "f.png")
    assert rc == 2 and "Traceback" not in err
    assert "image 2 (seed 6): VAE decode: the result contains NaN; 1 finished image kept" in err
    assert (tmp_path / "f-1.png").exists() and not (tmp_path / "f-2.png").exists()


# ----------------------------------------------------------------------------- info


def test_info_on_demo_model(home, capsys):
    from controldiff.loading.folder import load_components

    path = demo.default_model_path()
    rc, out, err = run(capsys, "info", path)
    assert rc == 0, err
    assert re.search(r"family:\s+sd1", out)
    assert re.search(r"kind:\s+txt2img \(unet in_channels=4\)", out)
    assert re.search(r"default size:\s+64x64", out) and re.search(r"latent factor:\s+4", out)
    c = load_components(path)
    for name, module in (("unet", c.unet), ("vae", c.vae), ("text_encoder", c.text_encoder)):
        count = sum(p.numel() for p in module.parameters())
        assert f"{name} parameters:" in out and f"{count:,}" in out


def test_info_on_sdxl_folder(tiny_model, capsys):
    rc, out, err = run(capsys, "info", tiny_model(family="sdxl"))
    assert rc == 0, err
    assert re.search(r"family:\s+sdxl", out) and "text_encoder_2 parameters:" in out


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, names", [
    (["generate", "-p", "x", "--width", "102"], "--width"),
    (["generate", "-p", "x", "--height", "0"], "--height"),
    (["generate", "-p", "x", "--scheduler", "nope"], "--scheduler"),
    (["generate", "-p", "x", "--steps", "two"], "--steps"),
    (["generate", "-p", "x", "--mask", "m.png"], "--mask"),
    (["generate", "-p", "x", "--strength", "0.5"], "--strength"),
    (["generate", "-p", "x", "--dtype", "int8"], "--dtype"),
    (["generate", "/no/such/model", "-p", "x"], "/no/such/model"),
    (["info", "/no/such/model"], "/no/such/model"),
    (["info"], "MODEL"),
])
def test_bad_arguments_exit_2_naming_the_argument(home, capsys, argv, names):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert names in err and "error" in err and "Traceback" not in err


def test_unreadable_image_is_a_usage_error(home, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "--image", bad)
    assert rc == 2 and "--image" in err and "Traceback" not in err


def test_library_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{}")
    rc, _, err = run(capsys, "generate", tmp_path, "-p", "x")
    assert rc == 2
    assert err.startswith("controldiff: error: ") and "unet" in err and "Traceback" not in err


def test_generate_with_lora_embedding_and_controlnet(tiny_model, tmp_path, capsys):
    """LoRA, embedding, prompt weighting, clip skip and a ControlNet from the command line."""
    import diffusers
    import PIL.Image
    from safetensors.torch import save_file

    from controldiff.png import read_parameters

    folder = tiny_model("sd1")
    g = torch.Generator().manual_seed(0)
    lora = {}
    for i in range(2):
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{i + 1}_to_q"
        lora[f"{key}.lora_down.weight"] = torch.randn(2, 16, generator=g)
        lora[f"{key}.lora_up.weight"] = torch.randn(16, 2, generator=g)
    save_file(lora, str(tmp_path / "style.safetensors"))
    save_file({"<toy>": torch.randn(1, 32, generator=g)}, str(tmp_path / "toy.safetensors"))
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).save_pretrained(
        tmp_path / "cn")
    PIL.Image.new("RGB", (64, 64), "white").save(tmp_path / "edges.png")
    out = tmp_path / "img.png"
    args = [str(folder), "-p", "a (<toy>:1.2) cat", "--steps", "2", "--seed", "1", "-o", str(out),
            "--lora", f"{tmp_path / 'style.safetensors'}:0.7", "--embedding", str(tmp_path / "toy.safetensors"),
            "--controlnet", f"{tmp_path / 'cn'}:{tmp_path / 'edges.png'}:0.5", "--clip-skip", "1"]
    assert cli.main(["generate", *args]) == 0
    text = read_parameters(out)
    assert 'Lora: "style:0.7"' in text and "TI: <toy>" in text and "Clip skip: 2" in text  # A1111's count
    # the ControlNet as sd-webui-controlnet records a unit, so A1111 restores it
    assert ('ControlNet 0: "Module: none, Model: cn, Weight: 0.5, Guidance Start: 0.0, Guidance End: 1.0, '
            'Control Mode: Balanced"') in text
    capsys.readouterr()
    assert cli.main(["generate", *args[:-2], "--overwrite", "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "--lora" in capsys.readouterr().err


# ----------------------------------------------------------------------------- outputs


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI loads a model: what is refused must be refused before."""
    from controldiff import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(never))


def _fake_images(monkeypatch, on_call=None, settings=None):
    """Replace sampling by a fake that returns one gray image per call (and records kwargs)."""
    from controldiff import pipeline

    calls = []

    def fake(self, *args, callback=None, **kw):
        calls.append(kw)
        if on_call is not None:
            result = on_call(len(calls), callback)
            if result is not None:
                return result
        return pipeline.Output(images=[Image.new("RGB", (64, 64), (9 * len(calls), 0, 0))], steps_done=2,
                               settings={"steps": 2, "guidance_scale": 7.5, "scheduler": "pndm", **(settings or {})})

    monkeypatch.setattr(pipeline.Pipeline, "__call__", fake)
    return calls


def test_existing_output_is_refused_before_loading(home, tmp_path, capsys, no_model):
    (tmp_path / "x.png").write_bytes(b"precious")
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "-o", tmp_path / "x.png")
    assert rc == 2 and "--out" in err and "x.png exists" in err and "--overwrite" in err
    (tmp_path / "multi-2.png").write_bytes(b"precious")
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "--num-images", 3, "-o", tmp_path / "multi.png")
    assert rc == 2 and "multi-2.png exists" in err
    assert (tmp_path / "x.png").read_bytes() == b"precious" and (tmp_path / "multi-2.png").read_bytes() == b"precious"
    assert not (tmp_path / "multi-1.png").exists()


def test_overwrite_replaces(home, tmp_path, capsys, monkeypatch):
    _fake_images(monkeypatch)
    (tmp_path / "x.png").write_bytes(b"old")
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "-o", tmp_path / "x.png", "--overwrite")
    assert rc == 0, err
    assert read_parameters(tmp_path / "x.png").startswith("x\n")


@pytest.mark.parametrize("where", ["parent is a file", "folder is a file"])
def test_bad_output_location_is_refused_before_loading(home, tmp_path, capsys, no_model, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    out = blocker / "img.png" if where == "parent is a file" else f"{blocker}/"
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "-o", out)
    assert rc == 2 and "--out" in err and str(blocker) in err and "Traceback" not in err


def test_full_disk_is_one_line_and_keeps_finished_images(home, tmp_path, capsys, monkeypatch):
    import errno

    from controldiff import png

    _fake_images(monkeypatch)
    real = png.write_png
    written = []

    def fill_up(image, f, text):
        if written:  # the second image: part of it, then no space
            f.write(b"\x89PNG" + b"\0" * 8000)
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real(image, f, text))

    monkeypatch.setattr(png, "write_png", fill_up)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "generate", "-p", "x", *FAST, "--num-images", 3, "--seed", 5)
    assert rc == 1
    assert err.strip().splitlines() == [
        "controldiff: error: cannot save image 2 in outputs: No space left on device; 1 finished image kept"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["00000-5.png"]  # no partial, no 0-byte
    assert read_parameters(tmp_path / "outputs" / "00000-5.png")


def test_sigterm_is_like_ctrl_c_in_process(home, tmp_path, capsys, monkeypatch):
    def second_image_gets_sigterm(n, callback):
        if n == 2:
            signal.raise_signal(signal.SIGTERM)
            assert callback(0, None, None) is False  # sampling stops after this step
            from controldiff import pipeline

            return pipeline.Output(images=[], steps_done=1, cancelled=True)
        return None

    _fake_images(monkeypatch, second_image_gets_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "--num-images", 3, "-o", tmp_path / "t.png")
    assert rc == 143
    assert "SIGTERM: stopping after this step" in err
    assert "cancelled after 1 step of image 2; 1 finished image kept" in err
    assert [p.name for p in tmp_path.iterdir()] == ["t-1.png"]
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


def test_signal_while_an_image_finishes_keeps_it(home, tmp_path, capsys, monkeypatch):
    def signal_after_last_step(n, callback):
        if n == 1:
            signal.raise_signal(signal.SIGINT)  # arrives during decoding: the image is complete
        return None

    _fake_images(monkeypatch, signal_after_last_step)
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "--num-images", 2, "-o", tmp_path / "s.png")
    assert rc == 130 and "stopped after image 1; 1 finished image kept" in err
    assert [p.name for p in tmp_path.iterdir()] == ["s-1.png"]


def test_sigterm_real_process_keeps_finished_images(home, tmp_path):
    """A real CLI process gets SIGTERM while sampling its second image: it keeps the first,
    says so, and exits 143 (128 + SIGTERM), leaving no partial file."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CONTROLDIFF_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "controldiff.cli", "generate", "-p", "x", "--steps", "150", "--width", "64",
         "--height", "64", "--num-images", "3", "--seed", "1", "-o", str(tmp_path / "out") + "/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        for line in child.stdout:  # wait for the first saved image: the second is now sampling
            if line.strip().endswith(".png"):
                break
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143, err
    assert "SIGTERM: stopping after this step" in err and "1 finished image kept" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-1.png"]


# ----------------------------------------------------------------------------- arguments


def test_short_n_with_a_number_is_refused(home, capsys, no_model):
    rc, _, err = run(capsys, "generate", "-p", "x", "-n", "3")
    assert rc == 2 and "--num-images 3" in err and "negative prompt" in err
    rc, _, err = run(capsys, "generate", "-p", "x", "--n", "3")  # no --n any more: ambiguous, not a guess
    assert rc == 2 and "--num-images" in err and "--negative" in err
    args = cli.build_parser().parse_args(["generate", "--negative", "3", "-n", "blurry 2"])
    assert args.negative == "blurry 2"
    assert cli.build_parser().parse_args(["generate", "--negative", "3"]).negative == "3"


@pytest.mark.parametrize("device", ["cuda:99", "nosuchdevice"])
def test_unavailable_device_is_one_line_before_loading(home, capsys, no_model, device):
    rc, _, err = run(capsys, "generate", "-p", "x", "--device", device)
    assert rc == 2 and "--device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cuda_without_cuda_is_one_line(home, capsys, no_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run(capsys, "generate", "-p", "x", "--device", "cuda")
    assert rc == 2 and "--device: cuda is not available" in err and "Traceback" not in err


def test_sizes_are_checked_before_loading(home, capsys, no_model):
    rc, _, err = run(capsys, "generate", "-p", "x", "--width", 102)  # the demo model: latent factor 4
    assert rc == 2 and "--width: 102 is not a multiple of 4" in err


@pytest.mark.parametrize("argv, names", [
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64 - 2), "--num-images", "3"], "--seed/--num-images"),
    (["--guidance", "nan"], "--guidance"),
    (["--cfg", "inf"], "--guidance"),
    (["--image", "i.png", "--strength", "nan"], "--strength"),
    (["--prompt", "caf\udce9"], "--prompt"),
    (["--negative", "\udcff"], "--negative"),
    (["--embedding", "e.pt:tok\udcff"], "--embedding"),
])
def test_out_of_range_values_are_refused_before_loading(home, capsys, no_model, argv, names):
    rc, _, err = run(capsys, "generate", *argv)
    assert rc == 2 and names in err and "Traceback" not in err


def test_non_utf8_prompt_names_the_byte(home, capsys, no_model):
    rc, _, err = run(capsys, "generate", "-p", "caf\udce9")  # b"caf\xe9" (Latin-1) decoded by Python's argv
    assert rc == 2 and "--prompt" in err and "UTF-8" in err and "0xe9" in err


def test_seed_range_is_the_library_range(home, tmp_path, capsys, monkeypatch):
    from controldiff.noise import SEED_LIMIT

    _fake_images(monkeypatch)
    top = SEED_LIMIT - 2
    rc, _, err = run(capsys, "generate", "-p", "x", *FAST, "--seed", top, "--num-images", 2, "-o", tmp_path / "s")
    assert rc == 0, err
    assert f"Seed: {top + 1}," in read_parameters(tmp_path / "s-2.png")  # a seed --seed accepts


def test_png_records_the_values_the_pipeline_used(home, tmp_path, capsys, monkeypatch):
    """No --steps/--cfg: the library picks its defaults, the PNG says what it used."""
    calls = _fake_images(monkeypatch, settings={"steps": 33, "guidance_scale": 4.5, "scheduler": "euler",
                                                 "controls": [{"name": "SAG", "scale": 0.75}]})
    rc, _, err = run(capsys, "generate", "-p", "x", "--seed", 1, "-o", tmp_path / "d.png")
    assert rc == 0, err
    assert not {"num_inference_steps", "guidance_scale", "strength"} & set(calls[0])
    text = read_parameters(tmp_path / "d.png")
    assert "Steps: 33, Sampler: Euler, CFG scale: 4.5, Seed: 1" in text
    assert 'SAG 0: "{\\"scale\\": 0.75}"' in text


@pytest.mark.parametrize("module", ["controldiff", "controldiff.cli"])
def test_python_dash_m_reports_a_subcommands_errors(tmp_path, module):
    """``python -m controldiff`` and ``python -m controldiff.cli`` catch the errors the
    subcommands raise (under ``-m controldiff.cli`` the module used to exist twice, so a
    training error escaped as a traceback)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", module, "train", "lora", str(tmp_path / "nothing"), "--data",
                          str(tmp_path), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "controldiff train: error: argument MODEL: not a model folder" in run.stderr
