"""lm-evaluation-harness on any model qat loads: float, fake-quant (prepared), converted, and every export read
back by `qat.export.load_any` (GGUF, compressed-tensors, native, GPTQ).

    result = evaluate_tasks(model, tokenizer, ["qat_wiki_lambada", "qat_wiki_ppl"], limit=50)
    result["tasks"]["qat_wiki_ppl"]["metrics"]["word_perplexity"]   # {"value", "stderr", "stderr_method", ...}

The model is handed to lm-eval's Hugging Face model class (`HFLM`) as it is: no weights are copied, and the
numbers are those of the module qat built (a FakeQuant / Quantized linear runs its own forward). lm-eval is an
optional dependency (`pip install 'qat[eval]'`), imported only inside this module's functions.

Standard errors (every metric carries one; lm-eval's own bootstrap is not used, so none depends on a process
pool or an unseeded draw):
    mean (accuracy...)            sample standard deviation / sqrt(n), lm-eval's closed form
    perplexity, word / byte       the delta method on the per-document log-likelihoods: for a ratio
    perplexity, bits per byte     r = sum(nll_i) / sum(w_i), se(r) = sd(nll_i - r w_i) / (mean(w) sqrt(n)); the
                                  perplexity exp(r) has se exp(r) se(r), bits per byte r / ln 2 has se(r) / ln 2
    any other aggregation         a seeded bootstrap (`bootstrap_iters` resamples of the documents)
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase

from qat.control import format_table, frozen_ranges
from qat.errors import ConfigError
from qat.jobs.offline_tasks import TASK_DIR, TASKS
from qat.models import ByteTokenizer, context_length

INSTALL_HINT = ("lm-evaluation-harness is not installed: pip install 'qat[eval]' (or pip install 'lm-eval>=0.4.5'); "
                "qat's other jobs do not need it")
QAT_TAGS = ("qat_offline", "qat_tiny")
DEFAULT_MAX_LENGTH = 2048


def require_lm_eval():
    """The `lm_eval` package, or an ImportError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - the model class evaluate_tasks uses
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return lm_eval


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer for lm-eval: a Hugging Face one as it is; qat's ByteTokenizer (tiny models) as a
    byte-level ByT5 tokenizer with the same ids (pad 0, bos 1, eos 2, byte b -> b + 3).

    Raises:
        TypeError: any other tokenizer, naming what is accepted.
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        tok = ByT5Tokenizer()  # ids: <pad> 0, </s> 1, <unk> 2, then bytes + 3
        tok.bos_token, tok.eos_token = "</s>", "<unk>"  # ByteTokenizer's bos 1 and eos 2
        return tok
    raise TypeError(f"tokenizer of type {type(tokenizer).__name__}: give a Hugging Face tokenizer (a folder, a "
                    "GGUF's vocabulary) or qat's ByteTokenizer ('tiny')")


def as_lm(model: nn.Module, tokenizer: Any, batch_size: int = 1, max_length: int | None = None):
    """lm-eval's `HFLM` around `model` (same module object, nothing copied), on the model's device.

    Args:
        model: a causal LM qat loaded or built (float, prepared, converted, `load_any`'s result).
        tokenizer: a Hugging Face tokenizer or qat's ByteTokenizer.
        batch_size: requests per forward (right-padded; causal attention keeps padding out of real positions).
        max_length: the longest window lm-eval feeds the model; default the model's max_position_embeddings.
    Raises:
        ImportError: lm-eval is not installed (the message says how to install it).
    Example:
        >>> lm = as_lm(qat.testing.tiny_llama(special_token_ids=True), ByteTokenizer())
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    tok = hf_tokenizer(tokenizer)
    extra = {"add_bos_token": False} if isinstance(tokenizer, ByteTokenizer) else {}  # ByT5 would append </s>
    length = int(max_length or context_length(model) or DEFAULT_MAX_LENGTH)
    # HFLM re-ties the input and output embeddings of the model it is given; qat's loaders already tied what
    # the checkpoint ties, and the model under evaluation must stay exactly the one given
    model.tie_weights = lambda *a, **k: None
    try:
        return HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=int(batch_size),
                    max_length=length, **extra)
    finally:
        del model.tie_weights


def task_manager(names: Sequence[str], include_path: Sequence[str] | None = None):
    """lm-eval's TaskManager with qat's tasks (configs/harness_tasks) registered; lm-eval's own task index
    (thousands of YAMLs, tens of seconds) is read only when a name is not qat's (qat_*)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    ours = set(TASKS) | set(QAT_TAGS)
    paths = [str(TASK_DIR), *map(str, include_path or [])]
    defaults = bool(include_path) or any(n not in ours and not n.startswith("qat_") for n in names)
    return TaskManager(include_path=paths, include_defaults=defaults)


