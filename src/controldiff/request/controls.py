"""The controls a request can name: every control class ``controldiff`` exports, read from its
constructor's signature, annotations and defaults (a new control appears here with no code).

What a signature cannot say is in two small tables: the parameters whose values are not JSON
by nature (images are base64, a ControlNet's model is a name in the ControlNet folders), and
the controls a request cannot express at all, with the reason. A control with a required
parameter of no JSON form is refused with a reason made from its annotation.
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .fields import Array, Env, Field, Image, Name, Number, Record, RequestError, Unsupported, from_constructor, \
    join, record_of

# Parameters whose JSON form the annotation cannot give, by (class, parameter) or by parameter name.
_BY_CLASS: dict[tuple[str, str], Field] = {
    ("ControlNet", "model"): Name("controlnets"),
    ("T2IAdapter", "model"): Name("controlnets"),
    # checked again by the constructor at run time; here so a request is refused before any model loads
    ("ControlNet", "scale"): Number(minimum=0.0),
    ("ControlNet", "start"): Number(minimum=0.0, maximum=1.0),
    ("ControlNet", "end"): Number(minimum=0.0, maximum=1.0),
    ("T2IAdapter", "scale"): Number(minimum=0.0),
}
_BY_NAME: dict[str, Field] = {
    "image": Image("RGB"),
    "mask": Image("L"),
    "depth_map": Image(None),
    "liked": Array(Image("RGB")),
    "disliked": Array(Image("RGB")),
}
# Controls a request cannot express, and why (others with no JSON form get a reason from their annotations).
REFUSED_BY_DESIGN = {
    "CLIPGuidance": "needs a CLIP model object (transformers' CLIPModel); requests name no CLIP models",
    "DiffEdit": "needs pipe.invert()'s Inversion and pipe.diffedit_mask()'s mask of the source image, "
                "made before the run",
}


def _loader(cls_name: str) -> Optional[Callable]:
    """How a model parameter's file is loaded (``model`` of ControlNet and T2IAdapter)."""
    from ..loading.control_models import load_controlnet, load_t2i_adapter

    return {"ControlNet": load_controlnet, "T2IAdapter": load_t2i_adapter}.get(cls_name)


def _override(owner: str, name: str) -> Optional[Field]:
    return _BY_CLASS.get((owner, name)) or _BY_NAME.get(name)


def _parameters(cls) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls.__init__)
    return [(p.name, hints.get(p.name, inspect.Parameter.empty), p.default)
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@dataclass
class ControlSpec:
    """One control class as a request gives it: ``{"type": NAME, ...constructor keywords}``."""

    cls: type
    record: Record

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def models(self) -> list[str]:
        """The parameters that name a model file, loaded at run time."""
        return [k for k, f in self.record.properties.items() if isinstance(f, Name)]

    def schema(self) -> dict:
        s = self.record.schema()
        s["properties"] = {"type": {"const": self.name}, **s["properties"]}
        s["required"] = ["type", *s.get("required", [])]
        if self.record.refused:
            s["x-refused-keywords"] = dict(self.record.refused)
        return s

    def convert(self, data, at: str, env: Env) -> "ControlRequest":
        kw = self.record.values({k: v for k, v in data.items() if k != "type"}, at, env)
        req = ControlRequest(self, kw, at)
        if not self.models:
            req.build(None)  # light (no model): built once here, so its own checks run before any work
        return req


@dataclass
class ControlRequest:
    """A control of a request, converted; :meth:`build` makes it (loading its model, if any)."""

    spec: ControlSpec
    kwargs: dict
    at: str

    @property
    def name(self) -> str:
        return self.spec.name

    def model_names(self) -> list[str]:
        """The names given for its models (what the PNG shows as a ControlNet unit's model)."""
        return [Path(self.kwargs[k]).name for k in self.spec.models if k in self.kwargs]

    def build(self, pipe):
        kw = dict(self.kwargs)
        for k in self.spec.models:
            if k in kw:
                kw[k] = _loader(self.name)(kw[k], device=pipe.device, dtype=pipe.dtype)
        try:
            return self.spec.cls(**kw)
        except ValueError as e:
            raise from_constructor(e, self.at, list(self.spec.record.properties)) from None


def _exported() -> list[type]:
    import controldiff
    from ..sampling.control import Control

    out = []
    for n in controldiff.__all__:
        obj = getattr(controldiff, n)
        if isinstance(obj, type) and issubclass(obj, Control) and obj is not Control:
            out.append(obj)
    return out


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[dict[str, ControlSpec], dict[str, str]]:
    specs, refused = {}, {}
    for cls in _exported():
        if cls.__name__ in REFUSED_BY_DESIGN:
            refused[cls.__name__] = REFUSED_BY_DESIGN[cls.__name__]
            continue
        record = record_of(cls, _parameters(cls), _override)
        if isinstance(record, Unsupported):
            refused[cls.__name__] = record.reason
        else:
            specs[cls.__name__] = ControlSpec(cls, record)
    return specs, refused


def specs() -> dict[str, ControlSpec]:
    """The controls a request can name, by class name."""
    return _tables()[0]


def refused() -> dict[str, str]:
    """The exported controls a request cannot name, with the one-line reason."""
    return dict(_tables()[1])


class ControlField(Field):
    """One item of ``controls``: ``{"type": NAME, ...}`` for any control of :func:`specs`."""

    kinds, what = ("object",), 'an object {"type": CONTROL, ...its keywords}'

    def schema(self) -> dict:
        return {"anyOf": [s.schema() for s in specs().values()], "x-refused-controls": refused()}

    def convert(self, value, at, env) -> ControlRequest:
        self.expect(value, at)
        name = value.get("type")
        if not isinstance(name, str):
            raise RequestError(join(at, "type"), f"required: the control's class name, one of: "
                                                 f"{', '.join(specs())}")
        if name in refused():
            raise RequestError(join(at, "type"), f"{name} cannot be given in a request: {refused()[name]}")
        if name not in specs():
            raise RequestError(join(at, "type"), f"unknown control {name!r}; one of: {', '.join(specs())}")
        return specs()[name].convert(value, at, env)
