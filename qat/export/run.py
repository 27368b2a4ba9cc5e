"""What `qat-export` and `qat-eval` do, as plain functions (no Hydra here; the CLIs only compose configs).

    run_export("smollm2-135m", "out/m.gguf", format="gguf", gguf_type="Q4_K_M")
    run_eval("out/m.gguf", data="wiki", max_blocks=32)
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export import export as _export
from qat.export._io import load_safetensors, load_torch_checkpoint
from qat.export.load import load_any, load_any_tokenizer, quantize_on_load


def _load_checkpoint_into(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    path = Path(checkpoint)
    state = load_safetensors(path) if path.suffix == ".safetensors" else load_torch_checkpoint(path)
    keys = set(model.state_dict())
    if not keys & set(state):  # a Lightning checkpoint prefixes the wrapped model's keys
        for prefix in ("model.", "net.", "module."):
            if keys & {k.removeprefix(prefix) for k in state}:
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                break
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit the prepared model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (same base model and quant recipe as in training?)")


def prepare_source(model: str, quant: Any = None, checkpoint: str | None = None, dtype: str = "float32",
                   tiny: dict | None = None) -> nn.Module:
    """The model to export: `model` loaded by `load_any`; with `quant`, prepared with that recipe and,
    with `checkpoint` (a QAT / PTQ state dict), loaded from it; else quantized in flight (RTN).

    Raises:
        ValueError: a checkpoint without a recipe, or one that does not fit.
    """
    from qat.transform import QuantRecipe, convert, prepare

    loaded = load_any(model, dtype, **(tiny or {}))
    if quant is None:
        if checkpoint is not None:
            raise ValueError("export: checkpoint= needs quant=<the recipe it was trained with>")
        return loaded
    from qat.recipes import load_recipe

    recipe = load_recipe(quant) if isinstance(quant, (str, os.PathLike)) else QuantRecipe.from_dict(quant)
    if checkpoint is None:
        return quantize_on_load(loaded, recipe)
    prepared = prepare(loaded, recipe)
    _load_checkpoint_into(prepared, checkpoint)
    return convert(prepared)


def bits_per_weight(path: str | os.PathLike, model: nn.Module) -> tuple[int, float]:
    """(bytes on disk, bits per parameter of the model) of an export file or folder."""
    p = Path(path)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    from qat.export._io import float_weight_names, weight_of

    n = 0
    seen = set()
    for name in float_weight_names(model):
        w = weight_of(model, name)
        key = id(w)
        if key not in seen:
            seen.add(key)
            n += int(torch.Size(w.shape).numel())
    return size, 8 * size / max(n, 1)


def run_export(model: str, output: str, format: str = "native", gguf_type: str = "Q8_0", quant: Any = None,
               checkpoint: str | None = None, tokenizer: str | None = None, dtype: str = "float32",
               tiny: dict | None = None) -> dict:
    """Load, (quantize,) export; returns {"output", "format", "bytes", "bpw", "seconds"}.

    Example:
        >>> run_export("tiny", "out/tiny.gguf", format="gguf", gguf_type="Q8_0")
    """
    start = time.perf_counter()
    source = prepare_source(model, quant, checkpoint, dtype, tiny)
    tok = load_any_tokenizer(tokenizer or model)
    tok = tok if hasattr(tok, "save_pretrained") else None  # tiny models' byte stand-in is not saved
    out = _export(source, output, format, gguf_type, tokenizer=tok)
    size, bpw = bits_per_weight(out, source)
    return {"output": str(out), "format": format, "bytes": size, "bpw": round(bpw, 3),
            "seconds": round(time.perf_counter() - start, 2)}


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over LongTensor blocks [N, T].

    Example:
        >>> perplexity(model, torch.randint(0, 100, (2, 32)))
    """
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits = model(ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll, count = nll + float(loss), count + ids[:, 1:].numel()
    return math.exp(nll / count)


def _corpus(data: str | dict, seq_len: int | None, max_blocks: int | None):
    from dataclasses import fields

    from qat.data import CorpusConfig

    raw = {"path": data} if isinstance(data, (str, os.PathLike)) else dict(data)
    cfg = CorpusConfig(**{f.name: raw[f.name] for f in fields(CorpusConfig) if f.name in raw and f.name != "tokenizer"})
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
    from qat.data import build_blocks

    start = time.perf_counter()
    net = load_any(model, dtype, **(tiny or {}))
    if quant is not None:
        net = quantize_on_load(net, quant)
    tok = load_any_tokenizer(tokenizer or model)
    if tok is None:
        raise ValueError(f"qat-eval: no tokenizer found with {model!r}; pass tokenizer=<folder or 'tiny'>")
    out: dict[str, Any] = {"model": str(model)}
    if data:
        blocks = build_blocks(_corpus(data, seq_len, max_blocks), tok, splits=[split])[split]
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
