"""Reading weight files safely and loading them into modules.

* ``load_state_dict(path)``: ``.safetensors`` through safetensors; ``.bin/.pt/.pth/.ckpt``
  only through ``torch.load(weights_only=True)`` (never arbitrary unpickling). Git-lfs
  pointers, truncated files, empty files and unsafe pickles are refused with an error
  naming the file (and the tensor where there is one).
* ``find_weights(folder, stem, variant)``: the diffusers / transformers file naming,
  safetensors first, sharded indexes, ``.bin`` last.
* ``load_model(build, files)``: build on the ``meta`` device (no random init of a
  multi-GB model), load with ``assign=True``, check missing / unexpected keys and
  shapes, re-materialise non-persistent buffers, cast, move, eval, no grad.
"""
from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "SAFETENSORS_EXTENSIONS",
    "PICKLE_EXTENSIONS",
    "WEIGHT_EXTENSIONS",
    "load_state_dict",
    "read_safetensors_header",
    "meta_state_dict",
    "find_weights",
    "load_model",
    "align_prefix",
]

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS

_LFS_MAGIC = b"version https://git-lfs"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header size


# ----------------------------------------------------------------------------- reading


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.is_dir():
        raise ValueError(
            f"{path}: is a directory, not a weights file (load a diffusers model folder with "
            "controldiff.loading.load_components)"
        )
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_EXTENSIONS:
        raise ValueError(
            f"{path}: unknown weights file extension {suffix or '(none)'!r}; accepted: "
            + ", ".join(WEIGHT_EXTENSIONS)
        )
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); the download or copy is incomplete")
    with open(path, "rb") as f:
        head = f.read(len(_LFS_MAGIC))
    if head == _LFS_MAGIC:
        raise ValueError(
            f"{path}: is a git-lfs pointer file ({size} bytes), not the weights themselves; "
            "fetch the real weights (run `git lfs pull` in the repository, or download the file directly)"
        )


#: bytes per element of the safetensors dtypes, and the torch dtype of each
_SAFETENSORS_DTYPES = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U8": (1, torch.uint8), "BOOL": (1, torch.bool),
    "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
}


def _entry(path: Path, name: str, info) -> tuple[int, int]:
    """The data offsets of one header entry, checked against its dtype and shape."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: corrupt safetensors header: the entry of tensor {name!r} {what}")

    if not isinstance(info, dict):
        raise bad(f"is a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"has no 'dtype' (got {dtype!r})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has no valid 'shape' (a list of sizes >= 0; got {shape!r})")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has no valid 'data_offsets' ([start, end]; got {offsets!r})")
    size = _SAFETENSORS_DTYPES.get(dtype, (None,))[0]
    if size is not None and offsets[1] - offsets[0] != size * math.prod(shape):
        raise bad(f"says {dtype} {shape} ({size * math.prod(shape)} bytes) but its data_offsets span "
                  f"{offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1]


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, from its
    header alone (no tensor is read), after checking the file like :func:`load_state_dict`
    does: empty files, git-lfs pointers, a cut or corrupt header, entries without a dtype
    or shape, and data missing at the end of the file raise a ``ValueError`` naming the file
    (and the first tensor whose bytes are missing). ``__metadata__`` is left out."""
    path = Path(path)
    _check_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(
                f"{path}: truncated safetensors file: only {size} bytes, not even the 8-byte header length"
            )
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
        raw = f.read(n)
    if len(raw) < n:
        # The header itself is cut: name the tensors whose entries are missing if we can tell.
        names = re.findall(rb'"((?:[^"\\]|\\.)*)"\s*:\s*\{\s*"dtype"', raw)
        last = names[-1].decode("utf-8", "replace") if names else None
        where = f"; the header is cut after the entry of tensor {last!r}" if last else ""
        raise ValueError(
            f"{path}: truncated safetensors file: the header promises {n} bytes but the file has only "
            f"{size - 8} after the length field{where}; every tensor's data is missing (re-download the file)"
        )
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    available = size - 8 - n
    entries = sorted((*_entry(path, name, info), name) for name, info in header.items())
    for start, end, name in entries:
        if end > available:
            raise ValueError(
                f"{path}: truncated safetensors file: data of tensor {name!r} (bytes {start}..{end} of the "
                f"data section) is missing: the file holds only {available} data bytes "
                f"({size} bytes in all); re-download the file"
            )
    return header


