"""Held (static) activation / KV ranges are set by calibration only: evaluation (perplexity, lm-eval) runs with
observing off and refuses an uncalibrated model, naming its quantizers."""
from __future__ import annotations

import pytest
import torch

import qat
from qat.errors import ConfigError
from qat.jobs.measure import perplexity
from qat.testing import tiny_llama

STATIC_KV = {"name": "w8a8_kv8_static", "weight": {"bits": 8}, "input": {"bits": 8, "granularity": "per_tensor"},
             "kv_cache": {"bits": 8, "granularity": "per_tensor"}}
KV_ONLY = {**STATIC_KV, "name": "w8_kv8_static", "input": None}


def _held(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("observer.lo", "observer.hi"))}


@pytest.mark.parametrize("recipe", ["nvfp4_w4a4", "w8a8_static", STATIC_KV], ids=["nvfp4", "w8a8_static", "kv"])
@pytest.mark.parametrize("observing", [False, True], ids=["frozen", "observing"])
def test_perplexity_never_calibrates(recipe, observing):
    """Calibrated on A, evaluated on B (even with observing left on, as a run that keeps ranges following its
    training batches): the held ranges and the NVFP4 global are A's, and the observing flags are restored."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (2, 16), generator=gen), 3 * torch.randint(0, 80, (8, 16), generator=gen)
    model = qat.prepare(tiny_llama(vocab_size=256), qat.transform.as_recipe(recipe))
    qat.calibrate(model, [a], freeze=not observing)
    held = _held(model)
    assert held and any("k_quantizer" in k for k in held) == (recipe is STATIC_KV)
    flags = {n: q.observing for n, q in qat.quantizers(model, ["input", "kv_cache"])}
    perplexity(model, b)
    after = _held(model)
    assert all(torch.equal(held[k], after[k]) for k in held)
    assert {n: q.observing for n, q in qat.quantizers(model, ["input", "kv_cache"])} == flags
    assert all(flags.values()) == observing


@pytest.mark.parametrize("recipe", ["nvfp4_w4a4", KV_ONLY], ids=["nvfp4", "kv"])
def test_uncalibrated_evaluation_is_refused_naming_the_quantizers(recipe):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.transform.as_recipe(recipe))
    role = "k_quantizer" if recipe is KV_ONLY else "q_proj.input_quantizer"
    with pytest.raises(ConfigError, match=rf"uncalibrated model: .*{role}.* calibrate first"):
        perplexity(model, torch.randint(0, 256, (2, 16)))
    assert not any(q.initialized for _, q in qat.quantizers(model, ["input", "kv_cache"]))  # nothing calibrated
    with qat.quantization_disabled(model):  # the float row of the same model is fine
        assert perplexity(model, torch.randint(0, 256, (2, 16))) > 1


@pytest.mark.parametrize("recipe", ["nvfp4_w4a4", "w8a8_static"])
def test_native_export_of_an_uncalibrated_model_is_refused(recipe, tmp_path):
    """Written, its reload would calibrate on the first thing it evaluates; calibrated, it is written and reloads
    with the same logits."""
    from qat.export import load_native, save_native

    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe(recipe))
    with pytest.raises(ConfigError, match=r"save_native: model\.layers\.0\.self_attn\.q_proj\.input_quantizer.* "
                                          r"calibrate the model first"):
        save_native(model, tmp_path / "uncal")
    assert not (tmp_path / "uncal").exists()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    qat.calibrate(model, [ids])
    reloaded = load_native(save_native(model, tmp_path / "cal"))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_static_global_stays_float32_through_a_dtype_cast():
    """model.to(bfloat16) after calibration: the calibrated global is one fp32 number; its range rounded to bf16
    would move it."""
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a4"))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    qat.calibrate(model, [ids])
    q = model.model.layers[0].self_attn.q_proj.input_quantizer
    held = {n: q.global_scale().clone() for n, q in qat.quantizers(model, ["input"])}
    model.to(torch.bfloat16)
    assert q.observer.hi.dtype == torch.float32 and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(torch.equal(q.global_scale(), held[n]) for n, q in qat.quantizers(model, ["input"]))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_static_global_recipe_refusals_and_hints(caplog):
    base = qat.load_recipe("nvfp4_w4a4").to_dict()
    with pytest.raises(ConfigError, match=r"quant\.weight\.static_global=true: .*leave static_global false"):
        qat.QuantRecipe.from_dict({**base, "weight": {**base["weight"], "static_global": True}})  # before any model
    with pytest.raises(ConfigError, match=r"quant\.overrides\[0\]\.weight\.static_global=true"):
        qat.QuantRecipe.from_dict({**base, "overrides": [{"targets": ["q_proj"], "weight": {"static_global": True}}]})
    # a checkpoint of the earlier dynamic nvfp4_w4a4: the refusal names the override that prepares that form
    dynamic = {**base, "input": {**base["input"], "static_global": False, "dynamic": True}}
    old = qat.prepare(tiny_llama(vocab_size=256), qat.transform.as_recipe(dynamic))
    new = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a4"))
    with pytest.raises(ConfigError, match=r"checkpoint's recipe \(nvfp4_w4a4's earlier dynamic form.*"
                                          r"quant\.input\.static_global=false quant\.input\.dynamic=true\)"):
        new.load_state_dict(old.state_dict())
    # a percentile observer's warning names the user's scheme, not the per-tensor range it observes with
    spec = qat.QuantSpec.from_dict({**base["input"], "observer": "percentile", "observer_args": {"percentile": 99.9}})
    q = qat.modules.quantizer.TensorQuantizer(spec, "input", torch.zeros(1, 64))
    qat.observers.reset_warnings()
    with caplog.at_level("WARNING"):
        q(torch.randn(2, 64))
    assert "fp4_e2m1 sym g16 nvfp4 static-global (its global's range per tensor)" in caplog.text
    assert "int8" not in caplog.text
