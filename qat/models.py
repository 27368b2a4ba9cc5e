"""Load a causal LM (and its tokenizer) from wherever it lives: cache alias, local folder, safetensors, hub, tiny.

    model = load_model("smollm2-135m")            # the checkpoint `qat-assets` imported into the cache
    model = load_model("/path/to/hf_folder")      # any local Hugging Face folder
    model = load_model("/path/model.safetensors") # a safetensors file with config.json beside it
    model = load_model("tiny")                    # a 2-layer random Llama (tests)
    model = load_model("HuggingFaceTB/SmolLM2-135M")   # a hub name, where the hub is reachable
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.assets import require
from qat.errors import ConfigError
from qat.io import load_safetensors
from qat.testing import cast_as_loaded, tiny_llama

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ALIASES = {"smollm2-135m": "model", "smollm2-135m-instruct": "model"}
TINY_NAMES = ("tiny", "tiny-llama")
# load_model("tiny"): tied embeddings, the byte tokenizer's special ids, and the caller's RNG left untouched
TINY_DEFAULTS = {"tie_word_embeddings": True, "special_token_ids": True, "fork_rng": True}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; ValueError listing the choices otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_path(name_or_path: str | os.PathLike) -> str:
    """Map an alias ("smollm2-135m") to its cache folder; otherwise return the name unchanged."""
    name = str(name_or_path)
    if name.lower() in ALIASES:
        return str(require(ALIASES[name.lower()]))
    return name


def _looks_like_path(name: str) -> bool:
    """Anything but a bare hub id `owner/name` (no leading ./ or /, no file suffix) is a path."""
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
    return not hub_id or name.endswith((".safetensors", ".json", ".bin", ".gguf"))


def check_model_source(name_or_path: str | os.PathLike) -> str:
    """Resolve and check a model location without loading it.

    Returns:
        "tiny", a local folder / file path, or a hub name (owner/name).
    Raises:
        FileNotFoundError: a path that does not exist, or a folder without config.json.
    """
    name = resolve_path(name_or_path)
    if name in TINY_NAMES:
        return name
    path = Path(name).expanduser()
    if path.exists():
        folder = path.parent if path.is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: no config.json in {folder} (need a Hugging Face checkpoint folder)")
        return str(path)
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"model path {name!r} does not exist; give a Hugging Face folder, a .safetensors file with config.json "
            f"beside it, one of {sorted(ALIASES)} (after `qat-assets`), {list(TINY_NAMES)}, or a hub name owner/name")
    return name


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32", **tiny_kwargs: Any) -> nn.Module:
    """Load a causal LM in eval mode.

    Args:
        name_or_path: see the module docstring.
        dtype: "float32", "bfloat16" or "float16".
        tiny_kwargs: passed to `tiny_llama` when name_or_path is "tiny".
    Returns:
        a transformers PreTrainedModel (AutoModelForCausalLM).
    Raises:
        FileNotFoundError: missing path / config.json. ValueError: bad dtype.
        ConfigError: a hub name that cannot be fetched (no network), with the hint to use `qat-assets`; a quantized
            export or a config with no causal-LM class.
    Example:
        >>> model = load_model("tiny", num_layers=1)
    """
    torch_dtype = resolve_dtype(dtype)
    source = check_model_source(name_or_path)
    if source in TINY_NAMES:
        return tiny_llama(**{**TINY_DEFAULTS, **tiny_kwargs}, dtype=torch_dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        config = AutoConfig.from_pretrained(str(path.parent))
        check_float_source(config, path)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        except ValueError as err:
            raise not_causal_lm(config, err) from None
        state = load_safetensors(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
        return cast_as_loaded(model, torch_dtype).eval()  # RoPE's inv_freq stays float32, as from_pretrained has it
    if path.exists():
        check_float_source(AutoConfig.from_pretrained(source), source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        raise unreachable(source, err) from None
    except ValueError as err:
        raise not_causal_lm(AutoConfig.from_pretrained(source), err) from None
    return model.eval()


def meta_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of a transformers config with its parameters on the meta device (buffers real), in eval mode:
    the modules and shapes without the memory (`qat.ptq.stream` fills it block by block)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise not_causal_lm(config, err) from None
    return model.eval()


def unreachable(source: str, err: Exception) -> ConfigError:
    """A model that cannot be read (a hub name without the network, a missing repository) as a user error."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"could not load model {source!r}: {first} (no hub access here? run `qat-assets` and use "
                       "model=smollm2_135m, or give a local folder)")


