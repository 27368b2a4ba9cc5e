"""Run by test_parallel.py: 2-process QAT of the tiny Llama (gloo, CPU) under DDP or FSDP2, then a resume.

    python tests/train/parallel_script.py {ddp,fsdp} OUT_DIR
    QAT_PARALLEL_ACCELERATOR=cuda QAT_PARALLEL_DEVICES=8 python tests/train/parallel_script.py fsdp OUT_DIR  # GPUs

(scripts/gpu_check.py runs it on the CUDA devices present: nccl, deterministic kernels, math attention.)

One launch, two fits: a straight run of STEPS steps that checkpoints every step, then a fresh module resumed
from the straight run's checkpoint at step RESUME_AT and trained to STEPS. Every rank saves what it holds
(rank{r}.pt): the full model state after each fit (FSDP: gathered from the shards), its quantizer flags, the
batches it saw, and (FSDP) the local and global shapes of the sharded learned scales.
Lightning's launcher re-runs this file for rank 1 (LOCAL_RANK set).
"""
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

import qat
from qat.export import load_any
from qat.jobs.export import run_export
from qat.lit import QATModule, TextDataModule
from qat.lit.parallel import FSDP2Strategy

ROOT = Path(__file__).resolve().parents[2]
STEPS, RESUME_AT = 4, 2
MODEL = {"path": "tiny", "tiny": {"num_layers": 1}}
ACCELERATOR = os.environ.get("QAT_PARALLEL_ACCELERATOR", "cpu")
DEVICES = int(os.environ.get("QAT_PARALLEL_DEVICES", "2"))
if ACCELERATOR == "cuda":  # bit-identical resume needs deterministic kernels (cuBLAS reads this before its init)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def recipe() -> dict:
    """LSQ weights (per-group scales: sharded under FSDP) + static int8 inputs with a learned PACT clip (0-d:
    replicated), initialised from each rank's own data."""
    quant = qat.load_recipe("w4a16_g128_lsq").to_dict()
    quant["weight"]["group_size"] = 64
    quant["input"] = {"bits": 8, "symmetric": True, "granularity": "per_tensor", "learn": "pact"}
    return quant


class RecordBatches(pl.Callback):
    """Keeps a fingerprint of every training batch (the test checks the ranks saw different data)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(int(batch["input_ids"][:, :4].sum()))


def deterministic_cuda() -> None:
    """Deterministic CUDA kernels (the embedding's backward, cuBLAS) and the math attention (flash and
    memory-efficient attention backward accumulate in a run-dependent order)."""
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns; the
    # bit-identical resume check then says whether it mattered
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


def fit(kind: str, out: Path, ckpt_path: str | None = None):
    pl.seed_everything(0)
    if ACCELERATOR == "cuda":
        deterministic_cuda()
    module = QATModule(MODEL, recipe(), optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
                       range_init_batches=2, freeze_ranges_after=3)
    data = TextDataModule(str(ROOT / "configs/data/tiny_corpus.txt"), block_size=32, batch_size=2,
                          max_train_blocks=32, max_eval_blocks=2)
    strategy = "ddp" if kind == "ddp" else FSDP2Strategy()
    record = RecordBatches()
    steps = pl.callbacks.ModelCheckpoint(dirpath=out / "steps", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(accelerator=ACCELERATOR, devices=DEVICES, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[record, steps],
                         default_root_dir=out)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer, record


def full_state(module: QATModule) -> dict:
    state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def differing(a: dict, b: dict) -> list[str]:
    """Keys of two state dicts whose values are not equal (tensors: torch.equal), and keys only one has."""
    keys = sorted(set(a) ^ set(b))
    for key in set(a) & set(b):
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        keys += [] if same else [key]
    return keys


def export_logits(checkpoint: Path, out: Path) -> torch.Tensor:
    """Logits (CPU) of `qat-export format=native` of `checkpoint` (a sharded folder or one file), reloaded."""
    result = run_export("tiny", str(out), format="native", quant=recipe(), checkpoint=str(checkpoint),
                        tiny=MODEL["tiny"])
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return load_any(result["output"])(ids).logits


def main(kind: str, out: Path) -> None:
    straight, trainer, record = fit(kind, out / "straight")
    saved = {"straight": full_state(straight), "_seen": record.seen,
             "_flags": [q.get_extra_state() for _, q in qat.quantizers(straight.model)],
             "_sharded": {n: (tuple(p.to_local().shape), tuple(p.shape)) for n, p in straight.model.named_parameters()
                          if isinstance(p, DTensor) and n.endswith("quantizer.scale")}}
    ckpt = out / "straight" / "steps" / f"epoch=0-step={RESUME_AT}.ckpt"
    resumed, trainer, _ = fit(kind, out / "resumed", ckpt_path=str(ckpt))
    saved["resumed"] = full_state(resumed)
    saved["_resumed_step"] = trainer.global_step
    torch.save(saved, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
