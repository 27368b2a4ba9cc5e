"""Out-of-core PTQ (`qat.ptq.stream`): a tiny Llama saved as sharded safetensors, quantized one block at a time,
gives exactly (atol=0) the prepared state of the in-memory run."""
from __future__ import annotations

import io
import json

import pytest
import torch

from qat import testing
from qat.errors import ConfigError
from qat.models import load_model
from qat.ptq import ptq_model
from qat.ptq.stream import cpu_state, load_parts, stream_ptq


def _batches(n=4, rows=2, seq=32, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sharded")
    testing.tiny_llama(num_layers=3, tie_word_embeddings=True).save_pretrained(folder, max_shard_size="100KB")
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    return folder


@pytest.mark.parametrize("method", [{"name": "gptq", "min_tokens": 64}, {"name": "awq", "min_tokens": 64}],
                         ids=["gptq", "awq"])
def test_stream_equals_in_memory(sharded, tmp_path, method):
    info = stream_ptq(sharded, "w4a16_g128_ragged", method, _batches(), tmp_path / "parts", progress=False)
    streamed = load_parts(tmp_path / "parts")
    reference = ptq_model(load_model(sharded), "w4a16_g128_ragged", method, _batches(), progress=False).state_dict()
    assert streamed.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(streamed[key], value), key
        else:
            assert streamed[key] == value, key
    assert info["offload"] == "stream" and len(list((tmp_path / "parts").glob("part-*.pt"))) == 4


def test_stream_refuses_rtn(sharded, tmp_path):
    with pytest.raises(ConfigError, match="block-by-block"):
        stream_ptq(sharded, "w4a16_g128", "rtn", [], tmp_path / "parts", progress=False)


def test_qat_ptq_offload_refuses_eval_export_and_tiny():
    from qat.jobs.ptq import check_offload

    cfg = {"offload": "stream", "eval": {"split": "test"}, "export": "gguf", "model": {"path": "tiny"}}
    with pytest.raises(ConfigError) as err:
        check_offload(cfg)
    for key in ("eval.split='test'", "export='gguf'", "model.path='tiny'"):
        assert key in str(err.value)
    with pytest.raises(ConfigError, match="choose from"):
        check_offload({**cfg, "offload": "disk"})


def test_cpu_state_keeps_one_copy_per_shared_storage(monkeypatch):
    """Tied tensors off the CPU (meta here, standing in for a GPU) become views of one CPU storage, so model.pt stores
    it once, as after a CPU run; tensors already on the CPU are kept as they are."""
    copies = []

    def to_cpu(storage):  # meta storages have no data: a CPU storage of their size, counted
        copies.append(storage.nbytes())
        return torch.arange(storage.nbytes() // 4, dtype=torch.float32).untyped_storage()
    monkeypatch.setattr(torch.UntypedStorage, "cpu", to_cpu)
    embed = torch.empty(8, 4, device="meta")
    norm = torch.ones(4)
    state = {"embed.weight": embed, "lm_head.weight": embed, "row": embed[2], "norm.weight": norm, "step": 3}
    out = cpu_state(state)
    assert copies == [embed.untyped_storage().nbytes()]
    assert out["norm.weight"] is norm and out["step"] == 3
    assert {out[k].untyped_storage().data_ptr() for k in ("embed.weight", "lm_head.weight", "row")} == \
        {out["embed.weight"].untyped_storage().data_ptr()}
    assert torch.equal(out["embed.weight"], torch.arange(32.0).reshape(8, 4))
    assert torch.equal(out["row"], torch.arange(8.0, 12.0))
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["embed.weight"].untyped_storage().data_ptr() == loaded["lm_head.weight"].untyped_storage().data_ptr()
