"""DreamBooth training on the tiny SD1 model: behaviour (the loss on the subject falls, the
saved model generates differently from the base), class images made by our pipeline (seeds
recorded, reused), the saved diffusers folder and single file load alike in our Pipeline and
in diffusers, exact resume with prior preservation, atomic saving, the CLI, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import controldiff as cd
import pipes
from controldiff import cli
from controldiff.png import parse_parameters, read_parameters
from controldiff.training import DreamBooth, LoRA, TrainConfig, train
from controldiff.training.checkpoint import atomic_folder
from controldiff.training.prior import class_images
from test_training import eval_loss, photos, same_files

KW = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
PROMPT, CLASS = "a photo of sks dog", "a photo of a dog"
UNET = "diffusers/unet/diffusion_pytorch_model.safetensors"


def config(data, out, **kw):
    base = dict(prompt=PROMPT, resolution=32, steps=4, batch_size=1, seed=1, lr=1e-3, progress=False)
    return TrainConfig(data, out, **{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("data"), sizes=((40, 32), (32, 36)))


@pytest.fixture(scope="module")
def trained(tiny_model, data, tmp_path_factory):
    """20 steps, UNet and text encoder, prior preservation on 2 generated class images."""
    out, classes = tmp_path_factory.mktemp("trained"), tmp_path_factory.mktemp("classes") / "dog"
    result = train(tiny_model("sd1"), DreamBooth(train_text_encoder=True),
                   config(data, out, steps=20, center_crop=True, class_data=classes, class_prompt=CLASS,
                          num_class_images=2, prior_loss_weight=0.5))
    return out, classes, result


def test_training_lowers_the_loss_and_changes_images(trained, data, tiny_model):
    out, _, result = trained
    assert len(result.losses) == 20
    assert result.files == [out / "diffusers", out / f"{out.name}.safetensors"]
    base, tuned = pipes.ours(tiny_model("sd1")), pipes.ours(out / "diffusers")
    before, after = eval_loss(base, data, prompt=PROMPT), eval_loss(tuned, data, prompt=PROMPT)
    assert after < 0.9 * before, (before, after)
    assert np.abs(tuned(PROMPT, seed=0, **KW).images - base(PROMPT, seed=0, **KW).images).max() > 1e-2


def test_class_images_are_ours_with_their_seeds_and_reused(trained, tiny_model):
    _, classes, _ = trained
    files = sorted(classes.glob("*.png"))
    assert [f.name for f in files] == ["class-00000-1.png", "class-00001-2.png"]  # seed + k (the run's seed 1)
    fields = parse_parameters(read_parameters(files[1]))
    assert fields["Seed"] == "2" and fields["Steps"] == "50" and fields["Size"] == "32x32"
    pipe = pipes.ours(tiny_model("sd1"))
    again = pipe(CLASS, seed=2, height=32, width=32, output_type="np").images[0]
    from PIL import Image
    assert np.abs(np.asarray(Image.open(files[1]), dtype=np.float32) / 255 - again).max() <= 1 / 255 + 1e-6
    before = {f: f.stat().st_mtime_ns for f in files}
    new = class_images(tiny_model("sd1"), classes, CLASS, 3, 32, seed=1, progress=False)
    assert [f.name for f in new] == ["class-00002-3.png"]
    assert {f: f.stat().st_mtime_ns for f in files} == before  # the existing ones are kept
    new[0].unlink()


def test_saved_folder_loads_alike_in_our_pipeline_and_diffusers(trained):
    out, _, _ = trained
    ours = pipes.ours(out / "diffusers")("a photo of sks dog", seed=0, **KW).images
    ref = pipes.reference("StableDiffusionPipeline", out / "diffusers")
    theirs = ref(PROMPT, generator=torch.Generator().manual_seed(0), **KW).images
    assert np.abs(ours - theirs).max() <= 1e-4


def test_single_file_loads_alike_in_our_pipeline_and_diffusers(trained, tiny_model):
    import diffusers

    out, _, _ = trained
    folder, file = out / "diffusers", out / f"{out.name}.safetensors"
    expected = pipes.ours(folder)(PROMPT, seed=0, **KW).images
    mine = cd.Pipeline.from_single_file(file, config=tiny_model("sd1"))  # configs: shapes don't give heads
    mine.progress = False
    assert np.abs(mine(PROMPT, seed=0, **KW).images - expected).max() <= 1e-6
    ref = diffusers.StableDiffusionPipeline.from_single_file(str(file), config=str(tiny_model("sd1")),
                                                             local_files_only=True, safety_checker=None,
                                                             requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, generator=torch.Generator().manual_seed(0), **KW).images
    assert np.abs(theirs - expected).max() <= 1e-4


def test_resume_with_prior_preservation_equals_one_run(tiny_model, data, trained, tmp_path):
    """Random crops; 2 instances, 2 class images, batches of 1: checkpoint-1 is mid-epoch, its
    next batch already drawn."""
    _, classes, _ = trained
    model = tiny_model("sd1")
    kw = dict(class_data=classes, class_prompt=CLASS, num_class_images=2, format="diffusers", steps=3)
    straight = train(model, DreamBooth(), config(data, tmp_path / "a", checkpoint_every=1, **kw))
    resumed = train(model, DreamBooth(), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-1", **kw))
    assert resumed.losses == straight.losses[1:]
    assert same_files(tmp_path / "a" / UNET, tmp_path / "b" / UNET) == 0


def test_saving_is_atomic(tmp_path):
    final = tmp_path / "model"
    atomic_folder(final, lambda d: (d / "a.txt").write_text("old"))

    def fails(d):
        (d / "a.txt").write_text("new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_folder(final, fails)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (final / "a.txt").read_text() == "old"
    atomic_folder(final, lambda d: (d / "b.txt").write_text("new"))
    assert [p.name for p in final.iterdir()] == ["b.txt"]


def test_errors(tiny_model, data, tmp_path):
    for kw, match in [(dict(class_prompt=CLASS), "class_data: prior preservation needs both"),
                      (dict(class_data=tmp_path), "class_prompt: prior preservation needs both"),
                      (dict(class_data=tmp_path, class_prompt=CLASS, num_class_images=0), "num_class_images: expected"),
                      (dict(class_data=tmp_path, class_prompt=CLASS, prior_loss_weight=-1.0), "prior_loss_weight")]:
        with pytest.raises(ValueError, match=match):
            config(data, tmp_path / "x", **kw).check()
    with pytest.raises(ValueError, match="format: dreambooth saves diffusers or single-file"):
        train(tiny_model("sd1"), DreamBooth(), config(data, tmp_path / "x", format="kohya"))
    train(tiny_model("sd1"), LoRA(), config(data, tmp_path / "lora", steps=1, checkpoint_every=1))
    with pytest.raises(ValueError, match="resume: .* other settings"):
        train(tiny_model("sd1"), DreamBooth(), config(data, tmp_path / "x", resume=tmp_path / "lora"))
    train(tiny_model("sd1"), DreamBooth(), config(data, tmp_path / "db", steps=1, checkpoint_every=1,
                                                  format="single-file"))
    with pytest.raises(ValueError, match="resume: .* another model"):
        train(tiny_model("sd2"), DreamBooth(), config(data, tmp_path / "x", resume=tmp_path / "db"))
    with pytest.raises(ValueError, match="resume: .* other settings"):
        train(tiny_model("sd1"), DreamBooth(train_text_encoder=True), config(data, tmp_path / "x",
                                                                             resume=tmp_path / "db"))
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_cli(tiny_model, data, tmp_path, capfd):
    model = str(tiny_model("sd1"))
    assert cli.main(["train", "dreambooth", model, "--data", str(data), "--output", str(tmp_path / "o"),
                     "--prompt", PROMPT, "--class-data", str(tmp_path / "c"), "--class-prompt", CLASS,
                     "--num-class-images", "1", "--prior-loss-weight", "0.5", "--train-text-encoder",
                     "--resolution", "32", "--steps", "1", "--seed", "0", "--format", "single-file",
                     "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["o.safetensors"]
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["class-00000-0.png"]
    capfd.readouterr()
    # the diffusers folder, with the text encoder saved by transformers: no bar under --no-progress
    assert cli.main(["train", "dreambooth", model, "--data", str(data), "--output", str(tmp_path / "f"),
                     "--prompt", PROMPT, "--train-text-encoder", "--resolution", "32", "--steps", "1",
                     "--format", "diffusers", "--no-progress"]) == 0
    assert (tmp_path / "f" / "diffusers" / "text_encoder").is_dir()
    assert "Writing model shards" not in capfd.readouterr().err
    assert cli.main(["train", "dreambooth", model, "--data", str(data), "--output", str(tmp_path / "o"),
                     "--prompt", PROMPT, "--class-prompt", CLASS]) == 2
    assert "class_data: prior preservation needs both" in capfd.readouterr().err


@pytest.mark.parametrize("family,kw", [("sd1", {}), ("sd2", {"prediction_type": "v_prediction"}), ("sdxl", {}),
                                       ("sdxl-refiner", {"refiner": True})])
def test_single_file_layout_equals_the_independent_inverse(tiny_model, family, kw):
    """loading/write_ldm.py against tests/original_layout.py (written apart from the library):
    the same tensors under the same names, bar the extras real files carry."""
    import json

    from safetensors.torch import load_file

    from controldiff.loading.write_ldm import original_state
    from original_layout import to_original

    folder = tiny_model(family.split("-")[0], **kw)
    slots = ("text_encoder", "text_encoder_2") if family.startswith("sdxl") else ("text_encoder",)
    text = [load_file(str(folder / s / "model.safetensors")) if (folder / s).is_dir() else None for s in slots]
    ours = original_state(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
                          json.loads((folder / "unet" / "config.json").read_text()),
                          load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")), text, family)
    ref = to_original(folder)
    extras = {"alphas_cumprod", "model_ema.decay"} | {k for k in ref if k.endswith(("position_ids", "logit_scale"))}
    if family == "sd2":  # the unused 24th layer: random there, zeros here; no projection here
        extras |= {k for k in ref if ".resblocks.2." in k or k.endswith("text_projection")}
        assert all(ours[k].abs().max() == 0 for k in ours if ".resblocks.2." in k)
    assert set(ref) - extras == set(ours) - extras and not set(ours) - set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in set(ours) - extras)
