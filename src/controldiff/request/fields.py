"""The typed fields of a request. Each field gives its JSON Schema and turns a JSON value into
what the library takes, or raises :class:`RequestError` naming the dotted field
(``controls.1.concepts.0.scale``) and what was expected. :func:`field_for` builds them from
Python annotations, so a control's constructor is the definition of its JSON form.
"""
from __future__ import annotations

import base64
import binascii
import collections.abc
import dataclasses
import inspect
import io
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Callable, Optional, Sequence


class RequestError(ValueError):
    """A request that cannot be run: ``field`` is the dotted path of the value at fault
    (``""`` for the request as a whole), ``message`` what was expected."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: pixels of the output and of every image given, images,
    steps and controls."""

    max_pixels: int = 2048 * 2048
    max_images: int = 64
    max_steps: int = 500
    max_controls: int = 16


@dataclass
class Env:
    """What converting a request needs to know: its folders (:class:`controldiff.request.Folders`)
    and its limits."""

    folders: Any
    limits: Limits


def join(at: str, key) -> str:
    return f"{at}.{key}" if at else str(key)


def kind_of(value) -> str:
    """The JSON kind of a decoded value."""
    if value is None:
        return "null"
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                    (dict, "object")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def _got(value) -> str:
    kind = kind_of(value)
    if kind in ("boolean", "integer", "number", "null"):
        return f"{kind} {value!r}" if kind != "null" else "null"
    if kind == "string":
        return f"string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def from_constructor(error: ValueError, at: str, names: Sequence[str]) -> RequestError:
    """A library ValueError (``"scale: expected ..."``, ``"Concept.threshold: ..."``) as a
    RequestError on the parameter it names, else on ``at``."""
    text = str(error)
    head, sep, rest = text.partition(": ")
    if sep:
        for word in re.split(r"[,/\s]+", head):
            name = word.split(".")[-1]
            if name in names:
                return RequestError(join(at, name), rest)
    return RequestError(at, text)


# ----------------------------------------------------------------------------- fields


class Field:
    """A JSON value of some kinds (``"string"``, ``"array"``...) and how to convert it."""

    kinds: tuple = ()
    what = "a value"

    def schema(self) -> dict:
        raise NotImplementedError

    def convert(self, value, at: str, env: Env):
        raise NotImplementedError

    def expect(self, value, at: str) -> None:
        if kind_of(value) not in self.kinds:
            raise RequestError(at, f"expected {self.what}, got {_got(value)}")


class Null(Field):
    kinds, what = ("null",), "null"

    def schema(self):
        return {"type": "null"}

    def convert(self, value, at, env):
        self.expect(value, at)
        return None


class Bool(Field):
    kinds, what = ("boolean",), "true or false"

    def schema(self):
        return {"type": "boolean"}

    def convert(self, value, at, env):
        self.expect(value, at)
        return value


class _Ranged(Field):
    def __init__(self, minimum=None, maximum=None, exclusive_minimum=None):
        self.minimum, self.maximum, self.exclusive_minimum = minimum, maximum, exclusive_minimum

    def schema(self):
        s = {"type": self.kinds[-1]}
        for key, v in (("minimum", self.minimum), ("maximum", self.maximum),
                       ("exclusiveMinimum", self.exclusive_minimum)):
            if v is not None:
                s[key] = v
        return s

    def check_range(self, v, at):
        lo = "" if self.minimum is None else f"{self.minimum} <= "
        lo = lo or ("" if self.exclusive_minimum is None else f"{self.exclusive_minimum} < ")
        hi = "" if self.maximum is None else f" <= {self.maximum}"
        if ((self.minimum is not None and v < self.minimum) or (self.maximum is not None and v > self.maximum)
                or (self.exclusive_minimum is not None and v <= self.exclusive_minimum)):
            raise RequestError(at, f"expected {self.what} with {lo}value{hi}, got {v!r}")
        return v


class Int(_Ranged):
    kinds, what = ("integer",), "an integer"

    def convert(self, value, at, env):
        self.expect(value, at)
        return self.check_range(value, at)


class Number(_Ranged):
    kinds, what = ("integer", "number"), "a number"

    def convert(self, value, at, env):
        self.expect(value, at)
        if not math.isfinite(value):
            raise RequestError(at, f"expected a finite number, got {value!r}")
        return self.check_range(float(value), at)


