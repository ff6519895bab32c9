"""Long prompts: token ids in chunks of the text encoder's window.

Each chunk is ``[BOS] + up to 75 tokens + [EOS]`` padded to 77 exactly as the tokenizer
pads (``padding="max_length"``), so a prompt of at most 75 tokens gives the tokenizer's
own ids. Longer prompts get more chunks, encoded separately and concatenated along the
sequence (the A1111 / compel approach); nothing is truncated. A ``BREAK`` fragment
closes the current chunk early (A1111).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from .weighting import BREAK, Fragment


@dataclass
class Chunks:
    """One prompt as k chunks: ids, per-token weights and attention mask, each (k, L)."""

    ids: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    spans: List[List[int]]  # flat positions (into ids.view(-1)) of each fragment's tokens

    @property
    def count(self) -> int:
        return self.ids.shape[0]


def token_ids(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """Token ids of each text, with no BOS/EOS and no truncation."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def build_chunks(tokenizer, fragments: Sequence[Fragment], expand=None) -> Chunks:
    """Tokenise each fragment (``expand`` rewrites its text first) and cut into chunks."""
    length = tokenizer.model_max_length
    body = length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = [f.text if expand is None else expand(f.text) for f in fragments if f.text != BREAK or f.weight != -1]
    tokenized = iter(token_ids(tokenizer, texts))

    rows: list[tuple[list[int], list[float], int]] = []  # ids, weights, position of EOS
    cur_ids: list[int] = []
    cur_w: list[float] = []
    spans: list[list[int]] = []

    def close() -> None:
        ids = [bos] + cur_ids + [eos]
        weights = [1.0] + cur_w + [1.0]
        rows.append((ids + [pad] * (length - len(ids)), weights + [1.0] * (length - len(weights)), len(ids) - 1))
        cur_ids.clear()
        cur_w.clear()

    for frag in fragments:
        if frag.text == BREAK and frag.weight == -1:
            close()
            spans.append([])
            continue
        span = []
        for tok in next(tokenized):
            if len(cur_ids) == body:
                close()
            span.append(len(rows) * length + 1 + len(cur_ids))
            cur_ids.append(tok)
            cur_w.append(float(frag.weight))
        spans.append(span)
    if cur_ids or not rows:
        close()
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    weights = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    mask = torch.zeros_like(ids)
    for k, (_, _, eos_at) in enumerate(rows):
        mask[k, : eos_at + 1] = 1
    return Chunks(ids, weights, mask, spans)


def empty_chunk(tokenizer) -> Chunks:
    """The chunk of an empty prompt: what shorter prompts are padded with."""
    return build_chunks(tokenizer, [Fragment("", 1.0)])


def describe(tokenizer, chunks: Chunks) -> List[str]:
    """The text of each chunk (for messages and tests)."""
    return [tokenizer.decode(row[1:n - 1], skip_special_tokens=True)
            for row, n in zip(chunks.ids.tolist(), chunks.mask.sum(dim=1).tolist())]
