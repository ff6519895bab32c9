"""A1111's API (/sdapi/v1) driven by the real ``webuiapi`` client against the real server and a
tiny model: txt2img, img2img (inpainting too), ControlNet units, progress, interrupt, PNG info,
the lists and options; errors named in A1111's field names."""
from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from controldiff.png import parse_parameters, read_parameters
from controldiff.serve import ServerConfig
from test_serve_support import folders, running, saved

STEPS = 2


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    kw = folders(tmp_path_factory.mktemp("a1111"), tiny_model("sd1"), controlnet=True)
    config = ServerConfig(**kw, preview_every=1)
    with running(config) as port:
        yield port, config


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server[0], sampler="Euler a", steps=STEPS)


def _array(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_txt2img_returns_images_with_infotext_and_saves_them(api, server):
    before = set(saved(server[1].outputs))
    r = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=123, width=64, height=64,
                    batch_size=2, n_iter=2, cfg_scale=5.5, sampler_name="DPM++ 2M", scheduler="Karras")
    assert len(r.images) == 4 and all(im.size == (64, 64) for im in r.images)
    assert r.info["all_seeds"] == [123, 124, 125, 126] and r.info["seed"] == 123
    assert len(r.info["infotexts"]) == 4
    for im, seed, text in zip(r.images, r.info["all_seeds"], r.info["infotexts"]):
        p = parse_parameters(im.info["parameters"])    # the PNG carries its infotext, as A1111's do
        assert im.info["parameters"] == text
        assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Steps"]) == ("a red fox", "blurry", str(seed), "2")
        assert (p["Sampler"], p.get("Schedule type"), p["CFG scale"], p["Size"]) == ("DPM++ 2M", "Karras", "5.5",
                                                                                       "64x64")
    assert r.parameters["prompt"] == "a red fox" and r.parameters["batch_size"] == 2
    new = set(saved(server[1].outputs)) - before
    assert len(new) == 4
    assert sorted(read_parameters(p) for p in new) == sorted(r.info["infotexts"])
    # the same seed remakes the same image; seed -1 draws one and says which
    again = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=124, width=64, height=64,
                        cfg_scale=5.5, sampler_name="DPM++ 2M", scheduler="Karras")
    assert np.array_equal(_array(again.image), _array(r.images[1]))
    rnd = api.txt2img(prompt="a red fox", seed=-1, width=64, height=64)
    assert rnd.info["seed"] >= 0 and f"Seed: {rnd.info['seed']}," in rnd.info["infotexts"][0]


def test_fields_left_out_take_a1111s_defaults(server):
    r = httpx.post(f"http://127.0.0.1:{server[0]}/sdapi/v1/txt2img",
                   json={"prompt": "a cat", "steps": STEPS, "width": 64, "height": 64}, timeout=120)
    assert r.status_code == 200, r.text
    p = parse_parameters(json.loads(r.json()["info"])["infotexts"][0])
    assert (p["Sampler"], p["CFG scale"], p["Steps"]) == ("Euler", "7.0", str(STEPS))


def test_clip_skip_and_model_through_override_settings(api):
    plain = api.txt2img(prompt="a cat", seed=7, width=64, height=64)
    skipped = api.txt2img(prompt="a cat", seed=7, width=64, height=64,
                          override_settings={"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny"})
    assert not np.array_equal(_array(plain.image), _array(skipped.image))
    assert skipped.info["clip_skip"] == 2 and parse_parameters(skipped.info["infotexts"][0])["Clip skip"] == "2"


def test_img2img_and_inpainting(api):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    r = api.img2img(images=[init], prompt="a boat", denoising_strength=0.5, seed=3, width=64, height=64)
    p = parse_parameters(r.info["infotexts"][0])
    assert r.image.size == (64, 64) and p["Denoising strength"] == "0.5"
    stronger = api.img2img(images=[init], prompt="a boat", denoising_strength=1.0, seed=3, width=64, height=64)
    assert not np.array_equal(_array(r.image), _array(stronger.image))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))   # repaint the left half
    inp = api.img2img(images=[init], mask_image=mask, mask_blur=0, prompt="a boat", denoising_strength=1.0,
                      seed=3, width=64, height=64, inpainting_fill=1)
    out = _array(inp.image)
    assert parse_parameters(inp.info["infotexts"][0]).get("Mode") == "inpaint"
    # the kept half stays close to the init image, the repainted half does not
    kept = np.abs(out[:, 40:] - _array(init)[:, 40:]).mean()
    changed = np.abs(out[:, :24] - _array(init)[:, :24]).mean()
    assert kept < changed