def check_tasks(tasks: str | Sequence[str], include_path: Sequence[str] | None = None):
    """(task names, lm-eval TaskManager): every name known to lm-eval or qat, checked before any model loads.

    Raises:
        ConfigError: no task, or unknown names (listing qat's tasks and tags).
    """
    names = [str(t).strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if not names:
        raise ConfigError("tasks: give at least one task name, e.g. tasks=[qat_offline]")
    manager = task_manager(names, include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"tasks: unknown {unknown}; qat's offline tasks are {sorted(TASKS)} (tags "
                          f"{list(QAT_TAGS)}); lm-eval's own: `lm-eval ls tasks`")
    return names, manager


def check_harness_args(limit: Any = None, batch_size: Any = 1, max_length: Any = None, num_fewshot: Any = None,
                       bootstrap_iters: Any = 1000, **unknown: Any) -> None:
    """Refuse bad `harness.*` values by key before any work: limit a positive integer or a fraction in (0, 1),
    batch_size >= 1, max_length >= 1 (or null), num_fewshot >= 0 (or null), bootstrap_iters >= 0.

    Raises:
        ConfigError: listing each bad key and what is valid.
    """
    def integer(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    bad = [f"harness.{k}: unknown; valid: limit, batch_size, max_length, num_fewshot, bootstrap_iters"
           for k in unknown]
    if limit is not None and not (integer(limit, 1) or (isinstance(limit, float) and 0 < limit < 1)):
        bad.append(f"harness.limit={limit!r}: a positive integer (documents per task) or a fraction in (0, 1)")
    if not integer(batch_size, 1):
        bad.append(f"harness.batch_size={batch_size!r}: an integer >= 1")
    if max_length is not None and not integer(max_length, 1):
        bad.append(f"harness.max_length={max_length!r}: an integer >= 1 or null")
    if num_fewshot is not None and not integer(num_fewshot, 0):
        bad.append(f"harness.num_fewshot={num_fewshot!r}: an integer >= 0 or null")
    if not integer(bootstrap_iters, 0):
        bad.append(f"harness.bootstrap_iters={bootstrap_iters!r}: an integer >= 0")
    if bad:
        raise ConfigError("bad lm-eval settings:\n  - " + "\n  - ".join(bad))


def evaluate_tasks(model: Any, tokenizer: Any, tasks: str | Sequence[str], limit: int | float | None = None,
                   batch_size: int = 1, max_length: int | None = None, num_fewshot: int | None = None,
                   bootstrap_iters: int = 1000, seed: int = 0, include_path: Sequence[str] | None = None) -> dict:
    """Run lm-eval tasks on a model; every metric with its standard error (see the module docstring).

    Args:
        model: an nn.Module (wrapped by `as_lm`) or an lm-eval LM already built.
        tokenizer: see `as_lm` (unused when `model` is an LM).
        tasks: task / tag names (qat's offline ones: qat_offline, qat_wiki_ppl...; any lm-eval task whose
            data can be fetched), a list or a comma-separated string.
        limit: documents per task (an int), or a fraction of each task's documents (a float < 1).
        num_fewshot: few-shot examples per prompt (default: each task's own).
        bootstrap_iters / seed: the seeded bootstrap for aggregations with no closed-form error.
        include_path: more folders of task YAMLs.
    Returns:
        {"tasks": {task: {"n": docs, "metrics": {metric: {"value", "stderr", "stderr_method",
        "higher_is_better"}}}}, "limit", "num_fewshot", "lm_eval", "seconds"}.
    Raises:
        ImportError: lm-eval missing. ConfigError: an unknown task name or a bad setting (before anything is evaluated).
    Example:
        >>> evaluate_tasks(model, tok, "qat_tiny_lambada,qat_tiny_ppl", limit=4)["tasks"]["qat_tiny_ppl"]
    """
    lm_eval = require_lm_eval()
    from lm_eval import evaluator
    from lm_eval.api.model import LM

    start = time.perf_counter()
    check_harness_args(limit=limit, batch_size=batch_size, max_length=max_length, num_fewshot=num_fewshot,
                       bootstrap_iters=bootstrap_iters)
    names, manager = check_tasks(tasks, include_path)
    was_training = getattr(model, "training", False)
    lm = model if isinstance(model, LM) else as_lm(model, tokenizer, batch_size, max_length)
    task_dict = manager.load(names)  # {"tasks": {name: Task}, "groups": ...}, tags and groups opened
    leaves = dict(task_dict["tasks"])
    if num_fewshot is not None:
        for task in leaves.values():
            task.set_config(key="num_fewshot", value=int(num_fewshot))
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        with frozen_ranges(model) if isinstance(model, nn.Module) else nullcontext():  # evaluation never calibrates
            out = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=True)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    results = {name: _task_metrics(task, out["results"].get(name, {}), out["samples"].get(name, []),
                                   bootstrap_iters, seed) for name, task in leaves.items()}
    return {"tasks": results, "limit": limit, "num_fewshot": num_fewshot,
            "lm_eval": getattr(lm_eval, "__version__", "?"), "seconds": round(time.perf_counter() - start, 2)}


def _task_metrics(task, results: dict, samples: list[dict], iters: int, seed: int) -> dict:
    metrics, n = {}, 0
    higher = task.higher_is_better()
    for metric, agg in task.aggregation().items():
        for key, value in results.items():
            name, _, filt = key.partition(",")
            if name != metric or not isinstance(value, (int, float)):
                continue
            items = [s[metric] for s in samples if s.get("filter") == filt and metric in s]
            n = max(n, len(items))
            label = metric if filt == "none" else f"{metric},{filt}"
            se, how = stderr_of(agg, items, iters, seed)
            metrics[label] = {"value": float(value), "stderr": se, "stderr_method": how,
                              "higher_is_better": bool(higher.get(metric, True))}
    return {"n": n, "metrics": metrics}


def stderr_of(agg: Callable, items: Sequence, iters: int = 1000, seed: int = 0) -> tuple[float, str]:
    """(standard error of agg(items), how it was computed): see the module docstring for the methods.

    Example:
        >>> stderr_of(lm_eval.api.metrics.mean, [0, 1, 1, 0])
        (0.2886..., 'mean')
    """
    from lm_eval.api import metrics as m

    n = len(items)
    if n < 2:
        return math.nan, "n<2"
    if agg is m.mean:
        return m.mean_stderr([float(x) for x in items]), "mean"
    if agg is m.perplexity:  # exp(-mean(ll))
        ll = torch.tensor([float(x) for x in items], dtype=torch.float64)
        return float(torch.exp(-ll.mean()) * ll.std() / math.sqrt(n)), "delta"
    if agg in (m.weighted_perplexity, m.bits_per_byte):
        ll = torch.tensor([float(a) for a, _ in items], dtype=torch.float64)
        w = torch.tensor([float(b) for _, b in items], dtype=torch.float64)
        r = -ll.sum() / w.sum()
        se_r = float((-ll - r * w).std() / (w.mean() * math.sqrt(n)))
        if agg is m.bits_per_byte:
            return se_r / math.log(2), "delta"
        return float(torch.exp(r)) * se_r, "delta"
    rng = random.Random(seed)
    draws = [agg(rng.choices(list(items), k=n)) for _ in range(max(iters, 2))]
    return float(torch.tensor(draws, dtype=torch.float64).std()), f"bootstrap({len(draws)})"


def flat_metrics(result: dict) -> dict[str, dict]:
    """{"<task>/<metric>": {"value", "stderr", "n", "higher_is_better"}}: the columns qat-compare shows."""
    out = {}
    for task, body in result.get("tasks", {}).items():
        for metric, v in body["metrics"].items():
            out[f"{task}/{metric}"] = {"value": v["value"], "stderr": v["stderr"], "n": body["n"],
                                       "higher_is_better": v["higher_is_better"]}
    return out


def tasks_table(result: dict) -> str:
    """A markdown table of `evaluate_tasks`' result: task, metric, value ± standard error, documents."""
    rows = [{"task": t, "metric": m, "value": f"{v['value']:.5g}", "± stderr": f"{v['stderr']:.3g}",
             "method": v["stderr_method"], "n": str(body["n"])}
            for t, body in result.get("tasks", {}).items() for m, v in body["metrics"].items()]
    return format_table(rows, ["task", "metric", "value", "± stderr", "method", "n"])
