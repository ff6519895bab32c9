"""Bad configs and tokenizer files fail where they are read, naming the file and the key,
before any weights are built (loaders) or any step runs (the command line)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import controldiff as cd
from controldiff import cli
from controldiff.loading import folder as folder_loader
from controldiff.models.config import read_json

# (component file, key, bad value, words the message must hold)
BAD_VALUES = [
    ("unet/config.json", "attention_head_dim", 0, "positive integer"),
    ("unet/config.json", "block_out_channels", "abc", "list of positive integers"),
    ("unet/config.json", "sample_size", 0, "positive integer"),
    ("unet/config.json", "sample_size", -8, "positive integer"),
    ("unet/config.json", "norm_num_groups", 5, "divisor"),
    ("unet/config.json", "in_channels", 7, "in_channels"),
    ("vae/config.json", "norm_num_groups", 5, "divisor"),
    ("vae/config.json", "scaling_factor", "0.18215", "positive number"),
    ("vae/config.json", "sample_size", 0, "positive integer"),
    ("vae/config.json", "block_out_channels", [], "list of positive integers"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 0, "positive integer"),
    ("scheduler/scheduler_config.json", "prediction_type", "flow", "epsilon"),
    ("scheduler/scheduler_config.json", "beta_end", "0.012", "number"),
    ("text_encoder/config.json", "num_attention_heads", 5, "divisor of hidden_size"),
    ("text_encoder/config.json", "hidden_size", 0, "positive integer"),
]


def _copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model("sd1"), tmp_path / "model"))


def _edit(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights are read or any module is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the config was checked")

    monkeypatch.setattr(folder_loader, "load_model", refuse)


@pytest.mark.parametrize("file, key, value, words", BAD_VALUES)
def test_bad_config_value_names_file_and_key_before_loading(tiny_model, tmp_path, no_weights, file, key, value,
                                                            words):
    model = _copy(tiny_model, tmp_path)
    _edit(model / file, key, value)
    with pytest.raises(ValueError) as e:
        folder_loader.load_components(model)
    msg = str(e.value)
    assert str(model / file) in msg and key in msg and words in msg


@pytest.mark.parametrize("content, words", [("[1, 2]", "JSON array"), ("", "empty"), ("{", "not valid JSON"),
                                            ('"abc"', "JSON string"), (b"\xff\xfe{", "UTF-8")])
def test_read_json_refuses_what_is_not_an_object(tmp_path, content, words):
    p = tmp_path / "config.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        read_json(p)
    assert str(p) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("file", ["model_index.json", "unet/config.json", "vae/config.json",
                                  "scheduler/scheduler_config.json", "text_encoder/config.json"])
def test_config_that_is_a_list_names_the_file(tiny_model, tmp_path, no_weights, file):
    model = _copy(tiny_model, tmp_path)
    (model / file).write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="expected a JSON object") as e:
        folder_loader.load_components(model)
    assert str(model / file) in str(e.value)


@pytest.mark.parametrize("file, content", [("tokenizer.json", ""), ("vocab.json", ""), ("vocab.json", "[]"),
                                           ("tokenizer_config.json", "{"), ("merges.txt", "")])
def test_broken_tokenizer_file_is_named_before_loading(tiny_model, tmp_path, no_weights, file, content):
    model = _copy(tiny_model, tmp_path)
    (model / "tokenizer" / file).write_text(content)
    with pytest.raises(ValueError) as e:
        folder_loader.load_components(model)
    assert str(model / "tokenizer" / file) in str(e.value)


def test_tokenizer_json_transformers_cannot_read_names_the_folder(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path)
    (model / "tokenizer" / "tokenizer.json").write_text("{}")  # valid JSON, not a tokenizer
    with pytest.raises(ValueError) as e:
        folder_loader.load_tokenizer(model / "tokenizer")
    assert str(model / "tokenizer") in str(e.value) and "tokenizer" in str(e.value)


def test_cli_refuses_bad_config_before_loading_the_model(tiny_model, tmp_path, capsys, monkeypatch):
    from controldiff import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(never))
    model = _copy(tiny_model, tmp_path)
    _edit(model / "vae" / "config.json", "scaling_factor", "abc")
    rc = cli.main(["generate", str(model), "-p", "x", "--steps", "1", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and str(model / "vae" / "config.json") in err and "scaling_factor" in err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()


def test_controlnet_folder_config_is_checked(tiny_model, tmp_path):
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model("sd1") / "unet")
    cn = tmp_path / "cn"
    diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).save_pretrained(cn)
    _edit(cn / "config.json", "attention_head_dim", 0)
    with pytest.raises(ValueError) as e:
        cd.load_controlnet(cn)
    assert str(cn / "config.json") in str(e.value) and "attention_head_dim" in str(e.value)
    (cn / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        cd.load_controlnet(cn)
