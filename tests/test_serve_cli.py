"""``controldiff serve``'s command line: its options reach the server's config and the app
(uvicorn's start replaced by a recorder), and bad options are refused before anything starts."""
from __future__ import annotations

import pytest
import uvicorn

from controldiff.cli import main
from controldiff.serve.config import is_loopback


@pytest.fixture
def started(monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def test_options_reach_the_server(tmp_path, started, monkeypatch):
    for d in ("models", "loras", "embeddings", "controlnets", "models/default"):
        (tmp_path / d).mkdir()
    monkeypatch.setenv("CONTROLDIFF_TOKEN", "from-env")
    model = tmp_path / "models" / "default"   # loaded by the worker on the first request, not here
    assert main(["serve", str(model), "--host", "0.0.0.0", "--port", "9123", "--models-dir", str(tmp_path / "models"),
                 "--lora-dir", str(tmp_path / "loras"), "--embedding-dir", str(tmp_path / "embeddings"),
                 "--controlnet-dir", str(tmp_path / "controlnets"), "--outputs", str(tmp_path / "out"),
                 "--device", "cpu", "--dtype", "float32", "--max-pixels", "4096", "--max-images", "3"]) == 0
    (app, kw), = started
    assert (kw["host"], kw["port"]) == ("0.0.0.0", 9123)
    c = app.state.server.config
    assert c.model == model and c.token == "from-env" and c.devices == ("cpu",) and c.dtype == "float32"
    assert c.models == [tmp_path / "models"] and c.loras == [tmp_path / "loras"]
    assert c.embeddings == [tmp_path / "embeddings"] and c.controlnets == [tmp_path / "controlnets"]
    assert (c.max_pixels, c.max_images) == (4096, 3) and (tmp_path / "out").is_dir()
    assert app.state.server.limits.max_images == 3


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "needs a token"),
    (["--host", "192.168.1.5", "--token", " "], "non-empty token"),
    (["/no/such/model"], "model folder or file not found"),
    (["--models-dir", "/no/such/dir"], "--models-dir: not a folder"),
    (["--device", "no-such-device"], "--device"),
    (["--port", "0"], "positive integer"),
])
def test_bad_options_are_refused_before_starting(tmp_path, started, monkeypatch, capsys, args, message):
    monkeypatch.delenv("CONTROLDIFF_TOKEN", raising=False)
    assert main(["serve", *args, "--outputs", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert started == []


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))
