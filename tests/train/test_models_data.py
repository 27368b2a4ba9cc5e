"""qat.models and qat.data: loading, errors, deterministic split and packing (no asset cache needed)."""
import json

import pytest
import torch

from qat.data import calibration_batches, load_documents, split_documents, tokenize_and_pack
from qat.lit.data import StreamSampler, TextDataModule
from qat.models import ByteTokenizer, context_length, load_model
from qat.testing import tiny_llama


def test_tiny_llama_is_deterministic():
    a, b = tiny_llama(seed=3), tiny_llama(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert context_length(a) == 256


def test_load_model_from_folder_and_safetensors(tmp_path):
    model = tiny_llama(num_layers=1)
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 7]])
    ref = model(ids).logits
    assert torch.allclose(load_model(str(tmp_path))(ids).logits, ref)
    assert torch.allclose(load_model(str(tmp_path / "model.safetensors"))(ids).logits, ref)
    assert load_model(str(tmp_path), dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["/does/not/exist", "./nope.safetensors", "missing_dir"])
def test_load_model_missing_path_names_it(bad):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(bad)


def test_load_model_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ValueError, match="choose from"):
        load_model("tiny", dtype="int3")


def test_split_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(100)]
    a, b = split_documents(docs, 0.1, 0.2, seed=1), split_documents(docs, 0.1, 0.2, seed=1)
    assert a == b
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (70, 10, 20)
    assert not set(a["train"]) & set(a["test"]) and not set(a["validation"]) & set(a["test"])
    assert split_documents(docs, 0.1, 0.2, seed=2)["test"] != a["test"]
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.5, 0.0)


def test_pack_blocks():
    blocks = tokenize_and_pack(["abc", "de"], ByteTokenizer(), 3)
    assert blocks.tolist() == [[100, 101, 102], [2, 103, 104]]
    with pytest.raises(ValueError, match="block_size"):
        tokenize_and_pack(["abc"], ByteTokenizer(), 64)


def test_load_documents_formats(tmp_path, corpus):
    paras = load_documents(corpus)
    assert len(paras) == 60 and all(p.strip() for p in paras)
    assert len(load_documents(corpus, sample_by="document")) == 1
    records = [{"text": f"row {i}", "x": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert load_documents(tmp_path / "a.jsonl") == [f"row {i}" for i in range(5)]
    (tmp_path / "b.json").write_text(json.dumps({r["text"]: {"extract": r["text"]} for r in records}))
    assert load_documents(tmp_path / "b.json", text_field="extract")[0] == "row 0"
    import datasets

    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "c.parquet"))
    assert len(load_documents(tmp_path / "c.parquet")) == 5
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    assert len(load_documents(tmp_path / "ds")) == 5
    with pytest.raises(ValueError, match="text_field='body'"):
        load_documents(tmp_path / "a.jsonl", text_field="body")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "missing.txt")


def test_datamodule_and_calibration_batches(corpus):
    dm = TextDataModule(corpus, block_size=32, batch_size=4, max_eval_blocks=5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert len(dm.blocks["validation"]) == 5
    cal = calibration_batches(dm, 3, 16)
    assert len(cal) == 3 and cal[0].shape == (1, 16)
    assert torch.equal(torch.cat(cal), torch.cat(calibration_batches({"path": corpus, "tokenizer": "tiny"}, 3, 16)))
    rows = calibration_batches(dm, 5, 16, batch_rows=2)  # the same sequences, two to a batch
    assert [tuple(b.shape) for b in rows] == [(2, 16), (2, 16), (1, 16)]
    assert torch.equal(torch.cat(rows), torch.cat(calibration_batches(dm, 5, 16)))
    with pytest.raises(ValueError, match="asked for"):
        calibration_batches({"path": corpus}, 10_000, 16)


def test_stream_sampler_seek_continues_the_stream():
    a = StreamSampler(10, seed=1, epoch_length=8)
    stream = list(a) + list(a) + list(a)  # three Lightning epochs of 8 read one stream of permutations of 10
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    b = StreamSampler(10, seed=1, epoch_length=8)
    b.seek(13)
    assert list(b) == stream[13:21]
    assert list(StreamSampler(10, seed=2)) != stream[:10]
