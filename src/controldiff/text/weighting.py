"""Prompt weighting syntaxes: parse a prompt string into text fragments with weights.

Two syntaxes users know:

- ``a1111`` (AUTOMATIC1111 web UI): ``(word)`` x1.1, ``((word))`` x1.21, ``[word]`` /1.1,
  ``(word:1.3)``, escapes ``\\(`` ``\\)`` ``\\[`` ``\\]``, and ``BREAK`` to start a new chunk.
  :func:`parse_a1111` is A1111's published ``parse_prompt_attention``.
- ``compel``: ``word+`` / ``word++`` (x1.1 per ``+``), ``word-`` (x0.9 per ``-``),
  ``(several words)1.2``, ``(words)+``, ``("a", "b").and(...)`` and
  ``("a", "b").blend(0.7, 0.3)`` (optionally ``no_normalize``). The basic forms of the
  ``compel`` package's grammar; :func:`parse_compel` returns a :class:`Conjunction`.

Weights are checked when parsed (finite, at most ``MAX_WEIGHT`` in size), so a prompt
like 1000 nested ``((...))`` is refused before any model runs; errors name the argument.
Nothing here touches a tokenizer or a model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Union

BREAK = "BREAK"  # an a1111 fragment (BREAK, -1.0) starts a new 75-token chunk
#: Largest accepted weight magnitude: far above any useful emphasis (1.1**48), and far
#: below what overflows the text encoder's float16/float32 hidden states.
MAX_WEIGHT = 100.0


@dataclass
class Fragment:
    text: str
    weight: float = 1.0


@dataclass
class Blend:
    """A weighted sum of the embeddings of several prompts (compel ``.blend``)."""

    prompts: List[List[Fragment]]
    weights: List[float]
    normalize: bool = True


@dataclass
class Conjunction:
    """Prompts whose embeddings are concatenated along the sequence (compel ``.and``)."""

    prompts: List[Union[List[Fragment], Blend]]
    weights: List[float] = field(default_factory=list)


# ---------------------------------------------------------------------------- a1111
_RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_a1111(text: str, name: str = "prompt") -> List[Fragment]:
    """A1111's ``parse_prompt_attention``: fragments with weights, runs of equal weight merged.

    ``Fragment("BREAK", -1.0)`` marks a chunk break. Unbalanced brackets are closed at the end.
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                value = float(weight)
            except ValueError:
                raise ValueError(f"{name}: {weight!r} in {part!r} is not a number: {text!r}") from None
            multiply_range(round_brackets.pop(), value)
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(_RE_BREAK.split(part)):
                if i > 0:
                    res.append([BREAK, -1.0])
                res.append([piece, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [Fragment(t, w) for t, w in res]


# ---------------------------------------------------------------------------- compel
_PLUS, _MINUS = 1.1, 0.9
_SYNTAX = '()",.+-'
_SPACE = None  # a word boundary between items
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_OPERATOR = re.compile(r"\((.*)\)\.(and|blend)\(([^()]*)\)", re.S)


def _suffix_weight(s: str, i: int, allow_number: bool) -> tuple[float, int]:
    """The weight written right after a term (``+++``, ``--``, or a number after a group)."""
    j = i
    while j < len(s) and s[j] == s[i] and s[i] in "+-":
        j += 1
    if j > i:
        return (_PLUS if s[i] == "+" else _MINUS) ** (j - i), j
    if allow_number:
        m = _NUMBER.match(s, i)
        if m:
            return float(m.group(0)), m.end()
    return 1.0, i


def _parse_items(s: str, name: str) -> list:
    """Items ([text, weight] or _SPACE) of a flat compel prompt. Groups ``(...)`` and
    ``"..."`` are kept on an explicit stack, so any nesting depth parses (no recursion)."""
    stack: list[tuple[list, str]] = [([], "")]  # (items, closing character) per open group
    word: list[str] = []

    def flush(weight: float = 1.0) -> None:
        if word:
            stack[-1][0].append(["".join(word), weight])
            word.clear()

    i = 0
    while i < len(s):
        c = s[i]
        items, stop = stack[-1]
        if stop and c == stop:
            flush()
            stack.pop()
            weight, i = _suffix_weight(s, i + 1, allow_number=True)
            for item in items:
                if item is not _SPACE:
                    item[1] *= weight
            stack[-1][0].extend(items)
        elif c == "\\" and i + 1 < len(s):
            word.append(s[i + 1])
            i += 2
        elif c.isspace():
            flush()
            items.append(_SPACE)
            i += 1
        elif c in '("':
            flush()
            stack.append(([], ")" if c == "(" else '"'))
            i += 1
        elif c in "+-":
            j = i
            while j < len(s) and s[j] == c:
                j += 1
            ends_term = j == len(s) or s[j].isspace() or s[j] in _SYNTAX
            if word and ends_term:
                weight, i = _suffix_weight(s, i, allow_number=False)
                flush(weight)
            else:
                word.append(s[i:j])
                i = j
        elif c in ",.":
            flush()
            items.append([c, 1.0])
            i += 1
        else:  # text, including a stray closing bracket
            word.append(c)
            i += 1
    if len(stack) > 1:
        stop = stack[-1][1]
        shown = s if len(s) <= 80 else s[:77] + "..."
        raise ValueError(f"{name}: unclosed {'(' if stop == ')' else stop!r} in compel syntax: {shown!r}")
    flush()
    return stack[0][0]


def _fragments(text: str, name: str) -> List[Fragment]:
    """A flat compel prompt: runs of equal weight merged (as compel's FlattenedPrompt)."""
    items = _parse_items(text, name)
    out: list[Fragment] = []
    space = False
    for item in items:
        if item is _SPACE:
            space = True
            continue
        text_, weight = item
        if out and out[-1].weight == weight:
            out[-1].text += (" " if space else "") + text_
        else:
            out.append(Fragment(text_, weight))
        space = False
    return out or [Fragment("", 1.0)]


def _split_top_level(s: str) -> list[str]:
    """Split at commas outside quotes and brackets."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(s):
        if c == '"' and (i == 0 or s[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
        elif not quoted and depth == 0 and c == ",":
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _operand(item: str, name: str) -> List[Fragment]:
    if len(item) >= 2 and item[0] == '"' and item[-1] == '"':
        item = item[1:-1].replace('\\"', '"')
    elif len(item) >= 2 and item[0] == "(" and item[-1] == ")":
        item = item[1:-1]
    return _fragments(item, name)


def _floats(args: list[str], text: str, name: str) -> list[float]:
    try:
        return [float(a) for a in args]
    except ValueError:
        raise ValueError(f"{name}: expected numbers in {text!r}, got {args}") from None


def parse_compel(text: str, name: str = "prompt") -> Conjunction:
    """Parse compel syntax; a plain prompt is a Conjunction of one flat prompt of weight 1."""
    m = _OPERATOR.fullmatch(text.strip())
    if m is None:
        return Conjunction([_fragments(text, name)], [1.0])
    operands = [_operand(p, name) for p in _split_top_level(m.group(1))]
    args = [a.strip() for a in m.group(3).split(",") if a.strip()]
    if m.group(2) == "blend":
        normalize = not (args and args[-1] == "no_normalize")
        weights = _floats(args[:-1] if not normalize else args, text, name)
        if len(weights) != len(operands):
            raise ValueError(f"{name}: .blend() needs one weight per prompt ({len(operands)}), "
                             f"got {len(weights)}: {text!r}")
        return Conjunction([Blend(operands, weights, normalize)], [1.0])
    weights = _floats(args, text, name) or [1.0] * len(operands)
    if len(weights) != len(operands):
        raise ValueError(f"{name}: .and() needs one weight per prompt ({len(operands)}) or none, got {len(weights)}: "
                         f"{text!r}")
    return Conjunction(operands, weights)


SYNTAXES = ("a1111", "compel", "none")


def parse(text: str, syntax: str, name: str = "prompt") -> Conjunction:
    """Any syntax as a Conjunction (a1111 and none give one flat prompt), weights checked."""
    if syntax == "compel":
        return check_weights(parse_compel(text, name), name)
    if syntax == "a1111":
        return check_weights(Conjunction([parse_a1111(text, name)], [1.0]), name)
    if syntax == "none":
        return Conjunction([[Fragment(text, 1.0)]], [1.0])
    raise ValueError(f"syntax: expected one of {SYNTAXES}, got {syntax!r}")


def _check_weight(weight: float, what: str, name: str) -> None:
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise ValueError(f"{name}: the weight of {what} is {weight:g}; weights must be finite and at most "
                         f"{MAX_WEIGHT:g} in size (is the emphasis nested too deep?)")


def check_weights(conj: Conjunction, name: str) -> Conjunction:
    """``conj`` if every fragment, blend and .and() weight is usable, else a ValueError naming
    ``name`` and showing the offending fragment."""
    for operand, weight in zip(conj.prompts, conj.weights):
        _check_weight(weight, "a .and() part", name)
        flats = operand.prompts if isinstance(operand, Blend) else [operand]
        if isinstance(operand, Blend):
            for w in operand.weights:
                _check_weight(w, "a .blend() part", name)
            if operand.normalize and sum(operand.weights) == 0:
                raise ValueError(f"{name}: .blend() weights sum to 0 and cannot be normalised; "
                                 "use no_normalize or other weights")
        for fragments in flats:
            for f in fragments:
                if not (f.text == BREAK and f.weight == -1.0):
                    text = f.text if len(f.text) <= 40 else f.text[:37] + "..."
                    _check_weight(f.weight, repr(text), name)
    return conj
