"""What every way of generating shares: the command line's ``generate`` and a JSON request
(:mod:`controldiff.request`, used by the server and batch runs) go through these functions,
so an image made either way is made, and recorded, the same way.

* A1111's ``<lora:NAME:WEIGHT>`` tags taken out of the prompt and found in LoRA folders;
* LoRAs and embeddings loaded for one run (:func:`load_extras`), and what the PNG says of them;
* one image at a time, image i from its own CPU generator seeded ``seed + i``
  (:func:`generate`), so any image can be remade alone;
* the PNG's A1111 infotext of each image (:func:`infotext`), from what the pipeline says it used.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

def random_seed() -> int:
    """The seed of a run that was given none (printed and recorded, so it can be remade)."""
    return secrets.randbelow(2**32)


def model_name(path: Optional[Path], is_demo: bool = False) -> Optional[str]:
    """The model's name in the infotext: a file's stem or a folder's name, as A1111 shows it."""
    if is_demo:
        from .demo import NAME

        return NAME
    if path is None:
        return None
    path = Path(path)
    return path.stem if path.is_file() else path.resolve().name


@dataclass(frozen=True)
class TaggedLora:
    """A LoRA a prompt's tag asks for: the file found, the weight (a name given twice: the
    weights added, as A1111 applies both) and the tag as written."""

    path: Path
    weight: float
    tag: str


def prompt_loras(prompt: str, lora_dirs: Sequence[Path], no_folder: str = "no LoRA folder given",
                 find: Optional[Callable[[str], Optional[Path]]] = None
                 ) -> tuple[str, dict[str, TaggedLora], list[str]]:
    """The prompt without its extra-network tags (the rest unchanged), the LoRAs its
    ``<lora:...>`` tags name, found in ``lora_dirs`` (or by ``find(name)``) as ``{name: TaggedLora}``,
    and the tags left out because they are not LoRAs (hypernetworks...). A bad tag, or a LoRA not
    found, is a ValueError starting ``prompt:`` (``no_folder`` says why none was searched)."""
    from .text.extra_networks import LORA_EXTENSIONS, LORA_KINDS, find_file, lora_tags, parse_prompt

    text, tags = parse_prompt(prompt)
    ignored = [t.text for t in tags if t.kind not in LORA_KINDS]
    out: dict[str, TaggedLora] = {}
    for t in lora_tags(tags):
        if t.te != t.unet:
            raise ValueError(f"prompt: {t.text}: separate text-encoder and UNet weights are not supported; "
                             "give one weight")
        path = find_file(t.name, lora_dirs) if find is None else find(t.name)
        if path is None:
            where = ", ".join(map(str, lora_dirs)) if lora_dirs else f"nowhere: {no_folder}"
            raise ValueError(f"prompt: {t.text}: no LoRA file {t.name}{'/'.join(LORA_EXTENSIONS)} found; "
                             f"searched {where}")
        out[t.name] = TaggedLora(path, out[t.name].weight + t.te if t.name in out else t.te, t.text)
    return text, out, ignored


@dataclass
class Extras:
    """What :func:`load_extras` put on a pipeline: the infotext fields, the hashes of the files
    by name, and the LoRA names and embedding tokens to unload."""

    params: dict = field(default_factory=dict)
    lora_hashes: dict = field(default_factory=dict)
    ti_hashes: dict = field(default_factory=dict)
    loras: list = field(default_factory=list)
    tokens: list = field(default_factory=list)

    def unload(self, pipe) -> None:
        """Take off what was loaded (the pipeline is as before :func:`load_extras`)."""
        for name in reversed(self.loras):
            pipe.unload_lora(name)
        if self.tokens:
            pipe.unload_textual_inversion(list(self.tokens))
        self.loras.clear()
        self.tokens.clear()


