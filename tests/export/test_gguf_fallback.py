"""Recipe key gguf_fallback: the modules whose rows a GGUF super-block type cannot hold (hidden 128 < 256 here)
train on the type llama.cpp stores such rows in (IQ4_XS -> IQ4_NL, TQ2_0 -> Q4_0, Q4_K -> Q5_0), so a GGUF export
at that type computes exactly what the fake-quant model computed; the others keep the recipe's type."""
from __future__ import annotations

import logging

import gguf
import pytest
import torch

import qat
from qat.errors import ConfigError
from qat.export import export_gguf, load_any
from qat.export.gguf_export import FALLBACK
from qat.formats import fallback_spec, gguf_fallback, gguf_types
from qat.formats.ternary import tq2_0_spec
from qat.recipes import CONFIG_DIR, read_recipe
from qat.testing import tiny_llama, tiny_moe
from qat.transform import QuantRecipe

NARROW = ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "lm_head")
WIDE = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")  # rows of intermediate_size = 256


def _recipe(name: str, **weight) -> dict:
    """A shipped recipe with gguf_fallback on and every weight quantized (embedding and head too), so the whole
    file is trained types and the GGUF export at the recipe's own type can equal the fake-quant model."""
    r = read_recipe(name)
    return {**r, "weight": {**r["weight"], **weight}, "targets": ["Linear", "Embedding"], "ignore": [],
            "gguf_fallback": True}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _spec(model, name):
    return model.get_submodule(name).weight_quantizer.spec


def test_fallback_is_the_registered_one_the_export_takes():
    for name, t in gguf_types().items():
        pair = gguf_fallback(t.spec())
        if t.fallback is None:
            assert pair is None, name
            continue
        assert pair[1] == FALLBACK[name] == t.fallback  # one table: the formats' registered GGUF types
        spec, dropped = fallback_spec(t.spec(), t.fallback)
        assert spec == gguf_types()[t.fallback].spec() and dropped == []
    assert gguf_fallback(qat.load_recipe("w4a16_g128").base.weight) is None  # no GGUF type
    assert gguf_fallback(qat.load_recipe("gguf_q4_0").base.weight) is None  # blocks of 32: no fallback
    assert fallback_spec(tq2_0_spec(learn="lsq"), "Q4_0")[1] == ["learn='lsq' -> 'none'"]  # ggml: learn none only


@pytest.mark.parametrize("recipe, gguf_type, narrow, lsq, dropped", [
    ("gguf_iq4_xs_lsq", "IQ4_XS", "IQ4_NL", True, False),  # IQ4_NL learns its scale too
    ("tq2_0", "TQ2_0", "Q4_0", True, True),  # grid ggml: learn none only
    ("gguf_q4_k", "Q4_K", "Q5_0", False, False),
])
def test_narrow_rows_train_on_the_fallback_and_export_exactly(token_ids, tmp_path, caplog, recipe, gguf_type,
                                                              narrow, lsq, dropped):
    if recipe == "tq2_0":
        r = _recipe("ternary_g64_lsq", group_size=256)
    else:
        r = _recipe(recipe)
    model = tiny_llama(vocab_size=256, hidden_size=128, intermediate_size=256)  # hidden rows: not a multiple of 256
    with caplog.at_level(logging.INFO, logger="qat.transform.prepare"):
        model = qat.prepare(model, r)
    base = model.qat_recipe.base.weight
    for name in NARROW:
        assert _spec(model, name) == fallback_spec(base, narrow)[0], name
    for name in WIDE:
        assert _spec(model, name) == base, name
    line = next(m for m in caplog.messages if m.startswith("gguf_fallback:"))
    assert f"14 module(s) have rows that are not a multiple of 256 ({gguf_type}'s block), so they train on {narrow}" \
        in line and "model.layers.0.self_attn.q_proj" in line
    assert ("learn='lsq' -> 'none'" in line) == dropped  # said where the fallback's format cannot learn
    assert (_spec(model, NARROW[1]).learn == "lsq") == (lsq and not dropped)
    assert "not format-exact" not in caplog.text  # prepare's warning of padded super-blocks: none left
    if lsq:  # one step, so the learned scales are off their grid
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if "quantizer" in n], lr=1e-3)
        model(token_ids, labels=token_ids).loss.backward()
        opt.step()
    ref = _logits(model, token_ids)
    caplog.clear()
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type)
    assert "re-quantized" not in caplog.text and "falls back" not in caplog.text
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == gguf_type
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == types["token_embd.weight"] \
        == types["output.weight"] == narrow
    assert torch.equal(_logits(load_any(path), token_ids), ref)  # atol=0


