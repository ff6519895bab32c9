"""A1111 prompt editing, alternation and composition (``AND``): what text each step sees.

The syntax of the AUTOMATIC1111 web UI (its ``modules/prompt_parser.py``), read the same way:

- ``[from:to:when]`` uses ``from`` up to step ``when``, then ``to``; ``[to:when]`` adds
  ``to`` after ``when``, ``[from::when]`` removes ``from`` after it. ``when`` written with a
  decimal point is a fraction of the steps (``0.5``, ``1.0``), without one a step (``10``).
- ``[a|b|c]`` alternates: step 1 ``a``, step 2 ``b``, ...; options may be empty (``[fe|]male``).
- Nesting works everywhere (``[a:[b|c]:0.5]``, ``([x:y:3])``); anything that is not well formed
  stays literal text for the emphasis parser, and a ``|`` outside any ``[...|...]`` (or a
  lone trailing backslash) leaves the whole prompt literal, as in A1111.
- ``A AND B:0.6 AND C`` (split first, on the word ``AND``) composes prompts: each part is
  one more conditional prediction, combined as ``uncond + cfg * sum_i w_i (cond_i - uncond)``
  (weight: a trailing ``:number``, default 1; also without ``AND``). The negative prompt
  is never split.

:func:`prompt_schedule` equals A1111's ``get_learned_conditioning_prompt_schedules`` (its
current rules, not ``use_old_scheduling``) and :func:`split_and` its
``get_multicond_prompt_list`` for one prompt: ``tests/test_prompt_editing.py`` compares both
with A1111's own functions. The parser here is our own recursive descent over A1111's grammar
(A1111 uses lark); nothing in this module touches a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

# text other than brackets, colons and pipes; a backslash escapes the next character
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# "[...:" then lark's SIGNED_NUMBER with optional whitespace either side, then "]"
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_LITERAL = "[]():"  # what may stand unmatched at the top level


@dataclass
class _Edit:
    before: Optional[list]
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list


_Node = Union[str, list, _Edit, _Alternate]


def _sequence(s: str, i: int) -> tuple[list, int]:
    """Text and well-formed brackets from ``i`` on; stops where neither continues."""
    nodes: list = []
    while i < len(s):
        m = _PLAIN.match(s, i)
        if m:
            nodes.append(m.group())
            i = m.end()
            continue
        if s[i] not in "([":
            break
        found = _bracket(s, i)
        if found is None:
            break
        node, i = found
        nodes.append(node)
    return nodes, i


def _bracket(s: str, i: int) -> Optional[tuple[_Node, int]]:
    """The bracket construct opening at ``i``, or None when it is not well formed."""
    n = len(s)
    first, j = _sequence(s, i + 1)
    if j >= n:
        return None
    if s[i] == "(":  # emphasis, kept as text for the emphasis parser
        if s[j] == ")":
            return ["(", *first, ")"], j + 1
        if s[j] == ":":
            second, k = _sequence(s, j + 1)
            if k < n and s[k] == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None
    if s[j] == "]":
        return ["[", *first, "]"], j + 1
    if s[j] == "|":
        options = [first]
        while j < n and s[j] == "|":
            option, j = _sequence(s, j + 1)
            options.append(option)
        return (_Alternate(options), j + 1) if j < n and s[j] == "]" else None
    if s[j] == ":":
        m = _WHEN.match(s, j + 1)
        if m:  # [to:when]
            return _Edit(None, first, m.group(1)), m.end()
        second, k = _sequence(s, j + 1)
        if k < n and s[k] == ":":
            m = _WHEN.match(s, k + 1)
            if m:  # [from:to:when]
                return _Edit(first, second, m.group(1)), m.end()
    return None


def _parse(prompt: str) -> Optional[list]:
    """The prompt's tree, or None where A1111's grammar rejects it (then it is all literal)."""
    nodes: list = []
    i = 0
    while i < len(prompt):
        part, i = _sequence(prompt, i)
        nodes.extend(part)
        if i < len(prompt):
            if prompt[i] not in _LITERAL:
                return None
            nodes.append(prompt[i])
            i += 1
    return nodes


def _walk(nodes: list):
    for node in nodes:
        yield node
        if isinstance(node, list):
            yield from _walk(node)
        elif isinstance(node, _Edit):
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _text(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, list):
            out.append(_text(node, step))
        elif isinstance(node, _Edit):
            out.append(_text((node.before or []) if step <= node.when else node.after, step))
        else:
            out.append(_text(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]``: ``text`` is used up to and including step ``end_at_step``
    (1-based, as A1111; the last entry ends at ``steps``)."""
    tree = _parse(prompt)
    if tree is None:
        return [(steps, prompt)]
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            value = float(node.number)
            if "." in node.number:
                value *= steps
            node.when = int(min(steps, value))  # min first: 1e400 is a step beyond the end
            if node.when >= 1:
                ends.add(node.when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _text(tree, end)) for end in sorted(ends)]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The prompt's ``AND``-separated parts, each ``(text, weight)``."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _WEIGHT.search(part).groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


def at_step(schedule: list[tuple[int, str]], step: int) -> int:
    """The index of the schedule entry A1111 uses at sampling step ``step`` (counted from 0,
    as its denoiser's step counter): the first entry with ``step <= end_at_step``, else the first."""
    return next((i for i, (end, _) in enumerate(schedule) if step <= end), 0)
