"""PNG files carrying their generation settings.

Written the way AUTOMATIC1111's web UI writes them (a ``parameters`` tEXt chunk), so
the usual tools (the A1111 "PNG Info" tab, ComfyUI, image viewers) show how an image
was made and can reproduce it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from PIL import Image, PngImagePlugin

KEY = "parameters"


def format_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A1111's layout: the prompt, ``Negative prompt: ...`` (if any), then ``Key: value, ...``."""
    fields: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
    }
    if model:
        fields["Model"] = model
    for k, v in (extra or {}).items():
        if v is not None:
            fields[k] = v
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _value(v: Any) -> str:
    # A1111 quotes values that would break its comma-separated parser.
    s = str(v)
    if "," in s or ":" in s or "\n" in s:
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Save ``image`` as PNG with ``parameters`` in a tEXt chunk (iTXt if not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    try:
        parameters.encode("latin-1")
        info.add_text(KEY, parameters)
    except UnicodeEncodeError:
        info.add_itxt(KEY, parameters)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG, or None when it has none."""
    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", None) or im.info
        value = text.get(KEY)
    return value if isinstance(value, str) else None
