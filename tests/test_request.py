"""JSON requests (``controldiff.request``): the schema made from the control classes, every
field checked with errors naming it, names confined to the configured folders, and runs equal
to calling the pipeline directly, with the infotext the command line writes."""
from __future__ import annotations

import base64
import inspect
import io
import shutil
import types

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import controldiff as cd
from controldiff import cli
from controldiff.png import parse_parameters, read_parameters
from controldiff.request import Folders, Limits, RequestError, control_names, parse, refused_controls, schema
from controldiff.request import controls as request_controls
from controldiff.sampling.control import Control
from test_infotext_restore import _lora_file as lora_file
from pipes import ours
from tiny_models import build_controlnet


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _lora_file(path, seed=0, scale=3.0):
    return lora_file(path, seed=seed, scale=scale)


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """Folders holding a tiny SD1 model, a LoRA, an embedding and a ControlNet."""
    root = tmp_path_factory.mktemp("request")
    for sub in ("models", "loras", "emb", "controlnets"):
        (root / sub).mkdir()
    shutil.copytree(tiny_model("sd1"), root / "models" / "tiny")
    _lora_file(root / "loras" / "style.safetensors")
    g = torch.Generator().manual_seed(3)
    save_file({"emb_params": 3 * torch.randn(2, 32, generator=g)}, str(root / "emb" / "toy.safetensors"))
    build_controlnet(root / "models" / "tiny", root / "controlnets" / "edges")
    folders = Folders(models=[root / "models"], loras=[root / "loras"], embeddings=[root / "emb"],
                      controlnets=[root / "controlnets"])
    return types.SimpleNamespace(root=root, folders=folders, model=root / "models" / "tiny",
                                 cn=root / "controlnets" / "edges")


@pytest.fixture(scope="module")
def pipe(world):
    return ours(world.model)


def _edges(size=(64, 64)) -> Image.Image:
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, ::8] = 255
    return Image.fromarray(a)


BASE = {"prompt": "a cat", "negative_prompt": "blurry", "num_inference_steps": 2, "width": 64, "height": 64,
        "seed": 7, "model": "tiny"}


def _req(world, **kw):
    return parse({**BASE, **kw}, folders=world.folders)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _direct(pipe, seed, prompt="a cat", **kw):
    kw = {"negative_prompt": "blurry", "num_inference_steps": 2, "width": 64, "height": 64, **kw}
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]


# ----------------------------------------------------------------------------- schema


def _exported_controls() -> set[str]:
    return {n for n in cd.__all__ if isinstance(getattr(cd, n), type) and issubclass(getattr(cd, n), Control)
            and getattr(cd, n) is not Control}


def test_schema_lists_every_exported_control_or_says_why_not():
    exported, named, refused = _exported_controls(), set(control_names()), refused_controls()
    assert named | set(refused) == exported and not named & set(refused)
    assert {"SEGA", "SAG", "PAG", "ControlNet", "T2IAdapter", "MultiDiffusion", "Regions", "InstructPix2Pix",
            "Depth", "AttendAndExcite", "FABRIC", "Pix2PixZero", "LEdits", "DeepCache", "ToMe"} <= named
    assert all(isinstance(r, str) and len(r) > 20 and "\n" not in r for r in refused.values())
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    items = s["properties"]["controls"]["items"]
    assert [i["properties"]["type"]["const"] for i in items["anyOf"]] == control_names()
    assert items["x-refused-controls"] == refused


def test_every_control_is_described_by_its_own_text():
    from controldiff.sampling.control import Control

    base = inspect.getdoc(Control).split("\n\n")[0].replace("\n", " ")
    items = {i["title"]: i for i in schema()["properties"]["controls"]["items"]["anyOf"]}
    for name in control_names():
        d = items[name].get("description") or ""
        assert len(d) > 20 and d != base, (name, d)
    assert items["SAG"]["description"].startswith("Self-attention guidance (SAG)")


