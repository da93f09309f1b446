"""Personal layers (FedPer, FedBN): tensors that never leave the envoys, chosen by pytree path patterns.

A pattern is matched against a tensor's name as the wire names it, its pytree path joined by '/'
(``params/head/kernel``, ``batch_stats/BatchNorm_0/mean``). Segments are compared one by one:

- ``*`` inside a segment matches any characters of that one segment (``params/Dense_*/bias``);
- a segment that is exactly ``**`` matches any number of whole segments, none included
  (``params/head/**``, ``**/BatchNorm_*/**``);
- every other character matches itself.

A pattern names the tensors it matches from the start of the name to its end. The tensors any
pattern matches are the experiment's *personal* ones: each envoy keeps its own from round to
round (the initial model's at first), they are neither uploaded nor averaged, and the model the
director keeps holds their initial values. See docs/personal.md.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from fedjax_core.errors import InvalidRequestError

MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 256


class PatternError(ValueError):
    """A personal-layer pattern that cannot be used; the message names the pattern and the fix."""


def check_syntax(pattern: str) -> None:
    """Refuse a pattern that is not a '/'-separated path of non-empty segments, '**' standing alone."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError(f"personal pattern {pattern!r} is not a non-empty string: write a pytree path such as "
                           "'params/head/**'")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"personal pattern {pattern[:40]!r}... is {len(pattern)} characters long; at most "
                           f"{MAX_PATTERN_CHARS} are allowed: use '*' or '**' to shorten it")
    if not pattern.isprintable():
        raise PatternError(f"personal pattern {pattern!r} holds control characters (a tab, a newline...); write the "
                           "tensor's path as the model names it, with '*' for characters you cannot type")
    for segment in pattern.split("/"):
        if not segment:
            raise PatternError(f"personal pattern {pattern!r} has an empty path segment: separate segments with one "
                               "'/', with none at either end (e.g. 'params/head/**')")
        if "**" in segment and segment != "**":
            raise PatternError(f"personal pattern {pattern!r}: '**' must be a whole segment ('params/**/bias'); "
                               "within a segment use '*' ('params/Dense_*/bias')")


def _glob(pattern: str, segment: str) -> bool:
    """Whether one path ``segment`` matches one pattern segment, ``*`` standing for any characters. Two pointers
    that go back only to the last ``*``: time linear in the lengths' product, never exponential (a regex with
    several ``*`` could backtrack for seconds on a crafted name, holding the director)."""
    p = s = 0
    star, mark = -1, 0
    while s < len(segment):
        if p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, s, p + 1
        elif p < len(pattern) and pattern[p] == segment[s]:
            p, s = p + 1, s + 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            s = mark
        else:
            return False
    return all(c == "*" for c in pattern[p:])


@functools.lru_cache(maxsize=1024)
def _segments(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("/"))


def _match(pattern: str, name: str) -> bool:
    """``name`` against a checked ``pattern``, segment by segment: ``reach[j]`` says whether the pattern's
    segments so far can match the name's first ``j`` segments (``**`` takes any number of them)."""
    parts = name.split("/")
    reach = [True] + [False] * len(parts)
    for segment in _segments(pattern):
        if segment == "**":
            for j in range(1, len(parts) + 1):
                reach[j] = reach[j] or reach[j - 1]
        else:
            reach = [False] + [reach[j - 1] and _glob(segment, parts[j - 1]) for j in range(1, len(parts) + 1)]
    return reach[-1]


def matches(pattern: str, name: str) -> bool:
    """Whether tensor ``name`` is matched by ``pattern`` (checked with :func:`check_syntax` first)."""
    check_syntax(pattern)
    return _match(pattern, name)


def split(names: Iterable[str], patterns: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(shared, personal)``: ``names`` in their order, split by whether any of ``patterns`` matches them."""
    for pattern in patterns:
        check_syntax(pattern)
    shared, personal = [], []
    for name in names:
        (personal if any(_match(p, name) for p in patterns) else shared).append(name)
    return tuple(shared), tuple(personal)


def personal_names(names: Iterable[str], patterns: Sequence[str]) -> tuple[str, ...]:
    """The names of ``names`` that ``patterns`` make personal (none without patterns)."""
    return split(names, patterns)[1] if patterns else ()


def check_patterns(patterns: Sequence[str], model: Sequence[tuple[str, bool]]) -> None:
    """Refuse patterns that cannot run on a model of ``(tensor name, is float)`` pairs: too many, badly written,
    duplicated, one that matches nothing, or a set that leaves no ``params/`` float tensor to average."""
    if len(patterns) > MAX_PATTERNS:
        raise PatternError(f"personal lists {len(patterns)} patterns; at most {MAX_PATTERNS} are allowed: merge them "
                           "with '*' and '**'")
    for pattern in patterns:
        check_syntax(pattern)
    twice = sorted({p for p in patterns if patterns.count(p) > 1})
    if twice:
        raise PatternError(f"personal lists {', '.join(map(repr, twice))} twice: drop the copies")
    names = [name for name, _ in model]
    for pattern in patterns:
        if not any(_match(pattern, name) for name in names):
            example = next((n for n in names if n.startswith("params/")), names[0] if names else "-")
            raise PatternError(f"personal pattern {pattern!r} matches no tensor of the model (its tensors are named "
                               f"like {example!r}): fix the path, or drop the pattern")
    shared = set(split(names, patterns)[0])
    if not any(name.startswith("params/") and is_float and name in shared for name, is_float in model):
        raise PatternError(f"personal patterns {list(patterns)} make every 'params/' float tensor personal, so "
                           "nothing would be averaged: leave at least one layer shared (e.g. 'params/head/**' "
                           "instead of 'params/**')")


def check_not_personal(personal: frozenset[str] | set[str], envoy: str, name: str) -> None:
    """Refuse an upload that carries one of the experiment's personal tensors (the director's check of each one)."""
    if name in personal:
        raise InvalidRequestError(f"protocol violation: the update from {envoy!r} carries personal tensor {name!r}, "
                                  "which never leaves its envoy (the experiment's personal patterns match it); a "
                                  "worker uploads only its task's upload_tensors")
