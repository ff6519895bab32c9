"""controldiff.loading: safe weight files, file discovery, meta-device loading, family
detection and whole diffusers folders (built with diffusers/transformers as the oracle)."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from controldiff import tiny
from controldiff.loading import (
    ModelInfo,
    align_prefix,
    detect_family,
    find_weights,
    load_components,
    load_model,
    load_state_dict,
    load_text_encoder,
)
from hostile import Evil

# ----------------------------------------------------------------------------- helpers


class Net(nn.Module):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.a = nn.Linear(3, hidden)
        self.b = nn.Linear(hidden, 2)


class WithBuffers(nn.Module):
    """A persistent buffer (in the files) and a non-persistent computed one (not)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("ids", torch.arange(5).unsqueeze(0), persistent=False)
        self.register_buffer("freqs", torch.linspace(0, 1, 3), persistent=False)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- load_state_dict


@pytest.mark.parametrize("ext", [".safetensors", ".bin", ".pt", ".pth", ".ckpt"])
def test_load_state_dict_roundtrip(tmp_path, ext):
    sd = {"x.weight": torch.randn(3, 4), "x.ids": torch.arange(4), "h": torch.randn(2).half()}
    p = tmp_path / f"w{ext}"
    if ext == ".safetensors":
        save_file(sd, str(p))
    else:
        torch.save(sd, p)
    out = load_state_dict(p)
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k])


def test_load_state_dict_ckpt_with_state_dict_wrapper(tmp_path):
    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 10, "epoch": 1}, p)
    out = load_state_dict(p)
    assert list(out) == ["w"] and torch.equal(out["w"], torch.ones(2))


def test_malicious_pickle_refused_and_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "evil": Evil(str(marker))}, p)
    with pytest.raises(ValueError) as e:
        load_state_dict(p)
    assert str(p) in str(e.value) and "objects other than tensors" in str(e.value)
    assert not marker.exists()


def test_malicious_raw_pickle_refused_and_not_executed(tmp_path):
    marker = tmp_path / "PWNED2"
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": Evil(str(marker))}, f)
    with pytest.raises(ValueError) as e:
        load_state_dict(p)
    assert str(p) in str(e.value)
    assert not marker.exists()


def test_lfs_pointer(tmp_path):
    p = tmp_path / "diffusion_pytorch_model.safetensors"
    p.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0904b2f3e3cc8bae3ebd3d1d31bc2e3ad1a6fd6a1\nsize 3438167536\n"
    )
    with pytest.raises(ValueError) as e:
        load_state_dict(p)
    assert str(p) in str(e.value) and "git lfs pull" in str(e.value)
    q = tmp_path / "pytorch_model.bin"
    shutil.copy(p, q)
    with pytest.raises(ValueError, match="git-lfs pointer"):
        load_state_dict(q)


def _two_tensor_file(tmp_path) -> Path:
    p = tmp_path / "model.safetensors"
    save_file({"first": torch.randn(64), "second": torch.randn(64)}, str(p))
    return p


def test_truncated_safetensors_data_names_tensor(tmp_path):
    p = _two_tensor_file(tmp_path)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    header = json.loads(p.read_bytes()[8:8 + n])
    # cut inside the tensor stored last
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError) as e:
        load_state_dict(p)
    msg = str(e.value)
    assert str(p) in msg and "truncated" in msg and repr(last) in msg


def test_truncated_safetensors_header_cut(tmp_path):
    p = _two_tensor_file(tmp_path)
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError) as e:
        load_state_dict(p)
    assert str(p) in str(e.value) and "header" in str(e.value) and "truncated" in str(e.value)
    p.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="truncated"):
        load_state_dict(p)


def test_empty_missing_directory_extension(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty") as e:
        load_state_dict(empty)
    assert str(empty) in str(e.value)

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        load_state_dict(missing)
    assert str(missing) in str(e.value)

    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(ValueError, match="directory") as e:
        load_state_dict(d)
    assert str(d) in str(e.value)

    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"xx")
    with pytest.raises(ValueError) as e:
        load_state_dict(odd)
    for ext in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        assert ext in str(e.value)


def test_corrupt_pickle_named(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(100)}, p)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError) as e:
        load_state_dict(p)
    assert str(p) in str(e.value)


# ----------------------------------------------------------------------------- find_weights


