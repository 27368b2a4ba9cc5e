"""The layers of docs/architecture.md, enforced on the source by an AST walk (no import of qat needed).

    cli -> lit -> jobs -> {export, ptq, sensitivity} -> {transform, control, data, models, assets}
        -> {arch, modules} -> {observers, ste, primitives} -> formats -> spec

`io`, `errors`, `testing`, `packing` (bit packing) and `recipes` (where the configs are) are leaves that anything may use. A module imports only from its own layer or below;
`export` and `ptq` are siblings that do not import each other. Also: no import cycle, no private name (`_x`)
imported across packages, no function-level import of a qat module (with no cycles there is nothing to protect),
and nothing below `jobs` imports Lightning or Hydra.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "qat"

# lowest first; each entry: the first dotted component below `qat` (a subpackage or a top-level module)
LAYERS = [
    {"io", "errors", "testing", "packing", "recipes"},
    {"spec"},
    {"formats"},
    {"observers", "ste", "primitives"},
    {"arch", "modules"},
    {"transform", "control", "data", "models", "assets"},
    {"export", "ptq", "sensitivity"},
    {"jobs", "demo"},
    {"lit"},
    {"cli"},
]
SIBLINGS = [{"export", "ptq"}]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
FRAMEWORK_FREE_BELOW = RANK["jobs"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package facade qat/__init__.py


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(line, target module or package, imported names, function-level?) for every import in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [a.name for a in node.names]
            # `from qat.x import y` may name a submodule y
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            yield node.lineno, target, [n for n in names if f"{target}.{n}" not in MODULES], id(node) in in_function
            for sub in subs:
                yield node.lineno, sub, [], id(node) in in_function


def _qat_edges():
    for module in sorted(MODULES):
        for line, target, names, lazy in _imports(module):
            if target == "qat" or target.startswith("qat."):
                yield module, line, target, names, lazy


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def test_every_module_has_a_layer():
    missing = sorted({u for m in MODULES if (u := _unit(m)) and u not in RANK})
    assert not missing, f"add these to LAYERS here and to docs/architecture.md: {missing}"


def layer_violation(module: str, target: str) -> str | None:
    """Why `module` may not import `target`, or None when it may."""
    src, dst = _unit(module), _unit(target)
    if src is None or dst is None or src == dst or src not in RANK or dst not in RANK:
        return None  # a module with no layer is reported by test_every_module_has_a_layer
    if RANK[dst] > RANK[src]:
        return f"{src} (layer {RANK[src]}) imports {target} (layer {RANK[dst]})"
    if any({src, dst} <= pair for pair in SIBLINGS):
        return f"{src} imports its sibling {target}"
    return None


def test_imports_go_down_the_layers_only():
    bad = [f"{_where(m, line)}: {why}" for m, line, t, _, _ in _qat_edges() if (why := layer_violation(m, t))]
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_package():
    bad = []
    for module, line, target, names, _ in _qat_edges():
        if _unit(module) == _unit(target):
            continue
        private = [n for n in names if n.startswith("_")] + [p for p in target.split(".") if p.startswith("_")]
        if private:
            bad.append(f"{_where(module, line)}: {module} imports private {private} from {target}")
    assert not bad, "\n".join(bad)


def test_no_function_level_import_of_qat():
    bad = [f"{_where(m, line)}: imports {t} inside a function" for m, line, t, _, lazy in _qat_edges() if lazy]
    assert not bad, "with no import cycles these protect nothing; import at the top:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, _, target, _, _ in _qat_edges():
        if target in MODULES and target != module:
            # a package's __init__ importing its own submodules is how packages are built, not a cycle
            if not (target.startswith(module + ".") and MODULES[module].name == "__init__.py"):
                edges[module].add(target)
    cycles = _strongly_connected(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_core_imports_no_lightning_or_hydra():
    bad = []
    for module in sorted(MODULES):
        unit = _unit(module)
        if unit is None or RANK.get(unit, 0) >= FRAMEWORK_FREE_BELOW:
            continue
        for line, target, _, _ in _imports(module):
            if target.split(".")[0] in FRAMEWORKS:
                bad.append(f"{_where(module, line)}: {module} imports {target}")
    assert not bad, "the core (below jobs) must work without Lightning and Hydra:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, target, allowed", [
    ("qat.spec", "qat.jobs.eval", False),            # a lower layer importing a higher one
    ("qat.ptq.gptq", "qat.export.kquants", False),   # siblings
    ("qat.export.native", "qat.ptq.rtn", False),
    ("qat.jobs.eval", "qat.spec", True),
    ("qat.ptq.gptq", "qat.io", True),
    ("qat.modules.fake", "qat.modules.quantizer", True),
])
def test_the_layer_rule_itself(module, target, allowed):
    assert (layer_violation(module, target) is None) is allowed
