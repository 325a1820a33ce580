"""Token shards as a LightningDataModule whose position is part of the checkpoint.

Training batch i is a pure function of (seed, i): B windows of T+1 tokens at offsets drawn from a
generator seeded with both. The only state is i, saved in every checkpoint, so a resumed run sees
exactly the batches the uninterrupted run would have seen. Validation is a fixed list of
non-overlapping windows from the held-out split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from app.errors import UserError


@dataclass
class Shards:
    """Where the token ids are (see pipelines/tokenize.py for the format)."""

    train_path: Path
    val_path: Path
    dtype: str  # numpy dtype name of the ids
    val_bytes: int  # UTF-8 bytes of the held-out text: bits per byte needs it
    val_tokens: int


class TrainWindows(IterableDataset):
    """Endless batches of random windows; global batch i depends only on (seed, i).

    With several data-parallel ranks, global batch i has `batch_size * world` windows and rank r
    reads its r-th slice, so N ranks see exactly what one process with N times the batch sees.
    """

    def __init__(
        self, path: Path, dtype: str, *, batch_size: int, seq_len: int, seed: int, start: int,
        rank: int = 0, world: int = 1,
    ):
        self.path, self.dtype = path, dtype
        self.batch_size, self.seq_len, self.seed, self.start = batch_size, seq_len, seed, start
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        ids = np.memmap(self.path, dtype=self.dtype, mode="r")
        high = len(ids) - self.seq_len - 1
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        index = self.start
        while True:
            rng = np.random.default_rng([self.seed, index])
            offsets = rng.integers(0, high + 1, size=self.batch_size * self.world)[mine]
            yield {"tokens": _windows(ids, offsets, self.seq_len + 1), "index": torch.tensor(index)}
            index += 1


class ValWindows(torch.utils.data.Dataset):
    """The first `num_batches * batch_size` non-overlapping windows of the held-out split."""

    def __init__(self, path: Path, dtype: str, *, seq_len: int, count: int):
        self.ids = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len = seq_len
        self.count = min(count, (len(self.ids) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        start = i * self.seq_len
        return {"tokens": torch.from_numpy(self.ids[start : start + self.seq_len + 1].astype(np.int64))}


def _windows(ids: np.ndarray, offsets: np.ndarray, length: int) -> Tensor:
    return torch.from_numpy(np.stack([ids[o : o + length] for o in offsets]).astype(np.int64))


class TokenDataModule(L.LightningDataModule):
    """Training windows from `train.bin`, validation windows from `val.bin`.

    `state_dict()` records how many micro-batches were consumed (checkpoints are written on
    optimizer-step boundaries), and `load_state_dict` makes training resume from the next one.
    """

    def __init__(self, shards: Shards, *, batch_size: int, seq_len: int, val_batches: int, seed: int, accumulate: int = 1):
        super().__init__()
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.val_batches, self.seed, self.accumulate = val_batches, seed, accumulate
        self.start = 0
        self._check_sizes()

    def _check_sizes(self) -> None:
        for path in (self.shards.train_path, self.shards.val_path):
            tokens = path.stat().st_size // np.dtype(self.shards.dtype).itemsize
            if tokens < self.seq_len + 1:
                raise UserError(
                    f"{path} holds {tokens} tokens, fewer than one window of trainer.seq_len={self.seq_len}: "
                    "add text or lower trainer.seq_len"
                )

    def train_dataloader(self) -> DataLoader:
        rank, world = _data_parallel_rank(self.trainer)
        windows = TrainWindows(
            self.shards.train_path, self.shards.dtype, batch_size=self.batch_size, seq_len=self.seq_len,
            seed=self.seed, start=self.start, rank=rank, world=world,
        )
        return DataLoader(windows, batch_size=None)  # the dataset yields whole batches

    def val_dataloader(self) -> DataLoader:
        windows = ValWindows(
            self.shards.val_path, self.shards.dtype, seq_len=self.seq_len, count=self.val_batches * self.batch_size
        )
        # Lightning's distributed sampler splits these windows over data-parallel ranks.
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False)

    def state_dict(self) -> dict:
        consumed = self.trainer.global_step * self.accumulate if self.trainer is not None else self.start
        return {"micro_batches": consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["micro_batches"])


def _data_parallel_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """(rank, world) over which training batches are split; (0, 1) for one process."""
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def token_byte_lengths(tokenizer_path: Path) -> Tensor:
    """UTF-8 bytes of every token id of a byte-level BPE tokenizer; 0 for special tokens.

    Byte-level BPE writes each byte as exactly one printable character, so a token's byte length
    is the length of its vocabulary string. Bits per byte sums cross entropy over the tokens with
    bytes and divides by their bytes (nanochat's convention), whatever the tokenizer.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = [0 if (tok := tokenizer.id_to_token(i)) in special else len(tok) for i in range(tokenizer.get_vocab_size())]
    return torch.tensor(lengths, dtype=torch.long)


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Cross entropy (nats per token) of the held-out ids under the training split's add-one
    smoothed unigram frequencies: what a model that ignores context reaches. A trained LM must
    land well below it."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val_ids].mean())
