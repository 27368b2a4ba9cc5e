"""Rotations that rewrite a model (QuaRot / SpinQuant), one file per transform, registered by name:

    r1         residual stream: RMSNorm weights folded into the linears that read it, then embeddings, the
               readers' columns, the writers' rows and lm_head rotated by one [hidden, hidden] matrix (offline)
    r2         per head on values: v_proj rows and o_proj columns by one [head_dim, head_dim] matrix (offline)
    r3         queries and keys after RoPE, per head, online before the KV-cache quantizer
    r4         down_proj: input rotated online, weight columns offline
    kv_cache   llama.cpp's K / V cache rotation (`attn_rot_k` / `attn_rot_v`), online, exactly as llama.cpp

Offline rotations leave the float model's function unchanged; online ones cancel in float. A recipe asks for
them under `rotations:` (`RotationConfig`), and `qat.prepare` applies them before swapping in fake-quant modules.
"""
from qat.transform.rotations.base import ROTATIONS, RotationConfig, apply_rotations, register_rotation, rotation_errors
from qat.transform.rotations import kv_llama_cpp, r1, r2, r3, r4  # noqa: F401  (each registers itself)

__all__ = ["ROTATIONS", "RotationConfig", "apply_rotations", "register_rotation", "rotation_errors"]