def test_find_weights_order_and_variant(tmp_path):
    d = tmp_path / "unet"
    d.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        find_weights(d, "diffusion_pytorch_model")
    assert str(d) in str(e.value) and "diffusion_pytorch_model.safetensors" in str(e.value)
    assert "diffusion_pytorch_model.bin" in str(e.value)

    torch.save({"w": torch.ones(1)}, d / "diffusion_pytorch_model.bin")
    assert find_weights(d, "diffusion_pytorch_model") == [d / "diffusion_pytorch_model.bin"]
    save_file({"w": torch.ones(1)}, str(d / "diffusion_pytorch_model.safetensors"))
    assert find_weights(d, "diffusion_pytorch_model") == [d / "diffusion_pytorch_model.safetensors"]
    # variant missing: falls back to the plain file; present: preferred
    assert find_weights(d, "diffusion_pytorch_model", "fp16") == [d / "diffusion_pytorch_model.safetensors"]
    save_file({"w": torch.ones(1)}, str(d / "diffusion_pytorch_model.fp16.safetensors"))
    assert find_weights(d, "diffusion_pytorch_model", "fp16") == [d / "diffusion_pytorch_model.fp16.safetensors"]

    t = tmp_path / "text_encoder"
    t.mkdir()
    torch.save({"w": torch.ones(1)}, t / "pytorch_model.bin")
    assert find_weights(t, "model") == [t / "pytorch_model.bin"]
    with pytest.raises(FileNotFoundError) as e:
        find_weights(tmp_path / "absent", "model")
    assert "absent" in str(e.value)


def _write_sharded(folder: Path, sd: dict, name: str = "diffusion_pytorch_model", ext: str = "safetensors",
                   variant: str | None = None) -> list[Path]:
    keys = sorted(sd)
    half = len(keys) // 2
    parts = [keys[:half], keys[half:]]
    weight_map = {}
    files = []
    for i, part in enumerate(parts):
        stem = f"{name}.{variant}" if variant else name
        fname = f"{stem}-{i + 1:05d}-of-{len(parts):05d}.{ext}"
        chunk = {k: sd[k] for k in part}
        if ext == "safetensors":
            save_file(chunk, str(folder / fname))
        else:
            torch.save(chunk, folder / fname)
        weight_map.update({k: fname for k in part})
        files.append(folder / fname)
    index = f"{name}.{ext}.index.{variant}.json" if variant else f"{name}.{ext}.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return files


@pytest.mark.parametrize("ext", ["safetensors", "bin"])
def test_sharded_index_loads(tmp_path, ext):
    torch.manual_seed(0)
    ref = Net()
    sd = _state(ref)
    files = _write_sharded(tmp_path, sd, ext=ext)
    found = find_weights(tmp_path, "diffusion_pytorch_model")
    assert found == files
    m = load_model(Net, found)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])
    # a shard listed in the index but absent is named
    files[1].unlink()
    with pytest.raises(FileNotFoundError) as e:
        find_weights(tmp_path, "diffusion_pytorch_model")
    assert files[1].name in str(e.value)


def test_sharded_variant_index(tmp_path):
    sd = _state(Net())
    files = _write_sharded(tmp_path, sd, name="model", variant="fp16")
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert find_weights(tmp_path, "model", variant="fp16") == files
    assert find_weights(tmp_path, "model") == [tmp_path / "model.safetensors"]


# ----------------------------------------------------------------------------- load_model


def test_load_model_builds_on_meta_and_loads(tmp_path):
    torch.manual_seed(1)
    ref = Net()
    p = tmp_path / "w.safetensors"
    save_file(_state(ref), str(p))
    devices = []

    def build():
        devices.append(torch.empty(1).device.type)
        return Net()

    m = load_model(build, p, dtype=torch.float16)
    assert devices == ["meta"]  # built once, on meta: no random init
    assert not m.training
    for k, v in m.state_dict().items():
        assert v.dtype == torch.float16 and v.device.type == "cpu"
        assert torch.equal(v, ref.state_dict()[k].half())
    assert all(not q.requires_grad for q in m.parameters())
    # default dtype: the module's own (float32), even from a float16 file
    p16 = tmp_path / "w16.safetensors"
    save_file({k: v.half() for k, v in _state(ref).items()}, str(p16))
    m32 = load_model(Net, p16)
    assert m32.a.weight.dtype == torch.float32
    assert torch.equal(m32.a.weight, ref.a.weight.detach().half().float())


