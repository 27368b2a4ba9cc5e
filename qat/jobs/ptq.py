"""The qat-ptq job: load, quantize with one PTQ method, measure, save; and what every PTQ / compare job shares:
checking a job config before anything loads (`check_job`), its inputs (`job_inputs`) and one measured row
(`run_one`: perplexity, bits per weight, size, wall time, peak memory; see `qat.jobs.measure`).

Every row records its evaluation protocol (corpus, split, number of blocks, block size); rows measured
under different protocols are not comparable and are refused when merged (`qat.jobs.results.check_protocols`).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig

from qat.data import SPLITS, build_blocks, calibration_batches, corpus_from_mapping
from qat.errors import ConfigError, UserError
from qat.export import FORMATS, check_recipe_format, export
from qat.export.load import load_any_tokenizer
from qat.io import atomic_path, atomic_write_bytes
from qat.jobs import placement
from qat.jobs.config import PTQ, as_bool, as_count, check_keys
from qat.jobs.export import gguf_type_error, stored_tokenizer
from qat.jobs.measure import FLOAT_BITS, PeakMemory, perplexity, weight_bits
from qat.jobs.placement import CALIBRATION_ROWS, device_errors, place, resolve_device
from qat.jobs.results import eval_protocol, to_json
from qat.models import (TINY_NAMES, check_model_source, check_token_ids, check_tokenizer_source, has_fused_experts,
                        load_model, resolve_dtype, tokenizer_location)
from qat.ptq import METHODS, method_config, method_of_config, ptq_model
from qat.ptq.distributed import backend_for, init_from_env, launch, process_rank, rank_device, usable_cpus
from qat.ptq.stream import cpu_state, stream_ptq
from qat.recipes import read_recipe, recipe_names
from qat.transform import as_recipe


def run_one(load: Callable[[], nn.Module], method: str, quant: Any, calibration: Sequence[Any],
            eval_blocks: torch.Tensor | None, method_args: dict | None = None, progress: bool = False,
            batch_size: int = 4, distributed: bool = False,
            device: torch.device | None = None) -> tuple[dict, nn.Module]:
    """Quantize a fresh model with one method and scheme, and measure it.

    Args:
        load: returns a fresh float model.
        method: "fp" (no quantization) or a PTQ method name ("rtn", "gptq", "awq", "smoothquant").
        quant: a recipe name, mapping or QuantRecipe (ignored for "fp").
        calibration: calibration batches (LongTensor [B, T]).
        eval_blocks: LongTensor [N, T] for perplexity.
        distributed: quantize over the initialised process group (`qat.ptq.apply`).
        device: where the model and the calibration batches go (None: where `load` puts them; eval blocks are
            moved batch by batch by `perplexity`).
    Returns:
        (row with COLUMNS and "device", the quantized model).
    Example:
        >>> row, model = run_one(lambda: load_model("tiny"), "gptq", "w4a16_g128", batches, test_blocks)
    """
    model = place(load(), device)
    if device is not None:
        calibration = [b.to(device) if isinstance(b, torch.Tensor) else b for b in calibration]
    start = time.perf_counter()
    with PeakMemory(device=device) as mem:
        if method != "fp":
            model = ptq_model(model, quant, {"name": method, **(method_args or {})}, calibration, progress=progress,
                              distributed=distributed)
    wall = time.perf_counter() - start
    bpw, size = weight_bits(model) if method != "fp" else (float(FLOAT_BITS), weight_bits(model)[1])
    ppl = perplexity(model, eval_blocks, batch_size) if eval_blocks is not None else math.nan
    name = "fp" if method == "fp" else quant_name(quant)
    row = {"method": method, "quant": name, "ppl": ppl, "bits_per_weight": bpw, "size_mb": size,
           "wall_s": wall, "peak_mem_mb": mem.peak_mb, "device": computed_on(model)}
    return row, model


def computed_on(model: nn.Module) -> str:
    """The device a row was computed on ("cpu", "cuda:0"), recorded with it (`qat.jobs.results.check_protocols`
    refuses to merge rows of CPU and GPU runs)."""
    return str(next(model.parameters(), torch.empty(0)).device)


def quant_name(quant: Any) -> str:
    """A row's scheme name: the recipe name given, the `name` of a recipe file given by its path (qat-sensitivity's
    quant/auto.yaml: `auto`, not the path), or the `name` of a recipe mapping / QuantRecipe."""
    if isinstance(quant, (str, os.PathLike)):
        path = Path(quant)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return str(read_recipe(path).get("name") or path.stem)
        return str(quant)
    return getattr(quant, "name", None) or dict(quant).get("name", "custom")


def quant_labels(quants: Sequence[Any], warn: Callable[[str], None] = print) -> list[str]:
    """The row labels of a comparison's `quants`: each entry's `quant_name`, except a recipe file whose name is
    also another entry's (two qat-sensitivity runs' recipes, both `auto`) or a shipped configs/quant recipe's:
    it is labelled by its file stem, or by its path as given when the stem is taken too, and `warn` names both."""
    names = [quant_name(q) for q in quants]
    files = [isinstance(q, (str, os.PathLike)) and Path(q).suffix in (".yaml", ".yml") and Path(q).is_file()
             for q in quants]
    shipped = set(recipe_names())
    labels = list(names)
    for i, quant in enumerate(quants):
        if not files[i]:
            continue
        others = [str(quants[j]) for j in range(len(quants)) if names[j] == names[i] and str(quants[j]) != str(quant)]
        if not others and names[i] not in shipped:
            continue
        stems = {Path(quants[j]).stem for j in range(len(quants)) if files[j] and str(quants[j]) != str(quant)}
        stem = Path(quant).stem
        labels[i] = stem if stem not in shipped | set(names) | stems else str(quant)
        clash = ([f"the shipped recipe configs/quant/{names[i]}.yaml"] if names[i] in shipped else []) + others
        warn(f"warning: quants entry {quant}: its recipe name {names[i]!r} is also the name of "
             f"{' and '.join(clash)}; its rows are labelled {labels[i]!r} instead")
    return labels


def model_context(model_cfg: dict) -> int | None:
    """max_position_embeddings of the configured model, read without loading weights (None: unknown)."""
    source = check_model_source(model_cfg["path"])
    if source in TINY_NAMES:
        return int(dict(model_cfg.get("tiny") or {}).get("max_position_embeddings", 256))
    path = Path(source).expanduser()
    if not path.exists():
        return None  # a hub name: checked when it loads
    config = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    return getattr(config, "max_position_embeddings", None)


def check_job(cfg: dict, calibrate: bool = True, method: Any = None) -> None:
    """What a qat-ptq / qat-compare job can check before loading anything: sizes, context, export format.

    Raises:
        ValueError: every problem found, each naming its key and the valid values.
        FileNotFoundError: the model path does not exist.
    Example:
        >>> check_job({**cfg, "calibration": {"samples": 0, "seq_len": 64}})  # ValueError: calibration.samples=0
    """
    errors, sizes = check_values(cfg), {"data.block_size": cfg["data"].get("block_size")}
    if calibrate:
        cal = cfg.get("calibration") or {}
        for key, least in (("samples", 1), ("seq_len", 2)):  # a block of one token has nothing to predict
            value = cal.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                errors.append(f"calibration.{key}={value!r}; must be "
                              f"{'a positive integer' if least == 1 else f'an integer >= {least}'}")
        if cal.get("split", "train") not in SPLITS:
            errors.append(f"calibration.split={cal.get('split')!r}; choose from {list(SPLITS)}")
        sizes["calibration.seq_len"] = cal.get("seq_len")
        try:
            errors += enough_tokens(method, cal)
        except (KeyError, ValueError) as err:
            errors.append(f"method: {err.args[0] if err.args else err}")
    context = model_context(cfg["model"])
    for key, value in sizes.items():
        if context is not None and isinstance(value, int) and value > context:
            errors.append(f"{key}={value} is larger than the context of model.path={cfg['model']['path']!r} "
                          f"(max_position_embeddings={context}); use {key}<={context}")
    try:  # a folder without tokenizer files: transformers would build an empty tokenizer (no text, no blocks)
        check_tokenizer_source(tokenizer_location(cfg["data"], cfg["model"]["path"]))
    except ConfigError as err:
        errors.append(str(err))
    if cfg.get("export") and cfg["export"] not in FORMATS:
        errors.append(f"export={cfg['export']!r}; choose from {list(FORMATS)} (or null)")
    elif cfg.get("export") and cfg.get("quant") is not None:  # the writer's own refusal, said before quantizing
        errors += format_errors(cfg["quant"], cfg["export"], has_fused_experts(cfg["model"]["path"]))
    if (gguf_type := cfg.get("gguf_type")) is not None:
        if cfg.get("export") != "gguf":
            errors.append(f"gguf_type={gguf_type!r} applies to export=gguf only (export={cfg.get('export')!r})")
        elif why := gguf_type_error(gguf_type):
            errors.append(why)
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))


def format_errors(quant: Any, format: str, experts: bool = False) -> list[str]:
    """The export writer's refusal of the recipe's schemes (`qat.export.check_recipe_format`; `experts`: the model
    has fused MoE experts), as one line; none for a recipe that does not load (quantizing reports that)."""
    try:
        recipe = as_recipe(quant)
    except (UserError, FileNotFoundError, TypeError):
        return []
    try:
        check_recipe_format(recipe, format, experts)
    except ConfigError as err:
        return [f"export={format}: {err} (choose another export format, or null: native holds every scheme)"]
    return []


def check_values(cfg: dict) -> list[str]:
    """The plain values of a qat-ptq / qat-compare config (seed, data sizes, eval settings, flags, device): one
    line per bad value, naming its key and what is valid."""
    errors = []
    checks = [(cfg.get("seed", 0), "seed", 0), (cfg["data"].get("block_size"), "data.block_size", 2),
              (cfg["data"].get("batch_size", 1), "data.batch_size", 1)]
    evl = cfg.get("eval") or {}
    if evl.get("split") is not None and evl["split"] not in SPLITS:
        errors.append(f"eval.split={evl['split']!r}; choose from {list(SPLITS)} (or null: no evaluation)")
    checks += [(evl.get("batch_size", 4), "eval.batch_size", 1)]
    for value, key, least in checks:
        try:
            as_count(value, key, least)
        except ConfigError as err:
            errors.append(str(err))
    for value, key in [(evl.get("max_blocks"), "eval.max_blocks"), (cfg["data"].get("max_eval_blocks"), "data.max_eval_blocks")]:
        try:
            as_count(value, key, 1, allow_none=True)
        except ConfigError as err:
            errors.append(str(err))
    errors += device_errors(cfg.get("device", placement.default_device()))
    for key in ("save", "progress", "fail_on_error"):
        if key in cfg:
            try:
                as_bool(cfg[key], key)
            except ConfigError as err:
                errors.append(str(err))
    return errors


def check_method(opts: dict, where: str = "method") -> None:
    """A PTQ method's options ({name, ...}) checked by its Config, before anything loads.

    Raises:
        ConfigError: an unknown method name (listing the registered ones) or a bad option, prefixed by `where`.
    """
    try:
        method_config(opts)
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err.args[0] if err.args else err}") from err


def enough_tokens(method: Any, cal: dict) -> list[str]:
    """A method with min_tokens (GPTQ, AWQ, SmoothQuant) refuses too few calibration tokens: say so now."""
    if not method or not all(isinstance(cal.get(k), int) for k in ("samples", "seq_len")):
        return []
    cfg = method_config(method)
    method_cls = method_of_config(cfg)
    name = method_cls.name
    have, need = cal["samples"] * cal["seq_len"], getattr(cfg, "min_tokens", 0)
    if not method_cls.needs_calibration or have >= need:
        return []
    return [f"calibration.samples x calibration.seq_len = {cal['samples']} x {cal['seq_len']} = {have} tokens; "
            f"method {name} needs min_tokens={need} (give more samples, or lower method.min_tokens)"]


def job_inputs(model_cfg: dict, data_cfg: dict, calibration: dict | None, eval_cfg: dict,
               batch_rows: int = CALIBRATION_ROWS):
    """(load_model callable, calibration batches, eval blocks) from the model / data config groups.

    Calibration sequences come from `calibration.split` of the corpus, grouped `batch_rows` to a batch
    (none when `calibration` is None: the float baseline needs none).
    Raises:
        ValueError: a corpus with fewer blocks than calibration.samples (keys: `qat.jobs.config.check_keys`).
    """
    tiny = dict(model_cfg.get("tiny") or {})
    batches = []
    if calibration is not None:
        batches = calibration_batches(data_cfg, int(calibration["samples"]), int(calibration["seq_len"]),
                                      calibration.get("split", "train"), batch_rows)
    blocks = None
    if eval_cfg.get("split"):
        corpus = corpus_from_mapping(data_cfg)
        corpus.max_eval_blocks = eval_cfg.get("max_blocks")
        blocks = build_blocks(corpus, splits=[eval_cfg["split"]])[eval_cfg["split"]]

    def load() -> nn.Module:
        model = load_model(model_cfg["path"], model_cfg.get("dtype", "float32"), **tiny)
        check_token_ids(model, [*batches, blocks], tokenizer_location(data_cfg, model_cfg["path"]), model_cfg["path"])
        return model
    return load, batches, blocks


def job_protocol(cfg: dict, blocks: torch.Tensor | None) -> dict | None:
    """The eval protocol of a job's rows (None: the job evaluates nothing)."""
    return None if blocks is None else eval_protocol(cfg["data"]["path"], cfg["eval"]["split"], blocks)


