"""Every CLI's error boundary (qat.cli.boundary): a user's mistake is one message naming the problem and a non-zero
exit, with no traceback; our own bugs keep theirs, and QAT_DEBUG / HYDRA_FULL_ERROR show everything.

The bad command lines live in tests/cli/bad_inputs.py and run in-process (a subprocess per case would import
torch + transformers each time); a few real console scripts at the end prove the installed entry points agree.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qat.cli.boundary import one_error
from qat.cli.hydra_errors import omegaconf_message
from qat.errors import ConfigError
from qat.jobs.config import as_bool
from tests.cli.bad_inputs import (APPS, CASES, CMP, EV, HYDRA_APPS, HYDRA_CASES, TR, argv_for, make_files,
                                  run_in_process)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return make_files(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    for var in ("QAT_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(var, raising=False)


def test_at_least_100_cases_across_every_app():
    apps = {app for app, _, _ in CASES}
    assert len(CASES) >= 100 and apps == {"demo", "train", "ptq", "compare", "eval", "export", "assets",
                                          "sensitivity"} == set(APPS)


@pytest.mark.parametrize("app,argv,expected", CASES, ids=[f"{a}:{' '.join(v)}" for a, v, _ in CASES])
def test_bad_input_is_one_clear_message(app, argv, expected, files):
    code, out = run_in_process(app, argv_for(argv, files, app))
    assert code != 0, out
    assert "Traceback" not in out and "Error executing job" not in out, out
    assert expected.lower() in out.lower(), out
    assert "\\n" not in out, out  # multi-line messages have real newlines, not repr'd ones
    assert "HYDRA_FULL_ERROR" not in out, out  # Hydra's advice (also inside its instantiate errors) is not ours
    assert not (files / "run").exists(), sorted(str(p) for p in (files / "run").rglob("*"))  # no empty run folder


def test_a_refused_run_leaves_no_empty_run_folder_but_keeps_what_is_not_hydras(tmp_path, monkeypatch):
    """A refusal removes the job's folder when it holds only Hydra's record (.hydra/, the .log), and the empty dated
    folders above it up to the launch folder; a folder holding anything else, and the launch folder, stay."""
    bad = "module.learned_rotations={}"
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process("train", TR + [bad])  # Hydra's default outputs/<date>/<time>
    assert code == 2 and "turns nothing on" in out, out
    assert list(tmp_path.iterdir()) == [], sorted(map(str, tmp_path.rglob("*")))
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "notes.txt").write_text("mine")
    code, out = run_in_process("train", TR + [bad])
    assert code == 2 and sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["notes.txt"], out
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "result.json").write_text("{}")  # an earlier run's result: the folder is not Hydra's alone
    code, out = run_in_process("train", TR + [bad, f"hydra.run.dir={kept}"])
    assert code == 2 and {p.name for p in kept.iterdir()} >= {"result.json", ".hydra"}, out
    code, out = run_in_process("train", TR + [bad, "hydra.run.dir=."])  # the launch folder itself
    assert code == 2 and (tmp_path / ".hydra").is_dir(), out


def test_a_refused_run_removes_only_folders_it_made(tmp_path, monkeypatch):
    """A folder that was there before the refused run stays, even empty (a run folder given on the command line,
    its empty parents, a symlinked run folder and the folder it points to); the empty parents the run made go,
    inside the launch folder or not."""
    bad = "module.learned_rotations={}"
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    launch.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(launch)
    (launch / "results" / "keepme").mkdir(parents=True)  # the user's empty folders, made before the run
    code, out = run_in_process("train", TR + [bad, "hydra.run.dir=results/keepme"])
    assert code == 2 and (launch / "results" / "keepme").is_dir(), out
    assert sorted(p.name for p in (launch / "results" / "keepme").iterdir()) == [".hydra", "train.log"]
    shutil.rmtree(launch / "results" / "keepme")
    (launch / "results").mkdir(exist_ok=True)
    code, out = run_in_process("train", TR + [bad, "hydra.run.dir=results/new/run"])  # results/ was there
    assert code == 2 and [p.name for p in launch.iterdir()] == ["results"], out
    assert list((launch / "results").iterdir()) == [], out
    target = elsewhere / "target"
    target.mkdir()
    (launch / "link").symlink_to(target)
    code, out = run_in_process("train", TR + [bad, "hydra.run.dir=link"])
    assert code == 2 and (launch / "link").is_symlink() and target.is_dir(), out
    outside = tmp_path / "abs" / "deep" / "run"  # outside the launch folder: what the run made goes
    code, out = run_in_process("train", TR + [bad, f"hydra.run.dir={outside}"])
    assert code == 2 and not (tmp_path / "abs").exists(), out


def test_a_refused_run_under_chdir_leaves_no_folder(tmp_path, monkeypatch):
    """hydra.job.chdir=true runs the job inside its folder: the refusal steps back to the launch folder and removes
    it."""
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process("train", TR + ["module.learned_rotations={}", "hydra.job.chdir=true"])
    assert code == 2 and "turns nothing on" in out, out
    assert list(tmp_path.iterdir()) == [] and Path.cwd() == tmp_path, sorted(map(str, tmp_path.rglob("*")))


@pytest.mark.parametrize("argv", [["-m", "trainer.max_steps=-3,-4"], ["-m", "quant=w4a16_g128,nosuch"],
                                  ["-m", "+foo=1"]], ids=["task refuses", "group option", "new key"])
def test_a_refused_multirun_leaves_no_sweep_folder(argv, tmp_path, monkeypatch):
    """A multirun whose first job is refused (by the job, or by Hydra composing the sweep) leaves no sweep folder
    holding only multirun.yaml; a reused sweep folder with an earlier sweep's jobs in it stays as it was."""
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process("train", argv)  # each one is refused before any job trains
    assert code == 2 and "Traceback" not in out, out
    assert list(tmp_path.iterdir()) == [], sorted(map(str, tmp_path.rglob("*")))
    old = tmp_path / "sweep"
    (old / "0").mkdir(parents=True)
    (old / "multirun.yaml").write_text("{}")
    code, out = run_in_process("train", argv + [f"hydra.sweep.dir={old}"])
    assert code == 2 and sorted(p.name for p in old.iterdir()) == ["0", "multirun.yaml"], out


