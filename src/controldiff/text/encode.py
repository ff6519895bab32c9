"""Prompt encoding with the CLIP text encoders, as the reference pipelines do it.

SD1/SD2: the last hidden state of one encoder. SDXL: the penultimate hidden states of
both encoders side by side, plus the second encoder's pooled projection. On top:
weighting syntaxes (``weighting.py``, ``emphasis.py``) and long prompts in chunks
(``chunks.py``); a plain prompt of at most 75 tokens gives exactly the diffusers encoding.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import emphasis
from .chunks import Chunks, build_chunks, describe, empty_chunk, token_ids
from .tokens import NO_TOKEN, prompt_token_ids
from .weighting import SYNTAXES, Blend, Fragment, parse


def check_text(value: str, name: str) -> str:
    """``value`` if it is text the tokenizer can read (encodable as UTF-8: no lone surrogates
    from a wrongly decoded file or argv), else a ValueError naming ``name``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])  # 0xDC80..0xDCFF: a byte Python's argv/filesystem decoding could not read
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"an unpaired surrogate {value[e.start]!r}"
        raise ValueError(f"{name}: not valid UTF-8 text ({what} at character {e.start}); pass or decode the text "
                         f"in UTF-8 (check the terminal's, the script's or the file's encoding): {value!r}") from None
    return value


def as_list(value, name: str) -> list[str]:
    """A prompt argument as a list of strings, or a ValueError naming the argument."""
    if isinstance(value, str):
        return [check_text(value, name)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [check_text(v, name) for v in value]
    raise ValueError(f"{name}: expected a string or a non-empty list of strings, got {value!r}")


def spread(values: Optional[list[str]], batch: int, name: str) -> Optional[list[str]]:
    """One prompt applies to every prompt of the batch; otherwise the counts must match."""
    if values is None:
        return None
    if len(values) == 1 and batch > 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"{name}: got {len(values)} prompts for {batch} prompts")
    return values


class Lazy:
    """A tensor computed on first use. The empty-chunk encoding (one more text encoder pass)
    is only needed to pad prompts of different lengths or for compel weights."""

    def __init__(self, fn):
        self._fn, self._value = fn, None

    def get(self) -> torch.Tensor:
        if self._value is None:
            with torch.no_grad():
                self._value = self._fn()
        return self._value


def _resolve(empty):
    return empty.get() if isinstance(empty, Lazy) else empty


@dataclass
class TextCond:
    """Text conditioning for a batch: token embeddings and, for SDXL, pooled embeddings.

    ``embeds`` is (batch, chunks * L, D): long prompts have several chunks of the encoder's
    window L. ``empty`` (1, L, D) is the encoding of an empty chunk (all encoders side by
    side): conds with fewer chunks are padded with it to share a batch (``pad_to``, ``cat``).
    ``ids`` (batch, chunks * L), when known, is the (first) tokenizer's id of the prompt token
    at each position, ``NO_TOKEN`` at BOS, EOS and padding (see ``text/tokens.py``).
    """

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    empty_chunk: Optional[Union[torch.Tensor, Lazy]] = None
    ids: Optional[torch.Tensor] = None

    @property
    def empty(self) -> Optional[torch.Tensor]:
        """The empty-chunk encoding (computed now if it was deferred)."""
        return _resolve(self.empty_chunk)

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def to(self, device=None, dtype=None) -> "TextCond":
        move = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
        empty = None if self.empty_chunk is None else Lazy(lambda: move(self.empty))
        return TextCond(move(self.embeds), move(self.pooled), empty, self.ids)

    def pad_to(self, length: int) -> "TextCond":
        """The same conditioning padded with empty chunks to ``length`` tokens."""
        if length == self.length:
            return self
        empty = self.empty
        if empty is None or length < self.length or (length - self.length) % empty.shape[1]:
            chunk = None if empty is None else empty.shape[1]
            raise ValueError(f"prompt embeddings: cannot pad {self.length} tokens to {length} "
                             f"(empty chunk of {chunk} tokens)")
        n = (length - self.length) // empty.shape[1]
        pad = empty.to(self.embeds.device, self.embeds.dtype).repeat(self.embeds.shape[0], n, 1)
        ids = None if self.ids is None else F.pad(self.ids, (0, length - self.length), value=NO_TOKEN)
        return TextCond(torch.cat([self.embeds, pad], dim=1), self.pooled, self.empty_chunk, ids)

    def repeat(self, n: int) -> "TextCond":
        """Each prompt repeated n times in a row (num_images_per_prompt)."""
        if n == 1:
            return self
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0)
        ids = None if self.ids is None else self.ids.repeat_interleave(n, dim=0)
        return TextCond(self.embeds.repeat_interleave(n, dim=0), pooled, self.empty_chunk, ids)

    def select(self, rows: Sequence[int]) -> "TextCond":
        """These rows of the batch, in this order (rows may repeat)."""
        index = torch.tensor(list(rows), device=self.embeds.device)
        pick = (lambda t: None if t is None else t[index.to(t.device)])
        return TextCond(pick(self.embeds), pick(self.pooled), self.empty_chunk, pick(self.ids))

    def tile(self, n: int) -> "TextCond":
        """The whole batch repeated n times (views, concept rows), ``empty`` kept for padding."""
        if n == 1:
            return self
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        ids = None if self.ids is None else self.ids.repeat(n, 1)
        return TextCond(self.embeds.repeat(n, 1, 1), pooled, self.empty_chunk, ids)

    def zeros_like(self) -> "TextCond":
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        empty = None if self.empty_chunk is None else Lazy(lambda: torch.zeros_like(self.empty))
        return TextCond(torch.zeros_like(self.embeds), pooled, empty)

    @staticmethod
    def cat(conds: Sequence["TextCond"]) -> "TextCond":
        """One batch of several conds; those with fewer chunks are padded with their empty chunk."""
        length = max(c.length for c in conds)
        conds = [c.pad_to(length) for c in conds]
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        empty = next((c.empty_chunk for c in conds if c.empty_chunk is not None), None)
        ids = None if any(c.ids is None for c in conds) else torch.cat([c.ids for c in conds])
        return TextCond(torch.cat([c.embeds for c in conds]), pooled, empty, ids)