def run_ptq_job(cfg: dict, out_dir: str | os.PathLike) -> dict:
    """The qat-ptq run: load, quantize with one method, evaluate, save (state dict, result.json, export).

    Returns:
        the result row (COLUMNS) plus the eval protocol, the method options and where things were written.
    Example:
        >>> run_ptq_job(OmegaConf.to_container(cfg, resolve=True), "outputs/ptq/run")
    """
    method, processes = check_ptq_job(cfg)
    device = resolve_device(cfg.get("device"), max(processes, placement.torchrun_processes()))
    torch.manual_seed(cfg.get("seed", 0))
    if cfg.get("offload") is not None:
        return run_streamed(cfg, method, Path(out_dir), device)
    if init_from_env(backend_for(device)):  # under torchrun: this process is one rank of WORLD_SIZE
        return ptq_rank(cfg, str(out_dir), True)
    return launch(ptq_rank, processes, cfg, str(out_dir), processes > 1, backend=backend_for(device))


def check_ptq_job(cfg: dict) -> tuple[dict, int]:
    """Everything a qat-ptq job checks before it loads anything (keys, method, sizes, export, processes); each job
    of a `qat-ptq -m` sweep is checked with it before the first one runs.

    Returns:
        (the method's options, the number of processes the job runs).
    Raises:
        ConfigError (or FileNotFoundError for a model path): naming the key and the valid values.
    """
    check_keys(cfg, PTQ)
    method = dict(cfg["method"])
    if method.get("name") in ("fp", "qat"):  # configs/method serves qat-compare too: its rows that are not PTQ
        other = ("qat-eval model=<model> evaluates the float model" if method["name"] == "fp" else
                 "qat-train trains it (init=gptq|awq|rtn for a PTQ start)")
        raise ConfigError(f"method: name {method['name']} (configs/method/{method['name']}*.yaml) is a qat-compare "
                          f"row, not a PTQ method; qat-ptq runs "
                          f"{', '.join(sorted(METHODS))}; {other}, qat-compare methods=[...] puts it in one table")
    check_method(method)  # validate before loading anything
    check_job(cfg, method=method)
    return method, check_processes(cfg, method)