def test_control_schemas_are_the_constructors_signatures():
    items = {i["title"]: i for i in schema()["properties"]["controls"]["items"]["anyOf"]}
    for name in control_names():
        params = list(inspect.signature(getattr(cd, name).__init__).parameters.values())[1:]
        props = items[name]["properties"]
        left_out = items[name].get("x-refused-keywords", {})
        assert set(props) - {"type"} | set(left_out) == {p.name for p in params if p.kind is not p.VAR_KEYWORD}
        assert set(items[name]["required"]) == {"type"} | {p.name for p in params if p.default is p.empty}
        for p in params:
            if p.name in props and isinstance(p.default, (bool, int, float, str)):
                assert props[p.name]["default"] == p.default, (name, p.name)
    assert items["SAG"]["properties"]["scale"] == {"type": "number", "default": 0.75}
    assert items["ControlNet"]["properties"]["model"]["x-controldiff-folder"] == "controlnets"
    assert items["ControlNet"]["properties"]["image"]["contentEncoding"] == "base64"
    assert items["PAG"]["properties"]["layers"]["default"] == ["mid"]
    assert items["AttendAndExcite"]["properties"]["thresholds"]["default"] == {"0": 0.05, "10": 0.5, "20": 0.8}
    assert "Tensor" in items["LEdits"]["x-refused-keywords"]["user_mask"]


class Blur(Control):
    """A control exported later: it appears with no API code."""

    def __init__(self, radius: float = 1.5, passes: int = 1, modes=None):
        self.radius, self.passes = radius, passes


class Steer(Control):
    def __init__(self, direction: torch.Tensor, scale: float = 1.0):
        self.direction = direction


@pytest.fixture
def new_controls(monkeypatch):
    monkeypatch.setattr(cd, "Blur", Blur, raising=False)
    monkeypatch.setattr(cd, "Steer", Steer, raising=False)
    monkeypatch.setattr(cd, "__all__", [*cd.__all__, "Blur", "Steer"])
    request_controls._tables.cache_clear()
    yield
    request_controls._tables.cache_clear()


def test_a_new_control_appears_or_is_refused_with_no_api_code(new_controls):
    assert "Blur" in control_names() and "Steer" in refused_controls()
    assert "direction" in refused_controls()["Steer"] and "Tensor" in refused_controls()["Steer"]
    item = next(i for i in schema()["properties"]["controls"]["items"]["anyOf"] if i["title"] == "Blur")
    assert item["properties"]["radius"] == {"type": "number", "default": 1.5}
    assert item["properties"]["passes"] == {"type": "integer", "default": 1}
    assert "modes" in item["x-refused-keywords"]  # no annotation: no JSON form; left out, refused by name
    req = parse({"controls": [{"type": "Blur", "radius": 3}]}, folders=Folders())
    blur = req.controls[0].build(None)
    assert isinstance(blur, Blur) and blur.radius == 3.0 and blur.passes == 1
    with pytest.raises(RequestError) as e:
        parse({"controls": [{"type": "Steer"}]}, folders=Folders())
    assert e.value.field == "controls.0.type" and "Tensor" in e.value.message
    with pytest.raises(RequestError) as e:
        parse({"controls": [{"type": "Blur", "passes": 1.5}]}, folders=Folders())
    assert e.value.field == "controls.0.passes"


