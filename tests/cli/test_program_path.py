"""sys.argv[0] while a qat CLI task runs: the console script's path, so that Lightning's DDP launcher can start the
other ranks as `python <argv[0]> ...` (a bare `qat-train` was looked for in the working directory)."""
from __future__ import annotations

import sys

from qat.cli.boundary import program_path, run_hydra


def _argv0_seen(monkeypatch, argv0: str) -> str:
    seen = []
    monkeypatch.setattr(sys, "argv", [argv0, "trainer=ddp"])
    run_hydra("qat-train", lambda: seen.append(list(sys.argv)), argv=["trainer=ddp"])
    assert sys.argv == [argv0, "trainer=ddp"]  # given back afterwards
    return seen[0][0]


def test_console_script_keeps_its_path_while_the_task_runs(monkeypatch, tmp_path):
    script = tmp_path / "bin" / "qat-train"
    script.parent.mkdir()
    script.write_text("# a console script\n")
    assert _argv0_seen(monkeypatch, str(script)) == str(script)


def test_other_programs_run_the_task_under_the_app_name(monkeypatch, tmp_path):
    """`python -m qat.cli.train` (argv[0] .../qat/cli/train.py; the launcher re-runs the module), an in-process
    caller (pytest), or a `qat-train` that is not a file: Hydra's help names the program `qat-train`."""
    other = tmp_path / "pytest"
    other.write_text("")
    assert _argv0_seen(monkeypatch, str(other)) == "qat-train"
    assert _argv0_seen(monkeypatch, str(tmp_path / "qat-train")) == "qat-train"  # no such file
    assert program_path("qat-train", []) == "qat-train"