def check_processes(cfg: dict, method: dict) -> int:
    """distributed.processes and the device of each process, checked before any is spawned
    (`qat.jobs.placement.check_processes`, with this host's usable CPU cores)."""
    return placement.check_processes(cfg, method, usable_cpus())


def ptq_rank(cfg: dict, out_dir: str, distributed: bool) -> dict | None:
    """One process of a qat-ptq run: every rank quantizes (on its share of the calibration batches when
    `distributed`, on its own device: `qat.ptq.distributed.rank_device`); rank 0 then evaluates and writes, as a
    single-process run does, and returns the result."""
    torch.manual_seed(cfg.get("seed", 0))
    method = dict(cfg["method"])
    rank = process_rank()
    load, batches, blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"],
                                       cfg["eval"] if rank == 0 else {"split": None})
    row, model = run_one(load, method.pop("name"), cfg["quant"], batches, blocks, method,
                         progress=as_bool(cfg.get("progress", True), "progress"),
                         batch_size=cfg["eval"].get("batch_size", 4), distributed=distributed,
                         device=rank_device() if distributed else resolve_device(cfg.get("device")))
    if rank != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**row, "protocol": job_protocol(cfg, blocks), "model": cfg["model"]["path"], "options": model.qat_ptq}
    if as_bool(cfg.get("save", True), "save"):
        result["checkpoint"] = str(save_state(model, out / "model.pt"))
    atomic_write_bytes(out / "result.json", to_json(result))  # the measurement is kept if the export fails
    if cfg.get("export"):
        suffix = ".gguf" if cfg["export"] == "gguf" else ""  # gguf is one file, the others folders
        path = out / f"export_{cfg['export']}{suffix}"
        source = tokenizer_location(cfg["data"], cfg["model"]["path"])  # the tokenizer the job read its text with
        tok = stored_tokenizer(load_any_tokenizer(source), source, path, cfg["export"])
        gguf_type = cfg.get("gguf_type") or "Q8_0"
        result["export"] = str(export(model, path, cfg["export"], gguf_type=gguf_type, tokenizer=tok))
        atomic_write_bytes(out / "result.json", to_json(result))
    return result