def test_controlnet_unit(api, server):
    hint = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert api.controlnet_model_list() == ["cn"]
    plain = api.txt2img(prompt="a house", seed=11, width=64, height=64)
    unit = webuiapi.ControlNetUnit(image=hint, model="cn", weight=0.8, guidance_start=0.0, guidance_end=1.0)
    r = api.txt2img(prompt="a house", seed=11, width=64, height=64, controlnet_units=[unit])
    p = parse_parameters(r.info["infotexts"][0])
    assert "ControlNet 0" in p and "Weight: 0.8" in p["ControlNet 0"] and "Model: cn" in p["ControlNet 0"]
    assert not np.array_equal(_array(plain.image), _array(r.image))
    # a disabled unit is no unit
    off = webuiapi.ControlNetUnit(image=hint, model="cn", enabled=False)
    r2 = api.txt2img(prompt="a house", seed=11, width=64, height=64, controlnet_units=[off])
    assert np.array_equal(_array(plain.image), _array(r2.image))


def test_png_info_reads_the_settings_back(api):
    r = api.txt2img(prompt="a lighthouse", seed=99, width=64, height=64)
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]
    assert info.parameters["Seed"] == "99" and info.parameters["Prompt"] == "a lighthouse"


def test_progress_and_interrupt(api, server):
    before = set(saved(server[1].outputs))
    box = {}
    t = threading.Thread(target=lambda: box.update(r=api.txt2img(prompt="a long one", seed=1, steps=400,
                                                                 width=64, height=64)))
    t.start()
    seen = None
    for _ in range(2000):
        prog = api.get_progress()
        if prog["state"]["sampling_step"] >= 2 and prog["current_image"]:
            seen = prog
            break
        time.sleep(0.01)
    assert seen is not None, "no progress reported"
    assert seen["state"]["sampling_steps"] == 400 and 0 < seen["progress"] < 1 and seen["state"]["job_count"] == 1
    Image.open(__import__("io").BytesIO(__import__("base64").b64decode(seen["current_image"]))).verify()
    api.interrupt()
    t.join(timeout=60)
    assert not t.is_alive()
    after = api.get_progress()
    assert after["state"]["interrupted"] and after["state"]["sampling_step"] < 400
    assert box["r"].info["interrupted"] is True
    assert set(saved(server[1].outputs)) == before   # the image cut short is not saved


def test_lists_and_options(api, server):
    assert "Euler a" in api.util_get_sampler_names() and "DPM++ 2M" in api.util_get_sampler_names()
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    assert "tiny" in api.util_get_model_names()
    assert [x["name"] for x in api.get_loras()] == ["style"]
    assert list(api.get_embeddings()["loaded"]) == ["shiny"]
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    api.set_options({"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 1})
    r = httpx.post(f"http://127.0.0.1:{server[0]}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["sd_model_checkpoint"]


@pytest.mark.parametrize("body, loc", [
    ({"steps": 0}, ["steps"]),
    ({"sampler_name": "Not A Sampler"}, ["sampler_name"]),
    ({"enable_hr": True}, ["enable_hr"]),
    ({"override_settings": {"sd_model_checkpoint": "missing"}}, ["override_settings", "sd_model_checkpoint"]),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"image": "", "model": "cn", "weight": -1}]}}},
     ["alwayson_scripts", "ControlNet", "args", 0, "image"]),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"module": "canny", "model": "cn"}]}}},
     ["alwayson_scripts", "ControlNet", "args", 0, "module"]),
    ({"alwayson_scripts": {"adetailer": {"args": [True]}}}, ["alwayson_scripts", "adetailer"]),
    ({"override_settings": ["CLIP_stop_at_last_layers", 2]}, ["override_settings"]),
    ({"seed": "lucky"}, ["seed"]),
    ({"batch_size": 100}, ["batch_size"]),
    ({"width": 4096, "height": 4096}, ["width"]),
])
def test_errors_name_the_a1111_field(server, body, loc):
    r = httpx.post(f"http://127.0.0.1:{server[0]}/sdapi/v1/txt2img",
                   json={"prompt": "x", "width": 64, "height": 64, "steps": STEPS, **body})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc


def test_controlnet_unit_errors_from_the_native_parse_name_the_unit_field(server):
    hint = webuiapi.raw_b64_img(Image.new("RGB", (64, 64)))
    r = httpx.post(f"http://127.0.0.1:{server[0]}/sdapi/v1/txt2img",
                   json={"prompt": "x", "width": 64, "height": 64, "steps": STEPS, "alwayson_scripts": {
                       "controlnet": {"args": [{"image": hint, "model": "cn", "weight": -1}]}}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:4] == ["alwayson_scripts", "controlnet", "args", 0]
    assert r.json()["detail"][0]["loc"][4:] == ["weight"]
