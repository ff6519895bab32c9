"""The A1111 embedding formats: PNG images (text chunk and pixel-encoded data) and legacy
``.pt`` files whose ``string_to_param`` is an ``nn.ParameterDict``; loaded without
unpickling anything but tensors and that one container.

The PNG writers are A1111's ``textual_inversion/image_embedding.py`` (``embedding_to_b64``,
``insert_image_data_embed``; AUTOMATIC1111/stable-diffusion-webui at 011bac41), transcribed.
"""
from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.PngImagePlugin
import pytest
import torch
from torch import nn

from controldiff.loading.textual_inversion import read_embedding
from hostile import Evil
from pipes import ours


class EmbeddingEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        return json.JSONEncoder.default(self, obj)


def lcg(m=2**32, a=1664525, c=1013904223, seed=0):
    while True:
        seed = (a * seed + c) % m
        yield seed % 255


def xor_block(block):
    g = lcg()
    randblock = np.array([next(g) for _ in range(np.prod(block.shape))]).astype(np.uint8).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), randblock & 0x0F)


def style_block(block, sequence):
    im = PIL.Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = PIL.ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            offset = 4 if yi % 2 == 0 else 0
            shade = sequence[i % len(sequence)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    fg = np.array(im).astype(np.uint8) & 0xF0
    return block ^ fg


def insert_image_data_embed(image, data):
    d = 3
    data_compressed = zlib.compress(json.dumps(data, cls=EmbeddingEncoder).encode(), level=9)
    data_np_ = np.frombuffer(data_compressed, np.uint8).copy()
    data_np_high = data_np_ >> 4
    data_np_low = data_np_ & 0x0F
    h = image.size[1]
    next_size = data_np_low.shape[0] + (h - (data_np_low.shape[0] % h))
    next_size = next_size + ((h * d) - (next_size % (h * d)))
    data_np_low = np.resize(data_np_low, next_size).reshape((h, -1, d))
    data_np_high = np.resize(data_np_high, next_size).reshape((h, -1, d))
    edge_style = list(data["string_to_param"].values())[0].cpu().detach().numpy().tolist()[0][:1024]
    edge_style = (np.abs(edge_style) / np.max(np.abs(edge_style)) * 255).astype(np.uint8)
    data_np_low = xor_block(style_block(data_np_low, sequence=edge_style))
    data_np_high = xor_block(style_block(data_np_high, sequence=edge_style[::-1]))
    im_low = PIL.Image.fromarray(data_np_low, mode="RGB")
    im_high = PIL.Image.fromarray(data_np_high, mode="RGB")
    background = PIL.Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, image.size[1]), (0, 0, 0))
    background.paste(im_low, (0, 0))
    background.paste(image, (im_low.size[0] + 1, 0))
    background.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return background


def a1111_data(emb, name="toy"):
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": name, "step": 500,
            "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}


def preview():
    """A1111 draws a caption over a picture; any non-black picture will do."""
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(40, 256, (64, 64, 3), dtype=np.uint8))


def vectors(n=2, width=32, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).double().float()


def test_png_text_chunk(tmp_path):
    emb = vectors()
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(a1111_data(emb), cls=EmbeddingEncoder).encode()))
    path = tmp_path / "toy-v2.png"
    preview().save(path, pnginfo=info)
    token, tensors, _ = read_embedding(path)
    assert token == "toy" and torch.allclose(tensors["*"], emb, atol=1e-7)


def test_png_pixels(tmp_path):
    """No text chunk: the data is in the pixels. The token is the data's name, as A1111."""
    emb = vectors(3, seed=1)
    path = tmp_path / "pixels.png"
    insert_image_data_embed(preview(), a1111_data(emb, "pix")).save(path)   # no text chunk: the data is the pixels
    token, tensors, _ = read_embedding(path)
    assert token == "pix" and torch.allclose(tensors["*"], emb, atol=1e-7)


def test_png_embedding_loads_into_the_pipeline(tiny_model, tmp_path):
    pipe = ours(tiny_model("sd1"))
    emb = vectors(2, seed=2)
    path = tmp_path / "toy.png"
    insert_image_data_embed(preview(), a1111_data(emb)).save(path)
    assert pipe.load_textual_inversion(path) == ["toy", "toy_1"]
    ids = pipe.tokenizers[0].convert_tokens_to_ids(["toy", "toy_1"])
    assert torch.allclose(pipe.text_encoders[0].get_input_embeddings().weight[ids], emb, atol=1e-6)


def test_plain_png_is_a_clear_error(tmp_path):
    path = tmp_path / "photo.png"
    preview().save(path)
    with pytest.raises(ValueError, match="photo.png: not an A1111 embedding image"):
        read_embedding(path)


def test_legacy_parameter_dict_pt(tmp_path):
    emb = vectors(2, seed=3)
    path = tmp_path / "old.pt"
    data = a1111_data(emb)
    data["string_to_param"] = nn.ParameterDict({"*": nn.Parameter(emb.clone())})
    torch.save(data, str(path))
    token, tensors, _ = read_embedding(path)
    assert token == "old" and torch.equal(tensors["*"], emb)


def test_other_objects_are_still_refused(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "payload": Evil(str(marker))}, str(path))
    with pytest.raises(ValueError, match="refused"):
        read_embedding(path)
    assert not marker.exists()
