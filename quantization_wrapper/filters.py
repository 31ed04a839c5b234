"""Module filters: callables that decide, module by module, whether a module gets quantized.

A filter is called as ``filter(module, name)`` for every module the model walker visits and returns
``True`` to quantize (when the module is quantizable at all). Filters combine with ``+``: the
combined filter quantizes a module only when every part agrees. After the walk, ``validate()``
raises if a name the filter was given matched nothing, so a typo in a skip list cannot pass
silently.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from .patterns import match_rank, validate_pattern

__all__ = [
    "QuantizeModuleFilter",
    "ExcludeModuleByName",
    "ExcludeSubmodules",
    "IncludeModuleByName",
    "FunctionFilter",
    "CombinedFilter",
    "as_module_filter",
]


class QuantizeModuleFilter:
    """Base class. Subclasses implement ``__call__(module, name) -> bool`` (``True``: quantize)."""

    def __call__(self, module: nn.Module, name: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` if the filter was configured with something that matched nothing."""

    def reset(self) -> None:
        """Forget what earlier walks matched (called by the walker before each walk)."""

    def __add__(self, other: "QuantizeModuleFilter") -> "CombinedFilter":
        if not callable(other):
            return NotImplemented
        return CombinedFilter([self, as_module_filter(other)])


class _NameListFilter(QuantizeModuleFilter):
    """Shared logic of the name-list filters: patterns, and which of them matched something."""

    kind = "name"

    def __init__(self, names: Iterable[str]):
        if isinstance(names, str):
            names = [names]
        self.names = list(names)
        if not self.names:
            raise ValueError(f"{type(self).__name__} needs at least one module name")
        for name in self.names:
            validate_pattern(name, type(self).__name__)
        self.matched: dict[str, list[str]] = {n: [] for n in self.names}

    def _hit(self, name: str) -> bool:
        hit = False
        for pattern in self.names:
            if self._matches(pattern, name):
                self.matched[pattern].append(name)
                hit = True
        return hit

    def _matches(self, pattern: str, name: str) -> bool:
        raise NotImplementedError  # pragma: no cover

    def reset(self) -> None:
        self.matched = {n: [] for n in self.names}

    def validate(self) -> None:
        missing = [n for n, hits in self.matched.items() if not hits]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: {missing} matched no module of the model; check the "
                f"spelling against model.named_modules() (matching rules: quantization_wrapper.patterns)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.names!r})"


class ExcludeModuleByName(_NameListFilter):
    """Keep the named modules in full precision: an exact dotted name, a trailing name
    (``"lm_head"``), a glob or a ``re:`` regex. Children of a named module are not excluded --
    use :class:`ExcludeSubmodules` for whole subtrees."""

    def _matches(self, pattern: str, name: str) -> bool:
        rank = match_rank(pattern, name)
        if rank is None:
            return False
        if rank[0] == 2:  # dotted path: only when it ends at this module, not above it
            return name == pattern or name.endswith("." + pattern)
        return True

    def __call__(self, module: nn.Module, name: str) -> bool:
        return not self._hit(name)


class ExcludeSubmodules(_NameListFilter):
    """Keep whole subtrees in full precision: ``"model.embeddings"`` excludes the module and every
    module under it."""

    def _matches(self, pattern: str, name: str) -> bool:
        rank = match_rank(pattern, name)
        if rank is None:
            return False
        if rank[0] == 2:
            return name == pattern or name.startswith(pattern + ".") or f".{pattern}." in f".{name}."
        return True

    def __call__(self, module: nn.Module, name: str) -> bool:
        # Match the subtree root and every descendant: the walker calls us with each full name.
        return not self._hit(name)


class IncludeModuleByName(_NameListFilter):
    """Quantize only modules matching one of ``names`` (any rule of
    :mod:`quantization_wrapper.patterns`, subtrees included)."""

    def _matches(self, pattern: str, name: str) -> bool:
        return match_rank(pattern, name) is not None

    def __call__(self, module: nn.Module, name: str) -> bool:
        return self._hit(name)


class FunctionFilter(QuantizeModuleFilter):
    """Wrap a plain ``fn(module, name) -> bool`` so it combines with ``+``."""

    def __init__(self, fn: Callable[[nn.Module, str], bool]):
        if not callable(fn):
            raise ValueError(f"FunctionFilter needs a callable(module, name) -> bool, got {fn!r}")
        self.fn = fn

    def __call__(self, module: nn.Module, name: str) -> bool:
        return bool(self.fn(module, name))

    def __repr__(self) -> str:
        return f"FunctionFilter({getattr(self.fn, '__name__', self.fn)!r})"


class CombinedFilter(QuantizeModuleFilter):
    """All parts must return ``True``. Every part sees every module, so each can validate."""

    def __init__(self, filters: Iterable[QuantizeModuleFilter]):
        self.filters: list[QuantizeModuleFilter] = []
        for f in filters:
            self.filters.extend(f.filters if isinstance(f, CombinedFilter) else [as_module_filter(f)])

    def __call__(self, module: nn.Module, name: str) -> bool:
        results = [f(module, name) for f in self.filters]  # no short-circuit: keep match records
        return all(results)

    def validate(self) -> None:
        errors = []
        for f in self.filters:
            try:
                f.validate()
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("; ".join(errors))

    def reset(self) -> None:
        for f in self.filters:
            f.reset()

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.filters))


def as_module_filter(obj: QuantizeModuleFilter | Callable[[nn.Module, str], bool] | None):
    """Normalize ``None``, a filter or a plain callable into a :class:`QuantizeModuleFilter`."""
    if obj is None or isinstance(obj, QuantizeModuleFilter):
        return obj
    if callable(obj):
        return FunctionFilter(obj)
    raise ValueError(f"module_filter={obj!r} must be a QuantizeModuleFilter or a callable(module, name)")
