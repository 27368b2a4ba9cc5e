"""Run by test_parallel.py: 2-process QAT of the tiny Llama (gloo, CPU) under DDP or FSDP2, then a resume.

    python tests/train/parallel_script.py {ddp,fsdp} OUT_DIR

One launch, two fits: a straight run of STEPS steps that checkpoints every step, then a fresh module resumed
from the straight run's checkpoint at step RESUME_AT and trained to STEPS. Every rank saves what it holds
(rank{r}.pt): the full model state after each fit (FSDP: gathered from the shards), its quantizer flags, the
batches it saw, and (FSDP) the local and global shapes of the sharded learned scales.
Lightning's launcher re-runs this file for rank 1 (LOCAL_RANK set).
"""
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

import qat
from qat.lit import QATModule, TextDataModule
from qat.lit.parallel import FSDP2Strategy

ROOT = Path(__file__).resolve().parents[2]
STEPS, RESUME_AT = 4, 2
MODEL = {"path": "tiny", "tiny": {"num_layers": 1}}


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


def fit(kind: str, out: Path, ckpt_path: str | None = None):
    pl.seed_everything(0)
    module = QATModule(MODEL, recipe(), optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
                       range_init_batches=2, freeze_ranges_after=3)
    data = TextDataModule(str(ROOT / "configs/data/tiny_corpus.txt"), block_size=32, batch_size=2,
                          max_train_blocks=32, max_eval_blocks=2)
    strategy = "ddp" if kind == "ddp" else FSDP2Strategy()
    record = RecordBatches()
    steps = pl.callbacks.ModelCheckpoint(dirpath=out / "steps", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[record, steps],
                         default_root_dir=out)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer, record


def full_state(module: QATModule) -> dict:
    state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


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
