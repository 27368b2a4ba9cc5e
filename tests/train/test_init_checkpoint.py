"""init=checkpoint: a run starts from another run's trained state (fresh optimizer and schedule); its dynamic
activation / KV schemes may differ from that run's, nothing else may (checked before anything loads)."""
from __future__ import annotations

import pytest
import torch

from qat.errors import ConfigError
from qat.lit.run import check_config, train

W4A8 = ["debug=tiny", "quant=w4a8_kv8", "eval.baselines=true", "eval.after=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step W4A8 KV8 run (int4 g128 weights, dynamic int8 inputs and KV) and its checkpoint."""
    from helpers_train import compose_train

    out = tmp_path_factory.mktemp("first")
    result = train(compose_train(W4A8 + ["trainer.max_steps=3"], output_dir=out))
    return result


def test_a_run_starts_where_the_checkpoint_ended(compose_train, tmp_path, trained):
    """Same recipe: the start row is the checkpoint's own model (its perplexity); training goes on from there."""
    result = train(compose_train(W4A8 + ["trainer.max_steps=2", "init=checkpoint", f"init.path={trained['ckpt']}"],
                                 output_dir=tmp_path))
    assert result["rtn_ppl"] == pytest.approx(trained["qat_ppl"], rel=1e-6)
    assert result["init_s"] > 0 and result["qat_ppl"] > 1
    state = torch.load(result["ckpt"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 2  # a fresh schedule: step 0 to max_steps


def test_a_changed_dynamic_scheme_starts_from_the_same_weights(compose_train, tmp_path, trained):
    """Asymmetric, clipped int4 inputs instead of the checkpoint's symmetric int8 ones: the trained weights load
    (the start row differs from the checkpoint's model by the new inputs only)."""
    cfg = compose_train(W4A8 + ["trainer.max_steps=1", "init=checkpoint", f"init.path={trained['ckpt']}",
                                "quant.input.bits=4", "quant.input.symmetric=false", "+quant.input.clip_ratio=0.9"],
                        output_dir=tmp_path)
    check_config(cfg)
    result = train(cfg)
    assert result["rtn_ppl"] != pytest.approx(trained["qat_ppl"], rel=1e-3)
    from qat.lit.module import QATModule

    module = QATModule.load_from_checkpoint(result["ckpt"], map_location="cpu", weights_only=False)
    spec = module.model.model.layers[0].self_attn.q_proj.input_quantizer.spec
    assert (spec.bits, spec.symmetric, spec.clip_ratio) == (4, False, 0.9)


@pytest.mark.parametrize("overrides, match", [
    # a weight scheme holds the trained latent weights' grid: another one is another model
    (["quant.weight.bits=8"], r"init.path=.* cannot start this run; set the same model, weight schemes, held ranges "
                              r"and learned_rotations .*\n  - quant: the checkpoint has 'w4a8_kv8'.*'weight'"),
    # a held (static) KV range would start uncalibrated where the checkpoint has none
    (["quant.kv_cache.granularity=per_tensor", "quant.kv_cache.dynamic=false"], r"differing fields .*'kv_cache'"),
    (["module.learned_rotations={lr: 0.1}"], r"learned_rotations: the checkpoint was trained with none, this run "
                                             r"\['r1', 'r2'\]"),
], ids=["weight", "held-kv", "rotations"])
def test_what_holds_state_must_match(compose_train, tmp_path, trained, overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(compose_train(W4A8 + ["init=checkpoint", f"init.path={trained['ckpt']}"] + overrides,
                                   output_dir=tmp_path))


@pytest.mark.parametrize("overrides, error, match", [
    ([], ConfigError, r"init=checkpoint needs init.path=<a qat-train checkpoint>"),
    (["init.path=/no/such.ckpt"], FileNotFoundError, r"init.path='/no/such.ckpt' does not exist; give a checkpoint"),
    (["init.path=/no/such.ckpt", "+init.start=grid"], ConfigError,
     r"init=checkpoint: unknown key\(s\) \['start'\]; it takes init.path"),
], ids=["no-path", "missing", "ptq-key"])
def test_bad_init_paths_are_named(compose_train, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        check_config(compose_train(W4A8 + ["init=checkpoint"] + overrides, output_dir=tmp_path))


def test_a_file_that_is_no_checkpoint_is_named(compose_train, tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(Exception, match=r"init.path cannot be read as a qat-train checkpoint") as err:
        check_config(compose_train(W4A8 + ["init=checkpoint", f"init.path={bad}"], output_dir=tmp_path / "o"))
    assert "notes.ckpt" in str(err.value) and "mmap" not in str(err.value)  # not torch's advice to re-save it
    with pytest.raises(ConfigError, match=r"init.path='.*' is a folder; give the checkpoint file qat-train wrote"):
        check_config(compose_train(W4A8 + ["init=checkpoint", f"init.path={tmp_path}"], output_dir=tmp_path / "o"))


def test_a_weight_only_run_goes_on_with_quantized_activations(compose_train, tmp_path, capsys):
    """Progressive QAT: W4A16 first, then W4A8 KV8 from its weights; the input and KV quantizers the checkpoint did
    not have start fresh (dynamic: nothing to load), and the run says so."""
    first = train(compose_train(["debug=tiny", "quant=w4a16_g128", "trainer.max_steps=2", "eval.after=false"],
                                output_dir=tmp_path / "a"))
    result = train(compose_train(W4A8 + ["trainer.max_steps=1", "init=checkpoint", f"init.path={first['ckpt']}"],
                                 output_dir=tmp_path / "b"))
    assert result["qat_ppl"] > 1
    err = capsys.readouterr().err
    # per layer: 7 linears' inputs, K and V
    assert "[qat-train] 18 dynamic quantizer(s) the checkpoint did not have (or this recipe drops) start fresh: " \
           "model.model.layers.0.mlp.down_proj.input_quantizer" in err
