"""`QATModule`: quantization-aware training of any causal LM as a LightningModule.

Everything that defines the model is a plain-dict hyperparameter (model location, quant recipe, optimizer),
so `QATModule.load_from_checkpoint(path)` rebuilds the float model, prepares it with the same recipe, and only
then loads the state dict, which carries the quantizer state (held ranges, learned scales, on/off flags).
"""
from __future__ import annotations

import copy
import math
import logging
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torchmetrics.text import Perplexity

from qat.control import frozen_ranges
from qat.errors import ConfigError
import qat
from qat.lit.parallel import average_replicated_grads, shard_fsdp2
from qat.models import load_model
from qat.transform.recipe import to_plain
from qat.transform.rotations.learned import (LEARNED_INITS, CayleySGD, attach_learned_rotations,
                                             fuse_learned_rotations, resolve_init)




def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Load the float model a `model` config node describes: {path, dtype, tiny: {...}}."""
    cfg = dict(model_cfg)
    return load_model(cfg["path"], cfg.get("dtype", "float32"), **dict(cfg.get("tiny") or {}))


# lr: SpinQuant's 1.5 is for 8 x 2048 tokens a step; at the README protocol's 2 x 128 its noise turns the rotations
# at random (SmolLM2 W4A4KV4 g64: 49.1 ppl at lr 1.5, 40.7 at 0.02 ~ 1.5 x 256 / 16384; docs/rotations.md)
ROTATION_KEYS = {"r1": True, "r2": True, "init": "auto", "lr": 0.02, "momentum": 0.0, "alone": 0}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def learned_rotation_errors(cfg: Mapping[str, Any], key: str = "learned_rotations") -> list[str]:
    """One line per bad value of a `learned_rotations` mapping (unknown keys, lr > 0, momentum in [0, 1), init a
    rotation kind, alone a step count, r1 / r2 booleans), each naming `<key>.<name>` and what is valid; [] when all are good.

    Example:
        >>> learned_rotation_errors({"lr": -1}, "module.learned_rotations")
        ['module.learned_rotations.lr=-1; give a number > 0 (the CayleySGD step, e.g. 0.02)']
    """
    if not isinstance(cfg, Mapping):
        return [f"{key}={cfg!r}; give null or a mapping of {list(ROTATION_KEYS)}, e.g. {{lr: 0.02}}"]
    if not cfg:
        return [f"{key}={{}} turns nothing on; give null (off) or at least one of {list(ROTATION_KEYS)}, "
                "e.g. {lr: 0.02}"]
    errors = []
    unknown = sorted(set(cfg) - set(ROTATION_KEYS))
    if unknown:
        errors.append(f"{key}: unknown key(s) {unknown}; valid: {sorted(ROTATION_KEYS)}")
    lr, momentum = cfg.get("lr", ROTATION_KEYS["lr"]), cfg.get("momentum", 0.0)
    if not (_number(lr) and lr > 0):
        errors.append(f"{key}.lr={lr!r}; give a number > 0 (the CayleySGD step, e.g. 0.02)")
    if not (_number(momentum) and 0 <= momentum < 1):
        errors.append(f"{key}.momentum={momentum!r}; give a number in [0, 1) (0: none)")
    if cfg.get("init", "auto") not in LEARNED_INITS:
        errors.append(f"{key}.init={cfg['init']!r}; choose one of {list(LEARNED_INITS)} (the starting rotation; "
                      "auto: the recipe's fused rotation where it has one, else a Hadamard)")
    alone = cfg.get("alone", 0)
    if not (isinstance(alone, int) and not isinstance(alone, bool) and alone >= 0):
        errors.append(f"{key}.alone={alone!r}; give a whole number of steps >= 0 (the first steps train the "
                      "rotations alone, weights held; 0: rotations and weights together from the start)")
    for flag in ("r1", "r2"):
        if not isinstance(cfg.get(flag, True), bool):
            errors.append(f"{key}.{flag}={cfg[flag]!r}; choose true or false")
    return errors


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on softened logits, times T^2 (Hinton et al.), averaged over positions.

    Example:
        >>> kd_loss(torch.randn(2, 5, 10), torch.randn(2, 5, 10), temperature=2.0)
    """
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * t * t


log = logging.getLogger(__name__)


