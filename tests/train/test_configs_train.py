"""qat-train configs: every experiment runs (fast_dev_run, tiny model), every recipe composes, bad configs fail early."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException

from qat.lit.run import check_config, gap_line, gap_recovered, train

from helpers_train import CONFIG_DIR, ROOT, compose_train, subprocess_env

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
TINY = ["model=tiny", "data=fixture", "logger=csv"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run_on_tiny_model(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", "debug=fast_dev_run", *TINY], tmp_path)
    assert cfg.model.path == "tiny" and cfg.trainer.fast_dev_run == 1
    results = train(cfg)
    assert results["train_s"] > 0


def test_default_run_prints_table_and_logs(tmp_path, capsys):
    cfg = compose_train(["trainer.max_steps=3", "trainer.log_every_n_steps=1", "eval.baselines=true", "eval.max_blocks=2",
                         "callbacks.quant_stats.every_n_steps=1"], tmp_path)
    results = train(cfg)
    out = capsys.readouterr().out
    assert "| FP " in out and "| RTN " in out and "| QAT " in out and "RTN -> FP" in out
    assert gap_line("RTN", results) in out  # recovered x% of the gap, or ended below FP (on this random model)
    assert {"fp_ppl", "rtn_ppl", "qat_ppl", "gap_recovered", "loss_gap_recovered"} <= set(results)
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    for key in ("train/loss", "train/lr", "quant/scale_mean", "quant/clip_frac", "model.layers.0.mlp.up_proj/scale_mean"):
        assert key in metrics
    assert Path(results["ckpt"]).is_file()
    assert f"written: {tmp_path}" in out and f"checkpoint: {results['ckpt']}" in out  # where to find the run


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_composes(recipe):
    data = yaml.safe_load(recipe.read_text())
    assert set(data) == {"overrides", "metrics", "machine"}, "recipe keys"
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("# qat-train "), "first line is the command"
    cfg = compose_train(list(data["overrides"]))
    assert cfg.quant is not None and cfg.trainer.max_steps > 0
    assert {"fp_ppl", "rtn_ppl", "qat_ppl"} <= set(data["metrics"])


def test_there_are_recipes():
    assert any("smollm2_135m" in str(p) for p in RECIPES)


def test_unknown_group_option_names_it():
    with pytest.raises(MissingConfigException, match="model/nope"):
        compose_train(["model=nope"])


def test_misspelt_override_key_names_it():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train(["trainer.max_stepz=3"])


@pytest.mark.parametrize("override, match", [
    ("+module.lrr=0.1", r"module: unknown key\(s\) \['lrr'\]"),
    ("+data.blok_size=3", r"data: unknown key\(s\) \['blok_size'\]"),
    ("+trainer.max_stepz=3", r"trainer: unknown key\(s\) \['max_stepz'\]"),
    ("+model.dtpye=bf16", r"model: unknown key\(s\) \['dtpye'\]"),
    ("+eval.splt=test", r"eval: unknown key\(s\)"),
    ("+quant.weight.bitz=4", "bitz"),
    ("data.block_size=1024", r"data.block_size=1024 is larger than the context .*max_position_embeddings=256"),
])
def test_bad_config_fails_before_training(override, match):
    with pytest.raises(ValueError, match=match):
        check_config(compose_train([override]))


def test_missing_data_file_and_model_path():
    with pytest.raises(FileNotFoundError, match="data.path='/no/such/corpus.txt'"):
        check_config(compose_train(["data.path=/no/such/corpus.txt"]))
    with pytest.raises(FileNotFoundError, match="model path '/no/such/model' does not exist"):
        check_config(compose_train(["model.path=/no/such/model"]))


def test_cli_multirun_sweep(tmp_path):
    cmd = [sys.executable, "-m", "qat.cli.train", "-m", "quant=w4a16_g128,w3a16_g64", "debug=fast_dev_run",
           f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quant w4a16_g128" in proc.stderr and "quant w3a16_g64" in proc.stderr
    assert (tmp_path / "0").is_dir() and (tmp_path / "1").is_dir()


def test_cli_bad_config_exits_with_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qat.cli.train", "data.path=/no/such.txt",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=subprocess_env())
    assert proc.returncode != 0 and "data.path='/no/such.txt' does not exist" in proc.stderr
    assert "step 1" not in proc.stderr


def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_train(["logger=wandb", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "eval.after=false",
                         "callbacks=none"], tmp_path)
    train(cfg)
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "an offline wandb run directory (to `wandb sync` later)"


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path):
    cfg = compose_train(["debug=fast_dev_run", "trainer.precision=bf16-mixed", "module.gradient_checkpointing=true",
                         "quant=w4a8_kv8"], tmp_path)
    assert train(cfg)["train_s"] > 0


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_scale_out_trainer_configs_compose(name):
    from hydra.utils import instantiate

    cfg = compose_train([f"trainer={name}"])
    assert cfg.trainer.devices == 2
    strategy = cfg.trainer.strategy
    if name == "fsdp":  # FSDP2 through ModelParallelStrategy; runs in tests/train/test_parallel.py
        from pytorch_lightning.strategies import ModelParallelStrategy

        assert isinstance(instantiate(strategy), ModelParallelStrategy)
    else:
        assert strategy == "ddp"


def test_full_precision_run_without_quant_group(tmp_path):
    cfg = compose_train(["~quant", "trainer.max_steps=2", "eval.baselines=true", "eval.max_blocks=2"], tmp_path)
    assert cfg.module.quant is None
    results = train(cfg)
    assert "rtn_ppl" not in results and results["qat_ppl"] > 0


@pytest.mark.parametrize("quant, roles", [("nvfp4_w4a4", "input"), ("w8a8_static", "input"), ("w4a16_g64", None)])
def test_static_activation_recipe_gets_range_init_on_training_batches(quant, roles, capsys):
    # smollm2_w4_qat's weight-only range_init_batches=0 with quant=<a static recipe>: calibrated on training
    # batches (said so), never left to the first evaluation (the test split)
    cfg = compose_train([f"quant={quant}", "module.range_init_batches=0"])
    check_config(cfg)
    out = capsys.readouterr()
    if roles is None:
        assert cfg.module.range_init_batches == 0 and "range_init_batches" not in out.out + out.err
    else:
        assert cfg.module.range_init_batches == 4
        assert f"quant={quant} holds static {roles} ranges: module.range_init_batches=0 raised to 4" in out.out + out.err
    cfg = compose_train([f"quant={quant}", "module.range_init_batches=2"])
    check_config(cfg)
    assert cfg.module.range_init_batches == 2  # a chosen count is kept


def test_evaluation_never_moves_the_static_global(tmp_path, monkeypatch):
    """qat-train quant=nvfp4_w4a4 module.range_init_batches=0: the start-point row and the final evaluation see the
    global calibrated on training batches; neither evaluation (test split) moves it."""
    import qat
    import qat.lit.callbacks as callbacks
    import qat.lit.run as run

    seen = []

    def recording(perplexity):
        def wrapped(model, blocks, *args, **kwargs):
            q = next(q for _, q in qat.quantizers(model, ["input"]))
            before = float(q.global_scale()) if q.initialized else None
            out = perplexity(model, blocks, *args, **kwargs)
            seen.append((before, float(q.global_scale()) if q.initialized else None, q.observing))
            return out
        return wrapped

    monkeypatch.setattr(callbacks, "perplexity", recording(callbacks.perplexity))
    monkeypatch.setattr(run, "perplexity", recording(run.perplexity))
    cfg = compose_train(["quant=nvfp4_w4a4", "module.range_init_batches=0", "trainer.max_steps=2", "eval.baselines=true",
                         "eval.max_blocks=2", "eval.tasks=[]"], tmp_path)
    train(cfg)
    fp, start, final = seen
    assert fp[0] is None  # the float row runs before range initialisation, quantizers off
    assert start[0] is not None and start[0] == start[1]  # calibrated on training batches, held through the eval
    assert final[0] == final[1] == start[0] and not final[2]  # ranges were frozen after range init; eval kept them


def test_gap_recovered_in_perplexity_and_loss():
    """A start far above FP: nearly all of the perplexity gap closes while the loss gap tells how far QAT still is."""
    from qat.lit.run import gap_recovered
    ppl, loss = gap_recovered(27.9, 1.0e7, 4866.0)
    assert ppl > 0.999 and loss == pytest.approx((math.log(1e7) - math.log(4866)) / (math.log(1e7) - math.log(27.9)))
    assert 0.59 < loss < 0.60
    assert gap_recovered(20.0, 40.0, 20.0) == (1.0, 1.0) and gap_recovered(20.0, 40.0, 40.0) == (0.0, 0.0)
    assert all(math.isnan(x) for x in gap_recovered(30.0, 20.0, 25.0))  # the start below FP: no gap to close


def test_gap_line_names_the_start_row_and_says_when_qat_ends_below_fp():
    """The summary line names the start row's label (GPTQ / AWQ with init=..., not always RTN), and QAT ending
    below FP is said in perplexities, not as a share over 100% (thousands of % on a tiny random model)."""
    def results(fp, start, qat_ppl):
        ppl, loss = gap_recovered(fp, start, qat_ppl)
        return {"fp_ppl": fp, "rtn_ppl": start, "qat_ppl": qat_ppl, "gap_recovered": ppl, "loss_gap_recovered": loss}

    assert gap_line("GPTQ", results(20.0, 40.0, 25.0)) == ("QAT recovered 75.0% of the GPTQ -> FP perplexity gap "
                                                           "(67.8% of the loss gap, log perplexity)")
    assert gap_line("RTN", results(20.0, 40.0, 20.0)).startswith("QAT recovered 100.0% of the RTN -> FP")
    below = gap_line("AWQ", results(300.0, 300.5, 250.0))  # 10000% of the gap as a share
    assert below == ("QAT ended below FP (250.000 vs 300.000 perplexity; AWQ started at 300.500): the whole AWQ -> FP "
                     "gap is closed")
    assert "%" not in below
    assert gap_line("RTN", results(30.0, 20.0, 25.0)) is None  # the start below FP: no line, as before
    assert gap_line("RTN", {"fp_ppl": 20.0, "qat_ppl": 25.0}) is None  # no start row (eval.baselines=false)
