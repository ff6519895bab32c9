"""DreamBooth training parity: our steps equal diffusers' ``examples/dreambooth/train_dreambooth.py``
(vendored in tests/reference/, torchvision replaced by tests/reference/torchvision_shim.py)
run for 2 steps on the tiny SD1 model with the same seed: same losses and the same trained
UNet (and text encoder) in the saved diffusers folders (max abs <= 1e-5). The seed drives
the data order, the random crops, the VAE sample, the noise and the timesteps in both. With
``--use_8bit_adam`` both use bitsandbytes' AdamW8bit (the tiny UNet's tensors of 4096+
elements get 8-bit moments).

With prior preservation both runs get the same class images (3 of them, not square, for 2
instances in batches of 2: the last batch of the epoch is smaller), so class-image
generation is not compared; the script lists folders in file-system order and ours sorts
them by name, so the script's lists are sorted here."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from controldiff.training import DreamBooth, TrainConfig, train
from reference import scripts
from test_training import photos

TOL = 1e-5


@pytest.fixture
def script(monkeypatch):
    module = scripts.load("train_dreambooth", monkeypatch)
    real = module.DreamBoothDataset.__init__

    def sorted_init(self, *a, **k):
        real(self, *a, **k)
        self.instance_images_path = sorted(self.instance_images_path)
        if self.class_data_root is not None:
            self.class_images_path = sorted(self.class_images_path)

    monkeypatch.setattr(module.DreamBoothDataset, "__init__", sorted_init)
    return module


def weights_differ(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.parametrize("setting", ["unet", "prior_text_encoder", "8bit_adam"])
def test_dreambooth_steps_equal_diffusers_script(script, tiny_model, tmp_path, setting):
    prior = setting == "prior_text_encoder"
    model = tiny_model("sd1")
    data = photos(tmp_path / "data", sizes=((40, 32), (32, 36)))
    classes = photos(tmp_path / "classes", sizes=((36, 32), (32, 40), (44, 32)), seed=1)
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "ref"), "--resolution", "32",
            "--train_batch_size", "2" if prior else "1", "--max_train_steps", "2", "--learning_rate", "1e-3",
            "--seed", "3", "--report_to", "all", "--checkpointing_steps", "1000"]
    if prior:
        args += ["--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", "a photo of dog",
                 "--num_class_images", "3", "--prior_loss_weight", "0.5", "--train_text_encoder"]
    if setting == "8bit_adam":
        args += ["--use_8bit_adam"]
    script.main(script.parse_args(args))

    extra = dict(class_data=classes, class_prompt="a photo of dog", num_class_images=3,
                 prior_loss_weight=0.5) if prior else {}
    result = train(model, DreamBooth(train_text_encoder=prior),
                   TrainConfig(data, tmp_path / "ours", prompt="a photo of sks dog", resolution=32, steps=2,
                               batch_size=2 if prior else 1, lr=1e-3, seed=3, interpolation="bilinear",
                               format="diffusers", progress=False, use_8bit_adam=setting == "8bit_adam", **extra))
    ours, ref = tmp_path / "ours" / "diffusers", tmp_path / "ref"

    # with prior preservation the script computes mse_loss twice a step: the prior's, then the instances'
    recorded = np.array(script.recorded).reshape(2, -1)
    expected = recorded[:, 1] + 0.5 * recorded[:, 0] if prior else recorded[:, 0]
    np.testing.assert_allclose(result.losses, expected, rtol=0, atol=TOL)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert weights_differ(model / unet, ref / unet) > 1e-4  # the steps trained something
    assert weights_differ(ours / unet, ref / unet) <= TOL
    text = "text_encoder/model.safetensors"
    assert (weights_differ(model / text, ref / text) > 1e-4) == prior
    assert weights_differ(ours / text, ref / text) <= TOL
    print(f"{setting}: losses {np.abs(np.array(result.losses) - expected).max():.2e}, "
          f"unet {weights_differ(ours / unet, ref / unet):.2e}, text encoder {weights_differ(ours / text, ref / text):.2e}")
