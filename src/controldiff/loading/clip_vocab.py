"""The CLIP tokenizer, built locally from the bundled BPE merges.

Single-file checkpoints carry no tokenizer. OpenAI's CLIP tokenizer (used by SD1, SD2's
OpenCLIP and both SDXL encoders) is fully determined by ``bpe_simple_vocab_16e6.txt.gz``,
which we bundle from the ``open_clip_torch`` wheel (MIT, see ``configs/LICENSE.open_clip``).
We rebuild ``vocab.json`` + ``merges.txt`` exactly as ``clip/simple_tokenizer.py`` does
(49408 tokens) and hand them to transformers' ``CLIPTokenizer``: no network, ever.
"""
from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

__all__ = ["BPE_FILE", "VOCAB_SIZE", "clip_vocab", "write_clip_tokenizer", "clip_tokenizer"]

BPE_FILE = Path(__file__).resolve().parent.parent / "configs" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2  # what CLIP's simple_tokenizer keeps of the file


def byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)``: token -> id and the merge lines, as OpenAI's CLIP tokenizer."""
    if not BPE_FILE.is_file():
        raise FileNotFoundError(f"{BPE_FILE}: bundled CLIP BPE vocabulary not found (broken installation?)")
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:_N_MERGES + 1]  # line 0 is a version header
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"{BPE_FILE}: gives {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>", max_length: int = 77) -> Path:
    """Write a transformers-loadable CLIP tokenizer folder; ``pad_token`` is ``"!"`` for
    SD2's and SDXL's second (OpenCLIP) tokenizer, ``<|endoftext|>`` for OpenAI CLIP."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
    """A transformers ``CLIPTokenizer`` built from the bundled merges (in a temporary folder,
    removed once loaded)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="controldiff-clip-") as tmp:
        write_clip_tokenizer(tmp, pad_token=pad_token, max_length=max_length)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
