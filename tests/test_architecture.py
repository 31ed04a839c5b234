"""The layering of docs/architecture.md, enforced: every import of every module (at the top, inside
functions, under ``if TYPE_CHECKING:``) points to a layer below its own or within it, and no
imports form a cycle. ``backend_manager`` never imports ``quantization_wrapper``."""

from __future__ import annotations

import ast
import fnmatch
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("backend_manager", "quantization_wrapper")

#: Bottom to top. A module may import modules of its own layer or of the layers below (never above),
#: and the whole graph must be acyclic. Patterns are fnmatch globs over dotted module names; the
#: first matching layer wins. Keep in step with the picture in docs/architecture.md.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("machine", ("backend_manager", "backend_manager.*")),
    ("basics", ("quantization_wrapper.errors", "quantization_wrapper.patterns", "quantization_wrapper.units",
                "quantization_wrapper.methods")),
    ("config", ("quantization_wrapper.config",)),
    ("registry and rules", ("quantization_wrapper.registry", "quantization_wrapper.tensors",
                            "quantization_wrapper.filters", "quantization_wrapper.compatibility",
                            "quantization_wrapper.validation", "quantization_wrapper.checkpoint.files",
                            "quantization_wrapper.checkpoint.safetensors_io",
                            "quantization_wrapper.checkpoint.checksums", "quantization_wrapper.checkpoint.description",
                            "quantization_wrapper.checkpoint.skeleton")),
    ("model surgery", ("quantization_wrapper.experts", "quantization_wrapper.surgery")),
    ("planning", ("quantization_wrapper.sizing", "quantization_wrapper.mixed_precision",
                  "quantization_wrapper.mixed_precision.*", "quantization_wrapper.presets",
                  "quantization_wrapper.recommend")),
    ("factory", ("quantization_wrapper.factory",)),
    ("checkpoints", ("quantization_wrapper.checkpoint", "quantization_wrapper.checkpoint.*",
                     "quantization_wrapper.serialization", "quantization_wrapper.loading",
                     "quantization_wrapper.native_formats", "quantization_wrapper.checkpoint_dir")),
    ("integrations", ("quantization_wrapper.peft_integration", "quantization_wrapper.peft_experts", "quantization_wrapper.training",
                      "quantization_wrapper.fsdp", "quantization_wrapper.hf_quantizer")),
    ("backends", ("quantization_wrapper.adapters", "quantization_wrapper.adapters.*")),
    ("facade", ("quantization_wrapper", "quantization_wrapper.cli", "quantization_wrapper.demo",
                "quantization_wrapper.__main__")),
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS "
                         f"and to the picture in docs/architecture.md")


def _own(name: str) -> str | None:
    """The module of ours that ``name`` (a dotted import target) is, or is inside."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every module of ours that ``module`` imports, wherever the import statement stands."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import sub`` depends on pkg.sub when that is a module, else on pkg itself
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        else:
            continue
        for name in names:
            own = _own(name)
            if own is not None and own != module:
                targets.add(own)
    return targets


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_backend_manager_never_imports_quantization_wrapper():
    offenders = {m: sorted(t for t in ts if t.startswith("quantization_wrapper"))
                 for m, ts in GRAPH.items() if m.startswith("backend_manager")}
    assert not {m: t for m, t in offenders.items() if t}


def test_imports_point_down():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, ts in sorted(GRAPH.items()) for t in sorted(ts) if _layer(t) > _layer(m)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_checker_sees_cycles_and_function_level_imports():
    # the checker itself: a cycle through an import inside a function is found
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert "quantization_wrapper.registry" in GRAPH["quantization_wrapper.adapters.base"]


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_the_picture_names_every_layer(doc):
    text = (ROOT / doc).read_text()
    missing = [name for name, _ in LAYERS if name not in text]
    assert not missing, f"{doc} does not show the layers {missing}"