@pytest.mark.parametrize("app, argv, count, refused", [
    ("train", ["-m", "trainer.max_steps=1,-5,2,abc"], 2,
     ["#1 (trainer.max_steps=-5): trainer.max_steps=-5; must be an integer >= -1",
      "#3 (trainer.max_steps=abc): trainer.max_steps='abc'; must be an integer >= -1"]),
    ("ptq", ["-m", "method=rtn,gptq", "calibration.samples=8,0"], 2,
     ["#1 (method=rtn calibration.samples=0): calibration.samples=0; must be a positive integer",
      "#3 (method=gptq calibration.samples=0): bad config:",
      "    - calibration.samples x calibration.seq_len = 0 x 64 = 0 tokens; method gptq needs min_tokens=128"]),
    ("eval", ["-m", "model=tiny", "data=fixture", "max_blocks=2,0", "split=test,nosuch"], 3,
     ["#1 (max_blocks=2 split=nosuch): split='nosuch'; choose from", "#2 (max_blocks=0 split=test): max_blocks=0",
      "#3 (max_blocks=0 split=nosuch): bad config:"]),
], ids=["train", "ptq", "eval"])
def test_a_sweep_is_checked_whole_before_its_first_job_runs(app, argv, count, refused, tmp_path, monkeypatch):
    """A multirun whose later job would be refused stops before the first one runs (it used to train or quantize
    job #0, then stop at #1, and never run the good jobs after it): every refused job is listed by what it sweeps,
    one exit, nothing on disk."""
    import qat.cli.eval
    import qat.cli.ptq
    import qat.cli.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qat.cli.eval, "run_eval_job", lambda cfg, out: pytest.fail("a job ran"))
    monkeypatch.setattr(qat.cli.train, "train", lambda cfg: pytest.fail("a job ran"))
    monkeypatch.setattr(qat.cli.ptq, "run_ptq_job", lambda cfg, out: pytest.fail("a job ran"))
    code, out = run_in_process(app, argv)
    assert code == 2 and "Traceback" not in out, out
    assert f"qat-{app}: error: {count} of the sweep's 4 jobs refused (none has run):" in out, out
    for line in refused:  # each on a line of its own, in this order
        assert any(got.startswith("  " + line) for got in out.splitlines()), out
    assert list(tmp_path.iterdir()) == [], sorted(map(str, tmp_path.rglob("*")))