def test_the_shipped_recipes():
    r = qat.load_recipe("gguf_tq2_0_lsq")
    assert r.gguf_fallback and r.base.weight == tq2_0_spec(learn="lsq")
    assert QuantRecipe.from_dict(r.to_dict()) == r
    off = qat.load_recipe("gguf_iq4_xs_lsq")  # off by default: the measured recipes train as they did
    assert not off.gguf_fallback and "gguf_fallback" not in off.to_dict()


def test_the_super_block_recipes_take_the_key_as_a_plain_hydra_override():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="export", overrides=["quant=gguf_iq4_xs_lsq", "quant.gguf_fallback=true"])
    assert QuantRecipe.from_dict(cfg.quant).gguf_fallback


def test_fused_experts_fall_back_whole(tmp_path):
    """One scheme per fused-experts module: its gate_up rows (hidden 128) misfit, so down_proj (256) moves too."""
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_moe("qwen3_moe", vocab_size=320, hidden_size=128, expert_size=256, num_experts=4)
    model = qat.prepare(model, {**read_recipe("gguf_q4_k"), "gguf_fallback": True})
    experts = model.model.layers[0].mlp.experts
    assert experts.schemes.weight == fallback_spec(qat.load_recipe("gguf_q4_k").base.weight, "Q5_0")[0]
    fake = _logits(model, ids)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == "Q5_0"
    assert torch.equal(_logits(load_any(path), ids), fake)


@pytest.mark.parametrize("recipe", ["w4a16_g128", "ternary_g64_lsq", "fp8_dynamic"])
def test_key_without_a_gguf_super_block_grid_is_refused_at_load(recipe):
    with pytest.raises(ConfigError, match=r"quant\.gguf_fallback=true .* grids int4 sym g32 iq4_xs .*ternary") as err:
        QuantRecipe.from_dict({**read_recipe(recipe), "gguf_fallback": True})
    assert str(qat.load_recipe(recipe).base.weight.describe()) in str(err.value)
    with pytest.raises(ConfigError, match=r"quant\.gguf_fallback='yes'; use true or false"):
        QuantRecipe.from_dict({**read_recipe("gguf_q4_k"), "gguf_fallback": "yes"})


def test_an_override_on_a_super_block_grid_is_enough():
    r = {**read_recipe("w4a16_g128"), "gguf_fallback": True,
         "overrides": [{"targets": ["re:.*down_proj"], "weight": {**read_recipe("gguf_q4_k")["weight"], "signed": None}}]}
    model = qat.prepare(tiny_llama(vocab_size=256, hidden_size=128, intermediate_size=384), r)
    assert _spec(model, "model.layers.0.mlp.down_proj") == qat.load_recipe("gguf_q5_0").base.weight  # 384 wide
    assert _spec(model, "model.layers.0.mlp.up_proj") == qat.load_recipe("w4a16_g128").base.weight  # no GGUF type


def test_gptq_solves_the_fallback_grid_and_exports_exactly(token_ids, tmp_path):
    from qat.ptq import ptq_model

    calib = [torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))]
    model = tiny_llama(vocab_size=256, hidden_size=128, intermediate_size=256)
    model = ptq_model(model, {**read_recipe("gguf_q4_k"), "gguf_fallback": True}, "gptq", calib, progress=False)
    ref = _logits(model, token_ids)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "Q4_K"
    assert torch.equal(_logits(load_any(path), token_ids), ref)


def test_rows_a_ternary_block_cannot_hold_are_refused_naming_the_key():
    """Ternary g256 pads no partial block: without the key, 128-wide rows are an error that says what fixes it."""
    with pytest.raises(ConfigError, match=r"12 module\(s\) on the GGUF TQ2_0 grid .* GGUF stores such rows as Q4_0: "
                                          r"the recipe key gguf_fallback: true"):
        qat.prepare(tiny_llama(vocab_size=256, hidden_size=128, intermediate_size=256),
                    {**read_recipe("gguf_tq2_0_lsq"), "gguf_fallback": False})