class Str(Field):
    kinds, what = ("string",), "a string"

    def __init__(self, enum: Optional[Sequence[str]] = None):
        self.enum = None if enum is None else tuple(enum)

    def schema(self):
        return {"type": "string", **({"enum": list(self.enum)} if self.enum else {})}

    def convert(self, value, at, env):
        from ..text.encode import check_text  # the library's rule: text the tokenizer and a PNG can hold

        self.expect(value, at)
        if self.enum is not None and value not in self.enum:
            raise RequestError(at, f"expected one of {', '.join(map(repr, self.enum))}, got {value!r}")
        try:
            return check_text(value, at)
        except ValueError as e:
            raise RequestError(at, str(e).removeprefix(f"{at}: ")) from None


class AnyOf(Field):
    """One of several fields; a value goes to those accepting its kind, in order (the error of
    the one that got deepest into the value is reported when none takes it)."""

    def __init__(self, members: Sequence[Field]):
        self.members = list(members)
        self.kinds = tuple(k for m in self.members for k in m.kinds)
        self.what = " or ".join(dict.fromkeys(m.what for m in self.members))

    def schema(self):
        return {"anyOf": [m.schema() for m in self.members]}

    def convert(self, value, at, env):
        self.expect(value, at)
        errors = []
        for m in self.members:
            if kind_of(value) in m.kinds:
                try:
                    return m.convert(value, at, env)
                except RequestError as e:
                    errors.append(e)
        raise max(errors, key=lambda e: len(e.field))


class Array(Field):
    kinds, what = ("array",), "a list"

    def __init__(self, items: Optional[Field] = None, as_tuple: bool = False, max_items: Optional[int] = None):
        self.items, self.as_tuple, self.max_items = items, as_tuple, max_items

    def schema(self):
        s: dict = {"type": "array"}
        if self.items is not None:
            s["items"] = self.items.schema()
        if self.max_items is not None:
            s["maxItems"] = self.max_items
        return s

    def convert(self, value, at, env):
        self.expect(value, at)
        if self.max_items is not None and len(value) > self.max_items:
            raise RequestError(at, f"at most {self.max_items} items, got {len(value)}")
        out = [v if self.items is None else self.items.convert(v, join(at, i), env) for i, v in enumerate(value)]
        return tuple(out) if self.as_tuple else out


class Map(Field):
    """A JSON object of any keys (integers written as strings for ``Mapping[int, ...]``)."""

    kinds, what = ("object",), "an object"

    def __init__(self, key: type, value: Field):
        self.key, self.value = key, value

    def schema(self):
        s = {"type": "object", "additionalProperties": self.value.schema()}
        if self.key is int:
            s["propertyNames"] = {"pattern": r"^-?[0-9]+$"}
        return s

    def convert(self, value, at, env):
        self.expect(value, at)
        out = {}
        for k, v in value.items():
            if self.key is int and not re.fullmatch(r"-?[0-9]+", k):
                raise RequestError(join(at, k), f"expected an integer key, got {k!r}")
            out[int(k) if self.key is int else k] = self.value.convert(v, join(at, k), env)
        return out


class Record(Field):
    """A JSON object of known keys (unknown ones refused), built into ``build(**values)``;
    a ValueError from ``build`` is reported on the key it names."""

    kinds, what = ("object",), "an object"

    def __init__(self, properties: dict[str, Field], required: Sequence[str] = (), defaults: Optional[dict] = None,
                 build: Callable = dict, title: Optional[str] = None, description: Optional[str] = None,
                 refused: Optional[dict[str, str]] = None):
        self.properties, self.required = dict(properties), list(required)
        self.defaults, self.build = dict(defaults or {}), build
        self.title, self.description, self.refused = title, description, dict(refused or {})

    def schema(self):
        props = {}
        for k, f in self.properties.items():
            props[k] = f.schema()
            if k in self.defaults:
                props[k]["default"] = self.defaults[k]
        s = {"type": "object", "properties": props, "additionalProperties": False}
        if self.required:
            s["required"] = list(self.required)
        if self.title:
            s["title"] = self.title
        if self.description:
            s["description"] = self.description
        return s

    def values(self, value, at, env) -> dict:
        """The converted values of the keys given (refusing unknown and missing ones)."""
        self.expect(value, at)
        for k in value:
            if k in self.refused:
                raise RequestError(join(at, k), f"cannot be given in a request: {self.refused[k]}")
            if k not in self.properties:
                raise RequestError(join(at, k), f"unknown key; expected one of: {', '.join(self.properties)}")
        for k in self.required:
            if k not in value:
                raise RequestError(join(at, k), "required")
        return {k: self.properties[k].convert(v, join(at, k), env) for k, v in value.items()}

    def convert(self, value, at, env):
        kw = self.values(value, at, env)
        try:
            return self.build(**kw)
        except ValueError as e:
            raise from_constructor(e, at, list(self.properties)) from None


