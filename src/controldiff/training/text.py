"""Captions to UNet conditioning, as diffusers' training scripts encode them: each caption
truncated and padded to the tokenizer's window (one chunk, no weighting syntax), so that the
text encoders can be trained through it. SD1/SD2: the last hidden state; SDXL: both
encoders' penultimate hidden states side by side and the last encoder's pooled projection.
Prompts at sampling time go through ``text/encode.py`` instead (chunks, weights)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["tokenize", "encode"]


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def encode(tokenizers, text_encoders, captions: Sequence[str], sdxl: bool
           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(embeddings (B, L, D), pooled (B, P) for SDXL else None); differentiable."""
    if not sdxl:
        encoder = text_encoders[0]
        ids = tokenize(tokenizers[0], captions).to(encoder.device)
        return encoder(ids, return_dict=False)[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        if encoder is None:  # a refiner's missing first encoder
            continue
        out = encoder(tokenize(tokenizer, captions).to(encoder.device), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        hidden.append(out[-1][-2])
    return torch.cat(hidden, dim=-1), pooled