def test_requests_and_the_schema_agree(world):
    img = b64(_edges())
    good = [
        {},
        {**BASE, "scheduler": "Euler a", "clip_skip": 1, "prompt_syntax": "compel", "num_images": 2},
        {**BASE, "image": img, "strength": 0.5, "mask_image": b64(Image.new("L", (64, 64), 255))},
        {**BASE, "loras": [{"name": "style", "weight": 0.5}], "embeddings": ["toy"]},
        {**BASE, "controls": [{"type": "SEGA", "concepts": [{"prompt": "smiling", "scale": 5}]},
                              {"type": "SEGA", "concepts": {"prompt": "dark", "reverse": True}},
                              {"type": "ControlNet", "model": "edges", "image": img, "scale": 0.8},
                              {"type": "Regions", "regions": [{"prompt": "a dog", "box": [0, 0, 32, 64]},
                                                              {"prompt": "sky", "mask": img}]},
                              {"type": "AttendAndExcite", "token_indices": ["cat"], "thresholds": {"0": 0.1}},
                              {"type": "PAG", "layers": ["mid", "up"]}, {"type": "LEdits", "concepts": ["hat"]},
                              {"type": "Pix2PixZero", "source": "cat", "target": ["dog", "wolf"]},
                              {"type": "FABRIC", "liked": [img]}, {"type": "ToMe", "seed": 3},
                              {"type": "Depth", "depth_map": b64(Image.linear_gradient("L"))}]},
    ]
    validator = jsonschema.Draft202012Validator(schema())
    for data in good:
        validator.validate(data)
        parse(data, folders=world.folders)
    bad = [{"prompt": 1}, {"num_images": 0}, {"seed": -1}, {"extra": 1}, {"controls": [{"type": "SAG", "x": 1}]},
           {"controls": [{"type": "SEGA"}]}, {"controls": [{"type": "Nope"}]}, {"loras": [{"weight": 1}]},
           {"strength": 0}, {"prompt_syntax": "weird"}, {"controls": [{"type": "SAG", "scale": "big"}]}]
    for data in bad:
        assert not validator.is_valid(data), data
        with pytest.raises(RequestError):
            parse(data, folders=world.folders)


# ----------------------------------------------------------------------------- parse errors


def _huge_png() -> str:
    return b64(Image.new("L", (2100, 2100)))


