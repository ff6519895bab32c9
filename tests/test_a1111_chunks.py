"""Long prompts are cut into chunks as A1111 cuts them, comma backtrack included.

``a1111_chunks`` is A1111's ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``
(modules/sd_hijack_clip.py, AUTOMATIC1111/stable-diffusion-webui at 00e09382), transcribed
without textual-inversion fixes, with its default ``comma_padding_backtrack = 20``; the
prompt is parsed by our A1111 parser (tested equal to A1111's ``parse_prompt_attention``).
"""
from __future__ import annotations

import pytest
import torch

from controldiff.text.chunks import build_chunks
from controldiff.text.weighting import parse_a1111
from pipes import ours

CHUNK = 75


def a1111_chunks(tokenizer, parsed, backtrack=20):
    """(tokens, multipliers) per chunk, as A1111's tokenize_line builds them."""
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma_token = tokenizer.get_vocab().get(",</w>", None)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    chunks = []
    chunk = {"tokens": [], "multipliers": []}
    last_comma = -1

    def next_chunk():
        nonlocal last_comma, chunk
        to_add = CHUNK - len(chunk["tokens"])
        if to_add > 0:
            chunk["tokens"] += [id_end] * to_add
            chunk["multipliers"] += [1.0] * to_add
        chunk["tokens"] = [id_start] + chunk["tokens"] + [id_end]
        chunk["multipliers"] = [1.0] + chunk["multipliers"] + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = {"tokens": [], "multipliers": []}

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk["tokens"])
            elif (backtrack != 0 and len(chunk["tokens"]) == CHUNK and last_comma != -1
                  and len(chunk["tokens"]) - last_comma <= backtrack):
                break_location = last_comma + 1
                reloc_tokens = chunk["tokens"][break_location:]
                reloc_mults = chunk["multipliers"][break_location:]
                chunk["tokens"] = chunk["tokens"][:break_location]
                chunk["multipliers"] = chunk["multipliers"][:break_location]
                next_chunk()
                chunk["tokens"] = reloc_tokens
                chunk["multipliers"] = reloc_mults
            if len(chunk["tokens"]) == CHUNK:
                next_chunk()
            chunk["tokens"].append(token)
            chunk["multipliers"].append(weight)
            position += 1
    if chunk["tokens"] or not chunks:
        next_chunk()
    return chunks


def _phrases(n, words=3, seed=0):
    """n comma-separated phrases of ``words`` words (tiny tokenizer: several tokens each)."""
    g = torch.Generator().manual_seed(seed)
    vocab = ["cat", "dog", "red", "house", "tree", "blue", "sky", "very", "detailed", "sun", "a", "big"]
    return ", ".join(" ".join(vocab[int(i)] for i in torch.randint(len(vocab), (words,), generator=g))
                     for _ in range(n))


PROMPTS = [
    _phrases(12), _phrases(30, 2, seed=1), _phrases(20, 4, seed=2),
    "(" + _phrases(10) + ":1.3), [" + _phrases(8, seed=3) + "], " + _phrases(9, seed=4),
    _phrases(10) + " BREAK " + _phrases(14, seed=5),
    "a " * 74 + ", cat dog",                      # the comma at the very limit
    ", ".join(["x"] * 120),                         # commas everywhere
    ", ".join(["cat cat cat"] * 20),                # every chunk cut inside a phrase: moved back
    " ".join(["cat"] * 60),                         # no comma: a plain cut
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chunks_equal_a1111(tiny_model, prompt):
    tok = ours(tiny_model("sd1")).tokenizers[0]
    frags = parse_a1111(prompt)
    expected = a1111_chunks(tok, [(f.text, f.weight) for f in frags])
    got = build_chunks(tok, frags, comma_backtrack=20)
    assert got.ids.tolist() == [c["tokens"] for c in expected]   # this tokenizer pads with EOS, as A1111
    assert torch.allclose(got.weights, torch.tensor([c["multipliers"] for c in expected]))


def test_backtrack_moves_a_phrase_and_spans_follow(tiny_model):
    tok = ours(tiny_model("sd1")).tokenizers[0]
    prompt = ", ".join(["cat cat cat"] * 20)   # 10 tokens a phrase with its comma: 75 cuts the 8th
    frags = parse_a1111(prompt)
    cut, plain = build_chunks(tok, frags, comma_backtrack=20), build_chunks(tok, frags)
    assert cut.ids[0, 1:76].tolist() != plain.ids[0, 1:76].tolist()  # the backtrack changed the cut
    comma = tok.get_vocab()[",</w>"]
    last = cut.mask[0].sum().item() - 2                           # the first chunk ends on a comma
    assert cut.ids[0, last].item() == comma
    flat = cut.ids.view(-1)
    assert [flat[p].item() for p in cut.spans[0]] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_encoder_uses_the_backtrack_for_a1111_syntax_only(tiny_model):
    pe = ours(tiny_model("sd1")).prompt_encoder
    prompt = ", ".join(["cat cat cat"] * 20)
    a1111 = pe.encode([prompt]).embeds
    pe.comma_backtrack = 0
    assert (pe.encode([prompt]).embeds - a1111).abs().max() > 1e-3
    pe.comma_backtrack = 20
    pe.syntax = "compel"
    compel = pe.encode([prompt]).embeds
    pe.comma_backtrack = 0
    assert torch.equal(pe.encode([prompt]).embeds, compel)
