"""Prompt encoding with the CLIP text encoders, as the reference pipelines do it.

SD1/SD2: the last hidden state of one encoder. SDXL: the penultimate hidden states of
both encoders side by side, plus the second encoder's pooled projection.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def as_list(value, name: str) -> list[str]:
    """A prompt argument as a list of strings, or a ValueError naming the argument."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name}: expected a string or a non-empty list of strings, got {value!r}")


def _spread(values: Optional[list[str]], batch: int, name: str) -> Optional[list[str]]:
    """One prompt applies to every prompt of the batch; otherwise the counts must match."""
    if values is None:
        return None
    if len(values) == 1 and batch > 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"{name}: got {len(values)} prompts for {batch} prompts")
    return values


@dataclass
class TextCond:
    """Text conditioning for a batch: token embeddings and, for SDXL, pooled embeddings."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def repeat(self, n: int) -> "TextCond":
        """Each prompt repeated n times in a row (num_images_per_prompt)."""
        if n == 1:
            return self
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0)
        return TextCond(self.embeds.repeat_interleave(n, dim=0), pooled)

    def zeros_like(self) -> "TextCond":
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return TextCond(torch.zeros_like(self.embeds), pooled)

    @staticmethod
    def cat(conds: Sequence["TextCond"]) -> "TextCond":
        lengths = {c.embeds.shape[1] for c in conds}
        if len(lengths) > 1:
            raise ValueError(f"prompt embeddings of different lengths cannot share a batch: {sorted(lengths)}")
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return TextCond(torch.cat([c.embeds for c in conds]), pooled)


class PromptEncoder:
    """Turns prompts into TextCond with the model's tokenizers and encoders.

    ``penultimate`` selects the SDXL convention (hidden_states[-2] of every encoder);
    ``clip_skip`` skips that many more final layers, as diffusers does.
    """

    def __init__(self, tokenizers, text_encoders, sdxl: bool):
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("PromptEncoder: need one tokenizer per text encoder")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.sdxl = sdxl
        # word -> replacement applied to every prompt before tokenising (textual inversion's
        # multi-vector tokens "tok" -> "tok tok_1 tok_2", as diffusers' maybe_convert_prompt)
        self.expansions: dict[str, str] = {}

    def expand(self, prompt: str) -> str:
        for word, replacement in self.expansions.items():
            prompt = prompt.replace(word, replacement)
        return prompt

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[-1].parameters()).device

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        prompts = [self.expand(p) for p in prompts]
        max_len = tokenizer.model_max_length
        ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            for row in full:
                dropped = tokenizer.decode(row[max_len - 1 : -1], skip_special_tokens=True).strip()
                if dropped:
                    warnings.warn(
                        f"prompt: longer than the text encoder's {max_len}-token window; this part was dropped: "
                        f"{dropped!r}",
                        stacklevel=4,
                    )
        return ids

    @torch.no_grad()
    def encode_pair(self, prompts, negative=None, prompts_2=None, negative_2=None, *, guided: bool = True,
                    zero_negative: bool = False, clip_skip: Optional[int] = None) -> dict:
        """{"cond": ..., "uncond": ...} for a batch of prompts and their negative prompts.

        ``zero_negative``: the unconditional embedding is zeros (SDXL with no negative prompt).
        Like diffusers, the negative prompt is encoded without clip_skip.
        """
        prompts = as_list(prompts, "prompt")
        batch = len(prompts)
        prompts_2 = _spread(None if prompts_2 is None else as_list(prompts_2, "prompt_2"), batch, "prompt_2")
        cond = self.encode(prompts, prompts_2, clip_skip=clip_skip)
        if not guided:
            return {"cond": cond}
        if zero_negative:
            return {"cond": cond, "uncond": cond.zeros_like()}
        negative = _spread([""] if negative is None else as_list(negative, "negative_prompt"), batch, "negative_prompt")
        negative_2 = _spread(None if negative_2 is None else as_list(negative_2, "negative_prompt_2"), batch,
                             "negative_prompt_2")
        if self.sdxl and negative_2 is None:
            negative_2 = negative
        return {"cond": cond, "uncond": self.encode(negative, negative_2)}

    @torch.no_grad()
    def encode(self, prompts: list[str], prompts_2: Optional[list[str]] = None, clip_skip: Optional[int] = None) -> TextCond:
        if self.sdxl:
            return self._encode_sdxl(prompts, prompts_2 or prompts, clip_skip)
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        ids = self._ids(tokenizer, prompts).to(self.device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").attention_mask.to(self.device)
        if clip_skip is None:
            embeds = encoder(ids, attention_mask=mask)[0]
        else:
            hidden = encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
            embeds = encoder.text_model.final_layer_norm(hidden[-(clip_skip + 1)])
        return TextCond(embeds)

    def _encode_sdxl(self, prompts, prompts_2, clip_skip) -> TextCond:
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompt_2: got {len(prompts_2)} prompts for {len(prompts)} prompts")
        # A refiner has only the second encoder: it gets prompt_2 alone, as in diffusers.
        texts = [prompts, prompts_2][-len(self.text_encoders):]
        embeds, pooled = [], None
        for text, tokenizer, encoder in zip(texts, self.tokenizers, self.text_encoders):
            ids = self._ids(tokenizer, text).to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            embeds.append(out.hidden_states[layer])
        if pooled is None:
            raise ValueError("text_encoder_2: an SDXL model needs a CLIPTextModelWithProjection as its last encoder")
        return TextCond(torch.cat(embeds, dim=-1), pooled)
