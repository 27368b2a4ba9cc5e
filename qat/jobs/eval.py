"""The qat-eval job: perplexity and a greedy sample of any export or checkpoint, loaded through qat's loader.

    run_eval("out/m.gguf", data="wiki", max_blocks=32)
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from qat.data import SPLITS, build_blocks, corpus_from_mapping
from qat.errors import ConfigError
from qat.export.load import in_flight_recipe, load_any, load_any_tokenizer, quantize_on_load
from qat.jobs.config import EVAL_JOB, as_count, check_keys
from qat.jobs.measure import perplexity


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
             tokenizer: str | None = None, dtype: str = "float32", tiny: dict | None = None) -> dict:
    """Perplexity (and a greedy generation) of any export, loaded through `load_any`.

    Args:
        model: an export or checkpoint path (see `qat.export.load`).
        data: a corpus path / alias ("wiki", a text file...) or a mapping of `qat.data.CorpusConfig` fields
            (the `data` config group), or None to skip perplexity.
        quant: a recipe to quantize in flight at load (e.g. fp8_dynamic).
        seq_len / max_blocks: override the corpus's block size / number of evaluation blocks.
    Returns:
        {"model", "ppl", "tokens", "sample", "seconds"}.
    Raises:
        ValueError: no tokenizer found (give tokenizer=).
    Example:
        >>> run_eval("out/m.gguf", data="wiki", max_blocks=8)
    """
    start = time.perf_counter()
    recipe = None if quant is None else in_flight_recipe(quant)  # refused before the model loads
    tok = tokenizer_for(tokenizer, model)
    net = load_any(model, dtype, **(tiny or {}))
    if recipe is not None:
        net = quantize_on_load(net, recipe)
    if tok is None:
        raise ConfigError(f"qat-eval: no tokenizer found with {model!r}; pass tokenizer=<folder or 'tiny'>")
    out: dict[str, Any] = {"model": str(model)}
    if data:
        blocks = build_blocks(corpus_config(data, seq_len, max_blocks), tok, splits=[split])[split]
        out.update(ppl=round(perplexity(net, blocks), 4), tokens=int(blocks.numel()))
    if prompt:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        gen = net.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[0, ids.shape[1]:].tolist()
        if not hasattr(tok, "__len__"):  # tiny models' byte tokenizer: ids past its vocabulary have no text
            new = [i for i in new if i < tok.vocab_size]
        out["sample"] = tok.decode(new)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def run_eval_job(cfg: dict) -> dict:
    """qat-eval's job: the composed config (plain dicts) checked against `qat.jobs.config.EVAL_JOB`, then
    `run_eval`.

    Raises:
        ValueError: a misspelt key anywhere (naming it), and what `run_eval` raises.
    """
    check_keys(cfg, EVAL_JOB)
    errors = []
    for key, least, allow_none in (("max_blocks", 1, True), ("max_new_tokens", 0, False), ("seed", 0, False)):
        try:
            as_count(cfg.get(key, 0), key, least, allow_none)
        except ConfigError as err:
            errors.append(str(err))
    if cfg.get("split") not in SPLITS:
        errors.append(f"split={cfg.get('split')!r}; choose from {list(SPLITS)}")
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))
    model = cfg["model"]
    return run_eval(model["path"], data=cfg.get("data"), quant=cfg.get("quant"), max_blocks=cfg["max_blocks"],
                    split=cfg["split"], prompt=cfg["prompt"], max_new_tokens=cfg["max_new_tokens"],
                    tokenizer=cfg["tokenizer"], dtype=model.get("dtype", "float32"), tiny=model.get("tiny"))
