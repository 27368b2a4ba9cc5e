"""Text corpora -> documents -> deterministic train/validation/test split by document -> packed token blocks.

No Lightning here: `qat.lit.data.TextDataModule` wraps these functions, and PTQ can call them directly.

Sources (`load_documents`):
    "wiki" / "shakespeare"          the corpora `qat-assets` put in the cache
    a .txt file or folder of them   documents separated by blank lines (sample_by="paragraph"), or one per
                                    file (sample_by="document"), or one per line (sample_by="line")
    .json / .jsonl / .parquet       one record per document, text in `text_field` (a top-level JSON object
                                    of records, like the wiki file, works too)
    a `save_to_disk` folder         Hugging Face datasets folder
    owner/name                      a hub dataset, where the hub is reachable
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from qat.assets import require
from qat.errors import BadFileError, ConfigError
from qat.models import load_tokenizer
from qat.transform.recipe import to_plain

SPLITS = ("train", "validation", "test")
SAMPLE_BY = ("paragraph", "document", "line")
TEXT_SUFFIXES = (".txt", ".text", ".md")
ALIASES = {"wiki": ("wiki", "extract", "paragraph"), "shakespeare": ("shakespeare", "text", "document")}


def _record_dataset(path: Path, text_field: str):
    """A .json whose top level is an object (or list) of records -> datasets.Dataset."""
    import datasets

    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadFileError(path, f"not valid JSON ({err})") from None
    records = list(data.values()) if isinstance(data, dict) else data
    if not records or not isinstance(records[0], dict):
        raise BadFileError(path, f"expected a JSON list/object of records with a {text_field!r} field")
    keys = sorted({k for r in records[:100] for k in r})
    if text_field not in keys:
        raise ConfigError(f"data.text_field={text_field!r} is not a field of {path}; fields: {keys}")
    return datasets.Dataset.from_list([{text_field: str(r.get(text_field) or "")} for r in records])


def _text_files(path: Path) -> list[str]:
    files = sorted(str(p) for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [str(path)]
    if not files:
        raise FileNotFoundError(f"data.path={str(path)!r}: folder has no {'/'.join(TEXT_SUFFIXES)} files")
    if all(os.path.getsize(f) == 0 for f in files):
        raise BadFileError(path, "data.path is empty: no text to train or evaluate on")
    return files


def load_documents(source: str | os.PathLike, text_field: str | None = None, sample_by: str | None = None) -> list[str]:
    """Read a corpus into a list of documents (non-empty strings), in a stable order.

    Args:
        source: see the module docstring.
        text_field: the record field holding the text (json/jsonl/parquet/datasets); default "text".
        sample_by: how text files split into documents: "paragraph" (default), "document", "line".
    Returns:
        list of document strings.
    Raises:
        FileNotFoundError: a path that does not exist. ValueError: a bad sample_by or text_field.
    Example:
        >>> docs = load_documents("configs/data/tiny_corpus.txt")
    """
    import datasets

    name = str(source)
    if name in ALIASES:
        kind, default_field, default_sample = ALIASES[name]
        name, text_field, sample_by = str(require(kind)), text_field or default_field, sample_by or default_sample
    text_field, sample_by = text_field or "text", sample_by or "paragraph"
    if sample_by not in SAMPLE_BY:
        raise ConfigError(f"data.sample_by={sample_by!r}; choose from {list(SAMPLE_BY)}")
    path = Path(name).expanduser()
    datasets.disable_progress_bars()
    if not path.exists() and (path.suffix or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)):
        raise FileNotFoundError(f"data.path={name!r} does not exist; give a .txt/.json/.jsonl/.parquet file, a "
                                f"folder, a hub name, or one of {sorted(ALIASES)} (after `qat-assets`)")
    try:
        ds, text_field = _load_dataset(name, path, text_field, sample_by)
    except datasets.exceptions.DatasetGenerationError as err:  # a local file the builder cannot parse
        cause = err.__cause__ or err
        raise BadFileError(path, f"cannot read it as a {path.suffix or 'text'} corpus ({type(cause).__name__}: "
                                 f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
    if text_field not in ds.column_names:
        raise ConfigError(f"data.text_field={text_field!r} is not a column of {name}; columns: {ds.column_names}")
    return [t for t in ds[text_field] if t and t.strip()]


def _load_dataset(name: str, path: Path, text_field: str, sample_by: str):
    """The corpus as a datasets.Dataset, by file type, and the field its text is in."""
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    elif path.is_dir() or path.suffix in TEXT_SUFFIXES:
        ds = datasets.load_dataset("text", data_files=_text_files(path), sample_by=sample_by, split="train")
        text_field = "text"
    elif path.suffix == ".json" and path.is_file() and _starts_with(path, "{["):
        ds = _record_dataset(path, text_field)
    elif path.suffix in (".json", ".jsonl") and path.is_file():
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    elif path.suffix == ".parquet" and path.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.exists():
        raise ConfigError(f"data.path={name!r}: unsupported file type; use .txt/.json/.jsonl/.parquet or a folder")
    else:
        ds = datasets.load_dataset(name, split="train")
    return ds, text_field


def _starts_with(path: Path, chars: str) -> bool:
    with open(path) as f:
        head = f.read(4096).lstrip()
    return bool(head) and head[0] in chars and not (head[0] == "{" and "}\n{" in head)


def split_documents(docs: Sequence[str], val_fraction: float = 0.05, test_fraction: float = 0.05,
                    seed: int = 0) -> dict[str, list[str]]:
    """Deterministic split by document: a seeded permutation, then test / validation / train slices.

    Raises:
        ValueError: fractions outside [0, 1) or summing to >= 1, or a split that would be empty.
    Example:
        >>> split_documents([str(i) for i in range(20)], 0.1, 0.1)["test"]
        ['...', '...']
    """
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"data.{key}={value}; must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction}; must be < 1")
    n = len(docs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(n * test_fraction)) if test_fraction else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction else 0
    if n - n_test - n_val < 1:
        raise ConfigError(f"only {n} documents: too few to split into train/validation/test")
    pick = lambda idx: [docs[i] for i in sorted(idx)]  # noqa: E731  (keep corpus order inside a split)
    return {"test": pick(order[:n_test]), "validation": pick(order[n_test:n_test + n_val]),
            "train": pick(order[n_test + n_val:])}


def tokenize_and_pack(docs: Sequence[str], tokenizer: Any, block_size: int, max_blocks: int | None = None,
                      separator_id: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with `separator_id` (default: the tokenizer's eos), cut into blocks.

    Returns:
        LongTensor [n_blocks, block_size] (the tail shorter than a block is dropped).
    Raises:
        ValueError: block_size < 2, or too little text for a single block.
    Example:
        >>> tokenize_and_pack(["hello world"] * 10, ByteTokenizer(), 16).shape
        torch.Size([7, 16])
    """
    if block_size < 2:
        raise ConfigError(f"data.block_size={block_size}; must be >= 2")
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    ids: list[int] = []
    needed = None if max_blocks is None else max_blocks * block_size
    step = 256
    for start in range(0, len(docs), step):
        for seq in tokenizer(list(docs[start:start + step]))["input_ids"]:
            ids.extend(seq)
            if sep is not None:
                ids.append(sep)
        if needed is not None and len(ids) >= needed:
            break
    n_blocks = len(ids) // block_size if max_blocks is None else min(max_blocks, len(ids) // block_size)
    if n_blocks == 0:
        raise ConfigError(f"only {len(ids)} tokens: not enough for one block of data.block_size={block_size}")
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