BAD = [
    ([], "", "expected a JSON object"),
    ({"prompt": 3}, "prompt", "expected a string, got integer 3"),
    ({"prompt": "\ud800"}, "prompt", "not valid UTF-8"),
    ({"negative_prompt": ["a"]}, "negative_prompt", "expected a string or null"),
    ({"width": 64.5}, "width", "expected an integer or null, got number 64.5"),
    ({"width": True}, "width", "got boolean True"),
    ({"width": 4}, "width", "8 <= value"),
    ({"width": 4096, "height": 4096}, "width", "more than the limit"),
    ({"width": 60, "model": "tiny"}, "width", "not a multiple of 8"),
    ({"num_inference_steps": 0}, "num_inference_steps", "1 <= value <= 500"),
    ({"num_inference_steps": 501}, "num_inference_steps", "1 <= value <= 500"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "finite"),
    ({"guidance_scale": "7"}, "guidance_scale", "expected a number or null"),
    ({"scheduler": "warp"}, "scheduler", "unknown scheduler 'warp'"),
    ({"seed": -1}, "seed", "0 <= value"),
    ({"seed": 2**64 - 1, "num_images": 2}, "seed", "past the largest seed"),
    ({"num_images": 65}, "num_images", "<= 64"),
    ({"strength": 0.5}, "strength", "only meaningful with image"),
    ({"strength": 1.5, "image": "__img__"}, "strength", "value <= 1"),
    ({"mask_image": "__img__"}, "mask_image", "also needs image"),
    ({"image": "__img__", "mask_image": "__small__"}, "mask_image", "differs"),
    ({"image": "%%%not base64%%%"}, "image", "not base64"),
    ({"image": base64.b64encode(b"GIF89a not really").decode()}, "image", "not a PNG, JPEG or WebP"),
    ({"image": "__cut__"}, "image", "not a readable PNG"),
    ({"image": "__huge__"}, "image", "more than the limit"),
    ({"image": 5}, "image", "expected a base64 PNG, JPEG or WebP image or null"),
    ({"clip_skip": 0}, "clip_skip", "1 <= value"),
    ({"prompt_syntax": "weird"}, "prompt_syntax", "one of 'a1111', 'compel', 'none'"),
    ({"steps": 20}, "steps", "unknown key"),
    ({"model": "missing"}, "model", "no model named 'missing'"),
    ({"model": "../models/tiny"}, "model", "leaves them"),
    ({"model": "tiny/../../x"}, "model", "leaves them"),
    ({"model": "..\\x"}, "model", "leaves them"),
    ({"model": "/etc"}, "model", "absolute path"),
    ({"model": "."}, "model", "got '.'"),
    ({"model": "tiny//unet"}, "model", "as listed"),
    ({"model": ""}, "model", "expected a name"),
    ({"model": "C:\\models\\x"}, "model", "absolute path"),
    ({"loras": [{"name": "../loras/style"}]}, "loras.0.name", "leaves them"),
    ({"loras": [{"name": "/tmp/style"}]}, "loras.0.name", "absolute path"),
    ({"loras": [{"name": "nope"}]}, "loras.0.name", "no LoRA named 'nope'"),
    ({"loras": [{"name": "style", "weight": "x"}]}, "loras.0.weight", "expected a number"),
    ({"loras": [{"name": "style", "strength": 1}]}, "loras.0.strength", "unknown key"),
    ({"loras": [{"name": "style"}, {"name": "style"}]}, "loras.1.name", "given twice"),
    ({"loras": [{"name": "style"}], "prompt": "x <lora:style:1>"}, "loras.0.name", "also in the prompt"),
    ({"prompt": "x <lora:nope:1>"}, "prompt", "no LoRA file nope"),
    ({"prompt": "x <lora:style:1:0.5>"}, "prompt", "separate text-encoder"),
    ({"prompt": "x <lora:../loras/style:1>"}, "prompt", "leaves them"),
    ({"prompt": "x <lora:/abs/style:1>"}, "prompt", "absolute path"),
    ({"embeddings": ["../emb/toy"]}, "embeddings.0", "leaves them"),
    ({"embeddings": ["nope"]}, "embeddings.0", "no embedding named 'nope'"),
    ({"controls": {"type": "SAG"}}, "controls", "expected a list"),
    ({"controls": [{"type": "SAG"}] * 17}, "controls", "at most 16"),
    ({"controls": ["SAG"]}, "controls.0", "expected an object"),
    ({"controls": [{"scale": 1}]}, "controls.0.type", "required"),
    ({"controls": [{"type": "Blurry"}]}, "controls.0.type", "unknown control 'Blurry'"),
    ({"controls": [{"type": "CLIPGuidance"}]}, "controls.0.type", "cannot be given in a request"),
    ({"controls": [{"type": "DiffEdit"}]}, "controls.0.type", "Inversion"),
    ({"controls": [{"type": "SAG", "scale": "x"}]}, "controls.0.scale", "expected a number"),
    ({"controls": [{"type": "SAG", "strength": 1}]}, "controls.0.strength", "unknown key"),
    ({"controls": [{"type": "SAG"}, {"type": "PAG", "layers": [""]}]}, "controls.1.layers", "layer identifiers"),
    ({"controls": [{"type": "SAG"}, {"type": "PAG", "adaptive_scale": -1}]}, "controls.1.adaptive_scale",
     "non-negative"),
    ({"controls": [{"type": "SEGA"}]}, "controls.0.concepts", "required"),
    ({"controls": [{"type": "SEGA", "concepts": [{"prompt": "a", "threshold": 2}]}]},
     "controls.0.concepts.0.threshold", "[0, 1]"),
    ({"controls": [{"type": "SEGA", "concepts": [{"prompt": "a"}, {"prompt": "b", "warmup": 1.5}]}]},
     "controls.0.concepts.1.warmup", "expected an integer"),
    ({"controls": [{"type": "SEGA", "concepts": [{"promt": "a"}]}]}, "controls.0.concepts.0.promt", "unknown key"),
    ({"controls": [{"type": "SEGA", "concepts": [{"prompt": "a"}], "momentum_beta": None}]},
     "controls.0.momentum_beta", "expected a number"),
    ({"controls": [{"type": "ControlNet", "image": "__img__"}]}, "controls.0.model", "required"),
    ({"controls": [{"type": "ControlNet", "model": "../controlnets/edges", "image": "__img__"}]},
     "controls.0.model", "leaves them"),
    ({"controls": [{"type": "ControlNet", "model": "/abs/edges", "image": "__img__"}]},
     "controls.0.model", "absolute path"),
    ({"controls": [{"type": "ControlNet", "model": "canny", "image": "__img__"}]},
     "controls.0.model", "no ControlNet or T2I-Adapter named 'canny' in the configured folders (available: edges)"),
    ({"controls": [{"type": "ControlNet", "model": "edges", "image": "@@"}]}, "controls.0.image", "not base64"),
    ({"controls": [{"type": "ControlNet", "model": "edges", "image": "__huge__"}]},
     "controls.0.image", "more than the limit"),
    ({"controls": [{"type": "ControlNet", "model": "edges", "image": "__img__", "scale": -1}]},
     "controls.0.scale", "0.0 <= value"),
    ({"controls": [{"type": "ControlNet", "model": "edges", "image": "__img__", "end": 2}]},
     "controls.0.end", "value <= 1.0"),
    ({"controls": [{"type": "Regions", "regions": [{"prompt": "a", "box": [0, 0, 1]}]}]},
     "controls.0.regions.0.box", "(x0, y0, x1, y1)"),
    ({"controls": [{"type": "Regions", "regions": [{"prompt": "a", "mask": "@@"}]}]},
     "controls.0.regions.0.mask", "not base64"),
    ({"controls": [{"type": "AttendAndExcite", "token_indices": [1], "thresholds": {"ten": 0.5}}]},
     "controls.0.thresholds.ten", "integer key"),
    ({"controls": [{"type": "AttendAndExcite", "token_indices": [[1, {}]]}]},
     "controls.0.token_indices.0.1", "expected an integer or a string"),
    ({"controls": [{"type": "FABRIC", "liked": ["@@"]}]}, "controls.0.liked.0", "not base64"),
    ({"controls": [{"type": "FABRIC", "min_weight": 0.9, "max_weight": 0.1}]}, "controls.0.min_weight", "above"),
    ({"controls": [{"type": "LEdits", "concepts": "a", "user_mask": [[1]]}]}, "controls.0.user_mask",
     "cannot be given in a request"),
    ({"controls": [{"type": "DeepCache", "skip_mode": "sideways"}]}, "controls.0.skip_mode", ""),
    ({"controls": [{"type": "MultiDiffusion", "window": -8}]}, "controls.0.window", ""),
]