class Image(Field):
    """A base64 PNG, JPEG or WebP (or a ``data:`` URL of one): a PIL image in ``mode`` (None:
    its own), EXIF orientation applied, 16-bit greyscale as 8 bits; never more pixels than
    the limit (checked from the header, before decoding)."""

    kinds, what = ("string",), "a base64 PNG, JPEG or WebP image"
    FORMATS = ("PNG", "JPEG", "WEBP")

    def __init__(self, mode: Optional[str] = "RGB"):
        self.mode = mode

    def schema(self):
        return {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png",
                "description": "a base64 PNG, JPEG or WebP image, or a data: URL of one"}

    def convert(self, value, at, env):
        import PIL
        import PIL.Image
        import PIL.ImageOps

        from ..images import to_8bit

        self.expect(value, at)
        text = re.sub(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", "", value.strip(), count=1)
        try:
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(at, "expected base64 image data (or a data: URL), got text that is not base64") \
                from None
        limit = env.limits.max_pixels
        try:
            with PIL.Image.open(io.BytesIO(raw), formats=self.FORMATS) as im:
                w, h = im.size
                if w * h > limit:
                    raise RequestError(at, f"{w}x{h} is {w * h} pixels, more than the limit of {limit}")
                im.load()
                image = PIL.ImageOps.exif_transpose(im)
        except RequestError:
            raise
        except PIL.UnidentifiedImageError:
            raise RequestError(at, "not a PNG, JPEG or WebP image") from None
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise RequestError(at, f"not a readable PNG, JPEG or WebP image ({e})") from None
        image = to_8bit(image)
        return image if self.mode is None else image.convert(self.mode)


def check_name(name, at: str) -> str:
    """A name inside a folder: relative, no ``..``, ``.`` or empty parts, no drive, no NUL (so it
    cannot leave the folder, nor name the folder itself)."""
    if not isinstance(name, str) or not name.strip():
        raise RequestError(at, f"expected a name, got {_got(name)}")
    parts = re.split(r"[\\/]", name)
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or name.startswith(("/", "\\", "~"))):
        raise RequestError(at, f"expected a name inside the configured folders, got the absolute path {name!r}")
    if ".." in parts or "\0" in name:
        raise RequestError(at, f"expected a name inside the configured folders, got {name!r}, which leaves them")
    if any(p in ("", ".") for p in parts):
        raise RequestError(at, f"expected a name inside the configured folders (as listed), got {name!r}")
    return name


_SINGULAR = {"models": "model", "loras": "LoRA", "embeddings": "embedding",
             "controlnets": "ControlNet or T2I-Adapter"}


class Name(Field):
    """A name in one kind of :class:`~controldiff.request.Folders` (``models``, ``loras``...),
    resolved to the file or folder it names (:meth:`Folders.find`)."""

    kinds = ("string",)

    def __init__(self, kind: str):
        self.kind = kind
        self.what = f"the name of one of the {kind}"

    def schema(self):
        return {"type": "string", "description": f"a name listed by GET /controldiff/v1/{self.kind}",
                "x-controldiff-folder": self.kind}

    def convert(self, value, at, env):
        self.expect(value, at)
        name = check_name(value, at)
        path = env.folders.find(self.kind, name)
        if path is None:
            known = env.folders.names(self.kind)
            listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
            raise RequestError(at, f"no {_SINGULAR[self.kind]} named {name!r} in the configured folders "
                                   f"(available: {listed})")
        return path


class Scheduler(Field):
    """A scheduler name, ours or A1111's sampler name, as the command line takes it."""

    kinds, what = ("string",), "a scheduler name"

    def schema(self):
        from .. import cli

        return {"type": "string", "examples": list(cli.scheduler_names()),
                "description": "a scheduler name, or A1111's sampler name ('Euler a', 'DPM++ 2M Karras')"}

    def convert(self, value, at, env):
        import argparse

        from .. import cli

        self.expect(value, at)
        try:
            return cli._scheduler(value)
        except argparse.ArgumentTypeError as e:
            raise RequestError(at, str(e)) from None