def test_a_sweep_of_good_jobs_runs_them_all(tmp_path, monkeypatch):
    """The up-front check refuses nothing good: every job runs, with the config it would have had without it. Each
    job is checked as Hydra runs it: a job folder named through `${hydra:job.num}`, `hydra.job.env_set` read by an
    interpolation, and a checkpoint that an earlier job of the sweep will write (under the sweep folder) are not
    refused; what the check would print is not printed twice."""
    import qat.cli.train

    seen = []
    monkeypatch.setattr(qat.cli.train, "train",
                        lambda cfg: seen.append((cfg.label, cfg.ckpt_path, cfg.paths.output_dir)) or {})
    sweep = tmp_path / "sw"
    code, out = run_in_process("train", [
        "-m", f"ckpt_path=null,{sweep}/j0/checkpoints/last.ckpt", f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=j${hydra:job.num}", "+hydra.job.env_set.QAT_TEST_LABEL=mine",
        "label=${oc.env:QAT_TEST_LABEL}", "quant=w8a8_static", "module.range_init_batches=0"])  # the check says it raises it
    assert code == 0, out
    assert seen == [("mine", None, str(sweep / "j0")), ("mine", f"{sweep}/j0/checkpoints/last.ckpt", str(sweep / "j1"))]
    assert "raised to" not in out, out  # the jobs' own checks run inside train(), stubbed here


def test_a_sweep_refused_alike_in_every_job_says_it_once(tmp_path, monkeypatch):
    """An interpolation that does not resolve, in a key no check reads, is refused up front too (the sweep's split
    escapes it: it used to run job #0 first); when every job is refused alike, the message is said once."""
    import qat.cli.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qat.cli.train, "train", lambda cfg: pytest.fail("a job ran"))
    code, out = run_in_process("train", ["-m", "trainer.max_steps=1,2", "label=${nope}"])
    assert code == 2, out
    assert out.strip().splitlines()[-1] == ("qat-train: error: every job of the sweep (2) is refused: label: "
                                            "Interpolation key 'nope' not found"), out
    code, out = run_in_process("train", ["-m", "label=${nope},x"])
    assert code == 2 and "1 of the sweep's 2 jobs refused (none has run):" in out, out
    assert list(tmp_path.iterdir()) == [], sorted(map(str, tmp_path.rglob("*")))


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    """hydra.run.dir naming a file or a dangling link: Hydra cannot make the folder; one line, exit 2, nothing
    touched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for where in ("afile", "dangling"):
        code, out = run_in_process("train", TR + [f"hydra.run.dir={where}"])
        assert code == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        assert f"{where}: hydra cannot make the output folder there" in out, out
    assert (tmp_path / "afile").read_text() == "mine" and (tmp_path / "dangling").is_symlink()


def test_a_refused_job_in_a_nested_sweep_subdir_or_with_its_own_record_folder_goes(tmp_path, monkeypatch):
    """A reused sweep folder whose jobs nest (hydra.sweep.subdir=j/N): the refused job's new j/N goes, the earlier
    j/0 stays; a record folder named by hydra.output_subdir counts as Hydra's record."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sw"
    (sweep / "j" / "0").mkdir(parents=True)
    (sweep / "j" / "0" / "result.json").write_text("{}")
    (sweep / "multirun.yaml").write_text("{}")
    code, out = run_in_process("train", ["-m", "trainer.max_steps=-2", f"hydra.sweep.dir={sweep}",
                                         "hydra.sweep.subdir=j/${hydra.job.num}x"])
    assert code == 2, out
    assert sorted(str(p.relative_to(sweep)) for p in sweep.rglob("*")) == ["j", "j/0", "j/0/result.json",
                                                                          "multirun.yaml"]
    code, out = run_in_process("train", ["module.learned_rotations={}", "hydra.output_subdir=rec"])
    assert code == 2 and list(tmp_path.iterdir()) == [sweep], sorted(map(str, tmp_path.rglob("*")))