def test_the_ternary_refusal_is_one_line_without_ragged_advice():
    """The 12 misfit modules are one line (count, the first three), with the gguf_fallback key in it: not a line per
    module each advising `ragged: true`, which a GGUF grid does not take."""
    with pytest.raises(ConfigError) as err:
        qat.prepare(tiny_llama(vocab_size=256, hidden_size=128, intermediate_size=256),
                    {**read_recipe("gguf_tq2_0_lsq"), "gguf_fallback": False})
    text = str(err.value)
    assert text == ("cannot prepare the model: 12 module(s) on the GGUF TQ2_0 grid have rows of 128 columns, not a "
                    "multiple of its 256-wide blocks (model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
                    "model.layers.0.self_attn.v_proj, ... (9 more)); GGUF stores such rows as Q4_0: the recipe key "
                    "gguf_fallback: true trains them on Q4_0's grid"), text
    assert "ragged" not in text and "\n" not in text


def test_rows_the_fallback_cannot_hold_either_are_refused_naming_what_would_do():
    """gguf_fallback on, rows of 100 (a multiple of neither TQ2_0's 256 nor Q4_0's 32): not the key already set,
    nor ragged, but leaving them out or another type."""
    model = torch.nn.Sequential(torch.nn.Linear(100, 8), torch.nn.Linear(8, 4))
    with pytest.raises(ConfigError) as err:
        qat.prepare(model, {**read_recipe("gguf_tq2_0_lsq"), "gguf_fallback": True, "ignore": []})
    text = str(err.value)
    assert "2 module(s) on the GGUF TQ2_0 grid have rows of 8, 100 columns, not a multiple of its 256-wide blocks " \
           "(0, 1); " in text, text
    assert "GGUF would store them as Q4_0, whose blocks of 32 do not hold them either: leave them out " \
           "(quant.ignore) or choose a GGUF type whose blocks divide their rows" in text, text
    assert "ragged" not in text and "gguf_fallback: true" not in text, text


@pytest.mark.parametrize("recipe, targets, warned", [("gguf_q4_k", ["Linear"], True),  # lm_head Q5_0, embedding float
                                                     ("gguf_q4_k", ["Linear", "Embedding"], False),  # one grid: exact
                                                     ("gguf_iq4_xs_lsq", ["Linear", "Embedding"], True)])  # own scales
def test_a_tied_quantized_lm_head_not_in_the_file_is_warned(token_ids, tmp_path, caplog, recipe, targets, warned):
    """A tied model's GGUF output is token_embd, written from the embedding: lm_head trained on another grid (or
    with scales of its own) is not in the file, which was silent (only the row fallback of token_embd was said)."""
    model = tiny_llama(vocab_size=256, hidden_size=128, intermediate_size=256, tie_word_embeddings=True)
    model = qat.prepare(model, {**read_recipe(recipe), "targets": targets, "ignore": [], "gguf_fallback": True})
    if model.lm_head.weight_quantizer.learned:  # one step: lm_head's and the embedding's learned scales part ways
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if "quantizer" in n], lr=1e-2)
        model(token_ids, labels=token_ids).loss.backward()
        opt.step()
    ref = _logits(model, token_ids)
    with caplog.at_level(logging.WARNING, logger="qat.export.gguf_export"):
        path = export_gguf(model, tmp_path / "m.gguf", "F32")
    assert ("lm_head is tied to the embedding" in caplog.text) == warned, caplog.text
    assert torch.equal(_logits(load_any(path), token_ids), ref) != warned


def test_rows_the_fallback_cannot_hold_either_say_so(caplog):
    """Q6_K falls back to Q8_0 (blocks of 32); 48-wide rows fit neither, so the export writes F16: the warning says
    that, not 'set gguf_fallback' (already set)."""
    model = tiny_llama(vocab_size=256, hidden_size=48, intermediate_size=256, num_heads=3,
                       num_kv_heads=1)
    with caplog.at_level(logging.WARNING):
        qat.prepare(model, {**read_recipe("gguf_q6_k"), "gguf_fallback": True})
    assert "cannot hold these rows either" in caplog.text and "F16" in caplog.text
    assert "trains them on that type instead" not in caplog.text
