"""Sparse upcycling (Komatsuzaki et al. 2022): a dense Llama-family model into a Mixtral-style mixture of experts.

    python scripts/upcycle_moe.py --out /tmp/smollm2-moe                 # SmolLM2-135M -> 8 experts, top-2
    python scripts/upcycle_moe.py --model <llama folder> --experts 4 --noise 0 --out <folder>

Each decoder layer's MLP (gate / up / down) is copied into every expert, each copy multiplied element-wise by
(1 + noise * N(0, 1)) (a fixed seed; `--noise 0`: exact copies), and a router is added (N(0, router_std) weights,
top-k with the top-k weights renormalised, as Mixtral). Everything else (embeddings, attention, norms, head) is
copied as it is. The result is a `MixtralForCausalLM` folder (transformers' fused experts; llama.cpp runs its GGUF
as architecture `llama` with experts, qat's GGUF export writes it so): with `--noise 0` it computes the dense
model's function whatever the router picks (the top-k weights sum to 1 over identical experts).
There is no pretrained MoE on the package index; this gives one with real weights for the MoE table of
docs/moe.md (RTN / GPTQ / AWQ on the wiki corpus, GGUF in llama.cpp).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from qat.errors import ConfigError
from qat.models import load_model, load_tokenizer, resolve_path

DENSE_TYPES = ("llama", "mistral")
COPIED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters")


def moe_config(config, num_experts: int, top_k: int) -> MixtralConfig:
    """The MixtralConfig of the upcycled model: the dense config's sizes, `num_experts` experts of the dense MLP's
    size, `top_k` routed per token, no sliding window, no router jitter.

    Raises:
        ValueError: a dense model that is not Llama / Mistral-shaped (attention or MLP biases, another family),
            or top_k outside [1, num_experts].
    """
    if config.model_type not in DENSE_TYPES:
        raise ValueError(f"upcycle: model_type {config.model_type!r}; upcycling copies a Llama-shaped MLP, "
                         f"supported: {list(DENSE_TYPES)}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("upcycle: attention_bias / mlp_bias are set; Mixtral's layers have no biases")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"upcycle: top_k={top_k} must be in [1, num_experts={num_experts}]")
    fields = {k: getattr(config, k) for k in COPIED_FIELDS if getattr(config, k, None) is not None}
    return MixtralConfig(**fields, num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
                         router_jitter_noise=0.0, output_router_logits=False)


@torch.no_grad()
def upcycle(dense: nn.Module, num_experts: int = 8, top_k: int = 2, noise: float = 0.01, router_std: float = 0.02,
            seed: int = 0, dtype: torch.dtype = torch.float32) -> MixtralForCausalLM:
    """The dense causal LM `dense` (Llama / Mistral) upcycled into a MixtralForCausalLM (eval mode, in `dtype`;
    the copies are perturbed in float32, then cast).

    Example:
        >>> moe = upcycle(qat.testing.tiny_llama(), num_experts=4, noise=0.0)
    """
    config = moe_config(dense.config, num_experts, top_k)
    gen = torch.Generator().manual_seed(seed)
    state, dense_state = {}, dense.state_dict()
    for name, t in dense_state.items():
        t = t.float()
        if ".mlp." not in name:
            state[name] = t.to(dtype)
            continue
        layer = name.split(".mlp.")[0]
        if name.endswith("mlp.gate_proj.weight"):
            gate, up = t, dense_state[f"{layer}.mlp.up_proj.weight"].float()
            state[f"{layer}.mlp.experts.gate_up_proj"] = _copies(torch.cat([gate, up], 0), num_experts, noise, gen, dtype)
            state[f"{layer}.mlp.gate.weight"] = (torch.randn(num_experts, t.shape[1], generator=gen) * router_std).to(dtype)
        elif name.endswith("mlp.down_proj.weight"):
            state[f"{layer}.mlp.experts.down_proj"] = _copies(t, num_experts, noise, gen, dtype)
        elif not name.endswith("mlp.up_proj.weight"):
            raise ValueError(f"upcycle: unexpected MLP tensor {name!r} (a Llama MLP has gate / up / down_proj)")
    with torch.device("meta"):
        moe = MixtralForCausalLM(config)
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"upcycle: state does not match MixtralForCausalLM: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config)  # its buffers (inv_freq) are not in a state dict
    left = [n for n, t in moe.state_dict(keep_vars=True).items() if t.is_meta] + \
        [n for n, t in moe.named_buffers() if t.is_meta]
    if left:
        raise ValueError(f"upcycle: tensors without a value: {left}")
    return moe.eval()


def _copies(w: torch.Tensor, n: int, noise: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """[n, *w.shape] in `dtype`: n copies of w, each times (1 + noise * N(0, 1)) element-wise (in float32)."""
    out = torch.empty(n, *w.shape, dtype=dtype)
    for e in range(n):  # one float32 copy at a time
        out[e] = w * (1 + noise * torch.randn(w.shape, generator=gen)) if noise else w
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the dense model (alias or folder)")
    parser.add_argument("--out", required=True, help="the output folder (a Hugging Face MixtralForCausalLM)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.01, help="relative perturbation of each expert copy")
    parser.add_argument("--router-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="dtype written")
    args = parser.parse_args()
    try:
        dense = load_model(args.model)
    except (ConfigError, OSError) as err:
        sys.exit(f"upcycle_moe: --model {args.model!r}: {err}")
    moe = upcycle(dense, args.experts, args.top_k, args.noise, args.router_std, args.seed, getattr(torch, args.dtype))
    moe.save_pretrained(args.out)
    try:  # a folder without tokenizer files, or the byte stand-in of model=tiny: the model is still complete
        tokenizer = load_tokenizer(resolve_path(args.model))
        tokenizer.save_pretrained(args.out)
    except (ConfigError, AttributeError, OSError) as err:
        print(f"upcycle_moe: no tokenizer written to {args.out} ({err}); give one with data.tokenizer= when "
              "using the folder", file=sys.stderr)
    n = sum(p.numel() for p in moe.parameters())
    print(f"{args.out}: MixtralForCausalLM, {args.experts} experts (top-{args.top_k}), {n / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