def test_an_unknown_top_level_key_lists_the_users_keys_not_hydras():
    from qat.jobs.config import unknown_keys

    errors = unknown_keys({"foo": 1, "seed": 0, "hydra": {}, "defaults": []},
                          {"seed": None, "hydra": None, "defaults": None, "data": {"path": None}})
    assert errors == ["config: unknown key(s) ['foo']; valid keys are ['data', 'seed']"]


def test_run_folders_override_goes_where_hydra_parses_it():
    """The RunFolders callback override is added after the command line's overrides (before any flag that
    follows them), first when there are none, and not at all when nothing runs or it is there already."""
    from qat.cli.boundary import RUN_FOLDERS_KEY, with_run_folders
    from hydra._internal.utils import get_args_parser

    for args in (["a=1", "b=2", "--config-name", "x"], ["-m", "a=1"], ["--info"], ["-m"], []):
        added = with_run_folders(args)
        if args == ["--info"]:
            assert added == args
            continue
        assert len(added) == len(args) + 1, added
        parsed = get_args_parser().parse_args(added)
        assert parsed.overrides[-1].startswith(f"+{RUN_FOLDERS_KEY}._target_="), parsed
        assert with_run_folders(added) == added
    assert with_run_folders(["--cfg", "job", "a=1"]) == ["--cfg", "job", "a=1"]


@pytest.mark.parametrize("app,argv,expected", HYDRA_CASES, ids=[f"{a}:{' '.join(v)}" for a, v, _ in HYDRA_CASES])
def test_hydra_refusal_is_one_line_and_exit_2(app, argv, expected, files):
    """What Hydra refuses before the task runs (an unknown key / group option, bad override syntax, a bad flag) is
    one "<app>: error:" line naming the override, exit 2: not Hydra's lines, option lists and HYDRA_FULL_ERROR
    advice."""
    code, out = run_in_process(app, argv_for(argv, files, app))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{APPS[app]}: error: "), out
    assert expected in lines[0], out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out and "\t" not in out, out


@pytest.mark.parametrize("override, key", [("data.block_size=${nope}", "data.block_size"),
                                           ("trainer.max_epochs=${nope.deeper}", "trainer.max_epochs"),
                                           ("module.kd={weight:0.5,teacher:${nope}}", "module.kd.teacher")])
def test_a_bad_interpolation_is_refused_before_the_job_starts(override, key, files, monkeypatch):
    """qat-train hands the job its config unresolved, and the job reads keys as it goes (trainer after the
    baselines' setup, module when the model loads): the command line's interpolations are resolved first."""
    import qat.cli.train

    started = []
    monkeypatch.setattr(qat.cli.train, "train", lambda cfg: started.append(cfg) or {})
    code, out = run_in_process("train", argv_for(TR + [override], files, "train"))
    assert code == 2 and not started, out
    assert out.strip().startswith(f"qat-train: error: {key}: Interpolation key 'nope"), out
    code, out = run_in_process("train", argv_for(TR + ["label=qat_lr${optim.optimizer.lr}"], files, "train"))
    assert code == 0 and started and started[0].label == "qat_lr0.0001", out  # a good one reaches the job


@pytest.mark.parametrize("argv, env, expected", [
    (["method=rtn", "quant=w4a16_g128", "device=gpu"], None, "device='gpu'; choose auto, cpu, cuda or cuda:N"),
    (["method=fp", "device=tpu"], None, "device='tpu'; choose auto, cpu, cuda or cuda:N"),
    (["method=rtn", "quant=w4a16_g128", "device=cuda:99"], None, "device='cuda:99'"),
    (["method=rtn", "quant=w4a16_g128"], "gpu", "device='gpu' (from QAT_DEVICE='gpu'); choose auto, cpu, cuda"),
    (["-m", "method=rtn,gptq", "quant=w4a16_g128", "device=gpu"], None, "device='gpu'; choose auto, cpu, cuda"),
    (["-m", "method=fp,rtn", "quant=w4a16_g128"], "gpu", "device='gpu' (from QAT_DEVICE='gpu')"),
    (["-m", "method=rtn", "quant=w4a16_g128", "device=cuda:99"], None, "device='cuda:99'"),
    (["-m", "method=rtn", "quant=w4a16_g128", "device=cpu,gpu"], None, "device='gpu'; choose auto, cpu, cuda"),
    (["-m", "method=rtn", "quant=w4a16_g128", "device=cpu,tpu"], "cpu", "device='tpu'")])
