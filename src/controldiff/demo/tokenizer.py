"""A word-level CLIP tokenizer for the scene vocabulary.

It is an ordinary CLIP BPE tokenizer (vocab.json + merges.txt, read by transformers'
``CLIPTokenizer``) whose merges build each vocabulary word into one token; any other text
still tokenises, character by character, as the byte-level base vocabulary allows. One token
per word keeps every caption (up to three objects, about 30 words) inside CLIP's 77-token
window and lets a small text encoder learn what each word means.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..loading.clip_vocab import byte_chars

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def merges_for(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into one token. A new merge is ranked after all earlier
    ones, so it applies only where no earlier merge does: words already whole stay whole."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_tokenizer(folder: str | Path, words: Iterable[str], max_length: int = 77) -> dict[str, int]:
    """Write the tokenizer files into ``folder``; return the vocabulary (token -> id)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_chars()
    merges = merges_for(sorted(set(words)))
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS, "eos_token": EOS,
           "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}))
    return vocab
