"""Writing an export where another one lies: the folder never reads as a mix of the two."""
from __future__ import annotations

import pytest
import torch

import qat
from qat.export import detect_format, export, load_any

from tests.export.conftest import logits


@pytest.mark.parametrize("first,second", [("native", "gptq"), ("gptq", "compressed_tensors")])
def test_export_over_another_format_loads_as_the_new_one(model, ids, tmp_path, first, second):
    prepared = qat.prepare(model, qat.load_recipe("gptq_w4a16_g128"))
    export(prepared, tmp_path / "out", first)
    export(prepared, tmp_path / "out", second)
    assert detect_format(tmp_path / "out") == second
    assert torch.equal(logits(load_any(tmp_path / "out"), ids), logits(prepared, ids))


def test_interrupted_export_over_an_old_one_leaves_the_old_one_whole(model, ids, tmp_path, monkeypatch):
    import qat.export.native as native

    prepared = qat.prepare(model, qat.load_recipe("w4a16_g128"))
    export(prepared, tmp_path / "out", "native")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "write_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        export(prepared, tmp_path / "out", "native")
    # the old export is untouched (not a mix, not a marker-less folder), and nothing is left beside it
    assert torch.equal(logits(load_any(tmp_path / "out"), ids), logits(prepared, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
