"""LoRA training parity: our steps equal diffusers' ``examples/dreambooth/train_dreambooth_lora.py``
(vendored in tests/reference/, torchvision replaced by tests/reference/torchvision_shim.py)
run for 2 steps on the tiny SD1 model with the same seed: same losses and the same trained
LoRA tensors in ``pytorch_lora_weights.safetensors`` (max abs <= 1e-5). The seed drives the
whole run in both: LoRA init, data order, random crop, VAE sample, noise, timesteps. SDXL: the same
against ``train_dreambooth_lora_sdxl.py`` (vendored alike) on the tiny SDXL model."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from controldiff.training import LoRA, TrainConfig, train

TOL = 1e-5


@pytest.fixture
def script(monkeypatch):
    """The vendored reference script, imported with the torchvision shim; its mse_loss records."""
    import peft  # noqa: F401  (before the shim: it probes torchvision)
    from reference import scripts

    return scripts.load("train_dreambooth_lora", monkeypatch)


def photo(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("setting", ["eps", "v_text"])
def test_lora_steps_equal_diffusers_script(script, tiny_model, tmp_path, monkeypatch, setting):
    v_pred = setting == "v_text"
    model = tiny_model("sd2", prediction_type="v_prediction") if v_pred else tiny_model("sd1")
    data = tmp_path / "data"
    data.mkdir()
    photo(data / "a.png", 40, 32, 0)  # not square: the random crop draws from the RNG
    common = dict(seed=3, steps=2, lr=1e-3, resolution=32)
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks", "--output_dir", str(tmp_path / "ref"), "--resolution", "32",
            "--train_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "3",
            "--rank", "4", "--report_to", "all", "--checkpointing_steps", "1000"]
    if v_pred:
        args.append("--train_text_encoder")
    parsed = script.parse_args(args)
    monkeypatch.setattr(script, "args", parsed, raising=False)  # its dataset reads the module-level args
    script.main(parsed)
    theirs = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))

    result = train(model, LoRA(rank=4, train_text_encoder=v_pred),
                   TrainConfig(data, tmp_path / "ours", prompt="a photo of sks", format="diffusers",
                               progress=False, **common))
    ours = load_file(str(tmp_path / "ours" / "pytorch_lora_weights.safetensors"))

    assert len(script.recorded) == 2
    np.testing.assert_allclose(result.losses, script.recorded, rtol=0, atol=TOL)
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    moved = max(theirs[k].abs().max().item() for k in theirs if ".up." in k)
    assert moved > 1e-4  # the up matrices start at 0: the steps trained something
    assert worst <= TOL, worst


@pytest.fixture
def script_sdxl(monkeypatch):
    """The vendored SDXL script (``train_dreambooth_lora_sdxl.py``), as ``script``."""
    import peft  # noqa: F401
    from reference import scripts

    return scripts.load("train_dreambooth_lora_sdxl", monkeypatch)


@pytest.mark.parametrize("text", [False, True], ids=["unet", "text_encoders"])
def test_sdxl_lora_steps_equal_diffusers_script(script_sdxl, tiny_model, tmp_path, monkeypatch, text):
    """SDXL: both encoders' penultimate states + the pooled projection, and the time ids the
    script computes (original size, crop corner, target size) from a 40x32 image resized and
    center-cropped to 24 (crop corner (0, 3)); with ``text`` LoRAs on both text encoders too."""
    script = script_sdxl
    model = tiny_model("sdxl")
    data = tmp_path / "data"
    data.mkdir()
    photo(data / "a.png", 40, 32, 0)
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks", "--output_dir", str(tmp_path / "ref"), "--resolution", "24",
            "--train_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "3",
            "--rank", "4", "--report_to", "all", "--checkpointing_steps", "1000", "--center_crop",
            # our one lr and weight decay for every component (its defaults: 1e-4, and 5e-6, 1e-3 for the text encoders)
            "--adam_weight_decay", "1e-2", "--text_encoder_lr", "1e-3", "--adam_weight_decay_text_encoder", "1e-2"]
    if text:
        args.append("--train_text_encoder")
    parsed = script.parse_args(args)
    monkeypatch.setattr(script, "args", parsed, raising=False)  # its dataset reads the module-level args
    script.main(parsed)
    theirs = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))

    result = train(model, LoRA(rank=4, train_text_encoder=text),
                   TrainConfig(data, tmp_path / "ours", prompt="a photo of sks", format="diffusers", progress=False,
                               seed=3, steps=2, lr=1e-3, resolution=24, center_crop=True))
    ours = load_file(str(tmp_path / "ours" / "pytorch_lora_weights.safetensors"))

    assert len(script.recorded) == 2
    np.testing.assert_allclose(result.losses, script.recorded, rtol=0, atol=TOL)
    assert set(ours) == set(theirs)
    assert any(k.startswith("text_encoder_2.") for k in ours) == text
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    moved = max(theirs[k].abs().max().item() for k in theirs if ".up." in k)
    assert moved > 1e-4
    assert worst <= TOL, worst