@dataclass(frozen=True)
class Unsupported:
    """An annotation with no JSON form, and why."""

    reason: str


# ----------------------------------------------------------------------------- from annotations


def json_default(value):
    """A default as JSON, or ``Unsupported`` when it has no JSON form."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else Unsupported("not finite")
    if isinstance(value, (list, tuple)):
        items = [json_default(v) for v in value]
        return Unsupported("item") if any(isinstance(v, Unsupported) for v in items) else items
    if isinstance(value, collections.abc.Mapping):
        items = {str(k): json_default(v) for k, v in value.items()}
        return Unsupported("item") if any(isinstance(v, Unsupported) for v in items.values()) else items
    return Unsupported(type(value).__name__)


def field_for(tp, owner: str, name: str, overrides: Callable[[str, str], Optional[Field]], inner: bool = False):
    """The field of an annotation (``owner.name`` for ``overrides``, which knows the values that
    are not JSON by nature: images, model names), or :class:`Unsupported`. ``inner``: a part of
    the parameter's annotation (an item, a union member), which the override does not replace."""
    given = None if inner else overrides(owner, name)
    if given is not None:
        return given
    if tp is inspect.Parameter.empty or tp is Any:
        return Unsupported(f"{owner}.{name} takes values of no declared type")
    if tp is type(None):
        return Null()
    if tp in (bool, int, float, str):
        return {bool: Bool, int: Int, float: Number, str: Str}[tp]()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [field_for(a, owner, name, overrides, inner=True) for a in args]
        ok = [m for m in members if not isinstance(m, Unsupported)]
        if all(isinstance(m, Null) for m in ok) and len(ok) < len(members):   # Optional[Tensor]: only None
            return Unsupported("; ".join(m.reason for m in members if isinstance(m, Unsupported)))
        return ok[0] if len(ok) == 1 else AnyOf(ok)
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if args and origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and len(set(args)) > 1:
            return Unsupported(f"{owner}.{name}: a tuple of mixed types")
        item = field_for(args[0], owner, name, overrides, inner=True) if args else None
        if isinstance(item, Unsupported):
            return item
        return Array(item, as_tuple=tp is tuple or origin is tuple)
    if origin in (dict, collections.abc.Mapping) and len(args) == 2 and args[0] in (int, str):
        value = field_for(args[1], owner, name, overrides, inner=True)
        return value if isinstance(value, Unsupported) else Map(args[0], value)
    if dataclasses.is_dataclass(tp):
        return record_of(tp, dataclass_parameters(tp), overrides)
    return Unsupported(f"{owner}.{name} takes a {getattr(tp, '__name__', str(tp))}, which has no JSON form")


def dataclass_parameters(cls) -> list[tuple[str, Any, Any]]:
    """``(name, annotation, default)`` of a dataclass's init fields."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.init:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else inspect.Parameter.empty)
            out.append((f.name, hints.get(f.name, inspect.Parameter.empty), default))
    return out


def record_of(cls, parameters, overrides, build: Optional[Callable] = None):
    """A :class:`Record` of ``(name, annotation, default)`` parameters built into ``cls``, or
    :class:`Unsupported` when a required one has no JSON form. Optional ones without a JSON form
    are left out: giving them is refused with the reason."""
    props, required, defaults, refused = {}, [], {}, {}
    for name, tp, default in parameters:
        f = field_for(tp, cls.__name__, name, overrides)
        if isinstance(f, Unsupported):
            if default is inspect.Parameter.empty:
                return Unsupported(f"{cls.__name__}.{name}: {f.reason}")
            refused[name] = f.reason
            continue
        if default is None and "null" not in f.kinds:
            f = AnyOf([f, Null()])
        props[name] = f
        if default is inspect.Parameter.empty:
            required.append(name)
        else:
            d = json_default(default)
            if not isinstance(d, Unsupported):
                defaults[name] = d
    # the class's own docstring, else its module's (not one inherited from a base class)
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", "") or "")
    return Record(props, required, defaults, build or cls, title=cls.__name__,
                  description=doc.split("\n\n")[0].replace("\n", " ") or None, refused=refused)
