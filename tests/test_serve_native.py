"""The native API (/controldiff/v1) on the real server: jobs with progress and a preview, cancel
(running and queued), 422 with the field path, the gallery and its files, and 20 clients at once
(A1111's API and the native one together): every request answered, every image saved intact
with its settings, none overwritten."""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from controldiff.png import parse_parameters, read_parameters
from controldiff.serve import ServerConfig
from test_serve_support import folders, running, saved

API = "/controldiff/v1"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    kw = folders(tmp_path_factory.mktemp("native"), tiny_model("sd1"))
    config = ServerConfig(**kw, preview_every=1)
    with running(config) as port:
        yield httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120), config, port


def wait(client, job_id: str, states=("done", "cancelled", "failed")) -> dict:
    for _ in range(2400):
        j = client.get(f"{API}/jobs/{job_id}").json()
        if j["state"] in states:
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {j['state']}")


def test_lists_and_schema(server):
    c = server[0]
    assert c.get(f"{API}/models").json() == ["tiny"]
    assert c.get(f"{API}/loras").json() == ["style"]
    assert c.get(f"{API}/embeddings").json() == ["shiny"]
    assert c.get(f"{API}/controlnets").json() == []
    assert "euler_a" in c.get(f"{API}/samplers").json()
    schema = c.get(f"{API}/schema").json()
    assert "prompt" in schema["properties"] and "controls" in schema["properties"]


def test_a_job_reports_progress_and_saves_its_images(server):
    c, config, _ = server
    job = c.post(f"{API}/jobs", json={"prompt": "a green hill", "num_inference_steps": 3, "width": 64,
                                      "height": 64, "seed": 40, "num_images": 2, "model": "tiny",
                                      "scheduler": "euler"}).json()
    j = wait(c, job["id"])
    assert j["state"] == "done" and j["error"] is None
    assert (j["num_images"], j["image_index"], j["step"], j["total_steps"]) == (2, 1, 3, 3)
    Image.open(io.BytesIO(base64.b64decode(j["preview"]))).verify()
    assert [i["seed"] for i in j["images"]] == [40, 41]
    for item in j["images"]:
        r = c.get(item["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        im = Image.open(io.BytesIO(r.content))
        assert im.size == (64, 64) and im.info["parameters"] == item["parameters"]
        assert parse_parameters(item["parameters"])["Seed"] == str(item["seed"])
    gallery = c.get(f"{API}/outputs").json()
    urls = [g["url"] for g in gallery]
    assert {i["url"] for i in j["images"]} <= set(urls)
    assert all(g["created"] for g in gallery)
    assert [g["created"] for g in gallery] == sorted((g["created"] for g in gallery), reverse=True)


def test_cancel_a_running_and_a_queued_job(server):
    c, config, _ = server
    before = set(saved(config.outputs))
    long = c.post(f"{API}/jobs", json={"prompt": "long", "num_inference_steps": 500, "width": 64, "height": 64,
                                       "seed": 1}).json()["id"]
    queued = c.post(f"{API}/jobs", json={"prompt": "queued", "num_inference_steps": 2, "width": 64,
                                         "height": 64, "seed": 2}).json()["id"]
    wait(c, long, states=("running",))
    assert c.get(f"{API}/jobs/{queued}").json()["state"] == "queued"
    assert c.post(f"{API}/jobs/{queued}/cancel").status_code == 200
    assert c.post(f"{API}/jobs/{long}/cancel").status_code == 200
    j = wait(c, long)
    assert j["state"] == "cancelled" and j["step"] < 500 and j["images"] == []
    q = wait(c, queued)
    assert q["state"] == "cancelled" and q["step"] == 0 and q["images"] == []
    assert set(saved(config.outputs)) == before
    assert c.post(f"{API}/jobs/nope/cancel").status_code == 404
    assert c.get(f"{API}/jobs/nope").status_code == 404


@pytest.mark.parametrize("body, loc", [
    ({"num_inference_steps": 0}, ["num_inference_steps"]),
    ({"width": 65}, ["width"]),
    ({"scheduler": "warp"}, ["scheduler"]),
    ({"controls": [{"type": "SEGA", "concepts": [{"prompt": "smiling", "scale": "big"}]}]},
     ["controls", 0, "concepts", 0, "scale"]),
    ({"controls": [{"type": "PAG"}, {"type": "NoSuchControl"}]}, ["controls", 1, "type"]),
    ({"model": "absent"}, ["model"]),
])
def test_bad_requests_are_422_naming_the_field(server, body, loc):
    r = server[0].post(f"{API}/jobs", json={"prompt": "x", "width": 64, "height": 64, **body})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"] == loc and detail[0]["msg"]


def test_twenty_concurrent_clients_lose_nothing(server):
    c, config, port = server
    config.outputs.mkdir(exist_ok=True)
    keep = config.outputs / "00000-7.png"   # a file already there is never overwritten
    Image.new("RGB", (8, 8), "red").save(keep)
    keep_bytes = keep.read_bytes()
    before = set(saved(config.outputs))

    def a1111(i):
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=2)
        r = api.txt2img(prompt=f"client {i}", seed=1000 + i, width=64, height=64)
        return [(f"client {i}", 1000 + i, r.info["infotexts"][0])]

    def native(i):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            job_id = client.post(f"{API}/jobs", json={"prompt": f"client {i}", "seed": 1000 + i, "width": 64,
                                                      "height": 64, "num_inference_steps": 2,
                                                      "scheduler": "euler_a"}).json()["id"]
            j = wait(client, job_id)
        assert j["state"] == "done", j
        return [(f"client {i}", 1000 + i, im["parameters"]) for im in j["images"]]

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: (a1111 if i % 2 else native)(i), range(20)))
    assert all(len(a) == 1 for a in answers)
    new = sorted(set(saved(config.outputs)) - before)
    assert len(new) == 20 and len({p.name for p in new}) == 20
    found = {}
    for p in new:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            im.load()
            assert im.size == (64, 64)
        text = read_parameters(p)
        fields = parse_parameters(text)
        found[fields["Prompt"]] = (int(fields["Seed"]), text)
    expected = {prompt: (seed, text) for a in answers for prompt, seed, text in a}
    assert found == expected
    assert keep.read_bytes() == keep_bytes
    assert not list(config.outputs.glob(".*.part"))


@pytest.mark.parametrize("family, row", [("sd1", (0.298, 0.207, 0.208)), ("sdxl", (0.3448, 0.4168, 0.4395))])
def test_preview_is_a1111s_cheap_approximation(family, row):
    from controldiff.serve.preview import preview_image

    latents = torch.zeros(2, 4, 3, 5)
    latents[0, 0, 1, 2] = 1.0            # one latent pixel of channel 0
    im = preview_image(family, 8, latents)
    assert im.size == (40, 24)
    px = np.asarray(im)
    assert tuple(px[8 * 1 + 3, 8 * 2 + 3]) == tuple(round((v + 1) * 127.5) for v in row)
    assert tuple(px[0, 0]) == (128, 128, 128)     # latent 0 is mid-grey
    assert preview_image(family, 8, torch.zeros(1, 16, 3, 5)) is None