def test_compare_job_refuses_a_bad_device_before_loading(argv, env, expected, files, tmp_path, monkeypatch):
    """A single job (method=...) or a multirun of qat-compare refuses a bad `device` as its methods=[...] mode and
    qat-ptq do: one line, exit 2, no model loaded and no failed row written (was: a failed row, exit 0 / 1)."""
    import qat.jobs.sweep

    loaded = []
    monkeypatch.setattr(qat.jobs.sweep, "job_inputs", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(
        AssertionError("a model loaded")))
    if env is not None:
        monkeypatch.setenv("QAT_DEVICE", env)
    code, out = run_in_process("compare", argv_for(argv, tmp_path, "compare"))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qat-compare: error: "), out
    assert expected in lines[0] and "ConfigError" not in out and "bad config" not in out, out
    assert not loaded and not list(tmp_path.rglob("result.json")), out


def test_an_interpolation_read_through_another_names_both():
    """The node holding the bad interpolation and the node whose reading led there."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    cfg = OmegaConf.create({"calibration": {"seq_len": "${data.block_size}"}, "data": {"block_size": "${nope}"}})
    with pytest.raises(InterpolationKeyError) as caught:
        cfg.calibration.seq_len
    assert omegaconf_message(caught.value) == ("data.block_size: Interpolation key 'nope' not found "
                                               "(needed by calibration.seq_len)")
    with pytest.raises(InterpolationKeyError) as caught:
        OmegaConf.resolve(cfg)  # no full_key at all: what Hydra's --cfg job --resolve raises
    assert omegaconf_message(caught.value) == "data.block_size: Interpolation key 'nope' not found"


def test_every_hydra_app_has_the_hydra_cases():
    assert {app for app, _, _ in HYDRA_CASES} == set(HYDRA_APPS) == set(APPS) - {"assets"}
    assert len(HYDRA_CASES) >= 5 * len(HYDRA_APPS) + 20


@pytest.mark.parametrize("app", sorted(HYDRA_APPS))
def test_cfg_help_and_info_still_work(app, files):
    """Hydra's own commands are not errors: `--cfg job` prints the composed job config, exit 0."""
    code, out = run_in_process(app, argv_for(["--cfg", "job", "quant=w8a8"], files, app))
    assert code == 0 and "name: w8a8" in out and f"{APPS[app]}: error" not in out, out
    if app == "ptq":
        for argv, shown in [(["--help"], "== Configuration groups =="), (["--info", "defaults"], "Defaults List"),
                            (["--hydra-help"], "Hydra (1."), (["--cfg", "hydra", "--package", "hydra.job"], "chdir:"),
                            (["--cfg", "job", "--help"], "== Configuration groups =="),
                            (["--hydra-help", "--cfg", "job"], "Hydra (1.")]:
            code, out = run_in_process(app, argv)
            assert code == 0 and shown in out and "qat-ptq: error" not in out, (argv, out)


def test_overwrite_no_keeps_the_existing_export(files):
    """Defect 1: `overwrite=no` was bool("no") == True and replaced the export."""
    before = (files / "existing.gguf").read_bytes()
    code, out = run_in_process("export", argv_for(["model=tiny", "format=gguf", "output={tmp}/existing.gguf",
                                                   "overwrite=no"], files, "export"))
    assert code == 2 and "already exists" in out
    assert (files / "existing.gguf").read_bytes() == before


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), (1, True), (0, False), ("yes", True),
                                            ("No", False), ("ON", True), ("off", False), ("1", True), ("0", False),
                                            ("true", True), ("False", False)])
def test_flags_parse_strictly(value, expected):
    assert as_bool(value, "overwrite") is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, -1, 0.5, None, "nope", [True]])
def test_other_flag_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"gguf_pure=.*choose true or false"):
        as_bool(value, "gguf_pure")


