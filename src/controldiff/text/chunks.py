"""Long prompts: token ids in chunks of the text encoder's window.

Each chunk is ``[BOS] + up to 75 tokens + [EOS]`` padded to 77 exactly as the tokenizer
pads (``padding="max_length"``), so a prompt of at most 75 tokens gives the tokenizer's
own ids. Longer prompts get more chunks, encoded separately and concatenated along the
sequence (the A1111 / compel approach); nothing is truncated. A ``BREAK`` fragment
closes the current chunk early (A1111); with ``comma_backtrack`` a chunk ends after its last
comma when that is near the 75-token limit (A1111's ``comma_padding_backtrack``).
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


def build_chunks(tokenizer, fragments: Sequence[Fragment], expand=None, comma_backtrack: int = 0) -> Chunks:
    """Tokenise each fragment (``expand`` rewrites its text first) and cut into chunks.

    ``comma_backtrack`` > 0 is A1111's ``comma_padding_backtrack``: when a chunk is full and
    its last comma is at most that many tokens back, the tokens after the comma move to the
    next chunk, so a phrase is not cut in two (A1111's default is 20)."""
    length = tokenizer.model_max_length
    body = length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.get_vocab().get(",</w>") if comma_backtrack else None
    texts = [f.text if expand is None else expand(f.text) for f in fragments if f.text != BREAK or f.weight != -1]
    tokenized = iter(token_ids(tokenizer, texts))

    rows: list[list[tuple[int, float, int]]] = []  # per chunk: (token, weight, fragment index)
    cur: list[tuple[int, float, int]] = []
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        rows.append(cur)
        cur, last_comma = [], -1

    for k, frag in enumerate(fragments):
        if frag.text == BREAK and frag.weight == -1:
            close()
            continue
        for tok in next(tokenized):
            if tok == comma:
                last_comma = len(cur)
            elif comma_backtrack and len(cur) == body and last_comma != -1 and body - last_comma <= comma_backtrack:
                moved = cur[last_comma + 1:]
                cur = cur[:last_comma + 1]
                close()
                cur = moved
            if len(cur) == body:
                close()
            cur.append((tok, float(frag.weight), k))
    if cur or not rows:
        close()

    ids, weights, mask = [], [], []
    spans: list[list[int]] = [[] for _ in fragments]
    for r, row in enumerate(rows):
        n = len(row) + 2
        ids.append([bos] + [t for t, _, _ in row] + [eos] + [pad] * (length - n))
        weights.append([1.0] + [w for _, w, _ in row] + [1.0] * (length - n + 1))
        mask.append([1] * n + [0] * (length - n))
        for q, (_, _, k) in enumerate(row):
            spans[k].append(r * length + 1 + q)
    return Chunks(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32),
                  torch.tensor(mask, dtype=torch.long), spans)


def empty_chunk(tokenizer) -> Chunks:
    """The chunk of an empty prompt: what shorter prompts are padded with."""
    return build_chunks(tokenizer, [Fragment("", 1.0)])


def describe(tokenizer, chunks: Chunks) -> List[str]:
    """The text of each chunk (for messages and tests)."""
    return [tokenizer.decode(row[1:n - 1], skip_special_tokens=True)
            for row, n in zip(chunks.ids.tolist(), chunks.mask.sum(dim=1).tolist())]
