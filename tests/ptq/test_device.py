"""The `device` key of qat-ptq / qat-eval / qat-sensitivity: device=cpu is the default's result bit for bit (on a host
without CUDA, where auto is the CPU); the gpu-marked tests (skipped without CUDA) run the same jobs on the GPU.

Bounds of the GPU tests, as in tests/gpu/test_cuda.py: GPTQ's rounding decisions turn last-bit differences of the
Hessian (cuBLAS sums in another order than the CPU's BLAS) into different codes, so a CUDA run is compared with the
CPU's by its perplexity (within 2%) and the share of equal quantized weights (at least 90%); what GPTQ does not
touch (embeddings, norms) comes back from the GPU unchanged (atol=0)."""
from __future__ import annotations

import pytest
import torch

from qat.jobs.eval import run_eval_job
from qat.jobs.ptq import run_ptq_job
from qat.jobs.sensitivity import run_sensitivity_job
from qat.sensitivity import ScoreTable

from .conftest import compose_job

PTQ = ["progress=false", "calibration.samples=16", "eval.max_blocks=4", "method.min_tokens=64"]


def ptq_state(cfg: dict, out) -> tuple[dict, dict]:
    result = run_ptq_job(cfg, out)
    return result, torch.load(out / "model.pt", weights_only=True)  # no map_location: stored on the CPU


def test_device_cpu_equals_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("QAT_DEVICE", raising=False)  # the default: auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    default = compose_job("ptq", PTQ)
    default.pop("device")  # a config without the key: the same default
    cpu = compose_job("ptq", [*PTQ, "device=cpu"])
    (r1, s1), (r2, s2) = ptq_state(default, tmp_path / "default"), ptq_state(cpu, tmp_path / "cpu")
    assert r1["ppl"] == r2["ppl"] and s1.keys() == s2.keys()
    for key, value in s1.items():
        assert torch.equal(value, s2[key]) if isinstance(value, torch.Tensor) else value == s2[key], key


def close_states(cuda: dict, cpu: dict, share: float = 0.9) -> None:
    """`cuda` (a state saved from a GPU run) against the CPU run's: every tensor stored on the CPU; of the linears
    GPTQ solved, at least `share` of the integer codes equal and the scales within 1% (GPTQ's later groups take
    their scales from the updated weights); everything else equal (atol=0)."""
    assert cuda.keys() == cpu.keys()
    solved = {k[:-len("_quantizer.pinned_scale")]: k for k in cpu if k.endswith(".weight_quantizer.pinned_scale")}
    equal = total = 0
    for key, value in cpu.items():
        if not isinstance(value, torch.Tensor):
            continue
        assert cuda[key].device.type == "cpu", key
        if key in solved:
            scale, gpu_scale = cpu[solved[key]], cuda[solved[key]]
            assert torch.allclose(gpu_scale, scale, rtol=0.01, atol=0), key
            codes = [torch.round(w.reshape(w.shape[0], s.shape[1], -1) / s) for w, s in
                     ((value, scale), (cuda[key], gpu_scale))]
            equal += int((codes[0] == codes[1]).sum())
            total += value.numel()
        elif "weight_quantizer." not in key:  # the qparams follow the weights
            assert torch.equal(cuda[key], value), key
    assert total and equal / total >= share, equal / total


@pytest.mark.gpu
def test_qat_ptq_gptq_on_cuda_within_bound_of_cpu(tmp_path):
    (cpu, cpu_state), (gpu, gpu_state) = (ptq_state(compose_job("ptq", [*PTQ, f"device={d}"]), tmp_path / d)
                                          for d in ("cpu", "cuda"))
    assert abs(gpu["ppl"] / cpu["ppl"] - 1) <= 0.02, (gpu["ppl"], cpu["ppl"])
    close_states(gpu_state, cpu_state)


@pytest.mark.gpu
def test_streamed_ptq_on_cuda_within_bound_of_cpu(tmp_path):
    from qat import testing
    from qat.ptq.stream import load_parts, stream_ptq

    testing.tiny_llama(num_layers=3, tie_word_embeddings=True).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (2, 32), generator=g) for _ in range(4)]
    states = {}
    for device in ("cpu", "cuda"):
        stream_ptq(tmp_path / "m", "w4a16_g128", {"name": "gptq", "min_tokens": 64}, batches, tmp_path / device,
                   progress=False, device=torch.device(device))
        states[device] = load_parts(tmp_path / device)
    close_states(states["cuda"], states["cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_distributed_ptq_on_two_gpus_equals_one(tmp_path):
    """nccl, process r on cuda:r: the same weights as one process on one GPU (atol=0: the same kernels on the same
    batches; GPUs of one model)."""
    one = ptq_state(compose_job("ptq", [*PTQ, "device=cuda:0"]), tmp_path / "one")[1]
    two = ptq_state(compose_job("ptq", [*PTQ, "device=cuda", "distributed.processes=2"]), tmp_path / "two")[1]
    for key, value in one.items():
        assert torch.equal(value, two[key]) if isinstance(value, torch.Tensor) else value == two[key], key


@pytest.mark.gpu
def test_qat_eval_on_cuda(tmp_path):
    ppl = {d: run_eval_job(compose_job("eval", ["model=tiny", "data=fixture", "max_new_tokens=2", f"device={d}"]),
                           tmp_path / d)["ppl"] for d in ("cpu", "cuda")}
    assert abs(ppl["cuda"] / ppl["cpu"] - 1) <= 1e-3, ppl


@pytest.mark.gpu
def test_qat_sensitivity_on_cuda(tmp_path):
    """Fisher scores on the GPU within 1% of the CPU's (summed squares of fp32 products, in another order)."""
    over = ["calibration.samples=4", "plot=false"]
    scores = {}
    for device in ("cpu", "cuda"):
        run_sensitivity_job(compose_job("sensitivity", [*over, f"device={device}"]), str(tmp_path / device))
        table = ScoreTable.load(tmp_path / device / "scores.json")
        scores[device] = {(m.name, c): s for m in table.modules for c, s in m.scores.items()}
    assert scores["cpu"].keys() == scores["cuda"].keys()
    for key, value in scores["cpu"].items():
        assert abs(scores["cuda"][key] - value) <= 0.01 * abs(value) + 1e-12, key
