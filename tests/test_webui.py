"""The web page (serve/static) in headless Chromium against the real server and a tiny model:
generate and see the image in the gallery and on disk, cancel a long run, a control added
from the schema-built stack reaching the job, errors next to their field, settings sent back
to the form. ``WEBUI_SCREENSHOT=docs/webui.png`` also saves the screenshot for the docs."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import base64
import io

import httpx
import pytest
import torch
import uvicorn
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from safetensors.torch import save_file
from tiny_models import build_controlnet

import controldiff as cd
from controldiff.png import parse_parameters, read_parameters
from controldiff.request import controls as request_controls
from controldiff.sampling.control import Control
from controldiff.serve import create_app
from controldiff.serve.config import ServerConfig

CHROMIUM = "/usr/bin/chromium"
WAIT = 30_000  # ms, for a job on two shared CPU cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The real app on a free port: a tiny default model, a models folder holding it, an
    embedding, a ControlNet and an outputs folder. Yields (base url, config)."""
    root = tmp_path_factory.mktemp("webui")
    models, embeddings, outputs = root / "models", root / "embeddings", root / "outputs"
    shutil.copytree(tiny_model("sd1"), models / "tiny")
    build_controlnet(models / "tiny", root / "controlnets" / "edges")
    embeddings.mkdir()
    (root / "loras").mkdir()
    save_file({"unused": torch.zeros(1)}, str(root / "loras" / "inkwash.safetensors"))  # listed, not loaded
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(embeddings / "shiny.safetensors"))
    config = ServerConfig(model=models / "tiny", models=[models], loras=[root / "loras"], embeddings=[embeddings],
                          controlnets=[root / "controlnets"], outputs=outputs,
                          devices=("cpu",), preview_every=1)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", config
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page, loaded: its lists and the schema fetched. Page errors fail the test."""
    errors: list[str] = []
    pg = browser.new_page(viewport={"width": 1100, "height": 760})
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server[0] + "/")
    expect(pg.locator("#load-state")).to_have_text("ready", timeout=WAIT)
    yield pg
    pg.close()
    assert not errors, errors


def fill_basics(pg, prompt: str, steps: int, seed: int) -> None:
    pg.fill("#prompt", prompt)
    pg.fill("#width", "64")
    pg.fill("#height", "64")
    pg.fill("#num_inference_steps", str(steps))
    pg.fill("#seed", str(seed))


def wait_state(pg, state: str) -> None:
    expect(pg.locator("#job-state")).to_have_attribute("data-state", state, timeout=WAIT)


def card(pg, url: str):
    return pg.locator(f'#gallery .card[data-url="{url}"]')


def newest_job_images(server, pg) -> list[dict]:
    job_id = pg.evaluate("lastJob")
    return httpx.get(f"{server[0]}/controldiff/v1/jobs/{job_id}").json()["images"]


def test_generate_shows_the_image_in_the_gallery_and_on_disk(page, server):
    base, config = server
    expect(page.locator("#model option", has_text="tiny")).to_have_count(1)
    fill_basics(page, "a red fox", steps=2, seed=5)
    page.select_option("#lora-pick", "inkwash")
    page.click("#lora-insert")
    expect(page.locator("#prompt")).to_have_value("a red fox <lora:inkwash:1>")
    page.fill("#prompt", "a red fox")
    page.select_option("#embedding-pick", "shiny")
    page.click("#embedding-insert")
    expect(page.locator("#prompt")).to_have_value("a red fox shiny")
    page.click("#generate")
    wait_state(page, "done")
    images = newest_job_images(server, page)
    assert len(images) == 1 and images[0]["seed"] == 5
    url = images[0]["url"]
    shown = card(page, url).locator("img")
    expect(shown).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=shown.element_handle())
    assert shown.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    expect(page.locator("#preview")).to_be_visible()
    file = Path(config.outputs) / Path(urlparse(url).path).name
    with Image.open(file) as im:
        assert im.size == (64, 64)
    params = parse_parameters(read_parameters(file))
    assert params["Prompt"] == "a red fox shiny" and params["Seed"] == "5" and params["Steps"] == "2"
    assert card(page, url).locator("pre").text_content() == images[0]["parameters"]


def test_cancel_a_long_run(page, server):
    fill_basics(page, "a long run", steps=500, seed=1)
    page.click("#generate")
    expect(page.locator("#job-state")).to_contain_text("step", timeout=WAIT)
    expect(page.locator("#preview")).to_have_attribute("src", re.compile("^data:image/png;base64,"), timeout=WAIT)
    expect(page.locator("#cancel")).to_be_enabled()
    page.click("#cancel")
    wait_state(page, "cancelled")
    job = httpx.get(f"{server[0]}/controldiff/v1/jobs/{page.evaluate('lastJob')}").json()
    assert job["state"] == "cancelled" and job["step"] < 500
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()


def test_a_control_from_the_schema_stack_reaches_the_job_and_comes_back(page, server, tmp_path):
    schema = httpx.get(f"{server[0]}/controldiff/v1/schema").json()
    offered = page.locator("#control-type option:enabled").all_text_contents()
    assert {"SEGA", "Regions", "ControlNet"} <= set(offered), offered
    assert all(f"\"{name}\"" in json.dumps(schema) for name in offered)

    fill_basics(page, "a quiet lake", steps=2, seed=11)
    page.select_option("#control-type", "SEGA")
    page.click("#add-control")
    sega = page.locator('.control[data-type="SEGA"]')
    sega.locator('[data-key="concepts"] [data-key="prompt"] textarea').fill("smiling")
    sega.locator('[data-key="concepts"] [data-key="warmup"] input').fill("0")
    page.select_option("#control-type", "Regions")
    page.click("#add-control")
    regions = page.locator('.control[data-type="Regions"]')
    regions.locator('[data-key="regions"] [data-key="prompt"] textarea').fill("a boat")
    canvas = regions.locator("canvas.boxes")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    k = box["width"] / 64  # canvas pixels per image pixel
    page.mouse.move(box["x"] + 8 * k, box["y"] + 16 * k)
    page.mouse.down()
    page.mouse.move(box["x"] + 40 * k, box["y"] + 48 * k, steps=4)
    page.mouse.up()
    drawn = [float(v) for v in regions.locator('[data-key="box"] input').input_value().split(",")]
    assert drawn == pytest.approx([8, 16, 40, 48], abs=1.5)

    page.click("#generate")
    wait_state(page, "done")
    (image,) = newest_job_images(server, page)
    params = parse_parameters(image["parameters"])
    sega_settings = json.loads(params["SEGA 0"])
    assert sega_settings["concepts"][0]["prompt"] == "smiling" and sega_settings["concepts"][0]["warmup"] == 0
    region = json.loads(params["Regions 0"])["regions"][0]
    assert region["prompt"] == "a boat" and region["box"] == pytest.approx(drawn)
    expect(card(page, image["url"])).to_be_visible()
    card(page, image["url"]).locator("summary").click()
    expect(card(page, image["url"]).locator("pre")).to_contain_text("SEGA 0")
    shot = tmp_path / "webui.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.width == 1100 and im.height >= 760
        if os.environ.get("WEBUI_SCREENSHOT"):
            im.convert("RGB").quantize(64).save(os.environ["WEBUI_SCREENSHOT"], optimize=True)

    # the form changed, then filled back from the gallery's settings
    page.fill("#prompt", "something else")
    page.fill("#seed", "99")
    page.fill("#num_inference_steps", "7")
    page.locator('.control[data-type="SEGA"] .control-head button.remove').click()
    expect(sega).to_have_count(0)
    card(page, image["url"]).locator("button.send").click()
    expect(page.locator("#prompt")).to_have_value("a quiet lake")
    expect(page.locator("#seed")).to_have_value("11")
    expect(page.locator("#num_inference_steps")).to_have_value("2")
    expect(sega.locator('[data-key="concepts"] [data-key="prompt"] textarea')).to_have_value("smiling")
    expect(regions.locator('[data-key="regions"] [data-key="prompt"] textarea')).to_have_value("a boat")
    request = page.evaluate("collect()")
    assert [c["type"] for c in request["controls"]] == ["SEGA", "Regions"]
    assert request["controls"][1]["regions"][0]["box"] == pytest.approx(drawn)


def test_errors_are_shown_next_to_the_field_they_name(page, server):
    fill_basics(page, "a tree", steps=2, seed=3)
    page.fill("#num_inference_steps", "0")
    page.click("#generate")
    error = page.locator('[data-key="num_inference_steps"] .field-error')
    expect(error).to_be_visible()
    assert "num_inference_steps" not in (page.locator("#errors").text_content() or "")
    page.fill("#num_inference_steps", "2")
    page.select_option("#control-type", "SEGA")
    page.click("#add-control")
    concept = page.locator('.control[data-type="SEGA"] [data-key="concepts"] [data-key="0"]')
    concept.locator('[data-key="prompt"] textarea').fill("smiling")
    concept.locator('[data-key="threshold"] input').fill("5")
    page.click("#generate")
    expect(concept.locator('[data-key="threshold"] .field-error')).to_be_visible()
    expect(error).to_have_count(0)  # the earlier error is cleared
    assert page.evaluate("lastJob") is None  # no job was made


def picture(path: Path, color=(200, 40, 40)) -> Path:
    im = Image.new("RGB", (64, 64), (20, 20, 20))
    im.paste(color, (16, 16, 48, 48))
    im.save(path)
    return path


def decode(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_controlnet_image_upload_and_inpaint_mask_painted_on_the_init_image(page, server, tmp_path):
    fill_basics(page, "a red square", steps=2, seed=21)
    page.select_option("#control-type", "ControlNet")
    page.click("#add-control")
    cn = page.locator('.control[data-type="ControlNet"]')
    expect(cn.locator('[data-key="model"] select option', has_text="edges")).to_have_count(1)
    cn.locator('[data-key="model"] select').select_option("edges")
    cn.locator('[data-key="image"] input[type=file]').set_input_files(str(picture(tmp_path / "cond.png")))
    expect(cn.locator('[data-key="image"] img.thumb')).to_have_count(1)

    page.click("#init-panel summary")
    page.set_input_files("#init-file", str(picture(tmp_path / "init.png", color=(40, 40, 200))))
    mask = page.locator("#mask-canvas")
    expect(mask).to_be_visible()
    mask.scroll_into_view_if_needed()
    box = mask.bounding_box()
    k = box["width"] / 64
    page.mouse.move(box["x"] + 10 * k, box["y"] + 10 * k)
    page.mouse.down()
    page.mouse.move(box["x"] + 20 * k, box["y"] + 10 * k, steps=5)
    page.mouse.up()
    page.fill("#strength", "0.9")

    request = page.evaluate("collect()")
    with decode(request["image"]) as im:
        assert im.size == (64, 64) and im.convert("RGB").getpixel((32, 32)) == (40, 40, 200)
    with decode(request["mask_image"]) as m:
        m = m.convert("L")
        assert m.size == (64, 64)
        assert m.getpixel((15, 10)) > 200 and m.getpixel((50, 50)) < 50  # painted stroke white, rest black
    with decode(request["controls"][0]["image"]) as c:
        assert c.convert("RGB").getpixel((32, 32)) == (200, 40, 40)
    assert request["controls"][0]["model"] == "edges" and request["strength"] == 0.9

    page.click("#generate")
    wait_state(page, "done")
    (image,) = newest_job_images(server, page)
    params = parse_parameters(image["parameters"])
    assert "Model: edges" in params["ControlNet 0"]
    assert params["Denoising strength"] == "0.9"
    cn.locator(".control-head button.remove").click()
    card(page, image["url"]).locator("button.send").click()
    expect(cn.locator('[data-key="model"] select')).to_have_value("edges")
    assert page.evaluate("collect()")["controls"][0] == {"type": "ControlNet", "model": "edges", "scale": 1,
                                                         "start": 0, "end": 1, "guess_mode": False}


class Blur(Control):
    """A control exported after the page was written."""

    def __init__(self, radius: float = 1.5, passes: int = 1, soft: bool = False):
        self.radius, self.passes, self.soft = radius, passes, soft


@pytest.fixture
def new_control(monkeypatch):
    monkeypatch.setattr(cd, "Blur", Blur, raising=False)
    monkeypatch.setattr(cd, "__all__", [*cd.__all__, "Blur"])
    request_controls._tables.cache_clear()
    yield
    request_controls._tables.cache_clear()


def test_a_new_control_gets_its_form_from_the_schema(new_control, page, server):
    # new_control comes first: the page loads a schema that has Blur
    fill_basics(page, "a hill", steps=1, seed=2)
    page.select_option("#control-type", "Blur")
    page.click("#add-control")
    blur = page.locator('.control[data-type="Blur"]')
    expect(blur.locator('[data-key="radius"] input[type=number]')).to_have_value("1.5")
    expect(blur.locator('[data-key="passes"] input[type=number]')).to_have_value("1")
    blur.locator('[data-key="radius"] input').fill("3")
    blur.locator('[data-key="soft"] input[type=checkbox]').check()
    assert page.evaluate("collect()")["controls"] == [{"type": "Blur", "radius": 3, "passes": 1, "soft": True}]
    page.click("#generate")
    wait_state(page, "done")
    (image,) = newest_job_images(server, page)
    assert json.loads(parse_parameters(image["parameters"])["Blur 0"]) == {"radius": 3.0, "passes": 1, "soft": True}
