"""One path from a JSON request to images, for the server (native API, and the A1111 API after
mapping its fields) and batch runs; the command line makes its images the same way
(:mod:`controldiff.generation`).

    from controldiff.request import Folders, parse, schema
    req = parse({"prompt": "a cat", "seed": 1, "controls": [{"type": "SAG", "scale": 0.75}]},
                folders=Folders(models=[Path("models")]))     # RequestError("controls.0.scale", ...)
    for result in req.run(pipe):                              # pipe loaded from req.model
        result.image, result.seed, result.parameters

:func:`parse` checks everything before any model loads: every field's type and range, the
scheduler, each control's keywords (from its constructor: :mod:`.controls`), images (decodable,
within the pixel limit) and names (inside the configured folders: no absolute paths, no ``..``).
Fields are named as ``Pipeline.__call__``'s keywords; :func:`schema` is the JSON Schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..sampling.control import Control
from .controls import ControlField, ControlRequest, refused, specs
from .fields import AnyOf, Array, Env, Image, Int, Limits, Name, Null, Number, Record, RequestError, Scheduler, \
    Str

__all__ = ["schema", "parse", "RequestError", "Folders", "Limits", "GenerationRequest", "Result",
           "refused_controls", "control_names"]

_WEIGHTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_MARKER = {"models": "model_index.json", "controlnets": "config.json"}


@dataclass
class Folders:
    """Where the names of a request are looked up; nothing outside them can be named.
    ``models`` and ``controlnets``: a name is a path inside one of the folders (a diffusers
    folder or a single file); ``loras`` and ``embeddings``: a file's name without extension,
    found anywhere below them (as A1111 names them). ``default_model``: the model of a request
    that names none (None: the embedded demo model)."""

    models: list[Path] = field(default_factory=list)
    loras: list[Path] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)
    controlnets: list[Path] = field(default_factory=list)
    default_model: Optional[Path] = None

    def find(self, kind: str, name: str) -> Optional[Path]:
        """The file or folder ``name`` (already checked by :func:`fields.check_name`) stands for."""
        from ..text.extra_networks import embedding_files, find_file

        if kind == "loras":
            return find_file(name, [Path(f) for f in self.loras])
        if kind == "embeddings":
            return embedding_files([Path(f) for f in self.embeddings]).get(name)
        for folder in getattr(self, kind):
            path = Path(folder) / name
            if path.exists():
                return path
        return None

    def names(self, kind: str) -> list[str]:
        """The names a request may use for ``kind`` ("models", "loras", "embeddings",
        "controlnets"): what ``GET /controldiff/v1/<kind>`` lists."""
        from ..text.extra_networks import LORA_EXTENSIONS, embedding_files

        if kind == "embeddings":
            return list(embedding_files([Path(f) for f in self.embeddings]))
        if kind == "loras":
            found = [p.stem for f in self.loras for p in sorted(Path(f).rglob("*"))
                     if p.is_file() and p.suffix.lower() in LORA_EXTENSIONS]
            return list(dict.fromkeys(found))
        out: list[str] = []
        for folder in map(Path, getattr(self, kind)):
            pipelines = [m.parent for m in folder.rglob("model_index.json") if m.is_file()]
            roots: list[Path] = []
            for marker in sorted(folder.rglob(_MARKER[kind])):   # parents sort before what they hold
                d = marker.parent
                if marker.is_file() and d != folder and not any(r == d or r in d.parents for r in roots) \
                        and not any(p in d.parents for p in pipelines):   # not a part of a model (unet/, vae/)
                    roots.append(d)
            hidden = roots + pipelines
            out += [r.relative_to(folder).as_posix() for r in roots]
            out += [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                    if p.is_file() and p.suffix.lower() in _WEIGHTS and not any(h in p.parents for h in hidden)]
        return list(dict.fromkeys(out))


def _optional(f):
    return AnyOf([f, Null()])


def _top(limits: Limits) -> Record:
    """The request's own fields (named as ``Pipeline.__call__``'s keywords where one exists)."""
    from ..noise import SEED_LIMIT

    lora = Record({"name": Name("loras"), "weight": Number()}, required=["name"], defaults={"weight": 1.0},
                  build=lambda name, weight=1.0: (name, weight))
    return Record({
        "prompt": Str(), "negative_prompt": _optional(Str()),
        "width": _optional(Int(minimum=8)), "height": _optional(Int(minimum=8)),
        "num_inference_steps": _optional(Int(1, limits.max_steps)),
        "guidance_scale": _optional(Number()),
        "scheduler": _optional(Scheduler()),
        "seed": _optional(Int(0, SEED_LIMIT - 1)),
        "num_images": Int(1, limits.max_images),
        "image": _optional(Image("RGB")), "mask_image": _optional(Image("L")),
        "strength": _optional(Number(exclusive_minimum=0.0, maximum=1.0)),
        "clip_skip": _optional(Int(minimum=1)),
        "prompt_syntax": Str(("a1111", "compel", "none")),
        "model": _optional(Name("models")),
        "loras": Array(lora),
        "embeddings": Array(Name("embeddings")),
        "controls": Array(ControlField(), max_items=limits.max_controls),
    }, defaults=dict(_DEFAULTS), title="controldiff generation request")


_DEFAULTS = dict(prompt="", negative_prompt=None, width=None, height=None, num_inference_steps=None,
                 guidance_scale=None, scheduler=None, seed=None, num_images=1, image=None, mask_image=None,
                 strength=None, clip_skip=None, prompt_syntax="a1111", model=None, loras=[], embeddings=[],
                 controls=[])
_DESCRIPTIONS = {
    "prompt": "what to draw; <lora:NAME:WEIGHT> tags load LoRAs, embedding names in it load embeddings",
    "width": "pixels, a multiple of the model's latent factor (default: the model's size)",
    "num_inference_steps": "default: the reference pipeline's for the model family and task",
    "guidance_scale": "classifier-free guidance; <= 1 disables it (default: 7.5, SDXL 5.0)",
    "seed": "image i uses seed + i (default: a random seed, recorded in each image)",
    "image": "init image: img2img, or inpainting with mask_image",
    "mask_image": "inpainting mask, white = repaint, the size of image",
    "strength": "how much image changes (default: 0.8 img2img, 1.0 inpainting)",
    "model": "default: the server's default model",
    "controls": 'controls in order, each {"type": CONTROL, ...its constructor keywords}',
}


def schema(limits: Limits = Limits()) -> dict:
    """The JSON Schema (2020-12) of a request; ``controls`` items are made from the control
    classes (``x-refused-controls``: those a request cannot name, and why)."""
    s = _top(limits).schema()
    for k, d in _DESCRIPTIONS.items():
        s["properties"][k]["description"] = d
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **s}


def control_names() -> list[str]:
    """The control types a request can name."""
    return list(specs())


def refused_controls() -> dict[str, str]:
    """The controls controldiff exports that a request cannot name, each with the reason."""
    return refused()


@dataclass
class Result:
    """One image of a run: ``parameters`` is its A1111 infotext (as the command line writes it);
    ``cancelled``: the image stopped part-way (its latents decoded as they were), always last."""

    image: Any
    seed: int
    parameters: str
    cancelled: bool = False


class _StepCount(Control):
    """Reads the number of steps of the run (for ``on_step``'s ``total_steps``); changes nothing."""

    total = 0

    def setup(self, ctx):
        self.total = ctx.steps


@dataclass
class GenerationRequest:
    """A checked request, ready to run on a pipeline loaded from :attr:`model`."""

    prompt: str   # as given: <lora:...> tags included (the infotext records it so)
    negative_prompt: Optional[str]
    width: Optional[int]
    height: Optional[int]
    num_inference_steps: Optional[int]
    guidance_scale: Optional[float]
    scheduler: Optional[str]
    seed: int
    num_images: int
    image: Any
    mask_image: Any
    strength: Optional[float]
    clip_skip: Optional[int]
    prompt_syntax: str
    model: Optional[Path]          # None: the embedded demo model
    loras: list                    # [(file, weight)]
    embeddings: list               # [(file, token)]
    controls: list[ControlRequest]
    folders: Folders
    data: dict                     # the request as given, with the seed drawn when none was
    text: str = ""                 # the prompt without its tags
    tagged: dict = field(default_factory=dict)   # the prompt's LoRA tags: {name: TaggedLora}
    named_embeddings: dict = field(default_factory=dict)   # embeddings named by words of the prompts: {name: file}

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    @property
    def mode(self) -> Optional[str]:
        return None if self.image is None else ("inpaint" if self.mask_image is not None else "img2img")

    def run(self, pipe, *, on_step: Optional[Callable] = None) -> list[Result]:
        """The images, made one at a time (:meth:`results`)."""
        return list(self.results(pipe, on_step=on_step))

    def results(self, pipe, *, on_step: Optional[Callable] = None) -> Iterator[Result]:
        """Yield each image as it is done. ``on_step(image_index, step, total_steps, latents)``
        after each step (``step`` counts from 1); returning False stops: the image in progress
        comes last with ``cancelled=True`` and no other is started. The LoRAs and embeddings
        are loaded onto ``pipe`` for the run and taken off after; its ControlNets and adapters
        are loaded for the run."""
        from ..generation import generate, infotext, load_extras, model_name
        from ..loading.hashes import model_hash

        path = None if pipe.path is None else Path(pipe.path)
        if self.model is not None and path is not None and path.resolve() != Path(self.model).resolve():
            raise ValueError(f"model: the request is for {self.model}; the pipeline given was loaded from {path}")
        controls = [c.build(pipe) for c in self.controls]
        count = _StepCount()
        callback = None if on_step is None else (lambda n, i, t, x: on_step(n, i + 1, count.total, x))
        name, mhash = model_name(path, self.model is None), None if path is None else model_hash(path)
        given = {k: v for k, v in (("num_inference_steps", self.num_inference_steps),
                                   ("guidance_scale", self.guidance_scale), ("strength", self.strength))
                 if v is not None}
        syntax = pipe.prompt_syntax
        extras = load_extras(pipe, prompt=self.text, negative=self.negative_prompt, loras=self.loras,
                             tagged=self.tagged, embeddings=self.embeddings, named_embeddings=self.named_embeddings,
                             prompt_syntax=self.prompt_syntax, clip_skip=self.clip_skip)
        try:
            pipe.prompt_syntax = self.prompt_syntax
            images = generate(pipe, self.text, self.seeds, callback=callback, negative_prompt=self.negative_prompt,
                              height=self.height, width=self.width, scheduler=self.scheduler, image=self.image,
                              mask_image=self.mask_image, clip_skip=self.clip_skip,
                              controls=controls + ([count] if on_step is not None else []), **given)
            for _, seed, out in images:
                settings = dict(out.settings, controls=out.settings["controls"][:len(controls)])
                text = infotext(self.prompt, self.negative_prompt, settings, out.images[0], seed, model=name,
                                model_hash=mhash, extra=extras.params, mode=self.mode,
                                controlnet_names=[n for c in self.controls if c.name == "ControlNet"
                                                  for n in c.model_names()])
                yield Result(out.images[0], seed, text, out.cancelled)
        finally:
            pipe.prompt_syntax = syntax
            extras.unload(pipe)


def parse(data, *, folders: Folders, limits: Limits = Limits()) -> GenerationRequest:
    """A checked :class:`GenerationRequest` from a decoded JSON request, or a
    :class:`RequestError` naming the field. Loads no model (reads at most a model's configs)."""
    from ..generation import prompt_loras, random_seed
    from ..noise import SEED_LIMIT
    from .fields import check_name

    if not isinstance(data, dict):
        raise RequestError("", f"expected a JSON object (a request), got {type(data).__name__}")
    v = {**_DEFAULTS, **_top(limits).values(data, "", Env(folders, limits))}
    if v["mask_image"] is not None and v["image"] is None:
        raise RequestError("mask_image", "inpainting also needs image")
    if v["strength"] is not None and v["image"] is None:
        raise RequestError("strength", "only meaningful with image (img2img or inpainting)")
    if v["mask_image"] is not None and v["mask_image"].size != v["image"].size:
        raise RequestError("mask_image", f"size {v['mask_image'].size} (w, h) differs from image's {v['image'].size}")
    if v["width"] is not None and v["height"] is not None and v["width"] * v["height"] > limits.max_pixels:
        raise RequestError("width", f"{v['width']}x{v['height']} is more than the limit of {limits.max_pixels} pixels")
    seed = random_seed() if v["seed"] is None else v["seed"]
    if seed + v["num_images"] > SEED_LIMIT:
        raise RequestError("seed", f"image i uses seed + i, and {seed} + {v['num_images'] - 1} is past the largest "
                                   "seed, 2**64 - 1; lower seed or num_images")
    def find_lora(name):  # a tag's name, looked up as loras[].name is
        return folders.find("loras", check_name(name, "prompt"))

    try:
        text, tagged, _ = prompt_loras(v["prompt"], [Path(f) for f in folders.loras], "no LoRA folder is configured",
                                       find_lora)
    except ValueError as e:
        raise RequestError("prompt", str(e).removeprefix("prompt: ")) from None
    for i, (path, _) in enumerate(v["loras"]):
        if path.stem in tagged:
            raise RequestError(f"loras.{i}.name", f"{path.stem} is also in the prompt as {tagged[path.stem].tag}; "
                                                  "give it once")
        if any(p.stem == path.stem for p, _ in v["loras"][:i]):
            raise RequestError(f"loras.{i}.name", f"{path.stem} is given twice")
    model = v["model"] if v["model"] is not None else folders.default_model
    if model is not None:
        _check_size(Path(model), v["width"], v["height"])
    return GenerationRequest(
        prompt=v["prompt"], negative_prompt=v["negative_prompt"], width=v["width"], height=v["height"],
        num_inference_steps=v["num_inference_steps"], guidance_scale=v["guidance_scale"], scheduler=v["scheduler"],
        seed=seed, num_images=v["num_images"], image=v["image"], mask_image=v["mask_image"], strength=v["strength"],
        clip_skip=v["clip_skip"], prompt_syntax=v["prompt_syntax"], model=None if model is None else Path(model),
        loras=list(v["loras"]), embeddings=[(p, p.stem) for p in v["embeddings"]], controls=list(v["controls"]),
        folders=folders, data={**data, "seed": seed}, text=text, tagged=tagged,
        named_embeddings=_prompt_embeddings(folders, [text, v["negative_prompt"] or ""]))


def _prompt_embeddings(folders: Folders, texts: list[str]) -> dict[str, Path]:
    """The embeddings whose names are words of the prompts, as A1111 loads them."""
    from ..text.extra_networks import used_embeddings

    found = {n: folders.find("embeddings", n) for n in used_embeddings(texts, folders.names("embeddings"))}
    return {n: p for n, p in found.items() if p is not None}


def _check_size(model: Path, width, height) -> None:
    """Width and height against the model's latent factor, read from its configs (no weights)."""
    from ..loading.inspect import quick_summary

    try:
        summary = quick_summary(model)
    except (ValueError, OSError) as e:
        raise RequestError("model", f"cannot read the model {model.name} ({e})") from None
    if summary is None:
        return
    factor = summary.info.latent_factor
    for key, value in (("width", width), ("height", height)):
        if value is not None and value % factor:
            raise RequestError(key, f"{value} is not a multiple of {factor} (the model's latent factor); "
                                    f"try {max(factor, value - value % factor)}")