def test_load_model_errors_name_file_and_tensor(tmp_path):
    sd = _state(Net())
    p = tmp_path / "w.safetensors"

    bad = dict(sd)
    del bad["b.bias"]
    save_file(bad, str(p))
    with pytest.raises(ValueError) as e:
        load_model(Net, p)
    assert str(p) in str(e.value) and "b.bias" in str(e.value) and "missing" in str(e.value)

    extra = dict(sd, **{"c.weight": torch.zeros(1)})
    save_file(extra, str(p))
    with pytest.raises(ValueError) as e:
        load_model(Net, p)
    assert str(p) in str(e.value) and "c.weight" in str(e.value) and "unexpected" in str(e.value)
    m = load_model(Net, p, ignore_unexpected=[r"^c\."])
    assert torch.equal(m.a.weight, sd["a.weight"])

    save_file(_state(Net(hidden=5)), str(p))
    with pytest.raises(ValueError) as e:
        load_model(Net, p)
    msg = str(e.value)
    assert str(p) in msg and "a.weight" in msg and "(5, 3)" in msg and "(4, 3)" in msg


def test_load_model_non_persistent_buffers(tmp_path):
    ref = WithBuffers()
    ref.scale.fill_(3.0)
    p = tmp_path / "w.safetensors"
    save_file(_state(ref), str(p))
    assert set(load_file(str(p))) == {"lin.weight", "lin.bias", "scale"}
    m = load_model(WithBuffers, p, dtype=torch.float64)
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    assert torch.equal(m.ids, torch.arange(5).unsqueeze(0))
    assert m.freqs.dtype == torch.float64 and torch.allclose(m.freqs, torch.linspace(0, 1, 3).double())
    assert torch.equal(m.scale, torch.full((2,), 3.0, dtype=torch.float64))


