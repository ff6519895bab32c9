"""Prompt weighting (a1111 and compel syntaxes), long prompts in chunks, clip skip.

Oracles: the ``compel`` package (embeddings, parser) and the diffusers pipelines (clip
skip, plain prompts); where none exists (A1111's algorithm) the expected tensors are
computed here independently from the plain encodings.
"""
from __future__ import annotations

import shutil
import types
import warnings

import numpy as np
import pytest
import torch

from controldiff.text.chunks import build_chunks
from controldiff.text.encode import TextCond
from controldiff.text.weighting import BREAK, Blend, Fragment, parse_a1111, parse_compel
from pipes import ours

EMB_TOL = 1e-5
IMG_TOL = 1e-4


def maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def frags(parsed):
    return [(f.text, round(f.weight, 6)) for f in parsed]


# --------------------------------------------------------------------------- a1111 parser
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("((word))", [("word", 1.21)]),
    ("[word]", [("word", round(1 / 1.1, 6))]),
    ("(word:1.3)", [("word", 1.3)]),
    ("a cat BREAK a dog", [("a cat", 1.0), (BREAK, -1.0), ("a dog", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_a1111(text, expected):
    assert frags(parse_a1111(text)) == expected


# --------------------------------------------------------------------------- compel parser
@pytest.mark.parametrize("text, expected", [
    ("a cat+ on a mat", [("a", 1.0), ("cat", 1.1), ("on a mat", 1.0)]),
    ("a cat++ and dog--", [("a", 1.0), ("cat", 1.21), ("and", 1.0), ("dog", 0.81)]),
    ("a cat- sits", [("a", 1.0), ("cat", 0.9), ("sits", 1.0)]),
    ("a (red cat)1.3 sitting", [("a", 1.0), ("red cat", 1.3), ("sitting", 1.0)]),
    ("(a cat)+ x", [("a cat", 1.1), ("x", 1.0)]),
    ("(big (red)+ cat)0.5", [("big", 0.5), ("red", 0.55), ("cat", 0.5)]),
    ("half-life x-ray", [("half-life x-ray", 1.0)]),
    ("hello \\(world\\)", [("hello (world)", 1.0)]),
])
def test_parse_compel_fragments(text, expected):
    conj = parse_compel(text)
    assert conj.weights == [1.0] and len(conj.prompts) == 1
    assert frags(conj.prompts[0]) == expected


def test_parse_compel_and_blend():
    conj = parse_compel('("a cat+", "a dog").and(1, 0.5)')
    assert conj.weights == [1.0, 0.5]
    assert [frags(p) for p in conj.prompts] == [[("a", 1.0), ("cat", 1.1)], [("a dog", 1.0)]]
    assert parse_compel('("a", "b").and()').weights == [1.0, 1.0]
    blend = parse_compel('("a cat", "a dog").blend(0.7, 0.3)').prompts[0]
    assert isinstance(blend, Blend) and blend.weights == [0.7, 0.3] and blend.normalize
    assert [frags(p) for p in blend.prompts] == [[("a cat", 1.0)], [("a dog", 1.0)]]
    assert not parse_compel('("a", "b").blend(1, 2, no_normalize)').prompts[0].normalize
    with pytest.raises(ValueError, match="prompt.*blend"):
        parse_compel('("a", "b").blend(0.7)')
    with pytest.raises(ValueError, match="prompt.*unclosed"):
        parse_compel("a (cat")


COMPEL_PROMPTS = [
    "a cat+ on a mat", "a (red cat)1.3 sitting", "a cat++ and dog--", "(big (red)+ cat)0.5 x",
    "a cat (sits)0 here", "a (cat)+, on a mat.", "half-life x-ray cat+", '("a cat", "a dog").and()',
    '("a cat+", "a dog").and(1, 0.5)', '("a cat", "a dog").blend(0.7, 0.3)',
    '("a (cat)1.2", "dog--").blend(1, 2, no_normalize)', "", "plain words",
    "word " * 30 + "(tail)1.4 " + "more- " * 10,  # 3 chunks, weights across the chunk boundary
]


def test_parse_compel_matches_compel_package(tiny_model):
    """Same fragments and weights, token for token, as compel's own parser."""
    from compel import Compel
    from compel.prompt_parser import Blend as CBlend
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model("sd1") / "tokenizer")

    def tokens(pairs):
        return [(i, round(w, 6)) for t, w in pairs for i in tok(t, add_special_tokens=False)["input_ids"]]

    for text in COMPEL_PROMPTS + ["a - b", "cat+, dog-.", "(x)+++ y", "1.5 version (z)0.25", '"quoted"1.5 thing']:
        theirs = Compel.parse_prompt_string(text)
        mine = parse_compel(text)
        assert list(theirs.weights) == mine.weights, text
        for t, m in zip(theirs.prompts, mine.prompts, strict=True):
            if isinstance(t, CBlend):
                assert (t.weights, t.normalize_weights) == (m.weights, m.normalize), text
                pairs = [([(f.text, f.weight) for f in a.children], [(f.text, f.weight) for f in b])
                         for a, b in zip(t.prompts, m.prompts, strict=True)]
            else:
                pairs = [([(f.text, f.weight) for f in t.children], [(f.text, f.weight) for f in m])]
            for a, b in pairs:
                assert tokens(a) == tokens(b), text


# --------------------------------------------------------------------------- chunks
def _words(n: int) -> str:
    """n tokens with the tiny char-level tokenizer: single-letter words."""
    return " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(n))


def test_long_prompt_chunks(tiny_model):
    pipe = ours(tiny_model("sd1"))
    tok = pipe.tokenizers[0]
    text = _words(200)
    chunks = build_chunks(tok, [Fragment(text)])
    assert chunks.ids.shape == (3, 77)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (chunks.ids[:, 0] == bos).all()
    assert chunks.ids[0, 76] == eos and chunks.ids[1, 76] == eos
    assert tok.decode(chunks.ids[2], skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")[150:]
    # every token kept, in order
    body = [i for row in chunks.ids.tolist() for i in row if i not in (bos, eos, tok.pad_token_id)]
    assert body == tok(text, add_special_tokens=False)["input_ids"]

    cond = pipe.prompt_encoder.encode([text])
    assert cond.embeds.shape == (1, 3 * 77, 32)
    first = pipe.prompt_encoder.encode([_words(75)]).embeds
    assert maxdiff(cond.embeds[:, :77], first) <= EMB_TOL  # the first chunk is the plain first 75 tokens
    third = pipe.prompt_encoder.encode([_words(200)[150 * 2:]]).embeds
    assert maxdiff(cond.embeds[:, 154:], third) <= EMB_TOL


def test_break_starts_a_new_chunk(tiny_model):
    pe = ours(tiny_model("sd1")).prompt_encoder
    cond = pe.encode(["a cat BREAK a dog"])
    assert cond.embeds.shape[1] == 154
    assert maxdiff(cond.embeds[:, :77], pe.encode(["a cat"]).embeds) <= EMB_TOL
    assert maxdiff(cond.embeds[:, 77:], pe.encode(["a dog"]).embeds) <= EMB_TOL
    pe.syntax = "none"  # plain text: BREAK is a word
    assert pe.encode(["a cat BREAK a dog"]).embeds.shape[1] == 77


def test_prompt_and_negative_padded_to_same_chunks(tiny_model):
    pe = ours(tiny_model("sd1")).prompt_encoder
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning any more
        text = pe.encode_pair([_words(100), "x"], negative="blurry")
    assert text["cond"].embeds.shape == text["uncond"].embeds.shape == (2, 154, 32)
    empty = pe.encode([""]).embeds
    plain = pe.encode(["x", "blurry"]).embeds
    assert maxdiff(text["cond"].embeds[1:, :77], plain[:1]) <= EMB_TOL
    assert maxdiff(text["cond"].embeds[1:, 77:], empty) <= EMB_TOL  # short prompt padded with the empty chunk
    assert maxdiff(text["uncond"].embeds[:, :77], plain[1:].expand(2, -1, -1)) <= EMB_TOL
    assert maxdiff(text["uncond"].embeds[:, 77:], empty.expand(2, -1, -1)) <= EMB_TOL
    long_negative = pe.encode_pair("x", negative=_words(160))
    assert long_negative["cond"].embeds.shape == long_negative["uncond"].embeds.shape == (1, 231, 32)


def test_textcond_cat_pads_different_chunk_counts(tiny_model):
    pe = ours(tiny_model("sdxl")).prompt_encoder
    short, long = pe.encode(["a cat"]), pe.encode([_words(90)])
    both = TextCond.cat([short.repeat(2), long])
    assert both.embeds.shape == (3, 154, 64) and both.pooled.shape == (3, 32)
    assert torch.equal(both.embeds[:2, :77], short.embeds.expand(2, -1, -1))
    assert torch.equal(both.embeds[:2, 77:], short.empty.expand(2, -1, -1))
    assert torch.equal(both.embeds[2:], long.embeds)
    tiled = TextCond.cat([short.tile(3), long])
    assert tiled.embeds.shape == (4, 154, 64) and torch.equal(tiled.embeds[1:3], both.embeds[:2])
    zeros = short.zeros_like()
    assert torch.equal(TextCond.cat([zeros, long]).embeds[0], torch.zeros(154, 64))
    moved = long.to(dtype=torch.float16)
    assert moved.embeds.dtype == moved.empty.dtype == moved.pooled.dtype == torch.float16
    with pytest.raises(ValueError, match="cannot pad"):
        TextCond(long.embeds).pad_to(231)


def test_truncate_option_warns(tiny_model):
    pe = ours(tiny_model("sd1")).prompt_encoder
    pe.truncate = True
    with pytest.warns(UserWarning, match="dropped"):
        cond = pe.encode([_words(100)])
    assert torch.equal(cond.embeds, pe.encode([_words(75)]).embeds)


# --------------------------------------------------------------------------- a1111 algorithm
def _a1111_expected(plain: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Independent statement of A1111's process_tokens for one chunk of one prompt."""
    out = plain.clone()
    for b in range(plain.shape[0]):
        z = plain[b]
        scaled = z * weights[:, None]
        out[b] = scaled * (z.mean() / scaled.mean())
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a1111_weight_one_is_plain(tiny_model, family):
    pe = ours(tiny_model(family)).prompt_encoder
    plain = pe.encode(["a red cat on a mat"]).embeds
    for text in ("a red (cat:1) on a mat", "a red (cat:1.0) on (a mat:1)"):
        assert torch.equal(pe.encode([text]).embeds, plain)
    pe.syntax = "none"
    assert torch.equal(pe.encode(["a red cat on a mat"]).embeds, plain)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a1111_weighted_word(tiny_model, family):
    pe = ours(tiny_model(family)).prompt_encoder
    tok = pe.tokenizers[0]
    plain = pe.encode(["a red cat on a mat"]).embeds
    # "a red " = tokens a, r, e, d -> positions 1..4; "cat" -> positions 5..7 (char-level vocab)
    cases = (("a red (cat:1.5) on a mat", 1.5), ("a red ((cat)) on a mat", 1.21), ("a red [cat] on a mat", 1 / 1.1))
    for text, w in cases:
        weights = torch.ones(77)
        weights[5:8] = w
        assert tok.convert_ids_to_tokens(tok("a red cat")["input_ids"][5:8]) == ["c", "a", "t</w>"]
        got = pe.encode([text]).embeds
        assert maxdiff(got, _a1111_expected(plain, weights)) <= EMB_TOL
        assert maxdiff(got, plain) > 1e-3
        assert abs(float(got.mean() - plain.mean())) <= 1e-6  # the mean is restored
    pe.syntax = "none"  # plain text: brackets are just characters
    assert maxdiff(pe.encode(["a red (cat:1.5) on a mat"]).embeds, plain) > 1e-3


def test_a1111_mean_restored_per_chunk(tiny_model):
    pe = ours(tiny_model("sd1")).prompt_encoder
    first, second = _words(40), "x y z"
    got = pe.encode([f"{first} BREAK ({second}:1.4)"]).embeds
    assert maxdiff(got[:, :77], pe.encode([first]).embeds) <= EMB_TOL  # the other chunk is untouched
    weights = torch.ones(77)
    weights[1:4] = 1.4
    assert maxdiff(got[:, 77:], _a1111_expected(pe.encode([second]).embeds, weights)) <= EMB_TOL


# --------------------------------------------------------------------------- compel parity
def _compel_reference(pe, family: str, text: str):
    from compel import Compel, ReturnedEmbeddingsType
    from compel.embeddings_provider import SplitLongTextMode

    kind = (ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED if family == "sdxl"
            else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED)
    outs = [Compel(tokenizer=t, text_encoder=e, returned_embeddings_type=kind, truncate_long_prompts=False,
                   split_long_text_mode=SplitLongTextMode.BRUTAL)(text)
            for t, e in zip(pe.tokenizers, pe.text_encoders)]
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_compel_parity(tiny_model, family):
    pe = ours(tiny_model(family)).prompt_encoder
    pe.syntax = "compel"
    for text in COMPEL_PROMPTS:
        expected = _compel_reference(pe, family, text)
        got = pe.encode([text]).embeds
        assert maxdiff(got, expected) <= EMB_TOL, text
    # a batch: each prompt as alone, padded with the empty chunk to the longest
    batch = pe.encode(["a cat+", '("a", "b").and()']).embeds
    assert batch.shape[1] == 154
    assert maxdiff(batch[1:], _compel_reference(pe, family, '("a", "b").and()')) <= EMB_TOL
    assert maxdiff(batch[:1, :77], _compel_reference(pe, family, "a cat+")) <= EMB_TOL


# --------------------------------------------------------------------------- SDXL
def test_sdxl_weighting_each_encoder_and_pooled(tiny_model):
    pe = ours(tiny_model("sdxl")).prompt_encoder
    plain = pe.encode(["a red cat on a mat"])
    got = pe.encode(["a red (cat:1.5) on a mat"])
    weights = torch.ones(77)
    weights[5:8] = 1.5
    expected = torch.cat([_a1111_expected(plain.embeds[..., :32], weights),
                          _a1111_expected(plain.embeds[..., 32:], weights)], dim=-1)  # mean restored per encoder
    assert maxdiff(got.embeds, expected) <= EMB_TOL
    assert torch.equal(got.pooled, plain.pooled)  # pooled: first chunk, unweighted (as A1111)
    long = pe.encode([_words(75) + " (tail:1.3) " + _words(30)])
    assert long.embeds.shape == (1, 154, 64)
    assert maxdiff(long.pooled, pe.encode([_words(75)]).pooled) <= EMB_TOL
    # prompt_2 of another length: both encoders padded to the same number of chunks
    two = pe.encode(["a cat"], [_words(100)])
    assert two.embeds.shape == (1, 154, 64)
    assert maxdiff(two.embeds[:, 77:, :32], pe.encode([""]).embeds[..., :32]) <= EMB_TOL
    assert maxdiff(two.embeds[:, :, 32:], pe.encode([_words(100)]).embeds[..., 32:]) <= EMB_TOL


def test_sdxl_plain_pooled_matches_diffusers_and_compel(tiny_model):
    import diffusers
    from compel import Compel, ReturnedEmbeddingsType

    path = tiny_model("sdxl")
    pe = ours(path).prompt_encoder
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    embeds, _, pooled, _ = ref.encode_prompt("a castle", None, "cpu", 1, False)
    got = pe.encode(["a castle"])
    assert torch.equal(got.embeds, embeds) and torch.equal(got.pooled, pooled)
    c2 = Compel(tokenizer=pe.tokenizers[1], text_encoder=pe.text_encoders[1], requires_pooled=True,
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED)
    pe.syntax = "compel"
    assert maxdiff(pe.encode(["a castle"]).pooled, c2("a castle")[1]) <= EMB_TOL


# --------------------------------------------------------------------------- clip skip
def _diffusers_clip_skip_shim(pipe):
    """diffusers 0.42's StableDiffusionPipeline(clip_skip=N) calls text_encoder.text_model.final_layer_norm,
    which transformers 5 moved to text_encoder.final_layer_norm: alias it (oracle-side only)."""
    te = pipe.text_encoder
    if te is not None and not hasattr(te, "text_model"):
        object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    return pipe


def _deeper_text_encoders(src, dst, layers: int = 3):
    """A copy of a tiny model folder whose text encoders have ``layers`` layers (clip_skip=2 on SDXL
    needs hidden_states[-4])."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shutil.copytree(src, dst)
    torch.manual_seed(0)
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if (dst / name).is_dir():
            cfg = CLIPTextConfig.from_pretrained(dst / name)
            cfg.num_hidden_layers = layers
            cls(cfg).eval().save_pretrained(dst / name)
    return dst


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_clip_skip_matches_diffusers(tiny_model, tmp_path, family):
    import diffusers

    path = _deeper_text_encoders(tiny_model(family), tmp_path / family)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    ref = _diffusers_clip_skip_shim(cls.from_pretrained(path, **kwargs))
    ref.set_progress_bar_config(disable=True)
    mine = ours(path)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", negative_prompt="fog", height=32, width=32)
    images = {}
    for skip in (None, 1, 2):
        expected = ref("a red cube", generator=torch.Generator().manual_seed(3), clip_skip=skip, **kw).images
        got = mine("a red cube", generator=torch.Generator().manual_seed(3), clip_skip=skip, **kw).images
        assert np.abs(got - expected).max() <= IMG_TOL, skip
        images[skip] = got
    assert np.abs(images[1] - images[None]).max() > 1e-4 and np.abs(images[2] - images[1]).max() > 1e-4
    with pytest.raises(ValueError, match="clip_skip"):
        mine("a", clip_skip=5, num_inference_steps=1, output_type="np")


# --------------------------------------------------------------------------- pipeline
def test_pipeline_weighted_long_prompt(tiny_model):
    pipe = ours(tiny_model("sd1"))
    kw = dict(num_inference_steps=2, guidance_scale=6.0, output_type="np", seed=4, height=32, width=32)
    long = _words(120)
    plain = pipe(long, negative_prompt="blurry, " + _words(90), **kw).images
    weighted = pipe(f"({long[:20]}:1.4) {long[20:]}", negative_prompt="[blurry], " + _words(90), **kw).images
    assert np.isfinite(weighted).all() and np.abs(weighted - plain).max() > 1e-4
    pipe.prompt_encoder.syntax = "compel"
    compel = pipe(f"({long[:20]})1.4 {long[20:]}", negative_prompt="blurry-, " + _words(90), **kw).images
    assert np.abs(compel - plain).max() > 1e-4
    # a long prompt differs from its first 75 tokens: nothing is truncated
    assert np.abs(pipe(long, **kw).images - pipe(_words(75), **kw).images).max() > 1e-4


def test_pipeline_sdxl_weighted_long_prompt_zero_negative(tiny_model):
    pipe = ours(tiny_model("sdxl"))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", seed=1, height=32, width=32)
    a = pipe(_words(100) + " (castle:1.5)", **kw).images
    b = pipe(_words(100) + " castle", **kw).images
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-4


def test_bad_syntax_names_the_argument(tiny_model):
    pe = ours(tiny_model("sd1")).prompt_encoder
    with pytest.raises(ValueError, match="syntax"):
        pe.syntax = "markdown"


def test_textual_inversion_expansion_inside_weighted_fragment(tiny_model):
    pe = ours(tiny_model("sd1")).prompt_encoder
    expected = pe.encode(["a q w b"]).embeds
    pe.expansions["q"] = "q w"
    assert torch.equal(pe.encode(["a (q:1.0) b"]).embeds, expected)
    assert maxdiff(pe.encode(["a (q:1.2) b"]).embeds, expected) > 1e-3
