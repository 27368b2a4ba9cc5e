"""Model-family adapters, registered by Hugging Face `model_type`: what qat needs to know about an architecture.

An adapter owns, for one family: where its decoder blocks are, the norm -> linear mappings that AWQ,
SmoothQuant and weight folding scale through, its GGUF architecture and tensor names (gguf-py's
`TensorNameMap`, the table llama.cpp's converter uses), the tensor transforms llama.cpp's converter applies,
the GGUF metadata it writes, and the transformers classes a GGUF file of that architecture is read into.

Adding a family is one file, `qat/arch/<family>.py`, holding a subclass decorated with `@register_arch`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import gguf
import torch
from torch import nn

from qat.errors import ConfigError

ARCHS: dict[str, "ArchAdapter"] = {}


@dataclass(frozen=True)
class Mapping:
    """One producer -> consumers group inside a decoder block (module names relative to the block).

    `prev` is the op producing the consumers' shared input (a norm whose weight scales its output, or a
    Linear); scaling the consumers' input columns by s and dividing `prev`'s output by s keeps the function.
    `offset` is what the norm adds to its weight before scaling (Gemma's RMSNorm computes x * (1 + weight)).
    """

    prev: str
    linears: tuple[str, ...]
    offset: float = 0.0


def register_arch(cls: type["ArchAdapter"]) -> type["ArchAdapter"]:
    """Class decorator: register one instance of an adapter under each of its `model_types`.

    Raises:
        ValueError: a model_type registered twice.
    Example:
        >>> @register_arch
        ... class Qwen2Adapter(LlamaAdapter):
        ...     model_types = ("qwen2",)
    """
    adapter = cls()
    for model_type in cls.model_types:
        if model_type in ARCHS and type(ARCHS[model_type]) is not cls:
            raise ConfigError(f"architecture {model_type!r} is registered twice: {type(ARCHS[model_type]).__name__} "
                             f"and {cls.__name__}")
        ARCHS[model_type] = adapter
    return cls


def registered_archs() -> list[str]:
    """The registered Hugging Face model_types, sorted."""
    return sorted(ARCHS)


def model_type_of(obj: Any) -> str | None:
    """The model_type of a model (its `config`), a config, or a model_type string; None when it has none."""
    if isinstance(obj, str):
        return obj
    config = getattr(obj, "config", obj)
    return getattr(config, "model_type", None)


def find_arch(obj: Any) -> "ArchAdapter | None":
    """The adapter of a model / config / model_type, or None when its family is not registered."""
    return ARCHS.get(model_type_of(obj))


def get_arch(obj: Any, context: str = "") -> "ArchAdapter":
    """The adapter of a model, a config or a model_type.

    Args:
        obj: a Hugging Face model, its config, or a model_type string ("llama").
        context: words put after the name in the error (e.g. " of 'tiny'").
    Raises:
        ValueError: an unregistered family, listing the known ones and the file to add.
    Example:
        >>> get_arch("mistral").gguf_arch_name
        'llama'
    """
    model_type = model_type_of(obj)
    if model_type not in ARCHS:
        family = model_type if isinstance(model_type, str) and model_type.isidentifier() else "<family>"
        raise ConfigError(f"architecture {model_type!r}{context} is not supported; known: {registered_archs()}; "
                         f"add an adapter in qat/arch/{family}.py (see qat/arch/llama.py)")
    return ARCHS[model_type]


def gguf_reader_arch(gguf_arch: str) -> "ArchAdapter | None":
    """The adapter that reads GGUF files whose general.architecture is `gguf_arch` (None if none does)."""
    return next((a for a in ARCHS.values() if a.reads_gguf and a.gguf_arch_name == gguf_arch), None)


def gguf_reader_archs() -> list[str]:
    """The general.architecture values some adapter reads, sorted."""
    return sorted({a.gguf_arch_name for a in ARCHS.values() if a.reads_gguf})


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope parameters of the full-attention layers (transformers 5 `rope_parameters`, per layer type when
    the model has sliding layers), with `rope_theta` filled in from the config of older layouts."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


@functools.lru_cache(maxsize=32)
def tensor_name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    """gguf-py's Hugging Face -> GGUF tensor name table for `arch` with `n_blocks` blocks (built once)."""
    return gguf.TensorNameMap(arch, n_blocks)


class ArchAdapter:
    """What qat needs to know about one model family; subclass it in `qat/arch/<family>.py`.

    Class attributes:
        model_types: the Hugging Face model_types it serves.
        gguf_arch: the gguf-py architecture its GGUF files are written as.
        config_class / model_class: transformers class names a GGUF file is read into.
        blocks_path: the ModuleList of decoder blocks.
        mappings: norm / linear -> linears groups for scale folding (AWQ).
        smooth_mappings: the norm -> linears groups SmoothQuant smooths.
        tokenizer_pre: llama.cpp's tokenizer.ggml.pre for the family (None: detected from the tokenizer).
        reads_gguf: whether GGUF files of `gguf_arch` are imported through this adapter.
        rope_types: the rope_parameters.rope_type values its GGUF export writes (None: not checked).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    config_class: ClassVar[str]
    model_class: ClassVar[str]
    blocks_path: ClassVar[str] = "model.layers"
    mappings: ClassVar[tuple[Mapping, ...]] = ()
    smooth_mappings: ClassVar[tuple[Mapping, ...]] = ()
    tokenizer_pre: ClassVar[str | None] = None
    reads_gguf: ClassVar[bool] = True
    rope_types: ClassVar[tuple[str, ...] | None] = ("default", "linear")

    # -- rotations (qat.transform.rotations): names relative to a decoder block; a name is a Linear (its
    # weight and bias) or a weight parameter ([..., out, in], fused experts included) --------------------------
    residual_writes: ClassVar[tuple[str, ...]] = ("self_attn.o_proj", "mlp.down_proj")
    """The weights whose outputs are added to the residual stream (R1 rotates their rows)."""
    value_proj: ClassVar[str] = "self_attn.v_proj"
    """The weight holding the value rows (R2 rotates them per head; `value_rows` says where they start)."""
    out_proj: ClassVar[str] = "self_attn.o_proj"
    down_proj: ClassVar[str | None] = "mlp.down_proj"
    """The MLP's down projection, an nn.Linear (R4); None where the family has none (fused experts)."""
    final_norm: ClassVar[str] = "model.norm"
    residual_rotation_refusal: ClassVar[str | None] = None
    """Why R1 cannot be fused into this family's weights (None: it can)."""

    @property
    def residual_reads(self) -> tuple[Mapping, ...]:
        """norm -> the weights reading the normalised residual stream (R1 folds the norm into them and
        rotates their columns); by default the SmoothQuant groups."""
        return self.smooth_mappings

    def structure_refusal(self, config: Any) -> str | None:
        """Why this model's blocks do not all have the structure the mappings, rotations and GGUF layout assume
        (a Qwen3-MoE with dense MLP layers mixed in); None when they do."""
        return None

    def value_rows(self, config: Any) -> int:
        """The first row of the values in `value_proj` (0 unless q/k/v are fused)."""
        return 0

    @property
    def gguf_arch_name(self) -> str:
        """general.architecture of the GGUF files this family is written as ("llama")."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # -- model structure ----------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> tuple[str, list[nn.Module]]:
        """(name, modules) of the decoder blocks ("model.layers", [...])."""
        return self.blocks_path, list(model.get_submodule(self.blocks_path))

    # -- GGUF names ---------------------------------------------------------------------------------
    def gguf_name(self, hf_name: str, n_blocks: int) -> str:
        """GGUF tensor name of a Hugging Face parameter name, from gguf-py's TensorNameMap.

        Raises:
            ValueError: a parameter the GGUF layout has no place for.
        Example:
            >>> get_arch("llama").gguf_name("model.layers.3.mlp.down_proj.weight", 4)
            'blk.3.ffn_down.weight'
        """
        module, _, leaf = hf_name.rpartition(".")
        base = tensor_name_map(self.gguf_arch, n_blocks).get_name(module)
        if base is None:
            raise ConfigError(f"{hf_name!r} has no GGUF {self.gguf_arch_name} tensor name (gguf.TensorNameMap of "
                             f"{self.gguf_arch_name} with {n_blocks} blocks knows no module {module!r})")
        return f"{base}.{leaf}"

    def gguf_parts(self, hf_name: str, config: Any) -> list[tuple[str, int, int | None]]:
        """The GGUF tensors Hugging Face parameter `hf_name` is written as: [(GGUF name, first row, end row)],
        rows along its dim -2 (per expert for 3-D expert weights; end None: to the last). One whole tensor, except
        where a family fuses what GGUF splits (MoE `experts.gate_up_proj` -> ffn_gate_exps + ffn_up_exps).

        Raises:
            ValueError: as `gguf_name`.
        """
        return [(self.gguf_name(hf_name, config.num_hidden_layers), 0, None)]

    def n_experts(self, config: Any) -> int:
        """Routed experts per MoE layer, 0 for a dense family (llama.cpp's per-tensor type rules depend on it)."""
        return 0

    def hf_parts(self, hf_names: Iterable[str], config: Any) -> dict[str, tuple[str, int, int | None]]:
        """{GGUF name: (Hugging Face name, first row, end row)}: `gguf_parts` inverted, for the importer."""
        out = {}
        for name in hf_names:
            try:
                out.update({g: (name, start, stop) for g, start, stop in self.gguf_parts(name, config)})
            except ValueError:
                continue
        return out

    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(transformers 5 name piece, checkpoint name piece) pairs: where the family's safetensors checkpoints (what
    vLLM reads) name tensors otherwise than transformers 5's modules (Mixtral: `.block_sparse_moe.experts.{i}.w1`
    for `.mlp.experts` gate rows); applied by the folder exporters in order."""

    def checkpoint_key(self, key: str) -> str:
        """A transformers 5 tensor / module name as the family's checkpoints name it (`checkpoint_renames`)."""
        key += "."
        for ours, theirs in self.checkpoint_renames:
            key = key.replace(ours, theirs)
        return key[:-1]

    def hf_key(self, key: str) -> str:
        """Inverse of `checkpoint_key`."""
        key += "."
        for ours, theirs in reversed(self.checkpoint_renames):
            key = key.replace(theirs, ours)
        return key[:-1]

    def hf_names(self, hf_names: Iterable[str], n_blocks: int) -> dict[str, str]:
        """{GGUF name: Hugging Face name} for the parameters `hf_names` of a model (the importer's inverse)."""
        out = {}
        for name in hf_names:
            try:
                out[self.gguf_name(name, n_blocks)] = name
            except ValueError:
                continue
        return out

    # -- tensor transforms --------------------------------------------------------------------------
    def to_gguf(self, gguf_name: str, t: torch.Tensor, config: Any) -> torch.Tensor:
        """The rows of `t` (a weight, or its codes / scales, [O, ...]) as llama.cpp's converter lays them out."""
        return t

    def from_gguf(self, gguf_name: str, t: torch.Tensor, config: Any) -> torch.Tensor:
        """Inverse of `to_gguf`: a GGUF tensor's rows in Hugging Face order."""
        return t

    # -- GGUF metadata ------------------------------------------------------------------------------
    def check_config(self, config: Any) -> None:
        """Refuse a config whose model the GGUF file could not describe (before anything is written): by
        default a rope scaling other than `rope_types`.

        Raises:
            ValueError: naming the config field and what this family's GGUF export supports.
        """
        rope_type = rope_parameters(config).get("rope_type", "default")
        if self.rope_types is not None and rope_type not in self.rope_types:
            raise ConfigError(f"GGUF export of {config.model_type}: rope_parameters.rope_type={rope_type!r} is not "
                             f"written by qat's {self.gguf_arch_name} export; supported: {list(self.rope_types)}")

    def write_metadata(self, writer: gguf.GGUFWriter, config: Any) -> None:
        """Write the architecture's hyper-parameter keys ({arch}.context_length, ...) from `config`.

        The default is what llama.cpp's converter writes for a text model (`TextModel.set_gguf_parameters`):
        sizes, head counts, rope base (and the sliding layers' base), linear / yarn rope scaling, the RMSNorm
        epsilon and an explicit head_dim; then vocab_size, which qat's importer reads when no tokenizer is
        embedded.
        """
        rope = rope_parameters(config)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        if rope.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        swa_theta = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
        if swa_theta is not None:
            writer.add_rope_freq_base_swa(float(swa_theta))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if getattr(config, "head_dim", None):
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        writer.add_vocab_size(config.vocab_size)

    def extra_tensors(self, config: Any) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp's converter generates from the config (`generate_extra_tensors`: Llama 3's
        `rope_freqs`), written in F32 after the weights; none by default."""
        return {}

    def read_extra_tensors(self, config: Any, tensors: dict[str, torch.Tensor], where: str = "") -> None:
        """Fold a GGUF file's generated tensors (`extra_tensors`' names) back into `config`, in place.

        Raises:
            ValueError: a generated tensor this family does not write, naming it.
        """
        if tensors:
            raise ConfigError(f"{where}GGUF tensor(s) {sorted(tensors)} are not read by qat's "
                              f"{self.gguf_arch_name} importer")

    extra_tensor_names: ClassVar[tuple[str, ...]] = ()
    """The names `extra_tensors` may write (the importer hands those to `read_extra_tensors`)."""

    NEEDED: ClassVar[tuple[str, ...]] = ("attention.head_count", "embedding_length", "feed_forward_length",
                                         "block_count")

    def config_kwargs(self, field: Callable[[str, Any], Any], tensor_names: set[str]) -> dict[str, Any]:
        """The `config_class` arguments read from a GGUF file's metadata (`config_from_gguf`'s `field`)."""
        k = lambda key, default=None: field(f"{self.gguf_arch_name}.{key}", default)  # noqa: E731
        heads = int(k("attention.head_count"))
        hidden = int(k("embedding_length"))
        tokens = field("tokenizer.ggml.tokens", None)
        vocab = k("vocab_size") or (len(tokens) if tokens is not None else None)
        theta = float(k("rope.freq_base", 10000.0))
        scaled = {}
        if k("rope.scaling.type") == "linear" and float(k("rope.scaling.factor", 1.0)) != 1.0:
            # linear position interpolation as the file's keys say (llama.cpp reads the same two keys);
            # config_from_gguf drops rope_theta, which rope_parameters then holds
            scaled["rope_parameters"] = {"rope_type": "linear", "factor": float(k("rope.scaling.factor")),
                                         "rope_theta": theta}
        return dict(
            vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(k("feed_forward_length")),
            num_hidden_layers=int(k("block_count")), num_attention_heads=heads,
            num_key_value_heads=int(k("attention.head_count_kv", heads)),
            head_dim=int(k("attention.key_length", hidden // heads)),
            max_position_embeddings=int(k("context_length", 2048)),
            rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta, **scaled, tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=field("tokenizer.ggml.eos_token_id", None),
        )

    def config_from_gguf(self, field: Callable[[str, Any], Any], tensor_names: set[str], where: str = ""):
        """The transformers config of a GGUF file of this architecture.

        Args:
            field: field(key, default) reads a metadata key ("llama.block_count").
            tensor_names: the file's tensor names.
            where: "'<path>': " for error messages.
        Raises:
            ValueError: a metadata key the family needs is missing (naming it).
        """
        # transformers is imported on use: it takes seconds, and the core runs on plain PyTorch models without it
        import transformers

        arch = self.gguf_arch_name
        missing = [f"{arch}.{k}" for k in self.NEEDED if field(f"{arch}.{k}", None) is None]
        if missing:
            raise ConfigError(f"{where}GGUF metadata lacks {missing}, which a {arch} model needs")
        kw = self.config_kwargs(field, tensor_names)
        if "rope_parameters" in kw:
            kw.pop("rope_theta", None)
        return getattr(transformers, self.config_class)(**kw)

    def build_model(self, config: Any) -> nn.Module:
        """A randomly initialised causal LM of `model_class` for `config`."""
        # transformers is imported on use: it takes seconds, and the core runs on plain PyTorch models without it
        import transformers

        return getattr(transformers, self.model_class)(config)
