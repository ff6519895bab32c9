"""The server's limits: loopback unless a token is given, then the token on every route (bearer,
or basic auth as A1111 clients send it); names confined to their folders (../, absolute paths,
symlinks out, URL-encoded) for models, LoRAs, embeddings, ControlNets and outputs; request bodies and images
over the limits refused before anything decodes them."""
from __future__ import annotations

import base64
import io
import os

import httpx
import pytest
import webuiapi
from PIL import Image

from controldiff.cli import main
from controldiff.serve import ServerConfig, create_app
from test_serve_support import folders, running

TOKEN = "s3cret-token"
API = "/controldiff/v1"
LIMIT_BYTES = 300_000
LIMIT_PIXELS = 128 * 128


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    kw = folders(root / "served", tiny_model("sd1"))
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"not for you")
    os.symlink(tiny_model("sd1"), root / "served" / "models" / "linked")      # a model folder outside
    os.symlink(kw["loras"][0] / "style.safetensors", outside / "x")          # (a link into a folder is fine)
    lora_out = outside / "evil.safetensors"
    lora_out.write_bytes((kw["loras"][0] / "style.safetensors").read_bytes())
    os.symlink(lora_out, kw["loras"][0] / "evil.safetensors")                 # a LoRA file outside
    emb_out = outside / "evil_emb.safetensors"
    emb_out.write_bytes((kw["embeddings"][0] / "shiny.safetensors").read_bytes())
    os.symlink(emb_out, kw["embeddings"][0] / "evil_emb.safetensors")         # an embedding outside
    kw["outputs"].mkdir()
    os.symlink(outside / "secret.png", kw["outputs"] / "00099-1.png")         # an output outside
    config = ServerConfig(**kw, host="0.0.0.0", token=TOKEN, max_upload_bytes=LIMIT_BYTES,
                          max_pixels=LIMIT_PIXELS)
    with running(config, host="0.0.0.0") as port:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                              headers={"Authorization": f"Bearer {TOKEN}"})
        yield client, config, port, root


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "gray").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_binding_beyond_loopback_needs_a_token(tmp_path, capsys):
    with pytest.raises(ValueError, match="token"):
        create_app(ServerConfig(host="0.0.0.0", outputs=tmp_path / "o"))
    assert main(["serve", "--host", "0.0.0.0", "--outputs", str(tmp_path / "o")]) == 2
    assert "needs a token" in capsys.readouterr().err
    create_app(ServerConfig(host="127.0.0.1", outputs=tmp_path / "o"))   # loopback: no token needed


@pytest.mark.parametrize("path", ["/", f"{API}/models", "/sdapi/v1/sd-models", f"{API}/outputs"])
def test_every_route_needs_the_token(server, path):
    port = server[2]
    assert httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 401
    assert httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}{path}", auth=("anyone", TOKEN)).status_code == 200
    r = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={"prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")


def test_webuiapi_with_basic_auth(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server[2], username="me", password=TOKEN, steps=2)
    r = api.txt2img(prompt="behind a token", seed=3, width=64, height=64)
    assert r.image.size == (64, 64)
    denied = webuiapi.WebUIApi(host="127.0.0.1", port=server[2], username="me", password="wrong", steps=2)
    with pytest.raises(RuntimeError, match="401"):
        denied.txt2img(prompt="x", width=64, height=64)


@pytest.mark.parametrize("name", ["../tiny", "../../outside", "/etc", "linked", "%2e%2e%2ftiny", "tiny/../tiny"])
def test_model_names_stay_in_the_models_folder(server, name):
    c = server[0]
    assert "linked" not in c.get(f"{API}/models").json()
    r = c.post(f"{API}/jobs", json={"prompt": "x", "width": 64, "height": 64, "model": name})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["model"], r.text
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                          "override_settings": {"sd_model_checkpoint": name}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["override_settings", "sd_model_checkpoint"]
    r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
    assert r.status_code == 422


@pytest.mark.parametrize("name", ["../outside/evil", "/tmp/evil", "evil", "..%2Fevil"])
def test_lora_names_stay_in_the_lora_folder(server, name):
    c = server[0]
    assert c.get(f"{API}/loras").json() == ["style"]
    r = c.post(f"{API}/jobs", json={"prompt": "x", "width": 64, "height": 64, "loras": [{"name": name}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["loras", 0], r.text
    r = c.post("/sdapi/v1/txt2img", json={"prompt": f"x <lora:{name}:1>", "width": 64, "height": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["prompt"], r.text


@pytest.mark.parametrize("name", ["evil_emb", "../outside/evil_emb", "/tmp/evil_emb"])
def test_embedding_names_stay_in_the_embedding_folder(server, name):
    c = server[0]
    assert c.get(f"{API}/embeddings").json() == ["shiny"]
    r = c.post(f"{API}/jobs", json={"prompt": "x", "width": 64, "height": 64, "embeddings": [name]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["embeddings", 0], r.text


def test_controlnet_names_stay_in_their_folder(server):
    r = server[0].post(f"{API}/jobs", json={"prompt": "x", "width": 64, "height": 64, "controls": [
        {"type": "ControlNet", "model": "../models/tiny", "image": _png(64, 64)}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["controls", 0, "model"], r.text


@pytest.mark.parametrize("path", ["..%2Foutside%2Fsecret.png", "%2e%2e%2foutside%2fsecret.png", "00099-1.png",
                                  "..%5Csecret.png", "%2Fetc%2Fpasswd", ".00001.part"])
def test_outputs_are_served_only_from_the_outputs_folder(server, path):
    c, _, port, root = server
    r = c.get(f"{API}/outputs/{path}")
    assert r.status_code == 404 and b"not for you" not in r.content
    raw = httpx.get(f"http://127.0.0.1:{port}{API}/outputs/../../outside/secret.png",
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert b"not for you" not in raw.content
    assert all("00099" not in g["url"] for g in c.get(f"{API}/outputs").json())


def test_oversized_bodies_are_refused(server):
    c, _, port, _ = server
    big = {"prompt": "x" * (LIMIT_BYTES + 10)}
    assert c.post(f"{API}/jobs", json=big).status_code == 413
    assert c.post("/sdapi/v1/txt2img", json=big).status_code == 413

    def chunks():   # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(LIMIT_BYTES // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'

    r = c.post(f"{API}/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_images_over_the_pixel_limit_are_refused(server):
    c = server[0]
    r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "width": 64, "height": 64, "init_images": [_png(256, 256)]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["init_images", 0], r.text
    r = c.post(f"{API}/jobs", json={"prompt": "x", "width": 64, "height": 64, "image": _png(256, 256)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["image"], r.text
    r = c.post(f"{API}/jobs", json={"prompt": "x", "width": 256, "height": 256})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["width"], r.text
