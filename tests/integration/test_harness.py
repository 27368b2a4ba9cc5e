"""lm-evaluation-harness on qat models (qat.jobs.harness) and qat's offline tasks (qat.jobs.offline_tasks): the
wrapper's log-likelihoods are a direct forward's, exports evaluate to their model's numbers, the tasks are
deterministic and held out, qat-eval tasks=[...] runs end to end, a missing lm-eval says how to install it."""
from __future__ import annotations

import ast
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml

import qat
from qat.export import export, load_any
from qat.jobs import offline_tasks as ot
from qat.jobs.harness import INSTALL_HINT, as_lm, evaluate_tasks, stderr_of
from qat.jobs.results import load_results, to_markdown, write_results
from qat.models import ByteTokenizer
from qat.recipes import CONFIG_DIR
from qat.testing import tiny_llama

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (pip install 'qat[eval]')")
from lm_eval.api import metrics as M  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

TOK = ByteTokenizer()
PAIRS = [("The river followed the old road", " north"), ("A quiet scientist welcomed", " a letter"),
         ("x", " yz and more words")]


def model_variants():
    base = tiny_llama(special_token_ids=True)
    prepared = qat.prepare(tiny_llama(special_token_ids=True), qat.load_recipe("w4a16_g128"))
    return {"float": base, "prepared": prepared,
            "converted": qat.convert(qat.prepare(tiny_llama(special_token_ids=True), qat.load_recipe("gguf_q4_0")))}


def direct_loglik(model, context: str, continuation: str) -> torch.Tensor:
    ctx, cont = TOK(context)["input_ids"], TOK(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.nn.functional.log_softmax(model(ids[:, :-1]).logits, dim=-1)[0, -len(cont):]
    return logp.gather(1, torch.tensor(cont)[:, None]).sum()


@pytest.mark.parametrize("kind", ["float", "prepared", "converted"])
def test_wrapper_loglikelihoods_equal_a_direct_forward(kind):
    model = model_variants()[kind]
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    lm = as_lm(model, TOK, batch_size=1)
    assert lm.model is model and {n: p.data_ptr() for n, p in model.named_parameters()} == before  # no copy
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)], disable_tqdm=True)
    for (ctx, cont), (ll, _) in zip(PAIRS, got):
        assert torch.equal(torch.tensor(ll), direct_loglik(model, ctx, cont))
    # a rolling window shorter than max_length: the prefix (bos) token, then every token of the text
    text = "The northern forest watched the stars."
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [TOK.bos_token_id] + TOK(text)["input_ids"]
    with torch.no_grad():
        logp = torch.nn.functional.log_softmax(model(torch.tensor([ids[:-1]])).logits, dim=-1)[0]
    assert torch.equal(torch.tensor(rolled), logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())


def test_batched_requests_match_one_at_a_time():
    model = tiny_llama(special_token_ids=True)
    one = as_lm(model, TOK, batch_size=1).loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)],
                                                        disable_tqdm=True)
    four = as_lm(model, TOK, batch_size=4).loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)],
                                                         disable_tqdm=True)
    # right-padded batches change the matmul shapes, not what a position attends to: equal to float32 rounding
    assert [a[1] for a in one] == [b[1] for b in four]
    torch.testing.assert_close(torch.tensor([a[0] for a in one]), torch.tensor([b[0] for b in four]), rtol=0, atol=1e-4)


def _numbers(result: dict) -> dict:
    return {(t, m): (v["value"], v["stderr"]) for t, b in result["tasks"].items() for m, v in b["metrics"].items()}


# (recipe of the source model or None for float, export format, gguf type, relative tolerance): 0 = exact, the
# export holds the source's numerics (format-exact: the stored codes and scales are the fake-quant values). GGUF
# Q8_0 holds the recipe's linears exactly but, by llama.cpp's type rules, also stores the embedding and output
# matrix (float in the recipe, which ignores lm_head) as Q8_0: its numbers agree to 1%, not exactly.
EXPORTS = [(None, "gguf", "F32", 0), ("gguf_q8_0", "gguf", "Q8_0", 1e-2), ("gguf_q8_0", "native", None, 0),
           ("w4a16_g128_asym", "compressed_tensors", None, 0), ("gptq_w4a16_g128", "gptq", None, 0)]


@pytest.mark.parametrize("recipe,fmt,gguf_type,rel", EXPORTS, ids=[f"{f}-{g or r}" for r, f, g, _ in EXPORTS])
def test_an_export_evaluates_to_the_numbers_of_its_model(tmp_path, recipe, fmt, gguf_type, rel):
    model = tiny_llama(special_token_ids=True)
    if recipe:
        model = qat.prepare(model, qat.load_recipe(recipe))
    path = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    export(model, path, format=fmt, **({"gguf_type": gguf_type} if gguf_type else {}))
    ref = evaluate_tasks(model, TOK, ["qat_tiny"], limit=3)
    got = evaluate_tasks(load_any(path), TOK, ["qat_tiny"], limit=3)
    assert len(_numbers(ref)) == 5
    if rel == 0:
        assert _numbers(got) == _numbers(ref)
    else:
        values = lambda r: {k: v for k, (v, _) in _numbers(r).items()}  # noqa: E731
        assert values(got) == pytest.approx(values(ref), rel=rel)