def check_offload(cfg: dict) -> None:
    """offload=stream: a local safetensors folder, no evaluation or export (they need the whole model in memory).

    Raises:
        ConfigError: naming the keys to change.
    """
    if cfg.get("offload") != "stream":
        raise ConfigError(f"offload={cfg.get('offload')!r}; choose from ['stream'] (or null: the model in memory)")
    errors = [f"{key}={value!r}: offload=stream writes the quantized blocks as it goes and cannot {what} (it needs "
              f"the whole model in memory); set {key}=null" for key, value, what in
              [("eval.split", (cfg.get("eval") or {}).get("split"), "evaluate"), ("export", cfg.get("export"), "export")]
              if value is not None]
    source = check_model_source(cfg["model"]["path"])
    if source in TINY_NAMES or not Path(source).expanduser().is_dir():
        errors.append(f"model.path={cfg['model']['path']!r}: offload=stream reads a local Hugging Face folder with "
                      "safetensors weights")
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))


def run_streamed(cfg: dict, method: dict, out: Path, device: torch.device | None = None) -> dict:
    """qat-ptq offload=stream: quantize block by block from the shards into `out`/model_parts (see `qat.ptq.stream`)."""
    check_offload(cfg)
    _, batches, _ = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], {"split": None})
    source = str(Path(check_model_source(cfg["model"]["path"])).expanduser())
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with PeakMemory(device=device) as mem:
        options = stream_ptq(source, cfg["quant"], method, batches, out / "model_parts",
                             resolve_dtype(cfg["model"].get("dtype", "float32")),
                             as_bool(cfg.get("progress", True), "progress"), device)
    result = {"method": method["name"], "quant": quant_name(cfg["quant"]), "wall_s": time.perf_counter() - start,
              "peak_mem_mb": mem.peak_mb, "device": str(device or "cpu"), "model": cfg["model"]["path"],
              "options": options, "checkpoint": str(out / "model_parts")}
    atomic_write_bytes(out / "result.json", to_json(result))
    return result


def save_state(model: nn.Module, path: Path) -> Path:
    """The prepared model's state dict (pinned qparams, g_idx and quantizer flags included), atomically.

    A torch file (its tensors on the CPU, wherever the model ran) loadable with torch.load(weights_only=True);
    `qat-export checkpoint=... quant=...` and QAT training load it into a model prepared with the same recipe.
    """
    with atomic_path(path) as tmp:
        torch.save(cpu_state(model.state_dict()), tmp)
    return path


