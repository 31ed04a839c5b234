"""Module-name matching shared by ``skip_modules``, ``layer_configs`` and the module filters.

A pattern matches a dotted module name ``N`` in one of four ways, from most to least specific:

1. **exact** -- the pattern equals ``N`` (``"model.layers.0.self_attn.q_proj"``);
2. **dotted path** -- the pattern's dot-separated parts appear as a contiguous run of ``N``'s parts.
   This covers a submodule prefix (``"model.layers.0"`` covers everything under it), a last name
   (``"lm_head"``, ``"q_proj"``) and a middle path (``"self_attn.q_proj"``, ``"layers.3"``). Parts
   compare whole, so ``"layers.1"`` never matches ``"layers.10"``;
3. **glob** -- a pattern with ``*``, ``?`` or ``[`` matched against the whole name with
   :func:`fnmatch.fnmatchcase` (``"*.mlp.*"``);
4. **regex** -- a pattern starting with ``re:`` matched with :func:`re.fullmatch`
   (``"re:.*layers\\.(0|1)\\..*"``).

When several patterns match, the most specific wins: exact beats dotted path beats glob beats
regex; between two dotted paths the one with more parts wins; remaining ties go to the longer
pattern, then to the one listed first.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Iterable

__all__ = ["match_rank", "matches", "best_match", "validate_pattern", "REGEX_PREFIX"]

REGEX_PREFIX = "re:"
_GLOB_CHARS = set("*?[")


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> "re.Pattern[str]":
    return re.compile(pattern[len(REGEX_PREFIX):])


def validate_pattern(pattern: str, field_name: str) -> None:
    """Raise ``ValueError`` naming ``field_name`` when ``pattern`` is not a usable pattern."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"{field_name}: {pattern!r} is not a module pattern (a non-empty string)")
    if pattern.startswith(REGEX_PREFIX):
        try:
            _compiled(pattern)
        except re.error as e:
            raise ValueError(f"{field_name}: {pattern!r} is not a valid regular expression ({e}); "
                             f"write it as 're:<python regex>'") from e


def match_rank(pattern: str, name: str) -> tuple[int, int, int] | None:
    """How specifically ``pattern`` matches ``name``: a sortable tuple, or ``None`` if no match."""
    if pattern.startswith(REGEX_PREFIX):
        return (0, 0, len(pattern)) if _compiled(pattern).fullmatch(name) else None
    if _GLOB_CHARS & set(pattern):
        return (1, 0, len(pattern)) if fnmatch.fnmatchcase(name, pattern) else None
    if pattern == name:
        return (3, 0, len(pattern))
    parts, target = pattern.split("."), name.split(".")
    n = len(parts)
    for i in range(len(target) - n + 1):
        if target[i:i + n] == parts:
            return (2, n, len(pattern))
    return None


def matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` matches module ``name`` by any of the rules above."""
    return match_rank(pattern, name) is not None


def best_match(name: str, patterns: Iterable[str]) -> str | None:
    """The most specific pattern of ``patterns`` that matches ``name`` (``None`` if none does)."""
    best, best_rank = None, None
    for pattern in patterns:
        rank = match_rank(pattern, name)
        if rank is not None and (best_rank is None or rank > best_rank):
            best, best_rank = pattern, rank
    return best
