"""LoRA training on tiny models: behaviour (the loss on the training images falls, the
saved LoRA changes generation), the saved files load alike in our Pipeline and in diffusers
(kohya and diffusers formats), exact resume (after a checkpoint and after Ctrl-C), atomic
checkpoints, cached latents, min-SNR weights as diffusers', the CLI, and the errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pipes
from controldiff import cli
from controldiff.training import LoRA, Objective, TrainConfig, compute_snr, train
from controldiff.training import checkpoint as ckpt
from controldiff.training.text import encode

KW = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")


def photos(folder, sizes=((40, 32), (32, 36), (48, 32)), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def config(data, out, **kw):
    base = dict(prompt="a photo of sks", resolution=32, steps=4, batch_size=2, seed=1, lr=1e-2, progress=False)
    return TrainConfig(data, out, **{**base, **kw})


def same_files(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tiny_model, data, tmp_path_factory):
    """A LoRA trained 30 steps on the tiny SD1 model, UNet and text encoder, alpha != rank."""
    out = tmp_path_factory.mktemp("trained")
    result = train(tiny_model("sd1"), LoRA(rank=4, alpha=2, train_text_encoder=True),
                   config(data, out, steps=30, center_crop=True))
    return out, result


def eval_loss(pipe, data, lora=None, prompt="a photo of sks"):
    """The denoising loss on the training images at fixed noise and timesteps."""
    from controldiff.schedulers import create
    from controldiff.training.transforms import ImageTransform, load_rgb

    if lora:
        pipe.load_lora(lora, name="evaluated")
    try:
        t = ImageTransform(32, center_crop=True)
        x = torch.stack([t(load_rgb(p))[0] for p in sorted(data.glob("*.png"))])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            latents = pipe.vae.encode(x).mode() * pipe.vae.config.scaling_factor
            latents = latents.repeat(8, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=g)
            embeds, _ = encode(pipe.tokenizers, pipe.text_encoders, [prompt] * len(latents), False)
            objective = Objective(create("ddpm", pipe.scheduler_config))
            return objective(pipe.unet, latents, embeds, noise=noise, timesteps=timesteps).item()
    finally:
        if lora:
            pipe.unload_lora("evaluated")


def test_training_lowers_the_loss_and_the_lora_changes_images(trained, data, tiny_model):
    out, result = trained
    assert len(result.losses) == 30 and result.step == 30
    pipe = pipes.ours(tiny_model("sd1"))
    before = eval_loss(pipe, data)
    after = eval_loss(pipe, data, out / "pytorch_lora_weights.safetensors")
    assert after < 0.9 * before, (before, after)
    plain = pipe("a photo of sks", seed=0, **KW).images
    pipe.load_lora(out / "pytorch_lora_weights.safetensors")
    assert np.abs(pipe("a photo of sks", seed=0, **KW).images - plain).max() > 1e-2


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_saved_lora_loads_alike_in_our_pipeline_and_diffusers(trained, tiny_model, fmt):
    out, _ = trained
    file = out / ("pytorch_lora_weights.safetensors" if fmt == "diffusers" else f"{out.name}.safetensors")
    model = tiny_model("sd1")
    ours = pipes.ours(model)
    ours.load_lora(file)
    ref = pipes.reference("StableDiffusionPipeline", model)
    ref.load_lora_weights(str(file))
    a = ours("a photo of sks", seed=0, **KW).images
    b = ref("a photo of sks", generator=torch.Generator().manual_seed(0), **KW).images
    assert np.abs(a - b).max() <= 1e-4
    plain = pipes.ours(model)("a photo of sks", seed=0, **KW).images
    assert np.abs(a - plain).max() > 1e-2  # the LoRA (UNet and text encoder, alpha/rank = 0.5) is applied


def test_both_formats_hold_the_same_lora(trained, tiny_model):
    out, _ = trained
    pipe = pipes.ours(tiny_model("sd1"))
    images = []
    for file in (out / "pytorch_lora_weights.safetensors", out / f"{out.name}.safetensors"):
        pipe.load_lora(file, name="x")
        images.append(pipe("a photo of sks", seed=0, **KW).images)
        pipe.unload_lora("x")
    assert np.abs(images[0] - images[1]).max() <= 1e-6


def test_resume_after_a_checkpoint_or_ctrl_c_equals_one_run(tiny_model, data, tmp_path, monkeypatch):
    """Random crops, 3 images in batches of 2 (resumed mid-epoch), min-SNR, noise offset."""
    model = tiny_model("sd1")
    kw = dict(snr_gamma=5.0, noise_offset=0.1, gradient_accumulation=2, steps=4)
    straight = train(model, LoRA(), config(data, tmp_path / "a", checkpoint_every=2, **kw))
    resumed = train(model, LoRA(), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2", **kw))
    assert resumed.losses == straight.losses[2:]
    assert same_files(tmp_path / "a" / "pytorch_lora_weights.safetensors",
                      tmp_path / "b" / "pytorch_lora_weights.safetensors") == 0

    calls = []
    real = Objective.__call__

    def interrupted(self, *a, **k):  # Ctrl-C in the middle of step 4's second batch
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Objective, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(model, LoRA(), config(data, tmp_path / "c", checkpoint_every=2, **kw))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.setattr(Objective, "__call__", real)
    again = train(model, LoRA(), config(data, tmp_path / "c", resume=tmp_path / "c", **kw))  # the latest
    assert again.losses == straight.losses[3:]
    assert same_files(tmp_path / "a" / "pytorch_lora_weights.safetensors",
                      tmp_path / "c" / "pytorch_lora_weights.safetensors") == 0


def test_a_failing_checkpoint_leaves_the_last_good_one(tiny_model, data, tmp_path, monkeypatch):
    import errno

    real = ckpt.save_file
    calls = []

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            real(tensors, path, *a, **k)  # a partial file is there when the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match="checkpoint-2.*previous checkpoints are unchanged"):
        train(tiny_model("sd1"), LoRA(), config(data, tmp_path, checkpoint_every=1))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    good = ckpt.read(tmp_path / "checkpoint-1")
    assert good.step == 1 and good.trainable


def test_cached_latents_give_the_same_run(tiny_model, data, tmp_path):
    model = tiny_model("sd1")
    a = train(model, LoRA(), config(data, tmp_path / "a", center_crop=True, steps=3))
    b = train(model, LoRA(), config(data, tmp_path / "b", center_crop=True, steps=3, cache_latents=True))
    np.testing.assert_allclose(a.losses, b.losses, rtol=0, atol=1e-6)


def test_min_snr_weights_equal_diffusers():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr as reference

    from controldiff.schedulers import create

    t = torch.tensor([0, 10, 500, 999])
    ours = create("ddpm", {})
    assert torch.allclose(compute_snr(ours.alphas_cumprod, t), reference(DDPMScheduler(), t), rtol=1e-6)


def test_resume_from_another_model_is_refused(tiny_model, data, tmp_path):
    train(tiny_model("sd1"), LoRA(), config(data, tmp_path / "a", steps=1, checkpoint_every=1))
    with pytest.raises(ValueError, match="resume: .* another model"):
        train(tiny_model("sd2"), LoRA(), config(data, tmp_path / "b", resume=tmp_path / "a"))
    with pytest.raises(ValueError, match="resume: .* other settings"):
        train(tiny_model("sd1"), LoRA(rank=8), config(data, tmp_path / "b", resume=tmp_path / "a"))
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_sizes_are_of_the_turned_image(tmp_path):
    """A photo's EXIF orientation turns it when loaded: its recorded size (SDXL's original-size
    time id, its bucket, the resolution check) is the turned one."""
    from controldiff.training.data import read_folder
    from controldiff.training.transforms import load_rgb

    folder = tmp_path / "d"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 48x32, shown 32x48
    Image.new("RGB", (48, 32), "red").save(folder / "a.jpg", exif=exif)
    Image.new("RGB", (48, 32), "red").save(folder / "b.jpg")
    sizes = [e.size for e in read_folder(folder, 32, "x")]
    assert sizes == [load_rgb(folder / "a.jpg").size, load_rgb(folder / "b.jpg").size] == [(32, 48), (48, 32)]


def test_data_errors_name_the_file(tmp_path, tiny_model):
    model = tiny_model("sd1")

    def fails(folder, match, **kw):
        with pytest.raises(ValueError, match=match):
            train(model, LoRA(), config(folder, tmp_path / "out", **kw))

    fails(tmp_path / "missing", "data: .*missing is not a folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "data: .*empty holds no images")
    bad = photos(tmp_path / "bad", sizes=((40, 40),))
    (bad / "1.png").write_bytes(b"\x89PNG not really")
    fails(bad, r"1\.png: cannot read the image")
    small = photos(tmp_path / "small", sizes=((40, 40), (40, 20)))
    fails(small, r"1\.png: the image is 40x20, smaller than the resolution 32")
    caption = photos(tmp_path / "caption", sizes=((40, 40),))
    (caption / "0.txt").write_bytes("caf\xe9".encode("latin-1"))
    fails(caption, r"0\.txt: the caption is not UTF-8 text")
    fails(photos(tmp_path / "nocaption", sizes=((40, 40),)), r"prompt: .*0\.png has no caption file", prompt=None)
    assert not (tmp_path / "out").exists()


def test_argument_errors(tmp_path, data):
    for kw, match in [(dict(steps=0), "steps: expected a positive integer"), (dict(lr=-1.0), "lr: expected"),
                      (dict(format="ckpt"), "format: expected"), (dict(cache_latents=True), "cache_latents: needs"),
                      (dict(lr_scheduler="cyclic"), "lr_scheduler: expected")]:
        with pytest.raises(ValueError, match=match):
            config(data, tmp_path, **kw).check()
    with pytest.raises(ValueError, match="rank: expected a positive integer"):
        LoRA(rank=0)


def test_cli_trains_and_refuses_methods_not_implemented(tiny_model, data, tmp_path, capsys):
    model = str(tiny_model("sd1"))
    from controldiff.training import METHODS

    for method in [m for m, cls in METHODS.items() if cls is None]:
        assert cli.main(["train", method, model, "--data", str(data), "--output", str(tmp_path)]) == 2
        assert f"{method} is not implemented yet" in capsys.readouterr().err
    assert cli.main(["train", "lora", model, "--data", str(data), "--output", str(tmp_path / "o"), "--prompt", "sks",
                     "--resolution", "32", "--steps", "2", "--seed", "0", "--format", "kohya", "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["o.safetensors"]
    assert cli.main(["train", "lora", model, "--data", str(tmp_path / "nothing"), "--output", str(tmp_path)]) == 2
    assert "data: " in capsys.readouterr().err

    layers = ["--lora-layers", "to_q,attn2.to_v", "--lora-text-layers", "q_proj", "--train-text-encoder"]
    assert cli.main(["train", "lora", model, "--data", str(data), "--output", str(tmp_path / "l"), "--prompt", "sks",
                     "--resolution", "32", "--steps", "1", "--format", "diffusers", "--no-progress", *layers]) == 0
    keys = {re.sub(r"\.lora(_linear_layer)?\.(down|up)\.weight$", "", k)
            for k in load_file(str(tmp_path / "l" / "pytorch_lora_weights.safetensors"))}
    ends = {k.rsplit(".", 1)[1] if "attn2.to_v" not in k else "attn2.to_v" for k in keys}
    assert ends == {"to_q", "attn2.to_v", "q_proj"} and not any("attn1.to_v" in k for k in keys)
    for arg, value, match in (("--lora-layers", "to_q,,to_v", "--lora-layers: expected comma-separated"),
                              ("--lora-layers", "ff", r"unet_targets \(--lora-layers\): no Linear layer of the unet")):
        assert cli.main(["train", "lora", model, "--data", str(data), "--output", str(tmp_path / "e"), "--prompt",
                         "x", "--resolution", "32", "--steps", "1", arg, value]) == 2
        assert re.search(match, capsys.readouterr().err)
