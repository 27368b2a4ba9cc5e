"""DDP with 2 CPU processes (gloo): both ranks end with identical quantizer state and weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_ddp_two_processes_identical_quantizer_state(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    observed = [k for k in r0 if k.endswith("input_quantizer.scale")]  # PACT clips, set from each rank's data
    learned = [k for k in r0 if k.endswith("weight_quantizer.scale")]
    assert observed and learned
    for key in r0:
        if isinstance(r0[key], torch.Tensor):
            assert torch.equal(r0[key], r1[key]), key
    assert r0["_flags"] == r1["_flags"]
    assert r0["_seen"] != r1["_seen"], "each rank trains on its own shard of the data"