def test_offline_tasks_are_deterministic_and_held_out(tmp_path):
    first = [ot.write_task_file(t, tmp_path / "a") for t in ("qat_tiny_lambada", "qat_tiny_ppl")]
    again = [ot.write_task_file(t, tmp_path / "b") for t in ("qat_tiny_lambada", "qat_tiny_ppl")]
    assert [ot.file_sha256(p) for p in first] == [ot.file_sha256(p) for p in again]
    docs = qat.data.load_documents(ot.CORPORA["tiny"]["path"], sample_by="paragraph")
    split = qat.data.split_documents(docs, 0.1, 0.1, 0)
    assert ot.held_out("tiny") == split["test"] and not set(split["test"]) & set(split["train"])
    pages = [json.loads(line)["page"] for line in first[1].read_text().splitlines()]
    assert pages == split["test"] and len(pages) == 6
    items = [json.loads(line)["text"] for line in first[0].read_text().splitlines()]
    assert len(items) == 6 and all(" ".join(p.split()).startswith(i) for i, p in zip(items, split["test"]))
    # pinned: the same documents on every build (a change here changes what every earlier number measured)
    assert ot.file_sha256(first[1])[:16] == PINNED_TINY_PPL


PINNED_TINY_PPL = "8351d845afc9c7a3"


def test_task_corpora_follow_the_data_configs():
    fixture = yaml.safe_load((CONFIG_DIR / "data" / "fixture.yaml").read_text())
    assert yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["seed"] == 0  # the data split's seed
    for name, want in ot.CORPORA.items():
        cfg = dict(fixture)
        if name != "tiny":
            cfg.update({k: v for k, v in yaml.safe_load((CONFIG_DIR / "data" / f"{name}.yaml").read_text()).items()
                        if k != "defaults"})
        else:
            assert cfg["path"].endswith("configs/data/tiny_corpus.txt") and want["path"].endswith("data/tiny_corpus.txt")
            cfg["path"] = want["path"]
        for key in ("path", "text_field", "sample_by", "val_fraction", "test_fraction"):
            assert cfg[key] == want[key], (name, key)
    names = {yaml.safe_load(p.read_text().replace("!function", ""))["task"] for p in ot.TASK_DIR.glob("*.yaml")}
    assert names == set(ot.TASKS)


@pytest.mark.parametrize("corpus", ["wiki", "shakespeare"])
def test_asset_tasks_build_from_the_held_out_split(corpus):
    try:
        docs = ot.held_out(corpus)
    except FileNotFoundError:
        pytest.skip("asset cache missing (qat-assets)")
    lam, ppl = ot.task_docs(f"qat_{corpus}_lambada"), ot.task_docs(f"qat_{corpus}_ppl")
    assert lam == ot.task_docs(f"qat_{corpus}_lambada") and len(lam) >= 100 and len(ppl) >= 100
    assert all(ot.LAST_WORD.fullmatch(d["text"].split(" ")[-1]) for d in lam)
    assert sum(len(d["page"].split()) for d in ppl) == sum(len(d.split()) for d in docs)  # every held-out word


def test_stderr_methods():
    acc = [0, 1, 1, 0, 1]
    assert stderr_of(M.mean, acc) == (M.mean_stderr(acc), "mean")
    gen = random.Random(0)
    items = [(-gen.uniform(50, 150), gen.randint(20, 60)) for _ in range(400)]
    se, how = stderr_of(M.weighted_perplexity, items)
    boot, _ = stderr_of(lambda xs: M.weighted_perplexity(xs) + 0.0, items, iters=400)  # not a known aggregation
    assert how == "delta" and abs(se / boot - 1) < 0.2
    bpb, _ = stderr_of(M.bits_per_byte, items)
    r = math.log(M.weighted_perplexity(items))
    assert bpb == pytest.approx(se / math.exp(r) / math.log(2))


