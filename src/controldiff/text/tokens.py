"""Which positions of an encoded prompt hold a word's tokens (Attend-and-Excite's
``token_indices`` by word). ``TextCond.ids`` keeps, per batch row, the token id behind
each embedding position that holds a prompt token, ``NO_TOKEN`` elsewhere (BOS, EOS,
padding, padding chunks)."""
from __future__ import annotations

from typing import Sequence

import torch

NO_TOKEN = -1


def prompt_token_ids(ids: torch.Tensor, spans: Sequence[Sequence[int]]) -> torch.Tensor:
    """(1, k * L): the ids of chunked prompt ``ids`` (k, L) at the fragments' token
    positions ``spans``, ``NO_TOKEN`` elsewhere."""
    flat = ids.reshape(-1)
    out = torch.full_like(flat, NO_TOKEN)
    positions = torch.tensor([p for span in spans for p in span], dtype=torch.long)
    out[positions] = flat[positions]
    return out.reshape(1, -1)


def find_tokens(ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """Every position of ``ids`` where the sequence ``word_ids`` occurs, all its tokens (a
    word of two tokens found twice gives four positions). ``NO_TOKEN`` positions are
    skipped, so a word cut by a chunk boundary is still found."""
    n = len(word_ids)
    if n == 0:
        return []
    where = [i for i, t in enumerate(ids) if t != NO_TOKEN]
    tokens = [ids[i] for i in where]
    word = list(word_ids)
    found: list[int] = []
    for i in range(len(tokens) - n + 1):
        if tokens[i:i + n] == word:
            found.extend(where[i:i + n])
    return found