def test_load_model_clip_text_encoder_position_ids(tmp_path):
    """transformers' CLIP position_ids is a non-persistent buffer; an old checkpoint with the
    ``text_model.`` prefix and position_ids in the file loads too (prefix aligned, ids ignored)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_dict(tiny.text_encoder_config())
    torch.manual_seed(0)
    ref = CLIPTextModel(config).eval()
    old_style = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in _state(ref).items()}
    old_style["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    p = tmp_path / "model.safetensors"
    save_file(old_style, str(p))
    m = load_model(lambda: CLIPTextModel(config), p, rename=align_prefix,
                   ignore_unexpected=[r"(^|\.)embeddings\.position_ids$"])
    ids_name = [n for n, _ in m.named_buffers() if n.endswith("position_ids")][0]
    ids = dict(m.named_buffers())[ids_name]
    assert ids.device.type == "cpu" and torch.equal(ids, torch.arange(77).unsqueeze(0))
    tokens = torch.tensor([[tiny.BOS_ID, 5, 6, 7, tiny.EOS_ID]])
    with torch.no_grad():
        assert torch.equal(m(tokens).last_hidden_state, ref(tokens).last_hidden_state)
    # without ignoring: the position_ids are reported as unexpected, naming the file
    with pytest.raises(ValueError, match="position_ids"):
        load_model(lambda: CLIPTextModel(config), p, rename=align_prefix)


# ----------------------------------------------------------------------------- family


def test_detect_family_from_configs():
    vae = tiny.vae_config(latent_factor=8)
    sd1 = detect_family(tiny.unet_config("sd1"), [tiny.text_encoder_config()], tiny.scheduler_config("sd1"), vae)
    assert sd1 == ModelInfo("sd1", "epsilon", 4, "txt2img", 8, False)
    sd2 = detect_family(tiny.unet_config("sd2", in_channels=9), [tiny.text_encoder_config(act="gelu")],
                        tiny.scheduler_config("sd2", "v_prediction"), tiny.vae_config(latent_factor=4))
    assert (sd2.family, sd2.prediction_type, sd2.kind, sd2.latent_factor) == ("sd2", "v_prediction", "inpaint", 4)
    # SD2 from the cross-attention width alone (quick_gelu encoder config)
    big = dict(tiny.unet_config("sd1"), cross_attention_dim=1024)
    assert detect_family(big, [tiny.text_encoder_config()], {}, vae).family == "sd2"
    xl = detect_family(tiny.unet_config("sdxl"), [tiny.text_encoder_config(), tiny.text_encoder_config(act="gelu")],
                       tiny.scheduler_config("sdxl"), vae)
    assert (xl.family, xl.refiner) == ("sdxl", False)
    refiner = detect_family(tiny.unet_config("sdxl"), [None, tiny.text_encoder_config(act="gelu")], None, vae)
    assert (refiner.family, refiner.refiner, refiner.prediction_type) == ("sdxl", True, "epsilon")
    for n, kind in [(5, "depth"), (8, "instruct_pix2pix")]:
        assert detect_family(tiny.unet_config("sd1", in_channels=n), [tiny.text_encoder_config()], {}, vae).kind == kind
    with pytest.raises(ValueError) as e:
        detect_family(tiny.unet_config("sd1", in_channels=7), [tiny.text_encoder_config()], {}, vae)
    assert "unet/config.json" in str(e.value) and "in_channels" in str(e.value)
    with pytest.raises(Exception):
        sd1.family = "sdxl"  # frozen


# ----------------------------------------------------------------------------- folders


def _assert_matches_files(module: nn.Module, files: list[Path], dtype=torch.float32, prefix_free=False):
    saved = {}
    for f in files:
        saved.update(load_file(str(f)))
    if prefix_free:
        saved = align_prefix(saved, set(module.state_dict()))
    sd = module.state_dict()
    assert set(saved) == set(sd)
    for k, v in sd.items():
        if v.is_floating_point():
            assert v.dtype == dtype
            assert torch.equal(v, saved[k].to(dtype)), k
        else:
            assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize(
    "family,prediction_type",
    [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")],
)
def test_load_components_families(tiny_model, family, prediction_type):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = tiny_model(family=family, prediction_type=prediction_type)
    c = load_components(path)
    assert c.path == Path(path)
    assert c.info.family == family and c.info.prediction_type == prediction_type
    assert c.info.kind == "txt2img" and c.info.in_channels == 4 and c.info.latent_factor == 8
    assert not c.info.refiner
    assert c.scheduler_config["prediction_type"] == prediction_type
    n = 2 if family == "sdxl" else 1
    assert len(c.text_encoders) == n and len(c.tokenizers) == n
    assert type(c.text_encoders[0]) is CLIPTextModel
    if family == "sdxl":
        assert type(c.text_encoder_2) is CLIPTextModelWithProjection
        assert c.tokenizer_2.pad_token == "!"
    assert all(isinstance(t, CLIPTokenizer) for t in c.tokenizers)
    assert c.tokenizer("a cat").input_ids[0] == tiny.BOS_ID

    _assert_matches_files(c.unet, [path / "unet" / "diffusion_pytorch_model.safetensors"])
    _assert_matches_files(c.vae, [path / "vae" / "diffusion_pytorch_model.safetensors"])
    for slot, te in zip(["text_encoder", "text_encoder_2"], c.text_encoders):
        _assert_matches_files(te, [path / slot / "model.safetensors"], prefix_free=True)
        assert not any(t.is_meta for t in list(te.parameters()) + list(te.buffers()))
    for m in [c.unet, c.vae, *c.text_encoders]:
        assert not m.training and all(not p.requires_grad for p in m.parameters())


def test_text_encoders_equal_transformers(tiny_model):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = tiny_model(family="sdxl")
    c = load_components(path)
    tokens = torch.tensor([[tiny.BOS_ID, 40, 41, tiny.EOS_ID, tiny.EOS_ID]])
    with torch.no_grad():
        ref1 = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
        ref2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2").eval()
        o1, r1 = c.text_encoder(tokens, output_hidden_states=True), ref1(tokens, output_hidden_states=True)
        assert torch.equal(o1.hidden_states[-2], r1.hidden_states[-2])
        assert torch.equal(c.text_encoder_2(tokens).text_embeds, ref2(tokens).text_embeds)


def test_load_components_unet_matches_diffusers(tiny_model):
    """Loaded into our UNet, the weights give diffusers' output."""
    from diffusers import UNet2DConditionModel

    path = tiny_model(family="sd1")
    c = load_components(path)
    ref = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        ours = c.unet(x, torch.tensor([10]), ctx)
        theirs = ref(x, torch.tensor([10]), ctx).sample
    assert (ours - theirs).abs().max() < 1e-5


