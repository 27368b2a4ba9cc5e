"""The `device` key of qat-ptq / qat-eval / qat-sensitivity: device=cpu is the default's result bit for bit (on a host
without CUDA, where auto is the CPU); the gpu-marked tests (skipped without CUDA) run the same jobs on the GPU.

Bounds of the GPU tests: GPTQ's rounding decisions turn last-bit differences of the Hessian (cuBLAS sums in
another order than the CPU's BLAS) into different codes, and one flipped code moves the error pushed onto the rest of
its row and the inputs of the later blocks. So the GPU tests run GPTQ with static groups (the scales come from the
original weights: equal, atol=0) and compare a CUDA run with the CPU's by its perplexity (within 2%), the share of
equal codes (at least 80%) and of codes at most one step apart (at least 98%); what GPTQ does not touch (embeddings,
norms) comes back from the GPU unchanged (atol=0). `test_gptq_bounds_hold_under_hessian_noise` checks these bounds
on the CPU against such noise (measured, float32 Hessians perturbed by 1e-7..1e-5 relative: 87-100% equal codes,
99.4% within one step, perplexity within 0.4%; dynamic groups moved the scales by 11-25%)."""
from __future__ import annotations

import pytest
import torch

from qat.jobs.eval import run_eval_job
from qat.jobs.ptq import run_ptq_job
from qat.jobs.sensitivity import run_sensitivity_job
from qat.ptq.stats import InputStats
from qat.sensitivity import ScoreTable

from .conftest import compose_job

PTQ = ["progress=false", "calibration.samples=16", "eval.max_blocks=4", "method.min_tokens=64"]
STATIC = [*PTQ, "method.static_groups=true"]  # GPTQ with scales that a noisy Hessian does not move (see above)
# w8a8_static's static int8 inputs with minmax ranges (its percentile / PACT ranges do not merge across ranks: refused)
STATIC_MINMAX = ["quant=w8a8_static", "quant.input.observer=minmax", "quant.input.learn=none",
                 "~quant.input.observer_args"]


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
    assert r1["ppl"] == r2["ppl"] and s1.keys() == s2.keys() and r1["device"] == r2["device"] == "cpu"
    for key, value in s1.items():
        assert torch.equal(value, s2[key]) if isinstance(value, torch.Tensor) else value == s2[key], key


def close_states(cuda: dict, cpu: dict, equal_share: float = 0.8, near_share: float = 0.98) -> None:
    """`cuda` (a state saved from a GPU run, GPTQ with static groups) against the CPU run's: every tensor stored on the
    CPU; of the linears GPTQ solved, the scales equal (fitted on the original weights), at least `equal_share` of the
    integer codes equal and `near_share` at most one step apart; everything else equal (atol=0)."""
    assert cuda.keys() == cpu.keys()
    solved = {k[:-len("_quantizer.pinned_scale")]: k for k in cpu if k.endswith(".weight_quantizer.pinned_scale")}
    equal = near = total = 0
    for key, value in cpu.items():
        if not isinstance(value, torch.Tensor):
            continue
        assert cuda[key].device.type == "cpu", key
        if key in solved:
            scale = cpu[solved[key]]
            assert torch.equal(cuda[solved[key]], scale), key
            codes = [torch.round(w.reshape(w.shape[0], scale.shape[1], -1) / scale) for w in (value, cuda[key])]
            equal += int((codes[0] == codes[1]).sum())
            near += int(((codes[0] - codes[1]).abs() <= 1).sum())
            total += value.numel()
        elif "weight_quantizer." not in key:  # the qparams follow the weights
            assert torch.equal(cuda[key], value), key
    assert total and equal / total >= equal_share and near / total >= near_share, (equal / total, near / total)


def noisy_hessians(monkeypatch, relative: float, seed: int = 0) -> None:
    """Every GPTQ Hessian perturbed by symmetric relative noise of size `relative` (a float32 ulp is 1.2e-7): the
    last-bit differences of a Hessian summed on a GPU, simulated on the CPU."""
    hessian = InputStats.hessian
    g = torch.Generator().manual_seed(seed)

    def noisy(self):
        h = hessian(self)
        noise = torch.randn(h.shape, generator=g) * relative
        return h * (1 + (noise + noise.T) / 2)
    monkeypatch.setattr(InputStats, "hessian", noisy)


@pytest.mark.parametrize("relative", [1e-7, 1e-5])
def test_gptq_bounds_hold_under_hessian_noise(tmp_path, monkeypatch, relative):
    """The GPU tests' bounds, exercised on the CPU: a run whose Hessians carry float32-ulp noise stays within them
    (and the noise does flip codes: the bounds are not met trivially)."""
    cpu, cpu_state = ptq_state(compose_job("ptq", [*STATIC, "device=cpu"]), tmp_path / "cpu")
    noisy_hessians(monkeypatch, relative, seed=1)
    noisy, noisy_state = ptq_state(compose_job("ptq", [*STATIC, "device=cpu"]), tmp_path / "noisy")
    assert abs(noisy["ppl"] / cpu["ppl"] - 1) <= 0.02, (noisy["ppl"], cpu["ppl"])
    close_states(noisy_state, cpu_state)
    assert any(not torch.equal(v, noisy_state[k]) for k, v in cpu_state.items() if isinstance(v, torch.Tensor))


@pytest.mark.gpu
def test_qat_ptq_gptq_on_cuda_within_bound_of_cpu(tmp_path):
    (cpu, cpu_state), (gpu, gpu_state) = (ptq_state(compose_job("ptq", [*STATIC, f"device={d}"]), tmp_path / d)
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
    method = {"name": "gptq", "min_tokens": 64, "static_groups": True}
    for device in ("cpu", "cuda"):
        stream_ptq(tmp_path / "m", "w4a16_g128", method, batches, tmp_path / device, progress=False,
                   device=torch.device(device))
        states[device] = load_parts(tmp_path / device)
    close_states(states["cuda"], states["cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("method", [[], [*STATIC_MINMAX, "method=smoothquant", "method.min_tokens=64"],
                                    ["method=awq", "method.min_tokens=64"]], ids=["gptq", "smoothquant", "awq"])
def test_distributed_ptq_on_two_gpus_equals_one(tmp_path, method):
    """nccl, process r on cuda:r: the same weights as one process on one GPU (atol=0: the same kernels on the same
    batches; GPUs of one model). GPTQ (Hessians summed across ranks), SmoothQuant with static activation ranges
    (minmax observers merged across ranks), AWQ (scale searches spread over the ranks)."""
    one = ptq_state(compose_job("ptq", [*PTQ, *method, "device=cuda:0"]), tmp_path / "one")[1]
    two = ptq_state(compose_job("ptq", [*PTQ, *method, "device=cuda", "distributed.processes=2"]), tmp_path / "two")[1]
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
