"""qat.assets without the network (cache dir, manifest verification, errors); the real cache in `slow` tests."""
import pytest

from qat import assets


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "env"))
    assert assets.cache_dir() == tmp_path / "env"
    assert assets.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("QAT_CACHE")
    assert assets.cache_dir().name == "qat"


def test_manifest_verify_detects_corruption(tmp_path):
    f = tmp_path / "wiki" / "summaries_en-us.json"
    f.parent.mkdir()
    f.write_text("{}")
    assets._write_manifest(tmp_path, {"wiki/summaries_en-us.json": assets.sha256_file(f)})
    assert assets.verify(tmp_path) == []
    f.write_text('{"edited": 1}')
    assert "sha256 mismatch" in assets.verify(tmp_path)[0]
    f.unlink()
    assert "missing" in assets.verify(tmp_path)[0]


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="qat-assets --only model"):
        assets.require("model", tmp_path)
    with pytest.raises(ValueError, match="choose from"):
        assets.fetch(tmp_path, only=["weights"])


def test_pinned_checksums():
    assert all(s.sha256 and len(s.sha256) == 64 for s in assets.SOURCES.values())


@pytest.mark.slow
def test_cached_smollm2_and_wiki_give_a_sane_perplexity():
    pytest.importorskip("transformers")
    try:
        assets.require("model"), assets.require("wiki")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert assets.verify() == []
    from qat.data import calibration_batches
    from qat.jobs.measure import perplexity
    from qat.models import load_model

    model = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    import torch

    blocks = torch.cat(calibration_batches({"path": "wiki", "tokenizer": "smollm2-135m"}, 4, 256, split="test"))
    assert 5 < perplexity(model, blocks, 4) < 40
