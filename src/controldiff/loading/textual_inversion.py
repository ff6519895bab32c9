"""Textual inversion embeddings: Pipeline methods.

An embedding is one or more learned token vectors. Loading adds the tokens to the
tokenizer(s) (``tok``, ``tok_1``, ... for a multi-vector embedding, as diffusers does) and
rows to the text encoders' token embeddings, and registers the prompt expansion
``tok -> "tok tok_1 ..."`` with the prompt encoder. Unloading restores the original
tokenizer state and embedding module and re-adds whatever stays loaded.
"""
from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .png_embedding import read_png_embedding
from .weights import PICKLE_EXTENSIONS, _check_file, load_state_dict

__all__ = ["SDXL_KEYS", "TextualInversionMixin", "read_embedding"]

_DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
SDXL_KEYS = ("clip_l", "clip_g")  # A1111's keys of an SDXL embedding's two encoders


def _load_nested(path: Path) -> dict:
    """A1111 ``.pt`` files nest the tensors (``string_to_param: {"*": tensor}``), which
    ``load_state_dict`` drops; still only ``torch.load(weights_only=True)``."""
    _check_file(path)
    try:  # weights_only, plus the one module class old A1111 files pickled (string_to_param)
        with torch.serialization.safe_globals([nn.ParameterDict]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: the file holds Python objects other than tensors, dicts, strings and "
                         f"numbers; only plain checkpoints are loaded (torch.load weights_only=True): "
                         f"{str(e).splitlines()[0][:200]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or truncated embedding file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, the file holds a {type(obj).__name__}")
    return obj


def _as_matrix(t, where: str, key: str) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim not in (1, 2) or not t.is_floating_point():
        raise ValueError(f"{where}: {key!r} is not an embedding (expected a float tensor of shape (n, width))")
    return t.detach().reshape(-1, t.shape[-1]).float()


