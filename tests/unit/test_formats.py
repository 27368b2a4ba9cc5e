"""The format registry: every QuantSpec has one format, lookups name what is registered, checks come from the
format, and the core has no import cycle through qat.spec."""
import ast
from pathlib import Path

import pytest

import qat
from qat.formats import FORMATS, Format, get_format, gguf_types, register_format


def test_every_recipe_weight_has_a_format():
    for name in qat.recipe_names():
        spec = qat.load_recipe(name).base.weight
        if spec is not None:
            assert isinstance(get_format(spec), Format)


def test_unknown_format_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"format 'nf4'; registered: \['fp8', 'fp8_block', 'ggml', 'ggml_k', 'int', 'iq4_nl', 'iq4_xs', 'mxfp4', 'mxfp8', 'nvfp4', 'ternary'\]"):
        get_format("nf4")


def test_unknown_grid_lists_the_registered_grids():
    with pytest.raises(ValueError, match=r"QuantSpec.grid='nf4'; choose from \['uniform', 'block', 'ggml', 'ggml_k'"):
        qat.QuantSpec(grid="nf4")
    with pytest.raises(ValueError, match=r"QuantSpec.grid='ggml' needs dtype in \['int'\], not 'fp8_e4m3'"):
        qat.QuantSpec(dtype="fp8_e4m3", granularity="per_group", group_size=32, grid="ggml")


def test_a_second_format_cannot_take_a_registered_name():
    class Again(Format):
        name, grid, dtypes = "int", "uniform", ("int",)

    with pytest.raises(ValueError, match="already registered"):
        register_format(Again())
    assert type(FORMATS["int"]).__name__ == "IntFormat"


def test_gguf_types_come_from_the_formats():
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"} <= set(gguf_types())
    for name, t in gguf_types().items():
        spec = t.spec()
        trained = get_format(spec).gguf_type(spec)
        # a second storage of the same grid (TQ1_0 of the ternary g256, whose first type is TQ2_0) maps to the first
        assert trained == name or (name, trained) == ("TQ1_0", "TQ2_0")
        assert gguf_types()[trained].spec() == spec


def _qat_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {m for m in found if m.startswith("qat")}


def test_layers_spec_below_formats_below_primitives():
    root = Path(qat.__file__).parent
    assert _qat_imports(root / "spec.py") == set()  # the formats fill its registry; it imports none of them
    above = ("qat.primitives", "qat.observers", "qat.modules", "qat.transform", "qat.export", "qat.ptq", "qat.control")
    for path in (root / "formats").glob("*.py"):
        assert not {m for m in _qat_imports(path) if m.startswith(above)}, path.name
