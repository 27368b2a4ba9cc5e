"""scripts/gpu_check.py cannot rot: its smoke mode (`--device cpu --small`) runs every check but FSDP end to end on
the CPU, in a few seconds, and its exit status says whether a parity check failed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_smoke_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert gpu_check.main(["--device", "cpu", "--small", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    name = lambda check: " ".join(check.split()[:2 if check.startswith("parity") else 1])  # noqa: E731
    rows = {name(r["check"]): r for r in result["checks"]}
    assert {f"parity {s}" for s in gpu_check.PARITY} <= rows.keys()
    assert all(rows[f"parity {s}"]["result"] == "pass" for s in gpu_check.PARITY)
    assert rows["parity w4a16_g128"]["figures"]["max|dlogit| device-cpu"] == 0.0  # the CPU is its own reference
    for name in ("fake_quant", "qat_step", "gptq"):
        assert rows[name]["result"] == "measured", rows[name]
    step = {r["variant"]: r for r in rows["qat_step"]["rows"]}
    assert step["FP"]["time_ratio_vs_FP"] == 1.0 and len(step) == 5  # FP + 2 schemes x {lean, unfused}
    gptq = {r["method"]: r for r in rows["gptq"]["rows"]}
    assert gptq["gptq (qat)"]["error_vs_rtn"] < 1 and gptq["gptq (reference port)"]["error_vs_rtn"] < 1
    assert rows["fsdp"]["result"] == "skipped" and "test_parallel" in rows["fsdp"]["figures"]["why"]
    assert result["small"] and result["environment"]["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "| check" in printed and "parity w4a16_g128" in printed


def test_a_failed_parity_check_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "PARITY", {"w4a16_g128": ["native"]})
    monkeypatch.setattr(gpu_check, "export", lambda model, out, format: torch.save({}, out))  # not an export
    assert gpu_check.main(["--device", "cpu", "--small", "--only", "parity", "--json", str(tmp_path / "f.json")]) == 1
    assert "FAILED: parity w4a16_g128" in capsys.readouterr().err


def test_cuda_without_cuda_is_refused_clearly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "--device cpu --small" in capsys.readouterr().err


def test_bad_device_and_unwritable_json_are_refused_before_any_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_checks", lambda args: pytest.fail("a check ran"))
    for device in ("foo", "mps"):
        assert gpu_check.main(["--device", device]) == 2
        assert f"--device {device}: not a device this check runs on; use cuda, cuda:N or cpu" in capsys.readouterr().err
    (tmp_path / "f").write_text("")  # a file where --json's folder would be
    assert gpu_check.main(["--device", "cpu", "--small", "--json", str(tmp_path / "f" / "x.json")]) == 2
    assert "gpu_check: --json: output path" in capsys.readouterr().err
