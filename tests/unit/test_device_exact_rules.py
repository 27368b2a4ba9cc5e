"""The device-exactness rules of docs/architecture.md, checked on the source (CI has no GPU to catch a breach):
in the formats' arithmetic no `tensor / constant` (CUDA multiplies by the reciprocal: `qat.formats.common.divide`)
and no `.mean(` / `.sum(` (their addition order is the device's: `fixed_sum`, `mean_square`). A line that divides
or sums Python numbers, or tensors only ever on the CPU, says so with a trailing `# exact: <why>`."""
from __future__ import annotations

import ast
from pathlib import Path

import qat

ROOT = Path(qat.__file__).parent
FILES = sorted((ROOT / "formats").glob("*.py")) + [ROOT / "modules" / "hadamard.py", ROOT / "modules" / "quantizer.py",
                                                   ROOT / "observers" / "__init__.py"]


def _constant_like(node: ast.AST) -> bool:
    """A Python number as far as the source shows: a literal, a negated one, an ALL_CAPS module constant,
    `spec.qmax` / `qmin`, `finfo(...).max`, math.* or half_range(...) calls, arithmetic of these."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float))
    if isinstance(node, ast.UnaryOp):
        return _constant_like(node.operand)
    if isinstance(node, ast.BinOp):
        return _constant_like(node.left) and _constant_like(node.right)
    if isinstance(node, ast.Name):
        return node.id.isupper() or node.id in {"smax", "nmax", "qmax", "qmin"}
    if isinstance(node, ast.Subscript):
        return _constant_like(node.value)
    if isinstance(node, ast.Attribute):
        return node.attr in {"qmax", "qmin", "max", "bits"}
    if isinstance(node, ast.Call):
        f = node.func
        return (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math") or (
            isinstance(f, ast.Name) and f.id in {"half_range", "float", "int"})
    return False


DIVS = {"div", "div_", "divide", "true_divide"}  # torch.div(x, c), x.div(c), x.div_(c): the same multiply on CUDA


def breaches(path: Path) -> list[str]:
    src = path.read_text()
    lines = src.splitlines()
    found = []
    for node in ast.walk(ast.parse(src)):
        line = lines[node.lineno - 1] if hasattr(node, "lineno") else ""
        if "# exact:" in line:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _constant_like(node.right) \
                and not _constant_like(node.left):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)} (use divide)")
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Div) and _constant_like(node.value):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)} (use divide)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DIVS:
            args = node.args[1:] if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" \
                else node.args
            if args and _constant_like(args[0]):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)} (use divide)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {"mean", "sum"} \
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id in {"np", "math", "builtins"}):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)} (use fixed_sum / mean_square)")
    return found


def test_formats_divide_and_sum_the_same_way_on_every_device():
    found = [b for path in FILES for b in breaches(path)]
    assert not found, "\n".join(found)


def test_the_check_sees_a_breach(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(amax, spec, x):\n    return amax / 7.5, amax / spec.qmax, x.mean(-1), x.sum(-1)\n"
                   "def g(a):\n    return a / 2  # exact: a is a Python number\n"
                   "def h(x, spec):\n    x /= 3.0\n    return torch.div(x, spec.qmax), x.div_(2), torch.sum(x)\n")
    assert len(breaches(bad)) == 8
