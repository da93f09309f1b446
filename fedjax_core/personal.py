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
import re
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
    if any(c.isspace() or not c.isprintable() for c in pattern):
        raise PatternError(f"personal pattern {pattern!r} holds whitespace or control characters; tensor names "
                           "have none")
    for segment in pattern.split("/"):
        if not segment:
            raise PatternError(f"personal pattern {pattern!r} has an empty path segment: separate segments with one "
                               "'/', with none at either end (e.g. 'params/head/**')")
        if "**" in segment and segment != "**":
            raise PatternError(f"personal pattern {pattern!r}: '**' must be a whole segment ('params/**/bias'); "
                               "within a segment use '*' ('params/Dense_*/bias')")


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern:
    """The regex of ``pattern``, matched against ``name + '/'``: each segment is ``segment/``, and ``**`` any number
    of ``segment/`` pieces."""
    pieces = []
    for segment in pattern.split("/"):
        if segment == "**":
            pieces.append("(?:[^/]+/)*")
        else:
            pieces.append("[^/]*".join(re.escape(part) for part in segment.split("*")) + "/")
    return re.compile("".join(pieces))


def matches(pattern: str, name: str) -> bool:
    """Whether tensor ``name`` is matched by ``pattern`` (checked with :func:`check_syntax` first)."""
    check_syntax(pattern)
    return _compiled(pattern).fullmatch(name + "/") is not None


def split(names: Iterable[str], patterns: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(shared, personal)``: ``names`` in their order, split by whether any of ``patterns`` matches them."""
    for pattern in patterns:
        check_syntax(pattern)
    compiled = [_compiled(p) for p in patterns]
    shared, personal = [], []
    for name in names:
        (personal if any(c.fullmatch(name + "/") for c in compiled) else shared).append(name)
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
    if len(set(patterns)) != len(patterns):
        raise PatternError(f"personal lists a pattern twice: {list(patterns)}")
    names = [name for name, _ in model]
    for pattern in patterns:
        check_syntax(pattern)
        if not any(_compiled(pattern).fullmatch(name + "/") for name in names):
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
