"""Acceptance checks of qat-train's error handling: every bad input fails before the model loads."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import qat.lit.module
from qat.lit.run import check_config, train


def _fake_ckpt(path, cfg) -> None:
    hp = {"model": OmegaConf.to_container(cfg.module.model, resolve=True),
          "quant": OmegaConf.to_container(cfg.module.quant, resolve=True)}
    torch.save({"hyper_parameters": hp, "state_dict": {}}, path)


def test_resume_from_missing_checkpoint_fails_in_check(compose_train):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='/no/such.ckpt' does not exist"):
        check_config(compose_train(["ckpt_path=/no/such.ckpt"]))


def test_resume_with_another_recipe_names_both(compose_train, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    _fake_ckpt(ckpt, compose_train(["quant=w4a16_g128_lsq"]))
    with pytest.raises(ValueError, match=r"quant: the checkpoint has 'w4a16_g128_lsq', this run 'w8a8'.*'weight'"):
        check_config(compose_train(["quant=w8a8", f"ckpt_path={ckpt}"]))
    check_config(compose_train(["quant=w4a16_g128_lsq", f"ckpt_path={ckpt}"]))  # the same recipe resumes


def test_resume_with_other_learned_rotations_names_both(compose_train, tmp_path):
    """A checkpoint holds its learned rotations unfused (other state-dict names): resuming it without them (or
    with other ones) is refused up front (was: load_state_dict's RuntimeError traceback)."""
    ckpt = tmp_path / "last.ckpt"
    cfg = compose_train(["quant=w4a16_g128_lsq"])
    _fake_ckpt(ckpt, cfg)
    saved = torch.load(ckpt, weights_only=False)
    saved["hyper_parameters"]["learned_rotations"] = {"lr": 1.5}
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match=r"learned_rotations: the checkpoint was trained with \['r1', 'r2'\], this run none"):
        check_config(compose_train(["quant=w4a16_g128_lsq", f"ckpt_path={ckpt}"]))
    with pytest.raises(ValueError, match=r"with \['r1', 'r2'\], this run \['r1'\]"):
        check_config(compose_train(["quant=w4a16_g128_lsq", f"ckpt_path={ckpt}", "module.learned_rotations={r2: false}"]))
    check_config(compose_train(["quant=w4a16_g128_lsq", f"ckpt_path={ckpt}", "module.learned_rotations={lr: 0.5}"]))


@pytest.mark.parametrize("override, match", [
    ("optim.optimizer.lr=abc", r"optim.optimizer: TypeError.*'lr': 'abc'"),
    ("optim.scheduler.num_warmup_steps=abc", r"optim.scheduler: TypeError.*'num_warmup_steps': 'abc'"),
])
def test_bad_optimizer_value_fails_in_check(compose_train, override, match):
    with pytest.raises(ValueError, match=match):
        check_config(compose_train([override]))


def test_unwritable_output_dir_fails_in_check(compose_train):
    with pytest.raises(PermissionError, match=r"paths.output_dir='/dev/null/run' is not writable"):
        check_config(compose_train([], output_dir="/dev/null/run"))


def test_bad_trainer_value_fails_before_the_model_loads(compose_train, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the trainer config was checked")

    monkeypatch.setattr(qat.lit.module, "build_model", no_model)
    with pytest.raises(Exception, match="max_steps") as info:
        train(compose_train(["debug=tiny", "trainer.max_steps=-5"], output_dir=tmp_path))
    assert not isinstance(info.value, AssertionError)


def test_too_few_init_calibration_tokens_fail_in_check(compose_train):
    with pytest.raises(ValueError, match=r"init: calibration.samples x calibration.seq_len = 1 x 64 = 64 tokens; "
                                         r"method gptq needs min_tokens=128"):
        check_config(compose_train(["init=gptq", "init.calibration.samples=1", "init.calibration.seq_len=64"]))


def test_demo_names_a_misspelt_tiny_key():
    from qat.jobs.config import check_keys

    with pytest.raises(ValueError, match=r"tiny: unknown key\(s\) \['layerz'\]; valid keys are .*'num_layers'"):
        check_keys({"tiny": {"layerz": 4}}, "demo")
    check_keys({"tiny": {"num_layers": 4, "hidden_size": 128}}, "demo")


def test_resume_does_not_redo_the_ptq_initialisation(compose_train, tmp_path, monkeypatch, recwarn):
    """Also: a mid-epoch resume says nothing of an unreliable, non-resumable dataloader (Lightning's warning is
    wrong for qat's stream sampler, which seeks to the resumed step: tests/train/test_lit.py)."""
    from qat.lit.callbacks import PTQInit

    first = train(compose_train(["debug=tiny", "init=rtn", "trainer.max_steps=2", "eval.after=false"],
                                output_dir=tmp_path / "a"))
    assert "init_s" in first

    def solve_again(*args, **kwargs):
        raise AssertionError("PTQ initialisation ran again on resume; the checkpoint already holds its result")

    monkeypatch.setattr(PTQInit, "setup", solve_again)
    resumed = train(compose_train(["debug=tiny", "init=rtn", "trainer.max_steps=3", "eval.after=false",
                                   f"ckpt_path={first['ckpt']}"], output_dir=tmp_path / "b"))
    assert resumed["ckpt"] and "init_s" not in resumed
    assert not [w for w in recwarn if "ended before the epoch ended" in str(w.message)]


def test_train_result_json_is_strict(compose_train, tmp_path):
    import json

    # GPTQ starts below the float perplexity on this random model: gap_recovered is NaN
    train(compose_train(["debug=tiny", "trainer.max_steps=1", "eval.baselines=true", "init=gptq",
                         "init.calibration.samples=8", "init.calibration.seq_len=64"], output_dir=tmp_path))
    text = (tmp_path / "result.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in result.json"))
    assert data["method"] == "qat+gptq" and data["gap_recovered"] is None and data["qat_ppl"] > 1