# what a `data` config node holds besides CorpusConfig's fields: the loader's settings (qat.lit.TextDataModule)
LOADER_KEYS = ("batch_size", "eval_batch_size", "shuffle", "num_workers")


@dataclass
class CorpusConfig:
    """Everything that defines the packed blocks (the DataModule and `calibration_batches` share it)."""

    path: str
    tokenizer: str = "tiny"
    block_size: int = 128
    text_field: str | None = None
    sample_by: str | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = None


def build_blocks(cfg: CorpusConfig, tokenizer: Any = None, splits: Sequence[str] = SPLITS) -> dict[str, torch.Tensor]:
    """Load, split and pack a corpus: {"train": LongTensor [N, block], "validation": ..., "test": ...}.

    Raises:
        ValueError: an unknown split name, plus everything the steps above raise.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ConfigError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    parts = split_documents(load_documents(cfg.path, cfg.text_field, cfg.sample_by),
                            cfg.val_fraction, cfg.test_fraction, cfg.seed)
    out = {}
    for split in splits:
        if not parts[split]:
            continue
        limit = cfg.max_train_blocks if split == "train" else cfg.max_eval_blocks
        out[split] = tokenize_and_pack(parts[split], tokenizer, cfg.block_size, limit)
    return out


def calibration_batches(datamodule_or_cfg: Any, n_samples: int, seq_len: int, split: str = "train",
                        batch_rows: int = 1) -> list[torch.Tensor]:
    """`n_samples` token blocks of length `seq_len` for PTQ calibration, as LongTensors [batch_rows, seq_len]
    (the last one shorter when batch_rows does not divide n_samples). Batches of several rows make the
    block-by-block PTQ passes several times faster than one sequence at a time on CPU.

    Args:
        datamodule_or_cfg: a `qat.lit.data.TextDataModule`, a `CorpusConfig`, or a mapping / DictConfig of
            CorpusConfig fields (e.g. the `data` node of the training config).
        n_samples: how many blocks (the first ones of the split: deterministic).
        seq_len: tokens per block (overrides the config's block_size).
        batch_rows: sequences per batch.
    Raises:
        ValueError: the corpus yields fewer than n_samples blocks.
    Example:
        >>> batches = calibration_batches({"path": "wiki", "tokenizer": "smollm2-135m"}, 128, 512)
        >>> model(batches[0])
    """
    cfg = _corpus_config(datamodule_or_cfg)
    cfg.block_size, cfg.max_train_blocks, cfg.max_eval_blocks = seq_len, n_samples, n_samples
    tokenizer = getattr(datamodule_or_cfg, "tokenizer", None)
    blocks = build_blocks(cfg, tokenizer, splits=[split])[split]
    if len(blocks) < n_samples:
        raise ConfigError(f"{cfg.path}: only {len(blocks)} blocks of {seq_len} tokens in {split!r}, asked for {n_samples}")
    blocks = blocks[:n_samples]
    return [blocks[i:i + batch_rows] for i in range(0, len(blocks), max(1, batch_rows))]


def _corpus_config(obj: Any) -> CorpusConfig:
    if isinstance(obj, CorpusConfig):
        return CorpusConfig(**vars(obj))
    if hasattr(obj, "corpus") and isinstance(obj.corpus, CorpusConfig):
        return CorpusConfig(**vars(obj.corpus))
    obj = to_plain(obj)
    if not isinstance(obj, dict):
        raise TypeError(f"expected a TextDataModule, CorpusConfig or mapping, got {type(obj).__name__}")
    return corpus_from_mapping(obj)


def corpus_from_mapping(data: Mapping[str, Any]) -> CorpusConfig:
    """The CorpusConfig of a `data` config node: its corpus fields; the loader's keys (LOADER_KEYS) and Hydra's
    `_target_` are skipped, and any other key is an error, not silently dropped.

    Raises:
        ValueError: an unknown key (naming it and the valid ones), or no `path`.
    Example:
        >>> corpus_from_mapping({"path": "wiki", "block_size": 128, "batch_size": 8}).block_size
        128
    """
    fields = set(CorpusConfig.__dataclass_fields__)
    valid = fields | set(LOADER_KEYS) | {"_target_"}
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise ConfigError(f"data: unknown key(s) {unknown}; valid keys are {sorted(valid)}")
    if "path" not in data:
        raise ConfigError(f"data config needs 'path'; fields: {sorted(fields)}")
    return CorpusConfig(**{k: v for k, v in data.items() if k in fields})
