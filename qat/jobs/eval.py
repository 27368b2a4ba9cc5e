"""The qat-eval job: perplexity, lm-evaluation-harness tasks and a greedy sample of any export or checkpoint,
loaded through qat's loader.

    run_eval("out/m.gguf", data="wiki", max_blocks=32)
    run_eval("out/m.gguf", data=None, tasks=["qat_offline"])        # qat.jobs.harness (needs qat[eval])

`run_eval_job` also writes the result as one qat-compare row (result.json, atomically): method / quant name
the model, `ppl` the perplexity (null without data), `tasks` each task metric with its standard error.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from qat.data import SPLITS, build_blocks, corpus_from_mapping
from qat.errors import ConfigError
from qat.export.load import detect_format, in_flight_recipe, load_any, load_any_tokenizer, quantize_on_load
from qat.io import atomic_write_bytes
from qat.jobs.config import EVAL_JOB, as_count, check_keys
from qat.jobs.harness import (check_harness_args, check_tasks, evaluate_tasks, flat_metrics, require_lm_eval,
                              tasks_table)
from qat.jobs.measure import perplexity
from qat.jobs.placement import default_device, device_errors, place, resolve_device
from qat.jobs.results import eval_protocol, to_json
from qat.models import check_token_ids


def tokenizer_for(tokenizer: str | None, model: str):
    """The tokenizer given (refused when it cannot be loaded), else the one stored with `model` (or None)."""
    tok = load_any_tokenizer(tokenizer or model)
    if tokenizer is not None and tok is None:
        raise ConfigError(f"tokenizer={tokenizer!r} cannot be loaded; give a folder with tokenizer files, a .gguf "
                         "file with a vocabulary, or 'tiny'")
    return tok


def corpus_config(data: str | dict, seq_len: int | None, max_blocks: int | None):
    """A `qat.data.CorpusConfig` from a corpus path / alias or a `data` config mapping, with the block size and
    number of evaluation blocks overridden when given."""
    raw = {"path": data} if isinstance(data, (str, os.PathLike)) else dict(data)
    cfg = corpus_from_mapping({k: v for k, v in raw.items() if k != "tokenizer"})  # the model's tokenizer reads it
    cfg.path = str(cfg.path)
    if seq_len:
        cfg.block_size = seq_len
    if max_blocks:
        cfg.max_eval_blocks = max_blocks
    return cfg


def run_eval(model: str, data: str | dict | None = "wiki", quant: Any = None, seq_len: int | None = None,
             max_blocks: int | None = 32, split: str = "test", prompt: str | None = None, max_new_tokens: int = 32,
             tokenizer: str | None = None, dtype: str = "float32", tiny: dict | None = None,
             tasks: list[str] | str | None = None, harness: dict | None = None, device: str | None = None) -> dict:
    """Perplexity (and a greedy generation) of any export, loaded through `load_any`.

    Args:
        model: an export or checkpoint path (see `qat.export.load`).
        data: a corpus path / alias ("wiki", a text file...) or a mapping of `qat.data.CorpusConfig` fields
            (the `data` config group), or None to skip perplexity.
        quant: a recipe to quantize in flight at load (e.g. fp8_dynamic), on the CPU before the model moves to
            `device` (the same codes as a CPU run; the float model and its converted copy held in CPU memory).
        seq_len / max_blocks: override the corpus's block size / number of evaluation blocks.
        tasks: lm-eval task / tag names run by `qat.jobs.harness.evaluate_tasks` (e.g. ["qat_offline"]).
        harness: its other arguments (limit, batch_size, max_length, num_fewshot, bootstrap_iters).
        device: auto | cpu | cuda | cuda:N (`qat.jobs.placement`; None: $QAT_DEVICE, else auto).
    Returns:
        {"model", "ppl", "tokens", "protocol", "harness", "sample", "seconds"} ("harness": evaluate_tasks'
        result, when tasks are given).
    Raises:
        ValueError: no tokenizer found (give tokenizer=); an unusable device (before the model loads).
        ImportError: tasks without lm-eval installed (checked before the model loads).
    Example:
        >>> run_eval("out/m.gguf", data="wiki", max_blocks=8)
    """
    start = time.perf_counter()
    if tasks:  # refused before the model loads
        require_lm_eval()
        check_harness_args(**(harness or {}))
        check_tasks(tasks)
    recipe = None if quant is None else in_flight_recipe(quant)  # refused before the model loads
    target = resolve_device(device)
    tok = tokenizer_for(tokenizer, model)
    net = load_any(model, dtype, **(tiny or {}))
    if recipe is not None:  # on the CPU, then moved: the codes are a CPU run's on any device (rotations included)
        net = quantize_on_load(net, recipe)
    net = place(net, target)
    if tok is None:
        raise ConfigError(f"no tokenizer found with {model!r} (no tokenizer files there); pass tokenizer=<the model's "
                          "tokenizer: a folder or hub name; 'tiny' only for qat's tiny models>")
    out: dict[str, Any] = {"model": str(model)}
    if data:
        cfg = corpus_config(data, seq_len, max_blocks)
        blocks = build_blocks(cfg, tok, splits=[split])[split]
        check_token_ids(net, [blocks], str(tokenizer or model), model)
        out.update(ppl=round(perplexity(net, blocks), 4), tokens=int(blocks.numel()),
                   protocol=eval_protocol(cfg.path, split, blocks))
    if tasks:
        out["harness"] = evaluate_tasks(net, tok, tasks, **(harness or {}))
    if prompt and max_new_tokens:  # max_new_tokens=0: no sample
        ids = torch.tensor([tok(prompt)["input_ids"]], device=next(net.parameters()).device)
        gen = net.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[0, ids.shape[1]:].tolist()
        if not hasattr(tok, "__len__"):  # tiny models' byte tokenizer: ids past its vocabulary have no text
            new = [i for i in new if i < tok.vocab_size]
        out["sample"] = tok.decode(new)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def run_eval_job(cfg: dict, out_dir: str | os.PathLike | None = None) -> dict:
    """qat-eval's job: the composed config (plain dicts) checked against `qat.jobs.config.EVAL_JOB`, then
    `run_eval`; the result is written as a qat-compare row to `output` (default `<out_dir>/result.json`).

    Raises:
        ValueError: a misspelt key anywhere (naming it), and what `run_eval` raises.
    """
    check_eval_job(cfg)
    model = cfg["model"]
    harness = {k: v for k, v in (cfg.get("harness") or {}).items() if v is not None}
    result = run_eval(model["path"], data=cfg.get("data"), quant=cfg.get("quant"), max_blocks=cfg["max_blocks"],
                      split=cfg["split"], prompt=cfg["prompt"], max_new_tokens=cfg["max_new_tokens"],
                      tokenizer=cfg["tokenizer"], dtype=model.get("dtype", "float32"), tiny=model.get("tiny"),
                      tasks=cfg.get("tasks") or None, harness=harness, device=cfg.get("device"))
    target = cfg.get("output") or (Path(out_dir) / "result.json" if out_dir else None)
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, to_json(eval_row(result, cfg.get("label"), cfg.get("quant"))))
        result["result_json"] = str(target)
    return result


def check_eval_job(cfg: dict) -> None:
    """What a qat-eval job checks before it loads anything (each job of a `qat-eval -m` sweep is checked with it
    before the first one runs).

    Raises:
        ConfigError: naming every offending key and what is valid.
    """
    check_keys(cfg, EVAL_JOB)
    errors = []
    for key, least, allow_none in (("max_blocks", 1, True), ("max_new_tokens", 0, False), ("seed", 0, False)):
        try:
            as_count(cfg.get(key, 0), key, least, allow_none)
        except ConfigError as err:
            errors.append(str(err))
    if not cfg.get("data") and not cfg.get("tasks") and not (cfg.get("prompt") and cfg.get("max_new_tokens")):
        errors.append("nothing to evaluate: no data (perplexity), no tasks and no sample (prompt=null or "
                      "max_new_tokens=0); give data=<corpus>, tasks=[...] or max_new_tokens > 0")
    if cfg.get("split") not in SPLITS:
        errors.append(f"split={cfg.get('split')!r}; choose from {list(SPLITS)}")
    errors += device_errors(cfg.get("device", default_device()))
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))


def eval_row(result: dict, label: str | None = None, quant: Any = None) -> dict:
    """`run_eval`'s result as one qat-compare row (`qat-compare results=[.../result.json]` merges it): method =
    `label` (default: the model's file name), quant = the in-flight recipe or the model's format, `tasks` =
    `qat.jobs.harness.flat_metrics` (value, stderr, n per "<task>/<metric>"); the full result under "eval"."""
    model = str(result["model"])
    name = quant if isinstance(quant, str) else (quant or {}).get("name") if isinstance(quant, dict) else None
    return {"method": label or Path(model).name, "quant": name or detect_format(model),
            "ppl": result.get("ppl", math.nan), "protocol": result.get("protocol"),
            "tasks": flat_metrics(result.get("harness") or {}), "eval": result}


def eval_report(result: dict) -> str:
    """What qat-eval prints: the tasks' table (value ± standard error) when tasks ran, then the result."""
    lines = []
    if "ppl" in result:
        lines.append(f"perplexity {result['ppl']:.4f} on {result['tokens']} tokens")
    if result.get("harness"):
        lines.append(tasks_table(result["harness"]))
    if result.get("sample") is not None:
        lines.append(f"sample: {result['sample']!r}")
    if result.get("result_json"):
        lines.append(f"written: {result['result_json']}")
    return "\n".join(lines)