def test_ptq_save_no_writes_no_checkpoint(files):
    """Defect 1: `qat-ptq save=no` saved model.pt all the same."""
    run_dir = files / "ptq_save_no"
    code, out = run_in_process("ptq", ["method=rtn", "save=no", "eval.split=null", "calibration.samples=2",
                                       f"hydra.run.dir={run_dir}"])
    assert code == 0, out
    assert (run_dir / "result.json").is_file() and not (run_dir / "model.pt").exists()


def test_an_internal_bug_keeps_its_traceback(files, monkeypatch):
    import qat.cli.demo

    def broken(*args, **kwargs):
        return 1 // 0

    monkeypatch.setattr(qat.cli.demo, "run", broken)
    code, out = run_in_process("demo", argv_for([], files, "demo"))
    assert code != 0 and "Traceback" in out and "ZeroDivisionError" in out
    assert "qat-demo: error" not in out
    code, out = run_in_process("demo", argv_for(["-m", "tokens=4,5"], files, "demo"))  # a job of a multirun too
    assert code != 0 and "Traceback" in out and "ZeroDivisionError" in out and "qat-demo: error" not in out


@pytest.mark.parametrize("var", ["QAT_DEBUG", "HYDRA_FULL_ERROR"])
def test_debug_variables_show_the_traceback_of_a_user_error(var, files, monkeypatch):
    monkeypatch.setenv(var, "1")
    code, out = run_in_process("demo", argv_for(["tiny.num_heads=0"], files, "demo"))
    assert code != 0 and "Traceback" in out and "ConfigError" in out and "tiny.num_heads" in out
    code, out = run_in_process("demo", argv_for(["qunt=w4a16_g128"], files, "demo"))  # Hydra's own refusal too
    assert code != 0 and "Traceback" in out and "ConfigCompositionException" in out and "qunt" in out


def test_the_task_sees_the_users_hydra_full_error(files, monkeypatch):
    """run_hydra sets HYDRA_FULL_ERROR=1 for Hydra while it composes; the task (and anything it starts) sees the
    user's environment, and so does the caller afterwards."""
    import qat.cli.demo

    seen = []
    monkeypatch.setattr(qat.cli.demo, "run", lambda *a, **k: seen.append(os.environ.get("HYDRA_FULL_ERROR")) or "ok")
    code, out = run_in_process("demo", argv_for([], files, "demo"))
    assert code == 0 and seen == [None] and "HYDRA_FULL_ERROR" not in os.environ, out
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    code, out = run_in_process("demo", argv_for(["-m", "tokens=4,5"], files, "demo"))
    assert code == 0 and seen == [None, "0", "0"] and os.environ["HYDRA_FULL_ERROR"] == "0", out


def test_instantiation_errors_print_their_cause_as_text(files):
    """Hydra wraps a constructor's error as "Error in call to target ...:\\nValueError('...\\n...')"; the boundary
    prints the target, the config node and the cause's own message."""
    code, out = run_in_process("train", argv_for(["trainer.max_steps=1", "trainer.precision=13-true"], files, "train"))
    assert code == 2 and "Trainer" in out and "13-true" in out and "\\n" not in out