def meta_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A safetensors file's tensors on the ``meta`` device: names, shapes and dtypes from the
    header alone, for what only needs those (detecting a checkpoint's layout, counting
    parameters) without reading gigabytes."""
    path = Path(path)
    out = {}
    for name, info in read_safetensors_header(path).items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which this torch cannot hold")
        out[name] = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]][1], device="meta")
    return out


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: could not read the safetensors file: {e}") from None


def _load_pickle(path: Path) -> dict[str, Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only" in msg.lower() or "weights_only" in msg.lower() or "global" in msg.lower():
            m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", msg, re.S)
            detail = " ".join((m.group(1) if m else "").split())[:300]
            raise ValueError(
                f"{path}: refused: the file contains objects other than tensors (Python objects or pickle "
                "instructions that a plain tensor checkpoint does not need, and that could run code when "
                "unpickled); only plain tensor checkpoints are loaded (torch.load with weights_only=True). "
                "Convert it to .safetensors with a tool you trust"
                + (f" (unpickler: {detail})" if detail else "")
            ) from None
        raise ValueError(f"{path}: corrupt or truncated checkpoint: {msg[:300]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / original SD .ckpt layout
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, the checkpoint holds a {type(obj).__name__}")
    out = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not out and obj:
        raise ValueError(f"{path}: the checkpoint holds no tensors at its top level (keys: {list(obj)[:5]})")
    return out


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read one weights file into a ``{name: tensor}`` dict on the CPU, safely."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_EXTENSIONS:
        return _load_safetensors(path)
    _check_file(path)
    return _load_pickle(path)


# ----------------------------------------------------------------------------- finding


def _add_variant(name: str, variant: str | None) -> str:
    """diffusers/transformers naming: ``model.safetensors`` -> ``model.fp16.safetensors``,
    ``model.safetensors.index.json`` -> ``model.safetensors.index.fp16.json``."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def _candidates(stem: str, bin_stem: str, variant: str | None) -> list[str]:
    names = [
        f"{stem}.safetensors",
        f"{stem}.safetensors.index.json",
        f"{bin_stem}.bin",
        f"{bin_stem}.bin.index.json",
    ]
    out = [_add_variant(n, variant) for n in names] if variant else []
    return out + names


def _shards(index: Path) -> list[Path]:
    from ..models.config import read_json

    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: sharded index without a 'weight_map'")
    files: list[str] = []
    for f in weight_map.values():
        if f not in files:
            files.append(f)
    out = []
    for f in files:
        p = index.parent / f
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard listed in {index} not found")
        out.append(p)
    return out


def find_weights(folder: str | Path, stem: str = "diffusion_pytorch_model", variant: str | None = None,
                 bin_stem: str | None = None) -> list[Path]:
    """The weight file(s) of one component folder, in diffusers/transformers naming.

    ``stem`` is ``diffusion_pytorch_model`` for diffusers components, ``model`` for
    transformers ones (whose ``.bin`` files are ``pytorch_model.bin``). Order: with a
    variant, ``{stem}.{variant}.safetensors``, its sharded index, the variant ``.bin`` (and
    index) first; then the same without the variant. A sharded index returns its shards.
    """
    folder = Path(folder)
    if bin_stem is None:
        bin_stem = "pytorch_model" if stem == "model" else stem
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: component folder not found")
    names = _candidates(stem, bin_stem, variant)
    for name in names:
        p = folder / name
        if p.is_file():
            return _shards(p) if name.endswith(".index.json") or name.endswith(".json") else [p]
    raise FileNotFoundError(f"{folder}: no weights found; looked for " + ", ".join(names))