def test_qat_eval_tasks_end_to_end(tmp_path, monkeypatch, capsys):
    from qat.cli.eval import main

    monkeypatch.setattr(sys, "argv", ["qat-eval", "model=tiny", "~data", "tasks=[qat_tiny]", "harness.limit=3",
                                      "max_new_tokens=2", "label=tiny_fp", f"hydra.run.dir={tmp_path}"])
    main()
    printed = capsys.readouterr().out
    assert "qat_tiny_ppl" in printed and "word_perplexity" in printed and "± stderr" in printed
    (row,) = load_results([tmp_path / "result.json"])
    assert row["method"] == "tiny_fp" and math.isnan(row["ppl"])
    m = row["tasks"]["qat_tiny_ppl/word_perplexity"]
    assert m["n"] == 3 and m["stderr"] > 0 and not m["higher_is_better"]
    # qat-compare merges it: value ± stderr columns, ≈ where a row is within noise of the column's best
    other = {**row, "method": "tiny_q", "tasks": {k: {**v, "value": v["value"] * 1.001} for k, v in row["tasks"].items()}}
    far = {**row, "method": "far", "tasks": {k: {**v, "value": v["value"] + 100 * v["stderr"] + 1}
                                             for k, v in row["tasks"].items()}}
    md = to_markdown([row, other, far])
    assert "qat_tiny_ppl/word_perplexity" in md and "±" in md and "≈" in md
    assert f"qat_tiny_ppl/word_perplexity: tiny_fp/{row['quant']} vs tiny_q/{row['quant']}" in md
    assert f"vs far/{row['quant']}" not in md
    paths = write_results([row, other], tmp_path / "cmp")
    assert "±" in paths["md"].read_text() and "qat_tiny_ppl/word_perplexity stderr" in paths["csv"].read_text()
    fewer = {**other, "tasks": {k: {**v, "n": 2} for k, v in other["tasks"].items()}}
    with pytest.raises(ValueError, match="measured on 2 documents"):
        write_results([row, fewer], tmp_path / "cmp2")


def test_missing_lm_eval_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'qat\[eval\]'"):
        evaluate_tasks(tiny_llama(), TOK, ["qat_tiny"])
    from qat.jobs.eval import run_eval

    with pytest.raises(ImportError, match=r"qat\[eval\]"):  # before any model loads
        run_eval("no/such/model", data=None, tasks=["qat_tiny"])
    assert "qat[eval]" in INSTALL_HINT


def test_only_the_harness_module_imports_lm_eval_and_only_inside_functions():
    root = Path(qat.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "lm_eval" for m in mods):
                offenders.append(str(path.relative_to(root)))
    assert not offenders, f"top-level lm_eval imports (qat must import without lm-eval): {offenders}"


def test_unknown_task_is_named_before_the_model_is_wrapped():
    with pytest.raises(ValueError, match="unknown \\['qat_tiny_nope'\\].*qat_tiny_lambada"):
        evaluate_tasks(object(), TOK, ["qat_tiny_nope"])


def weights_only_and_tokenizer(tmp_path) -> tuple[Path, Path]:
    """A Qwen2 folder of config.json + weights only, and a folder holding a (BPE) tokenizer of fewer ids."""
    from qat.testing import tiny_model
    from tests.export.test_gguf_file import bpe_tokenizer

    tiny_model("qwen2", num_layers=1).save_pretrained(tmp_path / "weights_only")
    bpe_tokenizer().save_pretrained(tmp_path / "tok")
    return tmp_path / "weights_only", tmp_path / "tok"


def test_compare_tasks_read_data_tokenizer_not_the_weights_only_model_folder(tmp_path):
    """model.path=<weights only> data.tokenizer=<folder>: the pre-checks pass, and the lm-eval column of every row is
    computed with that tokenizer (it used to load the tokenizer from model.path after the first row's PTQ)."""
    from qat.jobs.compare import run_compare_job
    from tests.ptq.conftest import compose_job

    model, tok = weights_only_and_tokenizer(tmp_path)
    cfg = compose_job("compare", [f"model.path={model}", f"data.tokenizer={tok}", "calibration.samples=4",
                                  "eval.max_blocks=2", "methods=[rtn]", "quants=[w4a16_g128]",
                                  "eval.tasks=[qat_tiny_ppl]", "eval.harness.limit=2"])
    paths = run_compare_job(cfg, tmp_path / "out", log=lambda s: None)
    row, = json.loads(paths["json"].read_text())["rows"]
    assert row["tasks"]["qat_tiny_ppl/word_perplexity"]["n"] == 2 and row["tasks"]["qat_tiny_ppl/word_perplexity"]["value"] > 0


def test_compare_job_runs_tasks_on_every_row(tmp_path):
    from qat.jobs.compare import run_compare_job
    from qat.jobs.sweep import run_sweep_job
    from qat.jobs.config import register_resolvers
    from tests.ptq.conftest import compose_job

    register_resolvers()
    cfg = compose_job("compare", ["calibration.samples=4", "eval.max_blocks=2", "methods=[fp,rtn]",
                                  "quants=[w4a16_g128]", "eval.tasks=[qat_tiny_ppl]", "eval.harness.limit=2"])
    paths = run_compare_job(cfg, tmp_path, log=lambda s: None)
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "rtn"]
    fp, rtn = (r["tasks"]["qat_tiny_ppl/word_perplexity"] for r in rows)
    assert fp["n"] == rtn["n"] == 2 and fp["value"] != rtn["value"] and fp["stderr"] > 0
    assert "qat_tiny_ppl/bits_per_byte" in paths["md"].read_text()
    with pytest.raises(ValueError, match="single-process qat-compare"):
        run_sweep_job({**cfg, "method": {"name": "rtn"}}, tmp_path / "job")
