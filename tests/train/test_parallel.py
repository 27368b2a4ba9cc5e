"""DDP and FSDP2 QAT with 2 CPU processes (gloo): identical state on both ranks, learned scales sharded under
FSDP, a resume from a mid-run checkpoint that continues bit-identically, and an export from the (sharded)
checkpoint whose logits equal the single-process export of the same weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_script import RESUME_AT, STEPS, export_logits

SCRIPT = Path(__file__).with_name("parallel_script.py")


def launch(kind: str, out: Path) -> tuple[dict, dict]:
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1", "QAT_PARALLEL_ACCELERATOR": "cpu",
           "QAT_PARALLEL_DEVICES": "2"}
    proc = subprocess.run([sys.executable, str(SCRIPT), kind, str(out)], capture_output=True, text=True,
                          timeout=600, cwd=out, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key}"
        else:
            assert a[key] == b[key], f"{what}: {key}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_resume_and_export(kind, tmp_path):
    r0, r1 = launch(kind, tmp_path)
    straight = r0["straight"]
    observed = [k for k in straight if k.endswith("input_quantizer.scale")]  # PACT clips, set from each rank's data
    learned = [k for k in straight if k.endswith("weight_quantizer.scale")]  # LSQ per-group scales
    assert observed and learned
    assert_same_state(straight, r1["straight"], "ranks after training")
    assert r0["_flags"] == r1["_flags"]
    assert r0["_seen"] != r1["_seen"], "each rank trains on its own shard of the data"
    if kind == "fsdp":  # every learned per-group scale was split across the two ranks with its weight
        assert set(r0["_sharded"]) == set(learned)
        for name, (local, whole) in r0["_sharded"].items():
            assert local[0] * 2 == whole[0] and local[1:] == whole[1:], name
    assert r0["_resumed_step"] == STEPS
    assert_same_state(straight, r0["resumed"], f"straight vs resumed at step {RESUME_AT}")

    final = tmp_path / "straight" / "steps" / f"epoch=0-step={STEPS}.ckpt"
    assert final.is_dir() == (kind == "fsdp")  # FSDP: one shard file per rank
    torch.save(straight, tmp_path / "gathered.pt")
    from_checkpoint = export_logits(final, tmp_path / "from_ckpt")
    single = export_logits(tmp_path / "gathered.pt", tmp_path / "single")
    assert torch.equal(from_checkpoint, single)