def read_embedding(source, token: Optional[str] = None) -> tuple[str, dict[str, Tensor], str]:
    """``(token, {encoder key: (n, width) tensor}, where)`` from a file, folder, tensor or dict.

    Encoder keys: ``"*"`` for SD1/SD2 embeddings, ``"clip_l"``/``"clip_g"`` for SDXL.
    Formats: diffusers ``{token: tensor}``, A1111 ``string_to_param`` / ``emb_params``
    (token from ``token`` or the file name, as A1111 does; also as an A1111 embedding PNG,
    ``loading/png_embedding.py``), SDXL ``clip_l``/``clip_g``.
    """
    stem = None
    if isinstance(source, Tensor):
        if token is None:
            raise ValueError("token: an embedding passed as a tensor needs token=...")
        return token, {"*": _as_matrix(source, "embedding tensor", token)}, "embedding tensor"
    if isinstance(source, dict):
        data, where = source, "embedding dict"
    else:
        path = Path(source)
        if path.is_dir():
            found = [path / n for n in _DIFFUSERS_NAMES if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no {' or '.join(_DIFFUSERS_NAMES)} in this folder")
            path = found[0]
        where, stem = str(path), path.stem
        suffix = path.suffix.lower()
        if suffix == ".png":
            if not path.is_file():
                raise FileNotFoundError(f"{path}: embedding image not found")
            data = read_png_embedding(path)
            stem = str(data.get("name") or stem)  # A1111 names a PNG embedding by its data, a file by its name
        else:
            data = _load_nested(path) if suffix in PICKLE_EXTENSIONS else load_state_dict(path)

    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if isinstance(params, nn.ParameterDict):  # A1111 files before 2023
            params = dict(params.items())
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{where}: 'string_to_param' should hold exactly one tensor")
        return token or stem or str(data.get("name")), {"*": _as_matrix(next(iter(params.values())), where,
                                                                          "string_to_param")}, where
    if any(k in data for k in SDXL_KEYS):
        missing = [k for k in SDXL_KEYS if k not in data]
        if missing:
            raise ValueError(f"{where}: SDXL embedding without {missing[0]!r}")
        if token is None and stem is None:
            raise ValueError("token: an SDXL embedding dict needs token=...")
        return token or stem, {k: _as_matrix(data[k], where, k) for k in SDXL_KEYS}, where
    for key in ("emb_params", "string_to_param.*"):
        if key in data:
            return token or stem, {"*": _as_matrix(data[key], where, key)}, where
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(tensors) == 1:  # diffusers learned_embeds: {token: tensor}
        key, value = next(iter(tensors.items()))
        return token or key, {"*": _as_matrix(value, where, key)}, where
    raise ValueError(f"{where}: not a textual inversion embedding: expected one tensor, 'string_to_param', "
                     f"'emb_params' or 'clip_l'/'clip_g'; found keys {list(data)[:6]}")


class TextualInversionMixin:
    """Mixed into :class:`controldiff.Pipeline`: load_textual_inversion, unload_textual_inversion."""

    @property
    def textual_inversions(self) -> dict[str, list[str]]:
        """Loaded embeddings: main token -> all its tokens."""
        return {t: e["tokens"] for t, e in self._ti_state()["loaded"].items()}

    def _ti_state(self) -> dict:
        state = self.__dict__.get("_ti")
        if state is None:
            state = {"loaded": {}, "originals": [(copy.deepcopy(tok), enc.get_input_embeddings())
                                                 for tok, enc in zip(self.tokenizers, self.text_encoders)]}
            self.__dict__["_ti"] = state
        return state

    def _ti_encoder_keys(self) -> list[str]:
        if self.info.family == "sdxl":
            return list(SDXL_KEYS)[-len(self.text_encoders):]
        return ["*"]

    def load_textual_inversion(self, path_or_tensor, token: Union[str, list, None] = None) -> list[str]:
        """Load one embedding (or a list of them, with a list of tokens); return the tokens added."""
        sources = path_or_tensor if isinstance(path_or_tensor, (list, tuple)) else [path_or_tensor]
        tokens = token if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise ValueError(f"token: got {len(tokens)} tokens for {len(sources)} embeddings")
        keys = self._ti_encoder_keys()
        planned: dict[str, dict] = {}
        for source, tok in zip(sources, tokens):
            tok, vectors, where = read_embedding(source, tok)
            if not tok:
                raise ValueError(f"{where}: no token name in the file: pass token=...")
            if set(vectors) != set(keys):
                if "*" in vectors:
                    raise ValueError(f"{where}: an SD1/SD2 embedding (one encoder); this {self.info.family} model "
                                     f"needs one per encoder: {' and '.join(keys)}")
                raise ValueError(f"{where}: an SDXL embedding (clip_l/clip_g); this model is {self.info.family}, "
                                 "with one text encoder")
            counts = {v.shape[0] for v in vectors.values()}
            if len(counts) > 1:
                raise ValueError(f"{where}: the encoders' embeddings have different vector counts {sorted(counts)}")
            n = counts.pop()
            names = [tok] + [f"{tok}_{i}" for i in range(1, n)]
            for i, (k, encoder) in enumerate(zip(keys, self.text_encoders)):
                width = encoder.get_input_embeddings().weight.shape[1]
                if vectors[k].shape[1] != width:
                    what = "" if k == "*" else f" {k!r}"
                    raise ValueError(f"{where}: embedding{what} has width {vectors[k].shape[1]}, text encoder "
                                     f"{i + 1} expects {width}; the embedding is for another model family")
            for t in names[:2]:
                if t in planned or any(t in tz.get_vocab() for tz in self.tokenizers):
                    raise ValueError(f"token: {t!r} is already in the tokenizer vocabulary; choose another token "
                                     f"name or unload it first")
            planned[tok] = {"tokens": names, "vectors": [vectors[k] for k in keys]}
        state = self._ti_state()
        for tok, entry in planned.items():
            self._ti_add(entry)
            state["loaded"][tok] = entry
        return [t for e in planned.values() for t in e["tokens"]]

    @torch.no_grad()
    def _ti_add(self, entry: dict) -> None:
        names = entry["tokens"]
        for tokenizer, encoder, vectors in zip(self.tokenizers, self.text_encoders, entry["vectors"]):
            for t in names:
                tokenizer.add_tokens(t)
            ids = tokenizer.convert_tokens_to_ids(names)
            old = encoder.get_input_embeddings()
            rows = max(old.weight.shape[0], max(ids) + 1)
            new = nn.Embedding(rows, old.weight.shape[1], device=old.weight.device, dtype=old.weight.dtype)
            new.requires_grad_(False)
            new.weight[: old.weight.shape[0]] = old.weight
            new.weight[ids] = vectors.to(new.weight.device, new.weight.dtype)
            encoder.set_input_embeddings(new)
        if len(names) > 1:
            self.prompt_encoder.expansions[names[0]] = " ".join(names)

    def unload_textual_inversion(self, token: Union[str, list, None] = None) -> None:
        """Remove one, several (list) or all loaded embeddings; the rest stay loaded."""
        state = self._ti_state()
        loaded = state["loaded"]
        drop = list(loaded) if token is None else ([token] if isinstance(token, str) else list(token))
        for t in drop:
            if t not in loaded:
                raise ValueError(f"token: {t!r} is not a loaded textual inversion token (loaded: {sorted(loaded)})")
        for t in drop:
            del loaded[t]
            self.prompt_encoder.expansions.pop(t, None)
        for tokenizer, encoder, (pristine, embedding) in zip(self.tokenizers, self.text_encoders, state["originals"]):
            tokenizer.__dict__.clear()
            tokenizer.__dict__.update(copy.deepcopy(pristine).__dict__)
            encoder.set_input_embeddings(embedding)
        for entry in loaded.values():
            self._ti_add(entry)
