"""scripts/readme_eval_table.py's step runner: a step whose result exists is skipped (the pipeline resumes), a
step runs as its own process with a log, a failure is recorded and the run goes on (the end-to-end run on the
tiny model is `python scripts/readme_eval_table.py --tiny`, minutes: not a test)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("readme_eval_table", ROOT / "scripts" / "readme_eval_table.py")
script = sys.modules.setdefault("readme_eval_table", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(script)


def test_steps_skip_run_log_and_record_failures(tmp_path):
    p = script.Pipeline(tmp_path / "out", sys.executable)
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"a": 1}))
    done = tmp_path / "out" / "copy.json"
    assert p.step("copy", done, "json.tool", [str(src), str(done)])  # runs: python -m json.tool in out
    assert json.loads(done.read_text()) == {"a": 1} and "# exit 0" in (tmp_path / "out/logs/copy.log").read_text()
    done.write_text('{"kept": true}')
    assert p.step("copy", done, "json.tool", [str(tmp_path / "missing.json"), str(done)])  # skipped: exists
    assert json.loads(done.read_text()) == {"kept": True} and p.failed == []
    assert not p.step("bad/step", tmp_path / "out" / "never.json", "json.tool", [str(tmp_path / "missing.json")])
    assert p.failed == ["bad/step"] and (tmp_path / "out/logs/bad_step.log").exists()


def test_settings_follow_the_readme_protocol():
    big, tiny = script.settings(False), script.settings(True)
    assert big["common"] == ["model=smollm2_135m", "data=wiki", "data.block_size=128", "data.max_eval_blocks=32"]
    assert big["tasks"] == "[qat_wiki_lambada,qat_wiki_ppl]" and "calibration.samples=128" in big["compare"]
    assert "experiment=smollm2_w4_qat" in big["qat"] and tiny["tasks"] == "[qat_tiny_lambada,qat_tiny_ppl]"
    assert script.QUANTS == {"w4": "w4a16_g128_ragged", "w3": "w3a16_g128_ragged"}
    assert script.data_args(big) == big["common"][1:]