def load_extras(pipe, *, prompt: str, negative: Optional[str], loras: Sequence[tuple[Path, Optional[float]]] = (),
                tagged: Optional[dict[str, TaggedLora]] = None,
                embeddings: Sequence[tuple[Path, Optional[str]]] = (), named_embeddings: Mapping[str, Path] = {},
                prompt_syntax: str = "a1111", clip_skip: Optional[int] = None) -> Extras:
    """Load the LoRAs (files with weights, and the prompt's tags) and the embeddings: files with
    tokens, and those of ``named_embeddings`` (name -> file, e.g. ``embedding_files(folders)``)
    whose name is a word of the prompt or negative prompt, as A1111 does. All or nothing: a file
    that fails unloads the ones before it. ``prompt`` is the prompt without its tags."""
    from .loading.hashes import embedding_hash, lora_hash
    from .png import format_hashes
    from .text.extra_networks import used_embeddings

    done, names, tokens = Extras(), [], []
    try:
        for path, weight in loras:
            weight = 1.0 if weight is None else weight
            name = pipe.load_lora(path, weight=weight)
            done.loras.append(name)
            names.append(f"{name}:{weight:g}")
            done.lora_hashes[name] = lora_hash(path)
        for name, t in (tagged or {}).items():
            done.loras.append(pipe.load_lora(t.path, weight=t.weight, name=name))
            done.lora_hashes[name] = lora_hash(t.path)
        for path, token in embeddings:
            added = pipe.load_textual_inversion(path, token=token)
            done.tokens.append(added[0])
            tokens += added
            done.ti_hashes[added[0]] = embedding_hash(path)
        files = named_embeddings
        candidates = [n for n in files if n not in pipe.textual_inversions]
        for name in used_embeddings([prompt, negative or ""], candidates):
            done.tokens.append(pipe.load_textual_inversion(files[name], token=name)[0])
            done.ti_hashes[name] = embedding_hash(files[name])
    except BaseException:
        done.unload(pipe)
        raise
    params = done.params
    if names:
        params["Lora"] = " ".join(names)
    if done.lora_hashes:
        params["Lora hashes"] = format_hashes(done.lora_hashes)
    if tokens:
        params["TI"] = " ".join(tokens)
    if done.ti_hashes:
        params["TI hashes"] = format_hashes(done.ti_hashes)
    if prompt_syntax != "a1111":
        params["Prompt syntax"] = prompt_syntax
    if clip_skip:  # A1111 counts the layer used from the end: 2 = skip one (our clip_skip=1)
        params["Clip skip"] = clip_skip + 1
    return done


def generate(pipe, prompt: str, seeds: Sequence[int], *,
             callback: Optional[Callable[[int, int, object, object], Optional[bool]]] = None,
             **kwargs) -> Iterator[tuple[int, int, object]]:
    """Yield ``(i, seed, out)`` for each image, made one at a time, image i from its own CPU
    generator seeded ``seeds[i]`` (so ``--seed SEED+i`` remakes it alone; the same as diffusers
    with ``torch.Generator().manual_seed``). ``callback(i, step, t, latents)`` after each step;
    False stops: the image stopped is yielded (``out.cancelled``) and no other is started.
    ``kwargs`` go to ``pipe(...)`` (output_type "pil" unless given)."""
    import torch

    kwargs.setdefault("output_type", "pil")
    for i, s in enumerate(seeds):
        step = None if callback is None else (lambda k, t, x, i=i: callback(i, k, t, x))
        out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(s), callback=step, **kwargs)
        yield i, s, out
        if out.cancelled:
            return


def describe_controls(used: Sequence, controlnet_names: Sequence[str] = ()) -> list[dict]:
    """Descriptions of the controls used (``out.settings["controls"]``: dicts, or controls with
    ``describe()``); the ControlNets named, in order, by ``controlnet_names`` (the file or folder
    given), which A1111 shows as the unit's model."""
    out, k = [], 0
    for c in used:
        d = dict(c) if isinstance(c, dict) else dict(getattr(c, "describe", lambda: {"name": type(c).__name__})())
        if d.get("name") == "ControlNet" and k < len(controlnet_names):
            d["model"] = controlnet_names[k]
            k += 1
        out.append(d)
    return out


def infotext(prompt: str, negative: Optional[str], settings: dict, image, seed: int, *, model: Optional[str],
             model_hash: Optional[str], extra: dict, mode: Optional[str] = None, controls: Sequence = (),
             controlnet_names: Sequence[str] = ()) -> str:
    """The PNG's A1111 ``parameters`` text: the values the pipeline says it used
    (``out.settings``), A1111's sampler names, ``prompt`` as given (``<lora:...>`` tags
    included, as A1111 records it). ``mode``: "img2img" or "inpaint" (None: txt2img)."""
    from .png import control_fields, format_parameters
    from .schedulers.a1111 import TO_A1111

    fields = {}
    if mode is not None:
        fields["Denoising strength"] = settings.get("strength")
        fields["Mode"] = mode
    fields.update(extra)
    fields.update(control_fields(describe_controls(settings.get("controls", controls), controlnet_names)))
    fields["Version"] = f"controldiff {version()}"
    name = settings.get("scheduler")
    sampler, schedule = TO_A1111.get(name, (name, None))   # A1111's names, so A1111 reads them back
    if schedule:
        fields = {"Schedule type": schedule, **fields}
    return format_parameters(prompt, negative, settings.get("steps"), sampler, settings.get("guidance_scale"), seed,
                             image.width, image.height, model, fields, model_hash=model_hash)


def version() -> str:
    try:
        from importlib.metadata import version as installed

        return installed("controldiff")
    except Exception:  # not installed (running from a source tree)
        return "dev"