def pad_same(conds: Sequence[TextCond]) -> list[TextCond]:
    """Conds padded to the same number of chunks (prompt and negative prompt)."""
    length = max(c.length for c in conds)
    return [c.pad_to(length) for c in conds]


class PromptEncoder:
    """Turns prompts into TextCond with the model's tokenizers and encoders.

    ``syntax``: "a1111" (default), "compel" or "none" (plain text, as diffusers); see
    ``text/weighting.py``. Prompts longer than the encoder's window are encoded in chunks
    (``text/chunks.py``; with the a1111 syntax a chunk full within ``comma_backtrack`` = 20
    tokens of a comma ends after the comma, as A1111); ``truncate=True`` keeps only the first chunk, with a warning,
    as diffusers does. SDXL: the penultimate hidden states of every encoder side by side
    and the last encoder's pooled output of the first chunk (unweighted, as A1111);
    ``clip_skip`` skips that many more final layers, as diffusers does.
    """

    def __init__(self, tokenizers, text_encoders, sdxl: bool, syntax: str = "a1111", truncate: bool = False):
        if len(tokenizers) != len(text_encoders):
            raise ValueError("PromptEncoder: need one tokenizer per text encoder")
        # an SDXL refiner's folder has no first encoder (None in its slot): it reads prompt_2 alone
        present = [(t, e) for t, e in zip(tokenizers, text_encoders) if e is not None]
        if not present or any(t is None for t, _ in present):
            raise ValueError("PromptEncoder: need at least one text encoder, each with its tokenizer")
        self.tokenizers = [t for t, _ in present]
        self.text_encoders = [e for _, e in present]
        self.sdxl = sdxl
        self.syntax = syntax
        self.truncate = bool(truncate)
        # A1111's comma_padding_backtrack (its default): a chunk full near a comma ends after it
        self.comma_backtrack = 20
        # word -> replacement applied to the text of every fragment before tokenising (textual
        # inversion's multi-vector tokens "tok" -> "tok tok_1 tok_2", as diffusers' maybe_convert_prompt)
        self.expansions: dict[str, str] = {}

    @property
    def syntax(self) -> str:
        return self._syntax

    @syntax.setter
    def syntax(self, value: str) -> None:
        if value not in SYNTAXES:
            raise ValueError(f"syntax: expected one of {SYNTAXES}, got {value!r}")
        self._syntax = value

    def check(self, prompts, name: str = "prompt") -> None:
        """Parse ``prompts`` with the current syntax (no model runs): malformed syntax, weights
        that are not finite or out of range, and non-UTF-8 text raise a ValueError naming ``name``."""
        if prompts is None:
            return
        for p in as_list(prompts, name):
            parse(p, self.syntax, name)

    def expand(self, prompt: str) -> str:
        for word, replacement in self.expansions.items():
            prompt = prompt.replace(word, replacement)
        return prompt

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[-1].parameters()).device

    @torch.no_grad()
    def encode_pair(self, prompts, negative=None, prompts_2=None, negative_2=None, *, guided: bool = True,
                    zero_negative: bool = False, clip_skip: Optional[int] = None) -> dict:
        """{"cond": ..., "uncond": ...} for a batch of prompts and their negative prompts,
        padded to the same number of chunks.

        ``zero_negative``: the unconditional embedding is zeros (SDXL with no negative prompt).
        Like diffusers, the negative prompt is encoded without clip_skip.
        """
        prompts = as_list(prompts, "prompt")
        batch = len(prompts)
        prompts_2 = spread(None if prompts_2 is None else as_list(prompts_2, "prompt_2"), batch, "prompt_2")
        cond = self.encode(prompts, prompts_2, clip_skip=clip_skip)
        if not guided:
            return {"cond": cond}
        if zero_negative:
            return {"cond": cond, "uncond": cond.zeros_like()}
        negative = spread([""] if negative is None else as_list(negative, "negative_prompt"), batch, "negative_prompt")
        negative_2 = spread(None if negative_2 is None else as_list(negative_2, "negative_prompt_2"), batch,
                             "negative_prompt_2")
        if self.sdxl and negative_2 is None:
            negative_2 = negative
        cond, uncond = pad_same([cond, self.encode(negative, negative_2)])
        return {"cond": cond, "uncond": uncond}

    @torch.no_grad()
    def encode(self, prompts: list[str], prompts_2: Optional[list[str]] = None,
               clip_skip: Optional[int] = None) -> TextCond:
        prompts = as_list(prompts, "prompt")
        if self.sdxl:
            prompts_2 = prompts if prompts_2 is None else as_list(prompts_2, "prompt_2")
            if len(prompts_2) != len(prompts):
                raise ValueError(f"prompt_2: got {len(prompts_2)} prompts for {len(prompts)} prompts")
            # A refiner has only the second encoder: it gets prompt_2 alone, as in diffusers.
            texts = [prompts, prompts_2][-len(self.text_encoders):]
        else:
            texts = [prompts]
        parts = [self._encode_with(i, text, clip_skip) for i, text in enumerate(texts)]
        length = max(p.length for p in parts)
        parts = [p.pad_to(length) for p in parts]
        embeds = torch.cat([p.embeds for p in parts], dim=-1)
        empty = Lazy(lambda: torch.cat([p.empty.to(embeds.device) for p in parts], dim=-1))
        pooled = parts[-1].pooled if self.sdxl else None
        if self.sdxl and pooled is None:
            raise ValueError("text_encoder_2: an SDXL model needs a CLIPTextModelWithProjection as its last encoder")
        return TextCond(embeds, pooled, empty, parts[0].ids)

    def token_ids(self, text: str) -> list[int]:
        """The first tokenizer's ids of ``text`` (no BOS/EOS), as prompts are tokenised
        (textual-inversion tokens expanded): what ``TextCond.ids`` holds for it."""
        return token_ids(self.tokenizers[0], [self.expand(text)])[0]

    # ------------------------------------------------------------------ one encoder
    def _layer(self, index: int, clip_skip: Optional[int]) -> tuple[Optional[int], bool]:
        """(hidden_states index or None for the last hidden state, apply final_layer_norm)."""
        if clip_skip is not None:
            layers = self.text_encoders[index].config.num_hidden_layers
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0 \
                    or clip_skip + (2 if self.sdxl else 1) > layers + 1:
                raise ValueError(f"clip_skip: expected an integer from 0 to {layers - (1 if self.sdxl else 0)} "
                                 f"for this {layers}-layer text encoder, got {clip_skip!r}")
        if self.sdxl:
            return (-2 if clip_skip is None else -(clip_skip + 2)), False
        return (None, False) if clip_skip is None else (-(clip_skip + 1), True)

    def _run(self, index: int, ids: torch.Tensor, mask: Optional[torch.Tensor], layer) -> tuple:
        """Hidden states (N, L, D) and pooled output (N, P) or None of encoder ``index``."""
        encoder = self.text_encoders[index]
        device = next(encoder.parameters()).device
        mask = None if mask is None else mask.to(device)
        hidden_index, norm = layer
        if hidden_index is None:
            out = encoder(ids.to(device), attention_mask=mask)
            z = out[0]
        else:
            out = encoder(ids.to(device), attention_mask=mask, output_hidden_states=True)
            z = out.hidden_states[hidden_index]
            if norm:
                # transformers 5's CLIPTextModel holds final_layer_norm itself; 4.x under .text_model
                z = getattr(encoder, "text_model", encoder).final_layer_norm(z)
        pooled = out[0] if out[0].ndim == 2 else None
        return z, pooled

    def _uses_mask(self, index: int) -> bool:
        return not self.sdxl and bool(getattr(self.text_encoders[index].config, "use_attention_mask", False))

    def _chunks(self, tokenizer, fragments) -> Chunks:
        backtrack = self.comma_backtrack if self.syntax == "a1111" else 0
        chunks = build_chunks(tokenizer, fragments, self.expand, backtrack)
        if self.truncate and chunks.count > 1:
            dropped = " ".join(describe(tokenizer, chunks)[1:]).strip()
            if dropped:
                warnings.warn(f"prompt: longer than the text encoder's {tokenizer.model_max_length}-token window; "
                              f"this part was dropped (truncate=True): {dropped!r}", stacklevel=5)
            n = tokenizer.model_max_length
            chunks = Chunks(chunks.ids[:1], chunks.weights[:1], chunks.mask[:1],
                            [[p for p in span if p < n] for span in chunks.spans])
        return chunks

    def _encode_with(self, index: int, prompts: list[str], clip_skip: Optional[int]) -> TextCond:
        """One encoder: every prompt parsed, chunked, encoded in one batch, weighted, padded."""
        tokenizer = self.tokenizers[index]
        limit = getattr(self.text_encoders[index].config, "max_position_embeddings", None)
        if limit is not None and tokenizer.model_max_length > limit:
            raise ValueError(f"tokenizer: model_max_length {tokenizer.model_max_length} exceeds the text encoder's "
                             f"{limit} positions")
        layer = self._layer(index, clip_skip)
        use_mask = self._uses_mask(index)
        parsed = [parse(p, self.syntax) for p in prompts]
        flats: list[list[Fragment]] = []
        for conj in parsed:
            for operand in conj.prompts:
                flats.extend(operand.prompts if isinstance(operand, Blend) else [operand])
        chunks = [self._chunks(tokenizer, f) for f in flats]

        blank = empty_chunk(tokenizer)
        lazy_empty = Lazy(lambda: self._run(index, blank.ids, blank.mask if use_mask else None, layer)[0])
        ids = torch.cat([c.ids for c in chunks])
        mask = torch.cat([c.mask for c in chunks]) if use_mask else None
        z_all, pooled_all = self._run(index, ids, mask, layer)

        encoded: list[TextCond] = []  # per flat prompt: (1, k * L, D) with its ids
        firsts: list[Optional[torch.Tensor]] = []  # pooled output of its first chunk
        start = 0
        for flat, c in zip(flats, chunks):
            z = z_all[start:start + c.count]
            firsts.append(None if pooled_all is None else pooled_all[start:start + 1])
            start += c.count
            if self.syntax == "a1111":
                z = emphasis.a1111(z, c.weights)
            elif self.syntax == "compel":
                z = self._compel_weights(index, layer, flat, c, z, lazy_empty.get())
            encoded.append(TextCond(z.reshape(1, -1, z.shape[-1]), None, lazy_empty, prompt_token_ids(c.ids, c.spans)))

        rows, pooled_rows, i = [], [], 0
        for conj in parsed:
            parts = []
            for operand, weight in zip(conj.prompts, conj.weights):
                if isinstance(operand, Blend):  # a blend's tokens are its first prompt's
                    blended = pad_same(encoded[i:i + len(operand.prompts)])
                    first = firsts[i]
                    i += len(operand.prompts)
                    embeds = emphasis.weighted_sum([b.embeds for b in blended], operand.weights, operand.normalize)
                    part = TextCond(embeds, None, lazy_empty, blended[0].ids)
                else:
                    part, first = encoded[i], firsts[i]
                    i += 1
                if not parts:
                    pooled_rows.append(first)
                if weight != 1:  # compel .and() weights: lerp from the empty prompt
                    empty = lazy_empty.get()[:1]
                    blank_cond = TextCond(empty, None, empty).pad_to(part.length).embeds
                    part = TextCond(blank_cond + (part.embeds - blank_cond) * weight, None, lazy_empty, part.ids)
                parts.append(part)
            rows.append(TextCond(torch.cat([q.embeds for q in parts], dim=1), None, lazy_empty,
                                 torch.cat([q.ids for q in parts], dim=1)))
        cond = TextCond.cat(rows)
        pooled = None if pooled_all is None else torch.cat(pooled_rows)
        return TextCond(cond.embeds, pooled, lazy_empty, cond.ids)

    def _compel_weights(self, index, layer, fragments, chunks: Chunks, z, empty) -> torch.Tensor:
        """compel: weights applied around the empty chunk; fragments below 1 also lerped toward
        the prompt encoded with them masked out (compel's DownweightMode.MASK)."""
        base = emphasis.compel(z, chunks.weights, empty)
        without, weights = [], []
        for fragment, span in zip(fragments, chunks.spans):
            if fragment.weight < 1 and span:
                mask = torch.ones_like(chunks.ids).view(-1)
                mask[span] = 0
                z_masked, _ = self._run(index, chunks.ids, mask.view(chunks.ids.shape), layer)
                without.append(emphasis.compel(z_masked, chunks.weights, empty))
                weights.append(fragment.weight)
        return emphasis.downweight_lerp(base, without, weights)
