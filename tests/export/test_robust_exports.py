"""Exports that are complete or absent (#15 defects 2, 3, 9, 10): an incomplete folder never loads as a model, an
interrupted overwrite keeps the old export, killed exports' temporaries are cleaned, two exports to one output
cannot both succeed."""
from __future__ import annotations

import json
import os

import pytest
import torch

import qat
from qat.errors import BadFileError, UserError
from qat.export import export, load_any
from qat.export.publish import ExportBusyError, atomic_export, stale_temporaries
from qat.jobs.export import run_export

from tests.export.conftest import logits, tiny_llama


@pytest.fixture
def prepared(model):
    return qat.prepare(model, qat.load_recipe("gptq_w4a16_g128"))


def test_native_folder_without_its_description_is_refused(prepared, tmp_path):
    out = export(prepared, tmp_path / "n", "native")
    (out / "qat_quant.json").unlink()  # what a kill before the marker left (it loaded as random weights, ppl 2.4e15)
    with pytest.raises(BadFileError, match="no qat_quant.json"):
        load_any(out)


def test_compressed_tensors_config_without_quantization_config_is_refused(prepared, tmp_path):
    out = export(prepared, tmp_path / "ct", "compressed_tensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = None
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadFileError, match="packed quantized tensors"):
        load_any(out)


@pytest.mark.parametrize("fmt", ["native", "gptq"])
def test_overwrite_interrupted_at_publishing_keeps_the_old_export(prepared, model, ids, tmp_path, monkeypatch, fmt):
    import qat.export.publish as publish

    out = export(prepared, tmp_path / "out", fmt)
    before = logits(load_any(out), ids)
    other = qat.prepare(tiny_llama(seed=1), qat.load_recipe("w4a16_g128"))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        export(other, out, fmt)
    assert torch.equal(logits(load_any(out), ids), before) and not stale_temporaries(out)


def test_old_export_left_aside_by_a_crash_is_restored(prepared, ids, tmp_path):
    out = export(prepared, tmp_path / "out", "native")
    before = logits(load_any(out), ids)
    os.rename(out, tmp_path / ".out.qat-old-abc")  # a kill between "old aside" and "new in"
    with pytest.raises(UserError, match="already exists"):  # restored first, so not overwritten silently
        export(prepared, out, "native", overwrite=False)
    assert torch.equal(logits(load_any(out), ids), before) and not stale_temporaries(out)


def test_stale_temporaries_are_cleaned_and_not_counted(tmp_path):
    stale = tmp_path / ".m.gguf.qat-tmp-dead"
    stale.write_bytes(b"\0" * (1 << 20))
    inside = tmp_path / ".n.qat-tmp-dead"
    inside.mkdir()
    (inside / "model.safetensors").write_bytes(b"\0" * (1 << 20))
    gguf = run_export("tiny", str(tmp_path / "m.gguf"), format="gguf", gguf_type="Q8_0")
    native = run_export("tiny", str(tmp_path / "n"), format="native", quant="w4a16_g128", tiny={"hidden_size": 128, "intermediate_size": 256})
    assert not stale.exists() and not inside.exists()
    assert gguf["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert native["bytes"] == sum(f.stat().st_size for f in (tmp_path / "n").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "n"]


def test_two_exports_to_one_output_cannot_both_succeed(prepared, tmp_path):
    model = tiny_llama()
    export(prepared, tmp_path / "out", "native", overwrite=False)
    with pytest.raises(UserError, match="already exists"):
        export(prepared, tmp_path / "out", "native", overwrite=False)
    with atomic_export(tmp_path / "m.gguf"):  # another export holds the output
        with pytest.raises(ExportBusyError, match=f"pid {os.getpid()}"):
            export(model, tmp_path / "m.gguf", "gguf", "Q8_0")
    export(model, tmp_path / "m.gguf", "gguf", "Q8_0")  # the lock went with its holder


def test_dead_temporaries_of_another_output_are_cleaned_but_not_a_running_ones(tmp_path):
    dead = tmp_path / ".gone.gguf.qat-tmp-1"
    dead.write_bytes(b"\0" * 1000)
    aside = tmp_path / ".kept.qat-old-1"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    with atomic_export(tmp_path / "busy.gguf") as running:  # another export, alive
        export(tiny_llama(), tmp_path / "m.gguf", "gguf", "Q8_0")
        assert running.exists()
    assert not dead.exists() and (tmp_path / "kept" / "config.json").is_file() and not aside.exists()