class QATModule(pl.LightningModule):
    """Next-token training of a fake-quantized causal LM, with optional distillation from the float model.

    Args:
        model: {"path": location for qat.models.load_model, "dtype": "float32", "tiny": {qat.testing.tiny_llama kwargs}}.
        quant: a recipe mapping (configs/quant format) or None for full-precision fine-tuning.
        optimizer: {"_target_": "torch.optim.AdamW", "_partial_": true, "lr": ...} (hydra-instantiated).
        scheduler: same form, or None; stepped every optimizer step.
        kd: {"weight": w, "temperature": T, "teacher": "copy"|"shared"} or None. loss = (1-w) CE + w KD;
            "copy" distills from a frozen copy of the float model, "shared" from the student itself under
            qat.quantization_disabled (no extra memory, but the teacher moves with training).
        range_init_batches: calibrate activation ranges on this many training batches before the first step.
        fake_quant_after: quantizers stay off (full-precision training) until this global step.
        freeze_ranges_after: stop range updates (weights and activations) at this step; None keeps weight
            ranges following the weights and holds calibrated activation ranges.
        gradient_checkpointing: recompute layer activations in the backward (HF models).
        freeze_embeddings: do not train the token embeddings and the output head (they are not quantized by
            the usual recipes; on a small-vocabulary-heavy model like SmolLM2 this saves ~10% of the step).
        lean_ste: the memory-lean straight-through estimator (qat.set_lean_ste; Linear and fused experts):
            backward recomputes the fake-quantized weights and inputs instead of keeping them; same values and
            gradients.
        learned_rotations: {r1, r2, init, lr, momentum, alone} (all optional): SpinQuant-style learned rotations
            (`qat.transform.rotations.learned`) trained jointly with QAT by a CayleySGD stepped with the main
            optimizer (its lr follows the main scheduler's warmup and decay), and fused into the weights when fit
            ends (`fuse_rotations`). The first `alone` steps train the rotations only, the weights and quantizer
            parameters held (SpinQuant's protocol; the scheduler counts those steps too). Values checked first
            (`learned_rotation_errors`). Checkpoints hold them unfused: qat-export's checkpoint= fuses them.
    Example:
        >>> m = QATModule({"path": "tiny"}, qat.load_recipe("w4a16_g128").to_dict())
    """

    def __init__(self, model: Mapping[str, Any], quant: Mapping[str, Any] | None = None,
                 optimizer: Mapping[str, Any] | None = None, scheduler: Mapping[str, Any] | None = None,
                 kd: Mapping[str, Any] | None = None, range_init_batches: int = 0, fake_quant_after: int = 0,
                 freeze_ranges_after: int | None = None, gradient_checkpointing: bool = False,
                 freeze_embeddings: bool = False, lean_ste: bool = True,
                 learned_rotations: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        model, quant, kd = to_plain(model), to_plain(quant), to_plain(kd)
        optimizer = to_plain(optimizer) or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4}
        self._check_kd(kd)
        rotations = to_plain(learned_rotations)
        errors = [] if rotations is None else learned_rotation_errors(rotations)  # before the model is built
        if errors:
            raise ConfigError("; ".join(errors))
        self.save_hyperparameters({"model": model, "quant": quant, "optimizer": optimizer,
                                   "scheduler": to_plain(scheduler), "kd": kd,
                                   "range_init_batches": range_init_batches, "fake_quant_after": fake_quant_after,
                                   "freeze_ranges_after": freeze_ranges_after,
                                   "gradient_checkpointing": gradient_checkpointing,
                                   "freeze_embeddings": freeze_embeddings, "lean_ste": lean_ste,
                                   "learned_rotations": to_plain(learned_rotations)})
        self.model = build_model(model).train()
        self._teacher: list[nn.Module] = []  # a list keeps the teacher out of state_dict / parameters
        if kd and kd.get("teacher", "copy") == "copy":
            teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self._teacher.append(teacher)
        if quant is not None:
            qat.prepare(self.model, quant)
            qat.set_lean_ste(self.model, lean_ste)
        self._rotations, self._cayley = self._attach_rotations(to_plain(learned_rotations)), None
        if freeze_embeddings:  # input embeddings (and a tied lm_head) stay as they are: less compute, less memory
            for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                stored_weight(module).requires_grad_(False)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()
        self._replicated: list[nn.Parameter] = []  # under FSDP2: the 0-d parameters it leaves unsharded
        self._sharded = False

    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy: FSDP2 over the data-parallel mesh (`qat.lit.parallel`).

        Other strategies set no device mesh, and this does nothing.
        """
        mesh = self.device_mesh
        if mesh is None or self._sharded:
            return
        if mesh.ndim > 1 and mesh["tensor_parallel"].size() > 1:
            raise ConfigError("ModelParallelStrategy: tensor_parallel_size > 1 is not supported for QAT; set "
                              "tensor_parallel_size=1 and data_parallel_size=<devices> (FSDP2)")
        if self._rotations:
            raise ConfigError("module.learned_rotations is not supported with trainer=fsdp (the rotations are "
                              "parametrizations shared across sharded blocks); use trainer=ddp or one device")
        self._replicated = shard_fsdp2(self.model, mesh["data_parallel"] if mesh.ndim > 1 else mesh)
        self._sharded = True

    def on_after_backward(self) -> None:
        average_replicated_grads(self._replicated)

    ROTATION_KEYS = ROTATION_KEYS

    def _attach_rotations(self, cfg: Mapping[str, Any] | None) -> list[nn.Parameter]:
        if not cfg:
            return []
        cfg = {**self.ROTATION_KEYS, **cfg}
        recipe = getattr(self.model, "qat_recipe", None)  # the validated recipe prepare applied (quant: a name too)
        init = resolve_init(cfg["init"], recipe.rotations if recipe is not None else None)
        rotations = attach_learned_rotations(self.model, r1=cfg["r1"], r2=cfg["r2"], init=init)
        log.info("learned rotations: %d matrices (r1=%s, r2=%s, start %s) trained by CayleySGD (lr %s%s), fused "
                 "when fit ends", len(rotations), cfg["r1"], cfg["r2"], init, cfg["lr"],
                 f"; alone for the first {cfg['alone']} steps, weights held" if cfg["alone"] else "")
        return rotations

    def fuse_rotations(self) -> None:
        """Bake the learned rotations into the weights (plain parameters again: export as usual)."""
        if self._rotations:
            fuse_learned_rotations(self.model)
            log.info("learned rotations fused into the weights (%d matrices)", len(self._rotations))
            self._rotations, self._cayley = [], None

    def on_fit_end(self) -> None:
        self.fuse_rotations()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._cayley is not None and self.global_step < self._rotation_cfg()["alone"]:
            rotations = {id(p) for p in self._rotations}
            for group in optimizer.param_groups:  # no gradient: AdamW leaves the weights (and its state) as they are
                for p in group["params"]:
                    if id(p) not in rotations:
                        p.grad = None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        group = optimizer.param_groups[0]
        scale = group["lr"] / group.get("initial_lr", group["lr"])  # the scheduler's factor at this step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._cayley is not None:  # the rotations step with the main optimizer, on the same gradients
            for cayley_group in self._cayley.param_groups:
                cayley_group["lr"] = self._rotation_cfg()["lr"] * scale
            self._cayley.step()
            self._cayley.zero_grad(set_to_none=True)

    def _rotation_cfg(self) -> dict[str, Any]:
        return {**self.ROTATION_KEYS, **(self.hparams.learned_rotations or {})}

    @staticmethod
    def _check_kd(kd: Mapping[str, Any] | None) -> None:
        if kd is None:
            return
        allowed = {"weight", "temperature", "teacher"}
        if set(kd) - allowed:
            raise ConfigError(f"kd: unknown key(s) {sorted(set(kd) - allowed)}; valid: {sorted(allowed)}")
        if not 0 <= kd.get("weight", 1.0) <= 1:
            raise ConfigError(f"kd.weight={kd['weight']}; must be in [0, 1]")
        if kd.get("temperature", 1.0) <= 0:
            raise ConfigError(f"kd.temperature={kd['temperature']}; must be > 0")
        if kd.get("teacher", "copy") not in ("copy", "shared"):
            raise ConfigError(f"kd.teacher={kd['teacher']!r}; choose from ['copy', 'shared']")

    # -- forward / losses -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._teacher:
            teacher = self._teacher[0]
            if next(teacher.parameters()).device != input_ids.device:
                teacher.to(input_ids.device)
            return teacher(input_ids=input_ids, use_cache=False).logits
        with qat.quantization_disabled(self.model):
            return self(input_ids)

    def _losses(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(input_ids)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        out = {"ce": ce, "loss": ce}
        kd = self.hparams.kd
        if kd and kd.get("weight", 1.0) > 0:
            w = kd.get("weight", 1.0)
            out["kd"] = kd_loss(logits[:, :-1], self.teacher_logits(input_ids)[:, :-1], kd.get("temperature", 1.0))
            out["loss"] = (1 - w) * ce + w * out["kd"]
        return out

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch["input_ids"])
        for key, value in losses.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", on_step=True, on_epoch=False)
        self.log("train/ppl", losses["ce"].detach().exp(), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return losses["loss"]

    def _eval_step(self, batch: Mapping[str, torch.Tensor], metric: Perplexity, prefix: str) -> None:
        ids = batch["input_ids"]
        logits = self(ids)
        metric.update(logits[:, :-1].float(), ids[:, 1:])
        self.log(f"{prefix}/ppl", metric, prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        with frozen_ranges(self.model):
            self._eval_step(batch, self.val_ppl, "val")

    def test_step(self, batch, batch_idx):
        with frozen_ranges(self.model):
            self._eval_step(batch, self.test_ppl, "test")

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        from hydra.utils import instantiate

        rotations = {id(p) for p in self._rotations}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in rotations]
        optimizer = instantiate(self.hparams.optimizer)(params)
        if self._rotations:
            cfg = self._rotation_cfg()
            self._cayley = CayleySGD(self._rotations, lr=cfg["lr"], momentum=cfg["momentum"])
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- quantizer schedule -----------------------------------------------------------------------
    def on_train_start(self) -> None:
        hp = self.hparams
        if hp.quant is not None and hp.range_init_batches > 0 and not _all_initialized(self.model):
            self.range_init(self.trainer.train_dataloader, hp.range_init_batches)
            sync_activation_ranges(self.model, reinit_learned=True)
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "seek_train"):  # (re)start the data stream where this step's batch lies
            per_step = datamodule.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
            datamodule.seek_train(self.global_step * per_step)
        self.apply_schedule(self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        if self.global_step in (hp.fake_quant_after, hp.freeze_ranges_after):
            self.apply_schedule(self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if any(q.observing for _, q in qat.quantizers(self.model, roles=["input", "kv_cache"])):
            sync_activation_ranges(self.model)  # every rank saw different data: hold the union of their ranges

    def range_init(self, dataloader, n_batches: int) -> int:
        """Calibrate activation observers on the first `n_batches` of `dataloader` (qat.calibrate)."""
        def batches():
            for i, batch in enumerate(dataloader):
                if i >= n_batches:
                    return
                yield batch["input_ids"].to(self.device)

        was_training = self.model.training
        self.model.eval()
        try:
            return qat.calibrate(self.model, batches(), forward=lambda m, ids: m(input_ids=ids, use_cache=False),
                                 freeze=self.hparams.freeze_ranges_after is None)
        finally:
            self.model.train(was_training)

    def apply_schedule(self, step: int) -> None:
        """Quantizer flags for `step`: off before fake_quant_after; ranges frozen from freeze_ranges_after."""
        if self.hparams.quant is None:
            return
        hp = self.hparams
        qat.set_quantizers(self.model, enabled=step >= hp.fake_quant_after)
        if hp.freeze_ranges_after is not None:
            qat.set_quantizers(self.model, observing=step < hp.freeze_ranges_after)
        elif hp.range_init_batches > 0:
            qat.set_quantizers(self.model, roles=["input", "kv_cache"], observing=False)


@torch.no_grad()
def sync_activation_ranges(model: nn.Module, reinit_learned: bool = False) -> int:
    """Data-parallel runs: make held activation ranges identical on every rank (min of lo, max of hi).

    A no-op without torch.distributed. With `reinit_learned` (right after range initialisation, before
    training moves them), learned activation parameters (PACT / LSQ) are re-initialised from the merged range;
    afterwards they stay identical through the all-reduced gradients. Returns how many were synchronised.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    n = 0
    for _, q in qat.quantizers(model, roles=["input", "kv_cache"]):
        if q.spec.dynamic or not q.initialized:
            continue
        dist.all_reduce(q.observer.lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(q.observer.hi, op=dist.ReduceOp.MAX)
        if q.learned and reinit_learned:
            q._init_learned()
        n += 1
    return n


def _all_initialized(model: nn.Module) -> bool:
    return all(q.initialized or q.spec.dynamic for _, q in qat.quantizers(model))


def stored_weight(module: nn.Module) -> nn.Parameter:
    """The weight parameter `module` stores: under a parametrization (a learned rotation: weight = W @ R, computed
    at every access) the original W, else the weight itself. Freezing it leaves the rotation trainable."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
