"""`TextDataModule`: packed token blocks of a corpus (qat.data) as Lightning dataloaders."""
from __future__ import annotations

from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qat.data import SPLITS, CorpusConfig, build_blocks
from qat.errors import ConfigError
from qat.models import load_tokenizer


class BlockDataset(Dataset):
    """Rows of a LongTensor [N, T]; items are {"input_ids": [T]} (labels = input_ids, shifted in the loss)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class StreamSampler(DistributedSampler):
    """Training order as one endless stream of seeded permutations, read from a position.

    Permutation k (over all blocks) depends only on (seed, k), and the sampler continues from wherever it
    stopped, whatever Lightning thinks the epoch is. `seek(n)` jumps to sample n of the stream, so a run
    resumed at global step s (seek(s * batch * world * accumulate)) sees exactly the batches the straight
    run saw, at an epoch boundary or in the middle of one.

    Data-parallel: with `num_replicas` W, rank r reads stream positions r, r + W, r + 2W, ..., so one step of
    all ranks covers one contiguous stretch of the stream and `position` (the stream position of rank 0's
    next sample, shared by all ranks) means the same thing at any world size. It is a DistributedSampler so
    that Lightning uses it as it is rather than wrapping it (a wrapper re-shuffles each epoch's samples and
    would break the resume).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, epoch_length: int | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n, self.position = n, 0
        self.epoch_length = epoch_length or n // num_replicas  # samples per rank per Lightning epoch
        self._cache: tuple[int, list[int]] = (-1, [])

    def seek(self, position: int) -> None:
        self.position = position

    def _perm(self, k: int) -> list[int]:
        if self._cache[0] != k:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + k))
            self._cache = (k, order.tolist() if self.shuffle else list(range(self.n)))
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.epoch_length):
            k, i = divmod(self.position + self.rank, self.n)
            self.position += self.num_replicas
            yield self._perm(k)[i]

    def __len__(self) -> int:
        return self.epoch_length


class TextDataModule(pl.LightningDataModule):
    """Train / validation / test token blocks from any corpus `qat.data.load_documents` reads.

    Args:
        path: corpus ("wiki", "shakespeare", a file or folder, a hub name).
        tokenizer: model location whose tokenizer to use ("tiny" = bytes); see qat.models.load_tokenizer.
        block_size: tokens per training sequence.
        batch_size / eval_batch_size: sequences per step.
        max_train_blocks / max_eval_blocks: cap the blocks per split (None = all); eval caps take the first
            blocks of validation and test, so the slice is the same in every run.
        shuffle: shuffle training blocks (seeded by `seed` and the epoch).
        Other args: see qat.data.CorpusConfig.
    Example:
        >>> dm = TextDataModule("configs/data/tiny_corpus.txt", block_size=32, batch_size=4)
        >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
    """

    def __init__(self, path: str, tokenizer: str = "tiny", block_size: int = 128, batch_size: int = 8,
                 eval_batch_size: int | None = None, text_field: str | None = None, sample_by: str | None = None,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                 max_train_blocks: int | None = None, max_eval_blocks: int | None = None,
                 shuffle: bool = True, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}; must be >= 1")
        self.corpus = CorpusConfig(path=str(path), tokenizer=str(tokenizer), block_size=block_size,
                                   text_field=text_field, sample_by=sample_by, val_fraction=val_fraction,
                                   test_fraction=test_fraction, seed=seed, max_train_blocks=max_train_blocks,
                                   max_eval_blocks=max_eval_blocks)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.shuffle, self.num_workers = shuffle, num_workers
        self.blocks: dict[str, torch.Tensor] = {}
        self._tokenizer = None
        self.train_sampler: StreamSampler | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.corpus.tokenizer)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if not self.blocks:
            self.blocks = build_blocks(self.corpus, self.tokenizer, SPLITS)

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        if split not in self.blocks:
            raise ConfigError(f"split {split!r} is empty (data.{'val' if split == 'validation' else split}_fraction=0?)")
        ds = BlockDataset(self.blocks[split])
        if not train:
            return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)
        if self.train_sampler is None or self.train_sampler.n != len(ds) or self._stale_sampler():
            self.train_sampler = self._new_sampler(len(ds))
        return DataLoader(ds, batch_size=self.batch_size, sampler=self.train_sampler, num_workers=self.num_workers)

    def _replicas(self) -> tuple[int, int]:
        """(data-parallel world size, this rank) of the trainer this module is attached to; (1, 0) alone."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    def _stale_sampler(self) -> bool:
        return (self.train_sampler.num_replicas, self.train_sampler.rank) != self._replicas()

    def _new_sampler(self, n: int) -> StreamSampler:
        world, rank = self._replicas()
        if n < self.batch_size * world:
            raise ConfigError(f"{n} training blocks < data.batch_size={self.batch_size} x {world} ranks; lower the "
                              "batch size")
        per_rank = n // (self.batch_size * world) * self.batch_size
        return StreamSampler(n, self.corpus.seed, self.shuffle, epoch_length=per_rank, num_replicas=world, rank=rank)

    def seek_train(self, n_samples: int) -> None:
        """Continue the training stream at sample `n_samples` (resume; see StreamSampler)."""
        self.setup()
        if self.train_sampler is None or self._stale_sampler():
            self.train_sampler = self._new_sampler(len(self.blocks["train"]))
        self.train_sampler.seek(n_samples)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
