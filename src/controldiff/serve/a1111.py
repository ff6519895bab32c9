"""AUTOMATIC1111's web API (``/sdapi/v1``), the subset clients use, mapped onto the native request.

A1111's field names (``modules/api/models.py``: prompt, steps, cfg_scale, sampler_name, seed -1
for a random one, batch_size x n_iter images, init_images, mask, denoising_strength,
override_settings, ...) become a native request (:mod:`controldiff.request`), so both APIs
generate the same way. ControlNet units arrive as sd-webui-controlnet takes them
(``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}``, its ``external_code``
field names). What A1111 would do and we cannot (hires fix, face restoration, styles,
scripts, preprocessors, resize modes other than "just resize") is refused with a 422 naming the
field. Accepted unread: fields that tune what we do not do (eta, s_churn..., hr_* without
enable_hr) and, for inpainting, ``inpainting_fill`` and ``inpaint_full_res`` (the whole image is
inpainted, as with A1111's "original" fill and full-res off); ``mask_blur`` blurs the mask.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from typing import Any, Optional

from PIL import Image, ImageFilter, ImageOps

__all__ = ["FieldError", "DEFAULTS", "to_native", "native_to_a1111_loc", "response", "progress", "sampler_list",
           "scheduler_list", "CONTROL_MODES"]


class FieldError(Exception):
    """A bad A1111 field: ``loc`` is its path in the A1111 request."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = tuple(loc)
        self.message = message


# sd-webui-controlnet's ControlMode values (external_code.ControlMode), by name and number
CONTROL_MODES = {"balanced": False, "0": False, "controlnet is more important": True, "2": True}
_NO_MODULE = ("none", "")
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # "name [hash]", as A1111 titles models
# native field -> A1111 field, for errors found by the native request's parsing
_TOP = {"num_inference_steps": ("steps",), "guidance_scale": ("cfg_scale",), "scheduler": ("sampler_name",),
        "num_images": ("batch_size",), "image": ("init_images", 0), "mask_image": ("mask",),
        "strength": ("denoising_strength",), "clip_skip": ("override_settings", "CLIP_stop_at_last_layers"),
        "model": ("override_settings", "sd_model_checkpoint")}
_UNIT = {"scale": "weight", "start": "guidance_start", "end": "guidance_end", "guess_mode": "control_mode"}
# A1111's API defaults (modules/api/models.py, StableDiffusionProcessing): a client that leaves a
# field out gets what A1111 would do, not the model folder's scheduler or size
DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "denoising_strength": 0.75,
            "sampler_index": "Euler", "mask_blur": 4}
# refused unless left at these values: what A1111 would do that we do not
_UNSUPPORTED = {"enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
                "styles": ([], None), "script_name": (None, "", "None"), "subseed_strength": (0, 0.0, None)}


def strip_hash(name: str) -> str:
    """``"model.safetensors [abcd1234]"`` -> ``"model.safetensors"``."""
    return _HASH.sub("", str(name)).strip()


def _image(text: Any, loc: tuple) -> Image.Image:
    from .security import decode_base64

    raw = decode_base64(text) if isinstance(text, str) else None
    if raw is None:
        raise FieldError(loc, "expected a base64 image or a data URL")
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FieldError(loc, f"not a readable image ({e})") from None
    return ImageOps.exif_transpose(im)


