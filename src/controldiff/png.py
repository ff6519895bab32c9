"""PNG files carrying their generation settings.

Written the way AUTOMATIC1111's web UI writes them (a ``parameters`` tEXt chunk), so
the usual tools (the A1111 "PNG Info" tab, ComfyUI, image viewers) show how an image
was made and can reproduce it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

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
    model_hash: str | None = None,
) -> str:
    """A1111's layout (``processing.create_infotext``): the prompt, ``Negative prompt: ...`` (if
    any), then ``Key: value, ...``, values quoted as A1111 quotes them. :func:`parse_parameters`
    gives every field back."""
    fields: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
    }
    if model_hash:
        fields["Model hash"] = model_hash
    if model:
        fields["Model"] = model
    for k, v in (extra or {}).items():
        if v is not None and str(v) != "":  # A1111's parser drops empty values
            fields[k] = v
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


# sd-webui-controlnet's unit fields (scripts/infotext.py: "ControlNet N" entries of
# "Field Name: value" pairs); A1111 fills its ControlNet panel from them.
_CONTROLNET_FIELDS = (("scale", "Weight"), ("start", "Guidance Start"), ("end", "Guidance End"))


def _unit_value(v: Any) -> str:
    # inside a unit, "," and ":" separate fields and values; A1111 refuses units holding them
    return re.sub(r"[,:]", "_", str(v))


def control_fields(controls: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Infotext fields for the controls used, from their descriptions (``name`` and settings,
    as ``Control.describe()`` gives). A ControlNet is written as sd-webui-controlnet writes
    it, ``ControlNet 0: "Module: none, Model: canny, Weight: 0.8, Guidance Start: 0.0,
    Guidance End: 1.0, Control Mode: Balanced"``, so A1111 restores it; every other control
    as ``NAME N: {json of its settings}``, numbered per name."""
    fields: dict[str, str] = {}
    counts: dict[str, int] = {}
    for d in controls:
        d = dict(d)
        name = str(d.pop("name", "Control"))
        i = counts[name] = counts.get(name, -1) + 1
        if name == "ControlNet":
            model = d.get("model")
            unit = {"Module": "none", "Model": Path(str(model)).stem if model else "unknown"}
            unit.update({label: d[key] for key, label in _CONTROLNET_FIELDS if key in d})
            unit["Control Mode"] = "ControlNet is more important" if d.get("guess_mode") else "Balanced"
            fields[f"ControlNet {i}"] = ", ".join(f"{k}: {_unit_value(v)}" for k, v in unit.items())
        else:
            fields[f"{name} {i}"] = json.dumps(d, separators=(", ", ": "), default=str)
    return fields


def _value(v: Any) -> str:
    # A1111's quote (infotext_utils.quote): JSON for values holding ",", ":" or a newline. Also
    # quoted here, so they read back unchanged: values that would read as quoted ('"..."') or
    # lose the spaces around them; A1111 reads both the same way.
    s = str(v)
    if any(c in s for c in ",:\n") or s.startswith('"') or s != s.strip():
        s = json.dumps(s, ensure_ascii=False)
    return s


def format_hashes(hashes: Mapping[str, str]) -> str:
    """``Lora hashes`` / ``TI hashes``: ``name: hash, ...``, the names without ``:`` and ``,``
    (as A1111's ``extra_networks_lora`` and ``sd_hijack_clip`` write them)."""
    return ", ".join(f"{re.sub('[:,]', '', name)}: {h}" for name, h in hashes.items())


def parse_hashes(value: str) -> dict[str, str]:
    """``name: hash, ...`` -> ``{name: hash}``, read as A1111's Lora ``infotext_pasted`` reads it
    (an entry without ``:`` is skipped)."""
    out = {}
    for item in value.split(","):
        name, sep, h = item.strip().partition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


_UNIT_KEY = re.compile(r"ControlNet (\d+)")


def control_units(fields: Mapping[str, str]) -> dict[int, dict[str, str]]:
    """The ControlNet units of parsed infotext fields, ``{N: {"Module": ..., "Model": ...,
    "Weight": ..., ...}}`` (values as text), read as sd-webui-controlnet's ``parse_unit`` reads a
    ``ControlNet N`` field; a unit it could not read is a ValueError naming the field."""
    units = {}
    for key, value in fields.items():
        m = _UNIT_KEY.fullmatch(key)
        if m is None:
            continue
        unit = {}
        for item in value.split(","):
            parts = item.strip().split(": ")
            if len(parts) != 2:
                raise ValueError(f"{key}: expected 'Field: value, ...', got {value!r}")
            unit[parts[0]] = parts[1]
        units[int(m.group(1))] = unit
    return dict(sorted(units.items()))


def _pnginfo(parameters: str) -> PngImagePlugin.PngInfo:
    # Text from file names may hold lone surrogates (undecodable bytes): never fail on them.
    parameters = parameters.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    info = PngImagePlugin.PngInfo()
    try:
        parameters.encode("latin-1")
        info.add_text(KEY, parameters)
    except UnicodeEncodeError:
        info.add_itxt(KEY, parameters)
    return info


def write_png(image: Image.Image, file: BinaryIO, parameters: str) -> None:
    """Encode ``image`` as PNG into an open binary file, ``parameters`` in a tEXt chunk (iTXt
    if not Latin-1). :mod:`controldiff.outputs` decides where the file goes."""
    image.save(file, format="PNG", pnginfo=_pnginfo(parameters))


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG, or None when it has none."""
    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", None) or im.info
        value = text.get(KEY)
    return value if isinstance(value, str) else None


# A1111's infotext parser (modules/infotext_utils.py, parse_generation_parameters): "Key: value"
# pairs, values either plain up to the next comma or JSON-quoted strings
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of an A1111 ``parameters`` text, as A1111 reads them: ``Prompt``,
    ``Negative prompt`` and every ``Key: value`` of the last line (quoted values unquoted,
    ``Size: WxH`` also as ``Size-1``/``Size-2``). :func:`format_parameters` writes what this reads."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    res = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if not value:  # A1111's parser fails on an empty value and skips it
            continue
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        m = _SIZE.match(value)
        if m is not None:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        res[key] = value
    return res