# ----------------------------------------------------------------------------- building


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Parameters are created on ``meta``, buffers on the CPU (so computed buffers are real)."""
    old = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        old(module, name, param)
        if param is not None and param.device.type != "meta":
            moved = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            module._parameters[name] = moved

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = old  # type: ignore[method-assign]


def _meta_tensors(module: nn.Module) -> list[str]:
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p.is_meta]
    names += [n for n, b in module.named_buffers(remove_duplicate=False) if b is not None and b.is_meta]
    return names


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    m = module
    for p in path:
        m = getattr(m, p)
    if leaf in m._buffers:
        m._buffers[leaf] = value
    else:
        raise KeyError(name)


def _materialise_buffers(model: nn.Module, build: Callable[[], nn.Module], names: list[str]) -> None:
    """Fill buffers still on ``meta`` (non-persistent ones, absent from every file) from a copy
    built with real buffers; params of that copy stay on meta, so it costs almost nothing."""
    with _params_on_meta():
        ref = build()
    ref_buffers = dict(ref.named_buffers(remove_duplicate=False))
    if any(ref_buffers.get(n) is None or ref_buffers[n].is_meta for n in names):
        ref = build()  # a buffer computed from parameters: build normally (rare)
        ref_buffers = dict(ref.named_buffers(remove_duplicate=False))
    for n in names:
        b = ref_buffers.get(n)
        if b is None or b.is_meta:
            raise ValueError(f"{type(model).__name__}: tensor {n!r} is not in the weights and could not be built")
        _set_tensor(model, n, b.detach().clone())


def align_prefix(state: dict[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """Add or strip one leading name component (e.g. ``text_model.``) when that makes the
    file's keys match the model's; otherwise return ``state`` unchanged.

    transformers 5's ``CLIPTextModel`` has no ``text_model.`` level while checkpoints saved
    by transformers 4 (every diffusers model folder) do, and the other way round.
    """
    expected = set(expected)
    keys = set(state)
    best, best_score = state, len(keys & expected)
    if best_score == len(expected):
        return state
    prefixes = {k.split(".", 1)[0] + "." for k in keys if "." in k} | {
        k.split(".", 1)[0] + "." for k in expected if "." in k
    }
    for p in prefixes:
        stripped = {(k[len(p):] if k.startswith(p) else k): v for k, v in state.items()}
        added = {(p + k if not k.startswith(p) else k): v for k, v in state.items()}
        for cand in (stripped, added):
            if len(cand) != len(state):
                continue
            score = len(set(cand) & expected)
            if score > best_score:
                best, best_score = cand, score
    return best


def _files_str(files: Sequence[Path]) -> str:
    return str(files[0]) if len(files) == 1 else "[" + ", ".join(str(f) for f in files) + "]"


def load_model(
    build: Callable[[], nn.Module],
    files: str | Path | Sequence[str | Path],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    ignore_unexpected: Sequence[str] = (),
    rename: Callable[[dict[str, Tensor], set[str]], dict[str, Tensor]] | None = None,
) -> nn.Module:
    """Build ``build()`` on the meta device and load ``files`` into it (``assign=True``).

    Every key of the module's ``state_dict`` must be in the files with the same shape, and
    every key of the files must be in the module except those matching a regex of
    ``ignore_unexpected`` (``re.search``); otherwise a ``ValueError`` names the file and the
    tensor. ``rename(state, expected_keys)`` may rewrite the file's keys first (e.g.
    :func:`align_prefix`). Floating tensors are cast to ``dtype`` (default: the dtype the
    module was built with); the module is moved to ``device``, in eval mode, without grads.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("load_model: no weight files given")

    with torch.device("meta"):
        model = build()
    expected = model.state_dict(keep_vars=True)

    state: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        part = load_state_dict(f)
        for k, v in part.items():
            if k in state:
                raise ValueError(f"{f}: tensor {k!r} is also in {origin[k]}")
            state[k] = v
            origin[k] = f
    if rename is not None:
        before = {id(v): origin[k] for k, v in state.items()}
        state = rename(state, set(expected))
        origin = {k: before.get(id(v), files[0]) for k, v in state.items()}
    where = _files_str(files)

    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{where}: missing tensor {missing[0]!r}{more} needed by {type(model).__name__}; "
            "the file does not match this model's config"
        )
    patterns = [re.compile(p) for p in ignore_unexpected]
    unexpected = [k for k in state if k not in expected and not any(p.search(k) for p in patterns)]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(
            f"{origin[unexpected[0]]}: unexpected tensor {unexpected[0]!r}{more}: not a tensor of "
            f"{type(model).__name__}; the file does not match this model's config"
        )

    loaded: dict[str, Tensor] = {}
    for k, ref in expected.items():
        v = state[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(
                f"{origin[k]}: tensor {k!r} has shape {tuple(v.shape)} in the file but the model "
                f"expects {tuple(ref.shape)}; the file does not match this model's config"
            )
        if v.is_floating_point():
            target = dtype if dtype is not None else (ref.dtype if ref.is_floating_point() else v.dtype)
            if v.dtype != target:
                v = v.to(target)
        elif ref.is_floating_point():
            raise ValueError(f"{origin[k]}: tensor {k!r} is {v.dtype} in the file, the model expects {ref.dtype}")
        loaded[k] = v
    del state
    model.load_state_dict(loaded, strict=True, assign=True)

    leftover = _meta_tensors(model)
    if leftover:
        params = [n for n in leftover if n in dict(model.named_parameters(remove_duplicate=False))]
        if params:  # a parameter outside state_dict (should not happen): refuse rather than run garbage
            raise ValueError(f"{where}: parameter {params[0]!r} of {type(model).__name__} was not loaded")
        _materialise_buffers(model, build, leftover)
        if dtype is not None:
            for n, b in list(model.named_buffers()):
                if b.is_floating_point() and b.dtype != dtype:
                    _set_tensor(model, n, b.to(dtype))

    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model
