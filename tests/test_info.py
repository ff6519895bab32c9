"""``controldiff info``: read from configs and weight headers, as robust as the loaders:
every broken file is one line naming it, exit 2."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from controldiff import cli
from controldiff.loading.inspect import summarize

LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0904b2f3e3cc8bae3ebd3d1d31bc2e3ad1a6fd6a1\nsize 3438167536\n")


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _corrupt(kind: str, good: bytes) -> bytes:
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    if kind == "truncated data":
        return good[: len(good) - 100]
    if kind == "truncated header":
        return good[:40]
    if kind == "huge header length":
        return struct.pack("<Q", 2**62) + good[8:]
    if kind == "header length past the end":
        return struct.pack("<Q", len(good)) + good[8:]
    if kind == "header without dtype":
        name = next(k for k in header if k != "__metadata__")
        del header[name]["dtype"]
        return _safetensors(header, good[8 + n:])
    if kind == "shape not a list":
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = "abc"
        return _safetensors(header, good[8 + n:])
    if kind == "header not JSON":
        return struct.pack("<Q", 4) + b"{{{{" + good[8 + n:]
    if kind == "header a list":
        return _safetensors([1, 2], b"")  # type: ignore[arg-type]
    if kind == "git-lfs pointer":
        return LFS_POINTER.encode()
    if kind == "empty":
        return b""
    if kind == "7 bytes":
        return good[:7]
    raise AssertionError(kind)


KINDS = ["truncated data", "truncated header", "huge header length", "header length past the end",
         "header without dtype", "shape not a list", "header not JSON", "header a list", "git-lfs pointer",
         "empty", "7 bytes"]


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model("sd1"), tmp_path / "model"))


def info(capsys, path):
    rc = cli.main(["info", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str, named: Path) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(named) in err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("component, file", [("unet", "diffusion_pytorch_model.safetensors"),
                                             ("text_encoder", "model.safetensors")])
def test_corrupt_weights_exit_2_naming_the_file(model, capsys, kind, component, file):
    path = model / component / file
    path.write_bytes(_corrupt(kind, path.read_bytes()))
    rc, out, err = info(capsys, model)
    assert rc == 2, (out, err)
    _one_line_error(err, path)


@pytest.mark.parametrize("file, content", [
    ("tokenizer/tokenizer.json", ""),
    ("tokenizer/vocab.json", ""),
    ("unet/config.json", "[]"),
    ("vae/config.json", '"vae"'),
    ("scheduler/scheduler_config.json", ""),
    ("model_index.json", "[1]"),
    ("text_encoder/config.json", "{"),
])
def test_broken_configs_and_tokenizer_files_exit_2_naming_the_file(model, capsys, file, content):
    (model / file).write_text(content)
    rc, out, err = info(capsys, model)
    assert rc == 2, (out, err)
    _one_line_error(err, model / file)


def test_bad_config_value_names_file_and_key(model, capsys):
    cfg = json.loads((model / "unet" / "config.json").read_text())
    cfg["attention_head_dim"] = 0
    (model / "unet" / "config.json").write_text(json.dumps(cfg))
    rc, _, err = info(capsys, model)
    assert rc == 2 and "attention_head_dim" in err
    _one_line_error(err, model / "unet" / "config.json")


def test_missing_weights_file_is_named(model, capsys):
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    rc, _, err = info(capsys, model)
    assert rc == 2
    _one_line_error(err, model / "vae")


def test_counts_come_from_headers_without_reading_data(model, capsys, monkeypatch):
    import safetensors.torch

    from controldiff.loading.folder import load_components

    c = load_components(model)

    def never(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    rc, out, err = info(capsys, model)
    assert rc == 0, err
    for name, module in (("unet", c.unet), ("vae", c.vae), ("text_encoder", c.text_encoder)):
        assert f"{name} parameters:" in out and f"{sum(p.numel() for p in module.parameters()):,}" in out


# ----------------------------------------------------------------------------- single files


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """A tiny SD1 original-layout file whose widths fit the bundled SD1.5 configs (32 norm
    groups, 64-wide heads), so it loads without config=, as `info` and the CLI read it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from original_layout import to_original
    from transformers import CLIPTextConfig, CLIPTextModel

    from controldiff import tiny

    folder = tmp_path_factory.mktemp("single-info")
    torch.manual_seed(0)
    unet_cfg = {**tiny.unet_config("sd1"), "block_out_channels": [32, 64], "norm_num_groups": 32}
    UNet2DConditionModel(**unet_cfg).save_pretrained(folder / "unet")
    vae_cfg = {**tiny.vae_config(latent_factor=4), "block_out_channels": [32, 64, 64], "norm_num_groups": 32}
    AutoencoderKL(**vae_cfg).save_pretrained(folder / "vae")
    te_cfg = {**tiny.text_encoder_config(hidden_size=64), "num_attention_heads": 1}
    CLIPTextModel(CLIPTextConfig.from_dict(te_cfg)).save_pretrained(folder / "text_encoder")
    path = folder / "model.safetensors"
    save_file(to_original(folder), str(path))
    return path


def test_single_file_info_from_the_header_alone(single, capsys, monkeypatch):
    import safetensors.torch

    import controldiff as cd

    pipe = cd.Pipeline.from_single_file(single)
    expected = {name: sum(p.numel() for p in m.parameters())
                for name, m in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoders[0]))}

    def never(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    s = summarize(single)
    assert s.info.family == "sd1" and s.info.latent_factor == pipe.latent_factor
    assert s.default_size == pipe.default_size
    assert {name: count for name, count, _ in s.components} == expected
    rc, out, err = info(capsys, single)
    assert rc == 0, err
    assert "float32" in out and f"{sum(expected.values()):,}" in out


@pytest.mark.parametrize("kind", ["truncated data", "header without dtype", "git-lfs pointer", "huge header length"])
def test_corrupt_single_file_exit_2_naming_it(single, tmp_path, capsys, kind):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_corrupt(kind, single.read_bytes()))
    rc, _, err = info(capsys, bad)
    assert rc == 2
    _one_line_error(err, bad)


def test_single_file_sizes_checked_before_loading(single, capsys, monkeypatch):
    from controldiff import pipeline

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(never))
    rc = cli.main(["generate", str(single), "-p", "x", "--width", "102", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--width: 102 is not a multiple of 4" in err  # the file's latent factor, not 8


def test_pickled_single_file_info(single, tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single))}, ckpt)
    rc, out, err = info(capsys, ckpt)
    assert rc == 0, err
    assert "family:" in out and "unet parameters:" in out
