"""The jobs' `device` key (`qat.jobs.placement`): how auto / cpu / cuda / cuda:N resolve, and what is refused before
any model loads, on a host without CUDA and on a pretended one with two devices (torch.cuda stubbed)."""
from __future__ import annotations

import pytest
import torch

from qat.errors import ConfigError
from qat.jobs import placement
from qat.jobs.placement import check_processes, device_errors, place, resolve_device

CHOICES = "choose auto, cpu, cuda or cuda:N"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_resolution_without_cuda(no_cuda, monkeypatch):
    monkeypatch.delenv("QAT_DEVICE", raising=False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")  # read as Hydra may pass it
    assert resolve_device("auto", processes=4) == torch.device("cpu")
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"device='{value}': no CUDA device here \(torch.cuda.is_available\(\) "
                                              r"is False.*choose device=cpu or device=auto"):
            resolve_device(value)


def test_resolution_with_two_cuda_devices(two_gpus, monkeypatch):
    monkeypatch.delenv("QAT_DEVICE", raising=False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", processes=2) == torch.device("cuda")  # one GPU per process
    assert resolve_device("auto", processes=3) == torch.device("cpu")   # not enough GPUs: CPU ranks
    assert device_errors("cuda", processes=2) == []
    with pytest.raises(ConfigError, match=r"device='cuda:2': this host has 2 CUDA device\(s\); choose cuda:0..cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match=r"distributed.processes=3 with device='cuda' needs one CUDA device per "
                                          r"process; this host has 2: choose distributed.processes<=2, or device=cpu"):
        resolve_device("cuda", processes=3)
    with pytest.raises(ConfigError, match=r"device='cuda:1' places one process; distributed.processes=2 puts process "
                                          r"r on cuda:r: use device=cuda"):
        resolve_device("cuda:1", processes=2)


@pytest.mark.parametrize("value", ["gpu", "mps", "cuda:", "cuda:x", "cuda:-1", "", 0, 1.5, True, None, ["cpu"]])
def test_unknown_values_name_the_key_and_the_choices(value):
    errors = device_errors(value)
    assert errors == [f"device={value!r}; {CHOICES} (auto: cuda when available, else cpu)"]


def test_qat_device_sets_the_default(monkeypatch, two_gpus):
    monkeypatch.setenv("QAT_DEVICE", "cpu")  # what tests/conftest.py sets for the suite
    assert resolve_device(None) == torch.device("cpu") and placement.default_device() == "cpu"
    monkeypatch.setenv("QAT_DEVICE", "cuda:1")
    assert resolve_device(None) == torch.device("cuda", 1)
    monkeypatch.delenv("QAT_DEVICE")
    assert placement.default_device() == "auto"


def test_empty_qat_device_is_auto_in_code_and_in_the_configs(monkeypatch, no_cuda):
    from omegaconf import OmegaConf

    from qat.jobs.config import register_resolvers
    from qat.recipes import CONFIG_DIR

    register_resolvers()
    for job in ("ptq", "compare", "eval", "sensitivity"):  # each reads the default through ${qat_device:}
        assert OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{job}.yaml"))["device"] == "${qat_device:}", job
    for value in ("", " "):
        monkeypatch.setenv("QAT_DEVICE", value)
        assert placement.default_device() == OmegaConf.create({"device": "${qat_device:}"}).device == "auto"
        assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv("QAT_DEVICE", "cuda:1")
    assert OmegaConf.create({"device": "${qat_device:}"}).device == "cuda:1"


def test_a_bad_qat_device_is_named(monkeypatch, no_cuda):
    """A value that came from the environment says so: the user may not know QAT_DEVICE is set."""
    monkeypatch.setenv("QAT_DEVICE", "gpu")
    assert device_errors(placement.default_device()) == [
        f"device='gpu' (from QAT_DEVICE='gpu'); {CHOICES} (auto: cuda when available, else cpu)"]
    with pytest.raises(ConfigError, match=r"device='cuda' \(from QAT_DEVICE='cuda'\): no CUDA device here"):
        monkeypatch.setenv("QAT_DEVICE", "cuda")
        resolve_device(None)
    assert device_errors("tpu") == [f"device='tpu'; {CHOICES} (auto: cuda when available, else cpu)"]


def test_distributed_processes_need_one_cuda_device_each(two_gpus):
    gptq, many = {"name": "gptq"}, {"samples": 1024}
    # CUDA ranks: bounded by the GPUs, not by the CPU cores
    assert check_processes({"distributed": {"processes": 2}, "calibration": many, "device": "cuda"}, gptq, cpus=1) == 2
    assert check_processes({"distributed": {"processes": 2}, "calibration": many, "device": "auto"}, gptq, cpus=1) == 2
    with pytest.raises(ConfigError, match=r"distributed.processes=3 with device='cuda' needs one CUDA device per"):
        check_processes({"distributed": {"processes": 3}, "calibration": many, "device": "cuda"}, gptq, cpus=8)
    with pytest.raises(ConfigError, match=r"device='cuda:0' places one process"):
        check_processes({"distributed": {"processes": 2}, "calibration": many, "device": "cuda:0"}, gptq, cpus=8)
    # auto with more processes than GPUs: CPU ranks, bounded by the cores
    with pytest.raises(ConfigError, match=r"distributed.processes=3 is more than the 2 CPU core\(s\)"):
        check_processes({"distributed": {"processes": 3}, "calibration": many, "device": "auto"}, gptq, cpus=2)
    assert check_processes({"distributed": {"processes": 3}, "calibration": many, "device": "cpu"}, gptq, cpus=4) == 3


def test_torchrun_ranks_count_against_the_cuda_devices(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"4 processes on this host \(torchrun\) with device='cuda' needs one CUDA "
                                          r"device"):
        check_processes({"device": "cuda", "calibration": {"samples": 64}}, {"name": "gptq"}, cpus=8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two hosts of two
    assert check_processes({"device": "cuda", "calibration": {"samples": 64}}, {"name": "gptq"}, cpus=8) == 1


def test_torchrun_refusals_name_torchrun_not_a_key_the_user_never_set(two_gpus, monkeypatch):
    cfg = {"device": "cuda", "calibration": {"samples": 64}, "distributed": {"processes": 1}}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"4 processes on this host \(torchrun\) with device='cuda' needs one CUDA "
                                          r"device per process; this host has 2: choose torchrun --nproc-per-node<=2"):
        check_processes(cfg, {"name": "gptq"}, cpus=8)
    # one process per host on two hosts: cuda:1 would be ignored (each rank computes on cuda:LOCAL_RANK): refused
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"device='cuda:1' places one process; under torchrun \(WORLD_SIZE=2, 1 "
                                          r"process\(es\) on this host\) each process computes on cuda:LOCAL_RANK"):
        check_processes({**cfg, "device": "cuda:1"}, {"name": "gptq"}, cpus=8)
    assert check_processes(cfg, {"name": "gptq"}, cpus=8) == 1


def test_place_leaves_a_cpu_model_alone():
    model = torch.nn.Linear(4, 4)
    weight = model.weight
    assert place(model, torch.device("cpu")) is model and model.weight is weight
    assert place(model, None) is model
    assert place(model, torch.device("meta")).weight.device.type == "meta"