@pytest.mark.slow
def test_cli_ddp_run_evaluates_on_rank_zero(tmp_path):
    """`qat-train trainer=ddp trainer.devices=2` (docs/training.md) crashed at the final evaluation: rank 0's
    torchmetrics Perplexity waited in a collective that rank 1, which does not evaluate, never joined."""
    import subprocess
    import sys

    from helpers_train import subprocess_env

    cmd = [sys.executable, "-m", "qat.cli.train", "trainer=ddp", "trainer.devices=2", "debug=tiny",
           "trainer.max_steps=2", "eval.baselines=true", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| QAT " in proc.stdout and (tmp_path / "result.json").exists()


@pytest.mark.slow
def test_console_script_ddp_run_starts_its_other_rank(tmp_path):
    """`qat-train trainer=ddp trainer.devices=2` through the console script failed: Lightning starts rank 1 as
    `python <sys.argv[0]> ...`, and the CLI had set sys.argv[0] to the bare name (`python: can't open file
    '<cwd>/qat-train'`). The script is found on PATH, as a user's shell finds it."""
    import os
    import subprocess
    import sys

    from helpers_train import subprocess_env

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "qat-train"  # what pip writes for the [project.scripts] entry
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom qat.cli.train import main\nsys.exit(main())\n")
    script.chmod(0o755)
    env = subprocess_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cmd = ["qat-train", "trainer=ddp", "trainer.devices=2", "debug=tiny", "trainer.max_steps=2",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "can't open file" not in proc.stderr and (tmp_path / "run" / "result.json").exists()


def test_label_names_the_row_of_a_sweep_job(compose_train, tmp_path):
    """Two rows of a `qat-train -m optim.optimizer.lr=...` sweep were both 'qat' in qat-compare's table."""
    import json

    train(compose_train(["debug=tiny", "trainer.max_steps=1", "label=qat_lr${optim.optimizer.lr}"],
                        output_dir=tmp_path))
    assert json.loads((tmp_path / "result.json").read_text())["method"] == "qat_lr0.0001"


def test_train_result_merges_as_a_full_row(compose_train, tmp_path):
    """Without eval.baselines a qat-train result.json had no bits_per_weight / size_mb: merged into
    qat-compare its row was NaN there and left off the Pareto plot; wall_s also counted the evaluation."""
    from qat.jobs.results import load_results

    out = train(compose_train(["debug=tiny", "trainer.max_steps=1"], output_dir=tmp_path))
    row = load_results([tmp_path / "result.json"])[0]
    assert row["bits_per_weight"] == pytest.approx(4.25) and row["size_mb"] > 0
    assert row["wall_s"] == pytest.approx(out["train_s"])
    assert row["device"] == out["device"] == "cpu"  # where Lightning trained, recorded as a PTQ row records it


def test_init_without_a_recipe_fails_in_check(compose_train):
    with pytest.raises(ValueError, match=r"init=gptq needs a quant recipe"):
        check_config(compose_train(["~quant", "init=gptq"]))


def test_resume_of_a_checkpoint_whose_recipe_left_a_key_at_its_default(compose_train, tmp_path):
    """A checkpoint written before gguf_q4_k.yaml gained `gguf_fallback: false` holds the recipe without the key:
    it prepares the same model, so it resumes (was: refused, 'differing fields: {gguf_fallback: (None, False)}');
    a checkpoint trained with the key on does not resume without it."""
    ckpt = tmp_path / "last.ckpt"
    _fake_ckpt(ckpt, compose_train(["quant=gguf_q4_k"]))
    saved = torch.load(ckpt, weights_only=False)
    assert saved["hyper_parameters"]["quant"].pop("gguf_fallback") is False
    torch.save(saved, ckpt)
    check_config(compose_train(["quant=gguf_q4_k", f"ckpt_path={ckpt}"]))
    saved["hyper_parameters"]["quant"]["gguf_fallback"] = True
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match=r"differing fields \(checkpoint, this run\): \{'gguf_fallback': \(True, False\)\}"):
        check_config(compose_train(["quant=gguf_q4_k", f"ckpt_path={ckpt}"]))