def _b64png(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _number(body: dict, key: str, kind=float) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and float(v) != int(v)):
        raise FieldError((key,), f"expected {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not math.isfinite(v):
        raise FieldError((key,), f"expected a finite number, got {v!r}")
    return kind(v)


def _sampler(body: dict) -> Optional[str]:
    from ..schedulers import NAMES
    from ..schedulers.a1111 import from_a1111

    sampler = body.get("sampler_name") or body.get("sampler_index")
    if not sampler:
        return None
    key = "sampler_name" if body.get("sampler_name") else "sampler_index"
    schedule = body.get("scheduler")
    name = from_a1111(str(sampler), str(schedule) if schedule else None)
    if name is None or name not in NAMES:
        where = f" with scheduler {schedule!r}" if schedule and str(schedule).lower() != "automatic" else ""
        raise FieldError((key,), f"unknown sampler {sampler!r}{where}; one of: "
                                 + ", ".join(s["name"] for s in sampler_list()))
    return name


def to_native(body: dict, mode: str, options: dict, default_title: str) -> dict:
    """The native request for an A1111 ``txt2img``/``img2img`` body (``mode``), with the
    server's ``options`` (``sd_model_checkpoint``, ``CLIP_stop_at_last_layers``) under the
    body's ``override_settings``; fields left out take A1111's defaults (:data:`DEFAULTS`).
    Checks only what the mapping needs; the native parse the rest."""
    if not isinstance(body, dict):
        raise FieldError((), "expected a JSON object")
    body = {**DEFAULTS, **body}
    for key, allowed in _UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise FieldError((key,), f"not supported by this server (only {allowed[0]!r}), got {body[key]!r}")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise FieldError(("override_settings",), f"expected an object of option -> value, got {overrides!r}")
    settings = {**options, **overrides}
    out: dict[str, Any] = {"prompt": "" if body.get("prompt") is None else body["prompt"],
                           "negative_prompt": body.get("negative_prompt") or None}
    for a1111, native, kind in (("steps", "num_inference_steps", int), ("cfg_scale", "guidance_scale", float),
                                ("width", "width", int), ("height", "height", int)):
        v = _number(body, a1111, kind)
        if v is not None:
            out[native] = v
    seed = _number(body, "seed", int)
    if seed is not None and seed != -1:
        out["seed"] = seed
    batch, n_iter = _number(body, "batch_size", int) or 1, _number(body, "n_iter", int) or 1
    for key, v in (("batch_size", batch), ("n_iter", n_iter)):
        if v < 1:
            raise FieldError((key,), f"expected a positive integer, got {v}")
    out["num_images"] = batch * n_iter
    scheduler = _sampler(body)
    if scheduler is not None:
        out["scheduler"] = scheduler
    model = settings.get("sd_model_checkpoint")
    if model and strip_hash(model) != default_title:
        out["model"] = strip_hash(model)
    stop_at = settings.get("CLIP_stop_at_last_layers")
    if stop_at is not None:
        if isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1:
            raise FieldError(("override_settings", "CLIP_stop_at_last_layers"),
                             f"expected a positive integer, got {stop_at!r}")
        if stop_at > 1:  # A1111's N: the last layer used; ours: the layers skipped
            out["clip_skip"] = stop_at - 1
    init = None
    if mode == "img2img":
        init = _init_image(body, out)
    controls = _controlnet_units(body, init)
    if controls:
        out["controls"] = controls
    return out


def _size(out: dict, im: Image.Image) -> tuple[int, int]:
    return out.get("width") or im.width, out.get("height") or im.height


def _init_image(body: dict, out: dict) -> Image.Image:
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise FieldError(("init_images",), "expected a list with one base64 image")
    if len(images) > 1:
        raise FieldError(("init_images",), f"one init image is supported, got {len(images)}")
    resize_mode = body.get("resize_mode", 0)
    if resize_mode not in (0, None):
        raise FieldError(("resize_mode",), f"only 0 (just resize) is supported, got {resize_mode!r}")
    im = _image(images[0], ("init_images", 0)).convert("RGB")
    size = _size(out, im)
    if im.size != size:  # A1111's "just resize" to width x height
        im = im.resize(size, Image.LANCZOS)
    out["image"] = _b64png(im)
    strength = _number(body, "denoising_strength")
    if strength is not None:
        out["strength"] = strength
    if body.get("mask"):
        mask = _image(body["mask"], ("mask",)).convert("L")
        if mask.size != size:
            mask = mask.resize(size, Image.LANCZOS)
        if body.get("inpainting_mask_invert"):
            mask = ImageOps.invert(mask)
        blur = _number(body, "mask_blur") or 0
        if blur > 0:  # A1111 blurs the mask (a Gaussian of sigma mask_blur) before inpainting
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        out["mask_image"] = _b64png(mask)
    return im


def _controlnet_units(body: dict, init: Optional[Image.Image]) -> list[dict]:
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise FieldError(("alwayson_scripts",), "expected an object of script name -> {\"args\": [...]}")
    controls = []
    for name, script in scripts.items():
        if name.lower() != "controlnet":
            raise FieldError(("alwayson_scripts", name), "unknown script; this server runs only 'controlnet'")
        args = (script or {}).get("args", []) if isinstance(script, dict) else None
        if not isinstance(args, list):
            raise FieldError(("alwayson_scripts", name, "args"), "expected a list of ControlNet units")
        for i, unit in enumerate(args):
            control = _unit(unit, ("alwayson_scripts", name, "args", i), init)
            if control is not None:
                control["_a1111_loc"] = ["alwayson_scripts", name, "args", i]
                controls.append(control)
    return controls


def _unit(unit: Any, loc: tuple, init: Optional[Image.Image]) -> Optional[dict]:
    """One sd-webui-controlnet unit (its ``external_code.ControlNetUnit`` fields) as a native
    ControlNet control, or None when disabled."""
    if not isinstance(unit, dict):
        raise FieldError(loc, "expected a ControlNet unit object (image, model, weight, ...)")
    if not unit.get("enabled", True):
        return None
    module = unit.get("module") or "none"
    if str(module).lower() not in _NO_MODULE:
        raise FieldError((*loc, "module"), f"preprocessors are not run here: send the control image ready-made "
                                           f"with module 'none', got {module!r}")
    model = unit.get("model")
    if not model or str(model) == "None":
        raise FieldError((*loc, "model"), "expected a ControlNet name (see /controlnet/model_list)")
    image_key = "image" if unit.get("image") else "input_image"
    image = unit.get(image_key)
    if isinstance(image, dict):   # {"image": ..., "mask": ...}, as the extension also takes it
        if image.get("mask"):
            raise FieldError((*loc, image_key, "mask"), "unit masks are not supported")
        image, loc_image = image.get("image"), (*loc, image_key, "image")
    else:
        loc_image = (*loc, image_key)
    if unit.get("mask") or unit.get("mask_image"):
        raise FieldError((*loc, "mask"), "unit masks are not supported")
    if not image:
        if init is None:
            raise FieldError((*loc, "image"), "expected a base64 control image")
        image = _b64png(init)   # img2img without a unit image: the init image, as the extension does
    mode = str(unit.get("control_mode", "Balanced")).lower()
    if mode not in CONTROL_MODES:
        raise FieldError((*loc, "control_mode"), f"expected 'Balanced' or 'ControlNet is more important', "
                                                 f"got {unit.get('control_mode')!r}")
    control = {"type": "ControlNet", "model": strip_hash(model), "image": image}
    for native, key in (("scale", "weight"), ("start", "guidance_start"), ("end", "guidance_end")):
        if unit.get(key) is not None:
            control[native] = unit[key]
    if CONTROL_MODES[mode]:
        control["guess_mode"] = True
    control["_image_loc"] = list(loc_image)
    return control


def split_locations(native: dict) -> dict[int, tuple[list, list]]:
    """Take the A1111 locations the mapping noted on the controls out of the request."""
    out = {}
    for i, c in enumerate(native.get("controls", [])):
        out[i] = (c.pop("_a1111_loc"), c.pop("_image_loc"))
    return out


def native_to_a1111_loc(field: str, units: dict) -> list:
    """A native field path (``controls.0.scale``) as the A1111 field it came from."""
    parts = [int(p) if p.isdigit() else p for p in field.split(".")] if field else []
    if not parts:
        return []
    if parts[0] == "controls" and len(parts) > 1 and parts[1] in units:
        unit, image_loc = units[parts[1]]
        if len(parts) > 2 and parts[2] == "image":
            return [*image_loc, *parts[3:]]
        return [*unit, *(_UNIT.get(p, p) for p in parts[2:3]), *parts[3:]]
    return [*_TOP.get(parts[0], (parts[0],)), *parts[1:]]


def response(body: dict, job, request, send_images: bool) -> dict:
    """A1111's answer: ``images`` (base64 PNGs with their infotext), ``parameters`` (the request
    as given, images left out as A1111 does) and ``info`` (a JSON string: seeds, infotexts...)."""
    from ..png import parse_parameters

    results = [r for _, r in job.pngs]
    texts = [r.parameters for r in results]
    first = parse_parameters(texts[0]) if texts else {}
    seeds = [r.seed for r in results] or list(request.seeds)
    prompt, negative = body.get("prompt", ""), body.get("negative_prompt", "")

    def num(key, kind, fallback):
        try:
            return kind(first[key])
        except (KeyError, ValueError):
            return fallback

    width, height = num("Size-1", int, body.get("width")), num("Size-2", int, body.get("height"))
    n = len(results)
    info = {
        "prompt": prompt, "all_prompts": [prompt] * n, "negative_prompt": negative,
        "all_negative_prompts": [negative] * n, "seed": seeds[0] if seeds else None, "all_seeds": seeds,
        "subseed": seeds[0] if seeds else None, "all_subseeds": seeds, "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": first.get("Sampler", body.get("sampler_name")),
        "cfg_scale": num("CFG scale", float, body.get("cfg_scale")), "steps": num("Steps", int, body.get("steps")),
        "batch_size": body.get("batch_size", 1), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": num("Denoising strength", float, body.get("denoising_strength")),
        "extra_generation_params": {k: v for k, v in first.items() if k not in (
            "Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Size-1", "Size-2",
            "Model", "Model hash")},
        "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": request_clip_skip(body), "is_using_inpainting_conditioning": False,
        "version": first.get("Version"), "interrupted": job.state == "cancelled",
        "saved": [i["file"] for i in job.images],
    }
    parameters = {k: v for k, v in body.items()}
    if "init_images" in parameters:
        parameters["init_images"] = None
    if "mask" in parameters:
        parameters["mask"] = None
    images = [base64.b64encode(data).decode("ascii") for data, _ in job.pngs] if send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def request_clip_skip(body: dict) -> int:
    """A1111's ``clip_skip`` of the info: its CLIP_stop_at_last_layers (1: the last layer)."""
    v = (body.get("override_settings") or {}).get("CLIP_stop_at_last_layers")
    return v if isinstance(v, int) and not isinstance(v, bool) else 1


def progress(job, skip_image: bool = False) -> dict:
    """A1111's ``/progress`` for the job that started last (progress 0 when none runs)."""
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None}
    running = job.state == "running"
    state.update(interrupted=job.state == "cancelled" or job.cancel_requested.is_set(),
                 job=f"job {job.id}", job_count=job.num_images if running else 0,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                 job_no=job.image_index, sampling_step=job.step, sampling_steps=job.total_steps)
    done = 0.0
    if running and job.num_images:
        done = (job.image_index + (job.step / job.total_steps if job.total_steps else 0)) / job.num_images
        done = min(max(done, 0.0), 1.0)
    elapsed = time.time() - (job.started or time.time())
    eta = elapsed / done - elapsed if done > 0 else 0.0
    return {"progress": done, "eta_relative": eta, "state": state,
            "current_image": None if skip_image or not running else job.preview,
            "textinfo": None, "current_task": job.id}


def sampler_list() -> list[dict]:
    """A1111's ``/samplers``: one entry per A1111 sampler name we have (schedules in ``/schedulers``)."""
    from ..schedulers import NAMES
    from ..schedulers.a1111 import TO_A1111

    out: dict[str, dict] = {}
    for ours in NAMES:
        sampler, schedule = TO_A1111.get(ours, (ours, None))
        entry = out.setdefault(sampler, {"name": sampler, "aliases": [], "options": {}})
        if schedule is None:
            entry["aliases"].append(ours)
    return list(out.values())


def scheduler_list() -> list[dict]:
    """A1111's ``/schedulers``: Automatic and the schedule types our samplers have (Karras)."""
    from ..schedulers import NAMES
    from ..schedulers.a1111 import TO_A1111

    types = sorted({t for ours, (_, t) in TO_A1111.items() if t and ours in NAMES})
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False}] + [
        {"name": t.lower(), "label": t, "aliases": None, "default_rho": 7.0 if t == "Karras" else -1,
         "need_inner_model": False} for t in types]
