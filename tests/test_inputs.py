"""Hostile and unusual inputs: sizes and batches that cannot fit, text that is not UTF-8,
image files (EXIF, 16-bit, unreadable), arrays and tensors in every layout and range,
seeds and generator lists. Each is accepted as diffusers accepts it or refused with a
ValueError naming the argument, before any model runs."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff import images, memory

import diffusers


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("seed", 0)
    kw.setdefault("output_type", "np")
    kw.setdefault("scheduler", "euler")
    return pipe(kw.pop("prompt", "a cat"), **kw)


def picture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- sizes and batch
@pytest.fixture
def sixteen_gib(monkeypatch):
    monkeypatch.setattr(memory, "device_memory", lambda device: 16 * 2**30)


def test_device_memory_is_known_on_cpu():
    assert memory.device_memory("cpu") > 2**28


def test_huge_size_is_refused_up_front(pipe, no_work, sixteen_gib):
    with pytest.raises(ValueError, match=r"^height, width: one 100000x100000 image needs at least .* to decode"):
        run(pipe, height=100000, width=100000)


def test_huge_batch_is_refused_up_front(pipe, no_work, sixteen_gib):
    with pytest.raises(ValueError, match=r"^num_images_per_prompt: 1000000 images of 64x64"):
        run(pipe, num_images_per_prompt=10**6)
    with pytest.raises(ValueError, match=r"^num_images_per_prompt: 1000000 images .*500000 per prompt"):
        run(pipe, prompt=["a", "b"], num_images_per_prompt=500000)


def test_huge_img2img_size_is_refused_before_resizing(pipe, no_work, sixteen_gib):
    with pytest.raises(ValueError, match=r"^height, width: one 100000x100000 image"):
        run(pipe, image=torch.zeros(1, 3, 8, 8), height=100000, width=100000)


def test_ordinary_requests_fit(pipe, sixteen_gib):
    assert run(pipe, num_images_per_prompt=2).images.shape == (2, 64, 64, 3)


# ---------------------------------------------------------------------------- text
@pytest.mark.parametrize("argument", ["prompt", "negative_prompt"])
def test_non_utf8_prompt_is_refused(pipe, no_work, argument):
    kw = {"prompt": "a cat", argument: "a \udcff cat"}
    with pytest.raises(ValueError, match=rf"^{argument}: not valid UTF-8 text"):
        run(pipe, **kw)
    kw = {"prompt": ["x", "y"], argument: ["fine", "a \ud800"]}
    with pytest.raises(ValueError, match=rf"^{argument}: not valid UTF-8"):
        run(pipe, **kw)


def test_non_utf8_concept_is_refused():
    with pytest.raises(ValueError, match="Concept.prompt: not valid UTF-8"):
        cd.Concept("\udcff")


def test_unicode_prompts_still_work(pipe):
    assert np.isfinite(run(pipe, prompt="un chat 猫 🐱").images).all()


# ---------------------------------------------------------------------------- files
def test_exif_rotation_is_applied(pipe, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    PIL.Image.fromarray(picture(48, 64)).save(path, exif=exif)
    loaded = images.load_image(path, "image")
    assert loaded.size == (48, 64)  # (width, height) as displayed
    out = run(pipe, image=str(path), strength=0.5)
    assert out.images.shape == (1, 64, 48, 3)


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(values).save(path)
    assert PIL.Image.open(path).mode.startswith("I")
    loaded = np.asarray(images.load_image(path, "mask_image"))
    np.testing.assert_array_equal(loaded, np.round(values / 257.0).astype(np.uint8))
    assert len(np.unique(loaded)) > 200  # saturated would be almost all 255
    t = images.preprocess_image(str(path), 64, 64)
    assert t.shape == (1, 3, 64, 64) and -1 <= float(t.min()) < -0.99 and float(t.max()) > 0.99


def test_16_bit_depth_map_keeps_its_precision(tmp_path):
    from controldiff.controls.depth import _depth_tensor

    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "depth.png"
    PIL.Image.fromarray(values).save(path)
    np.testing.assert_array_equal(_depth_tensor(str(path))[0].numpy(), values.astype(np.float32))


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_unreadable_file_names_argument_and_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"^mask_image: cannot read .*broken\.png"):
        images.load_image(path, "mask_image")


def test_missing_file_is_named(pipe):
    with pytest.raises(FileNotFoundError, match="image"):
        run(pipe, image="/nonexistent/picture.png")


# ---------------------------------------------------------------------------- arrays and tensors
def test_equivalent_image_forms_give_the_same_image(pipe):
    rgb = picture(64, 64, 3)
    base = run(pipe, image=PIL.Image.fromarray(rgb), strength=0.6).images
    float01 = rgb.astype(np.float32) / 255.0
    tensor01 = torch.from_numpy(float01).permute(2, 0, 1)
    for form in (rgb, float01, float01[None], tensor01, tensor01[None], tensor01 * 2 - 1, [tensor01],
                 torch.from_numpy(rgb).permute(2, 0, 1)):
        np.testing.assert_allclose(run(pipe, image=form, strength=0.6).images, base, atol=1e-5)


def test_signed_tensor_matches_diffusers(tiny_model):
    """diffusers reads a tensor with a negative minimum as [-1, 1]: so do we."""
    path = tiny_model("sd1")
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None,
                                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = cd.Pipeline.from_pretrained(path)
    ours.progress = False
    signed = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(num_inference_steps=3, strength=0.7, output_type="np")
    expected = ref("a", image=signed, generator=torch.Generator().manual_seed(1), **kw).images
    got = ours("a", image=signed, generator=torch.Generator().manual_seed(1), **kw).images
    assert float(np.abs(got - expected).max()) <= 1e-4


def test_grey_images_and_2d_masks(pipe):
    grey = picture(64, 64)[..., 0]
    as_rgb = run(pipe, image=np.repeat(grey[..., None], 3, axis=-1), strength=0.6).images
    np.testing.assert_allclose(run(pipe, image=grey, strength=0.6).images, as_rgb, atol=1e-5)
    m = np.zeros((64, 64), np.uint8)
    m[:, 32:] = 255
    base = run(pipe, image=grey, mask_image=PIL.Image.fromarray(m)).images
    for form in (m, m / 255.0, (m / 255.0)[..., None], torch.from_numpy(m / 255.0), m > 0):
        np.testing.assert_allclose(run(pipe, image=grey, mask_image=form).images, base, atol=1e-5)


@pytest.mark.parametrize("argument, value, words", [
    ("image", np.zeros((3, 64, 64), np.float32), ["channels last", "(3, 64, 64)", "transpose"]),
    ("image", torch.zeros(1, 64, 64, 3), ["channels first", "(1, 64, 64, 3)", "permute"]),
    ("image", np.full((64, 64, 3), 200.0, np.float32), ["[0, 1]", "divide 0..255"]),
    ("image", torch.full((1, 3, 64, 64), -3.0), ["[0, 1] (or [-1, 1])", "-3"]),
    ("image", np.zeros((64, 64, 4), np.float32), ["C = 1 or 3"]),
    ("image", np.zeros((2, 2, 64, 64, 3)), ["(N, H, W, C)"]),
    ("image", np.zeros((64, 64, 3), np.int64), ["uint8", "int64"]),
    ("image", torch.full((1, 3, 64, 64), float("nan")), ["NaN"]),
    ("image", [PIL.Image.new("RGB", (64, 64)), np.zeros((64, 64, 3))], ["one kind"]),
    ("image", [], ["empty"]),
    ("image", 42, ["PIL image", "int"]),
    ("mask_image", np.full((64, 64), np.nan, np.float32), ["NaN"]),
    ("mask_image", torch.full((1, 1, 64, 64), 255.0), ["[0, 1]"]),
    ("mask_image", torch.full((1, 1, 64, 64), -0.5), ["[0, 1]"]),
])
def test_bad_images_are_named(pipe, no_work, argument, value, words):
    kw = {"image": picture(64, 64), argument: value}
    with pytest.raises(ValueError) as e:
        run(pipe, **kw)
    message = str(e.value)
    assert message.startswith(f"{argument}: "), message
    for w in words:
        assert w in message, (w, message)


def test_control_images_are_checked_when_made(tiny_model):
    from controldiff.controls.instruct_pix2pix import InstructPix2Pix

    with pytest.raises(ValueError, match=r"^image: expected values in \[0, 1\] \(or"):
        InstructPix2Pix(np.full((64, 64, 3), 9.0))


# ---------------------------------------------------------------------------- seeds and generators
@pytest.mark.parametrize("seed", [2**64, -1, 1.5, "7", True])
def test_bad_seeds_are_named(pipe, no_work, seed):
    with pytest.raises(ValueError, match=r"^seed: expected an integer in \[0, 2\*\*64\)"):
        run(pipe, seed=seed)


def test_seed_range_ends_and_numpy_seeds(pipe):
    assert run(pipe, seed=2**64 - 1, num_inference_steps=1).seed == 2**64 - 1
    np.testing.assert_array_equal(run(pipe, seed=np.int64(5)).images, run(pipe, seed=5).images)


def test_generator_list_must_match_the_batch(pipe, no_work):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"^generator: got a list of 1 generators for a batch of 2"):
        run(pipe, seed=None, prompt=["a", "b"], generator=[g])
    with pytest.raises(ValueError, match=r"^generator: got a list of 3 generators for a batch of 2"):
        run(pipe, seed=None, num_images_per_prompt=2, generator=[g, g, g])
    with pytest.raises(ValueError, match=r"^generator: expected a torch.Generator"):
        run(pipe, seed=None, generator=[g, 5])
    with pytest.raises(ValueError, match=r"^generator: expected a torch.Generator"):
        run(pipe, seed=None, generator=0)