def check_float_source(config: Any, where: str | os.PathLike) -> None:
    """Refuse a quantized export (compressed-tensors, GPTQ) where a float model is needed: transformers would build
    its quantized modules and the job fail later (or crash) on weights that are not float.

    Raises:
        ConfigError: naming the folder, its quantization method and what reads it (qat-eval / `load_any`).
    """
    q = getattr(config, "quantization_config", None)
    method = (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) if q else None
    method = None if method is None else str(getattr(method, "value", method))
    folder = Path(where).expanduser()
    if (folder.parent if folder.is_file() else folder).joinpath("qat_quant.json").is_file():
        method = "qat native"
    if method in ("compressed-tensors", "gptq", "qat native"):
        raise ConfigError(f"model {str(where)!r} is a quantized export ({method}); PTQ, QAT "
                          "and comparisons start from the float model: give its float checkpoint (qat-eval "
                          f"model.path={where} evaluates the export itself)")


def not_causal_lm(config: Any, err: Exception) -> ConfigError | Exception:
    """transformers' "Unrecognized configuration class" for a config with no causal-LM class (a T5, a BERT) as a
    user error naming the model type; any other error as it is."""
    if "Unrecognized configuration class" not in str(err):
        return err
    kind = getattr(config, "model_type", "?")
    return ConfigError(f"model of type {kind!r} ({type(config).__name__}) is not a causal "
                       "language model transformers can load (AutoModelForCausalLM has no class for it); qat quantizes "
                       "decoder-only LMs (Llama, Qwen, Gemma, Phi, Mistral, their MoE variants)")


def model_skeleton(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                   **tiny_kwargs: Any) -> nn.Module | None:
    """What `load_model` would return, with nothing read but its config (parameters on the meta device): a recipe
    and a method can be checked against its modules and shapes before any weights load. The tiny model is built for
    real (it is small).

    Returns:
        the model, or None where transformers cannot build it from its config alone (the load then decides).
    Raises:
        FileNotFoundError / ConfigError: as `load_model`: a missing path, a bad dtype, a hub name that cannot be
            read (no network), a quantized export, a config with no causal-LM class.
    Example:
        >>> qat.prepare(model_skeleton("smollm2-135m"), qat.load_recipe("w4a16_g128"))  # ConfigError: 576 % 128
    """
    torch_dtype = resolve_dtype(dtype)
    source = check_model_source(name_or_path)
    if source in TINY_NAMES:
        return tiny_llama(**{**TINY_DEFAULTS, **tiny_kwargs}, dtype=torch_dtype)
    from transformers import AutoConfig

    path = Path(source).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path) if path.exists() else source)
    except OSError as err:  # a hub name without the network: loading the model would fail the same way
        raise unreachable(source, err) from None
    except ValueError:
        return None
    check_float_source(config, source)
    return meta_model(config, torch_dtype)


# The files a tokenizer is read from (tokenizers' JSON, sentencepiece / tiktoken models, BPE / WordPiece vocabularies).
# Without any of them transformers does not fail: for GPT-2 / Qwen2 / Llama configs it builds a tokenizer of 1-3
# special tokens, every text then encodes to almost nothing, and a job stops much later on "only N tokens".
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")
TOKENIZER_SUFFIXES = (".tiktoken", ".spm")