def _script(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return path


def test_the_console_scripts_behave_the_same(tmp_path):
    """The installed entry points (not only their main functions): Hydra's app and the argparse one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("QAT_DEBUG", None)
    proc = subprocess.run([_script("qat-demo"), "tiny.hidden_size=100", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and out.strip().startswith("qat-demo: error:"), out
    assert "tiny.hidden_size=100" in out and "Traceback" not in out
    proc = subprocess.run([_script("qat-ptq"), "quant=nosuch", f"hydra.run.dir={tmp_path}"],  # Hydra's refusal
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("qat-ptq: error: quant=nosuch: no such recipe; choose one of ") \
        and proc.stderr.count("\n") == 1 and "w4a16_g128, " in proc.stderr, proc.stderr
    proc = subprocess.run([_script("qat-assets"), "--verify", "--cache", str(tmp_path / "nonexistent")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "nonexistent" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failing_cfg_package_prints_the_error_line_alone(tmp_path):
    """`qat-train --cfg job --resolve --package data` with a bad interpolation printed Hydra's `# @package data`
    on stdout before the error (the console script itself; the in-process HYDRA_CASES hold the other --cfg cases)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("QAT_DEBUG", None)
    proc = subprocess.run([_script("qat-train"), "--cfg", "job", "--resolve", "--package", "data",
                           "data.block_size=${nope}"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == "qat-train: error: data.block_size: Interpolation key 'nope' not found\n", proc.stderr


@pytest.mark.parametrize("value,least,allow_none,ok", [(3, 1, False, True), (None, 1, True, True), (0, 1, True, False),
                                                       (-2, 1, True, False), ("8", 1, False, False),
                                                       (True, 0, False, False), (-1, -1, False, True)])
def test_counts_are_integers_in_range(value, least, allow_none, ok):
    from qat.jobs.config import as_count

    if ok:
        assert as_count(value, "eval.max_blocks", least, allow_none) == value
    else:
        with pytest.raises(ConfigError, match=r"eval\.max_blocks=.*must be an integer >= "):
            as_count(value, "eval.max_blocks", least, allow_none)


def test_tiny_sizes_are_checked_before_transformers_divides():
    from qat.testing import tiny_llama

    with pytest.raises(ConfigError) as err:
        tiny_llama(num_heads=0, vocab_size=-1)
    assert "tiny.num_heads=0" in str(err.value) and "tiny.vocab_size=-1" in str(err.value)
    with pytest.raises(ConfigError, match="tiny.hidden_size=100 is not an even multiple of tiny.num_heads=4"):
        tiny_llama(hidden_size=100)


def test_model_folder_without_tokenizer_names_the_folder(tmp_path):
    """A saved model folder with no tokenizer files: one message naming the folder and data.tokenizer=."""
    from qat.errors import ConfigError
    from qat.models import load_tokenizer
    from qat.testing import tiny_llama

    tiny_llama(num_layers=1).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"m: no tokenizer could be loaded.*data\.tokenizer="):
        load_tokenizer(tmp_path / "m")


def test_model_folder_without_tokenizer_files_is_refused_not_read_as_an_empty_tokenizer(tmp_path):
    """A Qwen2 folder of config.json + weights: transformers silently builds a 1-token tokenizer from the config
    (texts encode to nothing: "only 48 tokens" much later); refused naming the folder, the files and the keys.
    With a tokenizer.json beside the weights the folder loads."""
    from qat.models import check_tokenizer_source, load_tokenizer
    from qat.testing import tiny_model
    from tests.export.test_gguf_file import bpe_tokenizer

    folder = tmp_path / "weights_only"
    tiny_model("qwen2", num_layers=1).save_pretrained(folder)
    for source in (folder, folder / "model.safetensors"):
        with pytest.raises(ConfigError, match=r"weights_only: no tokenizer could be loaded from this folder: it has no "
                                              r"tokenizer files \(tokenizer\.json, .*add the model's tokenizer files.*"
                                              r"data\.tokenizer=<folder or hub name> \(qat-eval / qat-export: tokenizer="):
            load_tokenizer(source)
    bpe = bpe_tokenizer()
    bpe.save_pretrained(folder)
    check_tokenizer_source(folder)
    text = "hello world, this is a tiny tokenizer"
    assert len(load_tokenizer(folder)) == len(bpe) > 256
    assert load_tokenizer(folder)(text)["input_ids"] == bpe(text)["input_ids"] != []


def test_a_target_that_does_not_import_is_named_with_the_reason(tmp_path, monkeypatch):
    """`_target_` is checked before any model loads (check_keys): a misspelt module or class, or a module whose own
    import needs something missing (named, not taken for a misspelling)."""
    from qat.jobs.config import import_target

    assert import_target("torch.optim.AdamW").__name__ == "AdamW"
    (tmp_path / "qat_needs_a_dep.py").write_text("import qat_no_such_dependency\nX = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target, reason in [("nosuch.Trainer", "ModuleNotFoundError: No module named 'nosuch'"),
                           ("torch.optim.Adamm", "AttributeError: module 'torch.optim' has no attribute 'Adamm'"),
                           ("torch..optim", "ValueError"),
                           ("qat_needs_a_dep.X", "No module named 'qat_no_such_dependency'")]:
        with pytest.raises(ConfigError) as err:
            import_target(target)
        assert str(err.value).startswith(f"cannot import _target_ '{target}' (") and reason in str(err.value)


def test_a_bug_inside_a_targets_module_keeps_its_traceback(tmp_path, monkeypatch):
    """Hydra's "Error locating target" is the user's only when the name is not there: a module that exists and
    fails in its own code (a bug, ours or a dependency's) is not turned into one line."""
    from hydra.utils import instantiate

    from qat.cli.boundary import user_message

    (tmp_path / "qat_broken_mod.py").write_text("import os\nos.not_a_function()\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    messages = {}
    for target in ("qat_broken_mod.Thing", "qat_no_such_mod.Thing"):
        with pytest.raises(Exception) as err:
            instantiate({"cb": {"_target_": target}})
        messages[target] = user_message(err.value)
    assert messages["qat_broken_mod.Thing"] is None
    assert messages["qat_no_such_mod.Thing"].startswith("cb: cannot import _target_ 'qat_no_such_mod.Thing'")


def test_several_value_errors_stay_a_list_one_is_one_line(files):
    """One error is printed on the "<app>: error:" line itself; several stay "bad config:" and one line each."""
    code, out = run_in_process("ptq", argv_for(["seed=abc", "eval.max_blocks=0"], files, "ptq"))
    lines = out.strip().splitlines()
    assert code == 2 and lines[:3] == ["qat-ptq: error: bad config:", "  - seed='abc'; must be an integer >= 0",
                                       "  - eval.max_blocks=0; must be an integer >= 1 or null"], out
    assert one_error("bad config:\n  - seed=-1; must be >= 0") == "seed=-1; must be >= 0"
    assert one_error("bad config:\n  - a\n  - b") == "bad config:\n  - a\n  - b"


def test_a_plain_key_named_like_another_apps_group_is_not_refused():
    """qat-sensitivity's `method` is a key of its own config, not the `method` group of qat-ptq / qat-compare."""
    from qat.cli.boundary import check_groups

    check_groups("qat-sensitivity", ["method={name:kl,cache_mb:64}", "method.name=kl"])
    with pytest.raises(ConfigError, match="qat-ptq has no experiment group"):
        check_groups("qat-ptq", ["experiment=tiny_qat"])


@pytest.mark.parametrize("app", ["ptq", "compare", "eval", "sensitivity"])
def test_a_bad_qat_device_is_refused_naming_it(app, files, monkeypatch):
    """The configs' default `device` is QAT_DEVICE's value: a bad one says where it came from."""
    monkeypatch.setenv("QAT_DEVICE", "gpu")
    code, out = run_in_process(app, argv_for({"compare": list(CMP), "eval": list(EV)}.get(app, []), files, app))
    assert code != 0 and "Traceback" not in out, out
    assert "device='gpu' (from QAT_DEVICE='gpu'); choose auto, cpu, cuda or cuda:N" in out, out


@pytest.mark.parametrize("strategy", [["trainer=fsdp"], ["+trainer.strategy=fsdp"], ["+trainer.strategy=FSDP"]])
def test_learned_rotations_with_a_sharded_trainer_are_refused_before_the_model_loads(strategy, files, monkeypatch):
    """trainer=fsdp (or any sharding strategy) with module.learned_rotations: one line naming both keys, exit 2,
    from the config check (was: refused in QATModule.configure_model, after the model was loaded and prepared)."""
    import qat.lit.module

    loaded = []
    monkeypatch.setattr(qat.lit.module, "build_model", lambda cfg: loaded.append(cfg))
    code, out = run_in_process("train", argv_for(TR + strategy + ["module.learned_rotations={lr:1.5}"], files, "train"))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not loaded, out
    assert lines[0].startswith("qat-train: error: module.learned_rotations with trainer.strategy="), out
    assert "sharded strategy" in lines[0] and "trainer=ddp" in lines[0], out
    from hydra import compose, initialize_config_dir

    from qat.lit.run import _check_values
    from qat.recipes import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):  # not sharded: no such error
        for over in (["trainer=ddp"], [], ["trainer=fsdp", "module.learned_rotations=null"]):
            cfg = compose("train", overrides=over + (["module.learned_rotations={lr:1.5}"] if len(over) < 2 else []))
            assert not [e for e in _check_values(cfg) if "sharded" in e], over