def test_load_components_refiner(tiny_model):
    path = tiny_model(family="sdxl", refiner=True)
    c = load_components(path)
    assert c.info.family == "sdxl" and c.info.refiner
    assert c.text_encoders[0] is None and c.tokenizers[0] is None
    assert c.text_encoder is None and c.text_encoder_2 is not None and c.tokenizer_2 is not None


@pytest.mark.parametrize("in_channels,kind", [(9, "inpaint"), (8, "instruct_pix2pix"), (5, "depth")])
def test_load_components_kinds(tiny_model, in_channels, kind):
    c = load_components(tiny_model(family="sd2" if in_channels == 5 else "sd1", in_channels=in_channels,
                                   latent_factor=4))
    assert c.info.kind == kind and c.info.in_channels == in_channels and c.info.latent_factor == 4
    assert c.unet.conv_in.weight.shape[1] == in_channels


def test_load_components_dtype_and_variant(tiny_model):
    path = tiny_model(family="sdxl", variant="fp16")
    c = load_components(path, dtype=torch.bfloat16)
    for m in [c.unet, c.vae, *c.text_encoders]:
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
        assert all(p.device.type == "cpu" for p in m.parameters())
    c16 = load_components(path, variant="fp16", dtype=None)
    assert c16.unet.conv_in.weight.dtype == torch.float32  # dtype None: the module's own
    _assert_matches_files(c16.unet, [path / "unet" / "diffusion_pytorch_model.fp16.safetensors"])
    _assert_matches_files(c16.text_encoder_2, [path / "text_encoder_2" / "model.fp16.safetensors"], prefix_free=True)
    full = load_components(path)
    assert not torch.equal(full.unet.conv_in.weight, c16.unet.conv_in.weight)  # fp16 rounding differs


def test_load_components_errors(tiny_model, tmp_path):
    src = tiny_model(family="sd1")

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    with pytest.raises(FileNotFoundError) as e:
        load_components(tmp_path / "absent")
    assert "absent" in str(e.value)

    f = tmp_path / "single.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError) as e:
        load_components(f)
    assert str(f) in str(e.value) and "ingle-file" in str(e.value)

    p = copy("no_index")
    (p / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_components(p)

    p = copy("no_vae")
    shutil.rmtree(p / "vae")
    with pytest.raises(FileNotFoundError) as e:
        load_components(p)
    assert str(p / "vae") in str(e.value)

    p = copy("no_tokenizer")
    shutil.rmtree(p / "tokenizer")
    with pytest.raises(FileNotFoundError) as e:
        load_components(p)
    assert str(p / "tokenizer") in str(e.value)

    p = copy("no_weights")
    (p / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_components(p)
    assert str(p / "unet") in str(e.value) and "diffusion_pytorch_model.safetensors" in str(e.value)

    p = copy("no_te_config")
    (p / "text_encoder" / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_components(p)
    assert str(p / "text_encoder" / "config.json") in str(e.value)

    p = copy("lfs")
    (p / "vae" / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 334643268\n")
    with pytest.raises(ValueError) as e:
        load_components(p)
    assert str(p / "vae" / "diffusion_pytorch_model.safetensors") in str(e.value) and "git lfs pull" in str(e.value)

    p = copy("shape")
    cfg = json.loads((p / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 48]
    (p / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_components(p)
    assert str(p / "unet" / "diffusion_pytorch_model.safetensors") in str(e.value) and "shape" in str(e.value)

    p = copy("arch")
    cfg = json.loads((p / "text_encoder" / "config.json").read_text())
    cfg["architectures"] = ["T5EncoderModel"]
    (p / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="T5EncoderModel"):
        load_components(p)

    p = copy("channels")
    cfg = json.loads((p / "unet" / "config.json").read_text())
    cfg["in_channels"] = 7
    (p / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="in_channels"):
        load_components(p)


def test_text_encoder_bin_and_old_prefix(tiny_model, tmp_path):
    """A transformers-4 style text encoder: pytorch_model.bin with text_model. keys and position_ids."""
    src = tiny_model(family="sd1")
    te = tmp_path / "text_encoder"
    te.mkdir()
    shutil.copy(src / "text_encoder" / "config.json", te / "config.json")
    sd = load_file(str(src / "text_encoder" / "model.safetensors"))
    old = {"text_model." + k: v for k, v in sd.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    torch.save(old, te / "pytorch_model.bin")
    m = load_text_encoder(te)
    ref = load_text_encoder(src / "text_encoder")
    for (k, v), (k2, v2) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