def check_tokenizer_source(name_or_path: str | os.PathLike) -> None:
    """Refuse a local model folder (or a .safetensors file's folder) that holds no tokenizer files, before any work.

    "tiny", hub names and paths that do not exist pass (their own checks report them).
    Raises:
        ConfigError: naming the folder, the files looked for, and how to give a tokenizer.
    Example:
        >>> check_tokenizer_source("out/weights_only")  # ConfigError: out/weights_only: no tokenizer could be ...
    """
    name = resolve_path(name_or_path)
    path = Path(name).expanduser()
    if name in TINY_NAMES or not path.exists():
        return
    folder = path.parent if path.is_file() else path
    if any((folder / f).is_file() for f in TOKENIZER_FILES) or any(
            f.suffix in TOKENIZER_SUFFIXES for f in folder.iterdir() if f.is_file()):
        return
    raise ConfigError(f"{folder}: no tokenizer could be loaded from this folder: it has no tokenizer files "
                      f"({', '.join(TOKENIZER_FILES[:5])}, ...), and from config.json alone transformers would build "
                      "an empty one; add the model's tokenizer files to the folder, or give a tokenizer with "
                      "data.tokenizer=<folder or hub name> (qat-eval / qat-export: tokenizer=<folder or hub name>)")


def tokenizer_location(data: Any, model_path: str | os.PathLike) -> str:
    """Where a job's tokenizer comes from: `data.tokenizer` when set, else the model location (`model.path`).

    Every pre-check and every load of a job goes through this, so a weights-only model folder with
    data.tokenizer=<folder> is checked and loaded from the same place.
    """
    tokenizer = data.get("tokenizer") if data is not None else None
    return str(tokenizer or model_path)


def check_token_ids(model: nn.Module, tensors: Any, tokenizer: str, model_path: str | os.PathLike) -> None:
    """Refuses token ids the model has no embedding row for: the tokenizer belongs to another model (its ids would
    index past the embedding table, an IndexError deep inside the forward).

    Raises:
        ConfigError: naming the tokenizer, the model, the largest id and the model's embedding rows.
    Example:
        >>> check_token_ids(model, batches + [blocks], "smollm2-135m", "tiny")
    """
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    top = max((int(t.max()) for t in tensors if isinstance(t, torch.Tensor) and t.numel()), default=-1)
    if rows is not None and top >= rows:
        raise ConfigError(f"tokenizer {tokenizer!r} gives token id {top}, but the model {str(model_path)!r} has "
                          f"{rows} embedding rows (vocab_size): the tokenizer belongs to another model; give the "
                          "model's own tokenizer (data.tokenizer=<folder or hub name>, tokenizer= for qat-eval)")


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer for a model location or a folder of tokenizer files; for "tiny", a byte-level stand-in
    (ids = bytes + 3, vocab 259+).

    Raises:
        ConfigError: a local folder without tokenizer files (`check_tokenizer_source`) or one transformers cannot read.
    """
    source = resolve_path(name_or_path)
    if source in TINY_NAMES:
        return ByteTokenizer()
    if not Path(source).expanduser().exists():  # a hub name, or a missing path refused with the model's message
        source = check_model_source(source)
    check_tokenizer_source(source)  # a folder of tokenizer files alone (no config.json) is a tokenizer location
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    try:
        return AutoTokenizer.from_pretrained(str(path.parent if path.is_file() else source))
    except (OSError, ValueError, ImportError) as err:
        if not path.exists():  # a hub name: the loader's own message (no network, not found) says more
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{source}: no tokenizer could be loaded from this folder ({first[:160]}); give one "
                          "with data.tokenizer=<folder> (qat-eval / qat-export: tokenizer=<folder>)") from None


EXPERTS_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")  # the routed-experts count of MoE configs


def has_fused_experts(name_or_path: str | os.PathLike) -> bool:
    """Whether the model at a local location is a mixture of experts (its config.json counts routed experts), read
    without loading weights; False for "tiny", hub names (not read here) and folders without a config.json."""
    path = Path(resolve_path(name_or_path)).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError):  # not a transformers config (a qat native export, ...): the loader says why
        return False
    return any(int(getattr(config, f, 0) or 0) > 0 for f in EXPERTS_FIELDS)


def context_length(model_or_config: Any) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), or None if unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None)


class ByteTokenizer:
    """UTF-8 bytes as token ids (offset by 3 for pad / bos / eos): a tokenizer for tiny test models."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def __call__(self, texts: list[str] | str, **_: Any) -> dict[str, list]:
        single = isinstance(texts, str)
        ids = [[b + 3 for b in t.encode("utf-8")] for t in ([texts] if single else texts)]
        return {"input_ids": ids[0] if single else ids}

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