@pytest.mark.parametrize("data, field, message", BAD, ids=[f"{b[1] or 'body'}-{i}" for i, b in enumerate(BAD)])
def test_parse_errors_name_the_field(world, data, field, message):
    png = base64.b64decode(b64(_edges()))
    images = {"__img__": b64(_edges()), "__small__": b64(Image.new("L", (32, 32))), "__huge__": _huge_png(),
              "__cut__": base64.b64encode(png[:len(png) // 2]).decode()}

    def fill(v):
        if isinstance(v, str):
            return images.get(v, v)
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v

    with pytest.raises(RequestError) as e:
        parse(fill(data), folders=world.folders)
    assert e.value.field == field, e.value
    assert message in e.value.message, e.value
    assert str(e.value) == (f"{field}: {e.value.message}" if field else e.value.message)


def test_limits_are_the_callers(world):
    small = Limits(max_pixels=64 * 64, max_images=2, max_steps=10, max_controls=1)
    for data, field in (({"width": 128, "height": 64}, "width"), ({"num_images": 3}, "num_images"),
                        ({"num_inference_steps": 11}, "num_inference_steps"),
                        ({"image": b64(Image.new("RGB", (65, 64)))}, "image"),
                        ({"controls": [{"type": "SAG"}, {"type": "PAG"}]}, "controls")):
        with pytest.raises(RequestError) as e:
            parse(data, folders=world.folders, limits=small)
        assert e.value.field == field
    assert schema(small)["properties"]["num_images"]["maximum"] == 2


def test_parse_loads_no_model_and_draws_the_seed_once(world, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("parse loaded a model")

    monkeypatch.setattr("controldiff.loading.control_models.load_controlnet", forbidden)
    monkeypatch.setattr("controldiff.pipeline.Pipeline.from_pretrained", forbidden)
    req = parse({"num_images": 3, "controls": [{"type": "ControlNet", "model": "edges",
                                                "image": "data:image/png;base64," + b64(_edges())}]},
                folders=world.folders)
    assert req.model is None and req.seeds == [req.seed, req.seed + 1, req.seed + 2] == \
        [req.data["seed"] + i for i in range(3)]
    assert req.controls[0].kwargs["model"] == world.cn and req.controls[0].kwargs["image"].size == (64, 64)
    assert parse({"seed": 5, "num_images": 2}, folders=world.folders).seeds == [5, 6]
    assert parse({}, folders=Folders(default_model=world.model)).model == world.model
    jpeg = parse({"image": b64(_edges(), "JPEG")}, folders=world.folders).image
    assert jpeg.mode == "RGB" and jpeg.size == (64, 64)


class Without(Folders):
    """Folders that refuse some names (as a server's may: symlinks out of the folder)."""

    def find(self, kind, name):
        return None if name in ("style", "toy") else super().find(kind, name)

    def names(self, kind):
        return [n for n in super().names(kind) if n not in ("style", "toy")]


def test_prompt_tags_and_words_are_looked_up_through_the_folders(world):
    f = world.folders
    req = parse({"prompt": "a toy <lora:style:0.5>", "negative_prompt": "toy"}, folders=f)
    assert req.text == "a toy " and req.tagged["style"].path == world.root / "loras" / "style.safetensors"
    assert req.named_embeddings == {"toy": world.root / "emb" / "toy.safetensors"}
    assert parse({"prompt": "toys"}, folders=f).named_embeddings == {}   # a word, not a part of one
    without = Without(**vars(f))
    assert parse({"prompt": "a toy"}, folders=without).named_embeddings == {}
    with pytest.raises(RequestError) as e:
        parse({"prompt": "a toy <lora:style:0.5>"}, folders=without)
    assert e.value.field == "prompt" and "no LoRA file style" in e.value.message


def test_folders_list_the_names_they_resolve(world):
    f = world.folders
    assert f.names("models") == ["tiny"] and f.names("controlnets") == ["edges"]
    assert f.names("loras") == ["style"] and f.names("embeddings") == ["toy"]
    # the parts of a model folder (unet/, vae/ have a config.json too) are no ControlNets
    assert Folders(controlnets=[world.root / "models"]).names("controlnets") == []
    req = parse({"model": "tiny", "loras": [{"name": "style"}], "embeddings": ["toy"]}, folders=f)
    assert req.model == world.model and req.loras == [(world.root / "loras" / "style.safetensors", 1.0)]
    assert req.embeddings == [(world.root / "emb" / "toy.safetensors", "toy")]


# ----------------------------------------------------------------------------- run


def test_txt2img_equals_the_pipeline_image_by_image(world, pipe):
    results = _req(world, num_images=2, scheduler="Euler a", guidance_scale=6.0).run(pipe)
    assert [r.seed for r in results] == [7, 8] and not any(r.cancelled for r in results)
    for r in results:
        ref = _direct(pipe, r.seed, scheduler="euler_a", guidance_scale=6.0)
        assert np.abs(_pixels(r.image) - _pixels(ref)).max() == 0
    assert not np.array_equal(_pixels(results[0].image), _pixels(results[1].image))


def test_img2img_and_inpainting_equal_the_pipeline(world, pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    (r,) = _req(world, image=b64(init), strength=0.5, num_inference_steps=4).run(pipe)
    ref = _direct(pipe, 7, image=init, strength=0.5, num_inference_steps=4)
    assert np.abs(_pixels(r.image) - _pixels(ref)).max() == 0
    p = parse_parameters(r.parameters)
    assert p["Denoising strength"] == "0.5" and p["Mode"] == "img2img"
    (r,) = _req(world, image=b64(init), mask_image=b64(mask)).run(pipe)
    ref = _direct(pipe, 7, image=init, mask_image=mask)
    assert np.abs(_pixels(r.image) - _pixels(ref)).max() == 0
    assert parse_parameters(r.parameters)["Mode"] == "inpaint"


def test_sega_and_controlnet_equal_the_pipeline(world, pipe):
    edges = _edges()
    controls = [{"type": "SEGA", "concepts": [{"prompt": "smiling", "scale": 5, "warmup": 0}]},
                {"type": "ControlNet", "model": "edges", "image": b64(edges), "scale": 0.8, "end": 0.5}]
    (r,) = _req(world, controls=controls).run(pipe)
    direct = [cd.SEGA([cd.Concept("smiling", scale=5.0, warmup=0)]),
              cd.ControlNet(cd.load_controlnet(world.cn), edges, scale=0.8, end=0.5)]
    ref = _direct(pipe, 7, controls=direct)
    assert np.abs(_pixels(r.image) - _pixels(ref)).max() == 0
    assert not np.array_equal(_pixels(r.image), _pixels(_direct(pipe, 7)))   # the controls act
    p = parse_parameters(r.parameters)
    assert p["ControlNet 0"] == ("Module: none, Model: edges, Weight: 0.8, Guidance Start: 0.0, "
                                 "Guidance End: 0.5, Control Mode: Balanced")
    assert '"smiling"' in p["SEGA 0"]


def test_a_control_checked_only_with_its_model_names_its_field_at_run(world, pipe):
    req = _req(world, controls=[{"type": "SAG"}, {"type": "ControlNet", "model": "edges", "image": b64(_edges()),
                                                  "start": 0.6, "end": 0.5}])
    with pytest.raises(RequestError) as e:
        req.run(pipe)
    assert e.value.field == "controls.1.start"


def test_loras_and_embeddings_are_loaded_for_the_run_only(world, pipe):
    plain = _req(world, prompt="a toy").run(pipe)[0]
    style = world.root / "loras" / "style.safetensors"
    tagged = _req(world, prompt="a toy <lora:style:0.7>").run(pipe)[0]
    listed = _req(world, prompt="a toy", loras=[{"name": "style", "weight": 0.7}]).run(pipe)[0]
    assert pipe.loras == {} and pipe.textual_inversions == {}
    assert np.array_equal(_pixels(tagged.image), _pixels(listed.image))
    # the same as loading them onto the pipeline by hand
    pipe.load_lora(style, weight=0.7)
    pipe.load_textual_inversion(world.root / "emb" / "toy.safetensors", token="toy")
    try:
        ref = _direct(pipe, 7, prompt="a toy")
    finally:
        pipe.unload_lora()
        pipe.unload_textual_inversion()
    assert np.abs(_pixels(listed.image) - _pixels(ref)).max() == 0
    assert not np.array_equal(_pixels(listed.image), _pixels(plain.image))
    again = _req(world, prompt="a toy").run(pipe)[0]   # nothing left behind
    assert np.array_equal(_pixels(again.image), _pixels(plain.image))
    without_emb = parse({**BASE, "prompt": "a toy"}, folders=Folders(models=world.folders.models)).run(pipe)[0]
    assert not np.array_equal(_pixels(without_emb.image), _pixels(plain.image))   # "toy" was the embedding
    p = parse_parameters(tagged.parameters)
    assert p["Prompt"] == "a toy <lora:style:0.7>" and p["Lora hashes"].startswith("style: ")
    assert p["TI hashes"].startswith("toy: ") and "Lora" not in p
    assert parse_parameters(listed.parameters)["Lora"] == "style:0.7"


def test_a_failing_lora_leaves_the_pipeline_as_it_was(world, pipe, tmp_path):
    bad = world.root / "loras" / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    try:
        req = _req(world, loras=[{"name": "style"}, {"name": "broken"}])
        with pytest.raises(ValueError):
            req.run(pipe)
    finally:
        bad.unlink()
    assert pipe.loras == {} and pipe.textual_inversions == {}


def test_on_step_reports_progress_and_cancels_keeping_finished_images(world, pipe):
    seen = []

    def on_step(image, step, total, latents):
        seen.append((image, step, total, tuple(latents.shape)))
        return not (image == 1 and step == 1)

    results = _req(world, num_images=3, num_inference_steps=3, scheduler="euler").run(pipe, on_step=on_step)
    assert seen == [(0, 1, 3, (1, 4, 8, 8)), (0, 2, 3, (1, 4, 8, 8)), (0, 3, 3, (1, 4, 8, 8)), (1, 1, 3, (1, 4, 8, 8))]
    assert [(r.seed, r.cancelled) for r in results] == [(7, False), (8, True)]
    full = _req(world, num_images=1, num_inference_steps=3, scheduler="euler").run(pipe)[0]
    assert np.array_equal(_pixels(results[0].image), _pixels(full.image))
    # img2img: total_steps is the steps the run has, fewer than asked
    totals = set()
    _req(world, image=b64(_edges()), strength=0.5, num_inference_steps=4, scheduler="euler").run(
        pipe, on_step=lambda i, s, t, x: totals.add(t))
    assert totals == {2}
    # PNDM's first step is two model calls: total_steps counts the loop's steps, as the callbacks come
    calls = []
    _req(world, num_inference_steps=3).run(pipe, on_step=lambda i, s, t, x: calls.append((s, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_infotext_is_the_command_lines_and_round_trips(world, pipe, tmp_path, capsys):
    edges = tmp_path / "edges.png"
    _edges().save(edges)
    (r,) = _req(world, prompt="a toy <lora:style:0.5>", scheduler="dpmpp_2m_karras", guidance_scale=5.0, clip_skip=1,
                controls=[{"type": "ControlNet", "model": "edges", "image": b64(_edges()), "scale": 0.7}]).run(pipe)
    out = tmp_path / "cli.png"
    rc = cli.main(["generate", str(world.model), "-p", "a toy <lora:style:0.5>", "-n", "blurry", "--steps", "2",
                   "--width", "64", "--height", "64", "--seed", "7", "--sampler", "dpmpp_2m_karras", "--cfg", "5",
                   "--clip-skip", "1", "--lora-dir", str(world.root / "loras"), "--embedding-dir",
                   str(world.root / "emb"), "--controlnet", f"{world.cn}:{edges}:0.7", "--dtype", "float32",
                   "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert r.parameters == read_parameters(out)
    with Image.open(out) as im:
        assert np.array_equal(_pixels(im), _pixels(r.image))
    p = parse_parameters(r.parameters)
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"],
            p["Seed"], p["Size"], p["Model"], p["Clip skip"]) == \
        ("a toy <lora:style:0.5>", "blurry", "2", "DPM++ 2M", "Karras", "5.0", "7", "64x64", "tiny", "2")
    assert p["Model hash"] and p["ControlNet 0"].startswith("Module: none, Model: edges, Weight: 0.7")


def test_run_refuses_a_pipeline_of_another_model(world, tmp_path):
    req = _req(world)
    with pytest.raises(ValueError, match="model: the request is for"):
        req.run(types.SimpleNamespace(path=tmp_path))
