"""Tokenizer training, token shards, meta.json and the cache: tiny corpora, a 300-token vocab."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer

import pipelines.tokenize as tokenize
from app.errors import UserError
from pipelines.corpus import Document
from pipelines.tokenize import (
    DataConfig,
    load_token_data,
    prepare_data,
    token_dtype,
    train_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Voilà un café crème, déjà payé à l'hôtel; naïve façade. " * 4,
    "Emoji party 🎉🚀 and CJK 東京 text.\n\nTwo blank lines above, tabs\there.",
    "Numbers 1234567890 and symbols #@!%^&*() ~ `code` <|endoftext|> literal.",
    "Congress shall make no law respecting an establishment of religion. " * 3,
    "The last document is held out for validation, with ümlauts and ß.",
]


def make_corpus(folder: Path, texts: list[str] = TEXTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def config(tmp_path: Path, **overrides) -> DataConfig:
    settings = dict(sources=[str(tmp_path / "corpus")], vocab_size=300, val_fraction=0.2,
                    cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**settings, **overrides})


def split_at(ids: np.ndarray, eos_id: int) -> list[list[int]]:
    """Documents of a shard: the id runs that each end with `eos_id`."""
    assert len(ids) and ids[-1] == eos_id, "every document, the last included, ends with EOS"
    ends = np.flatnonzero(ids == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e].tolist() for s, e in zip(starts, ends)]


@pytest.fixture
def built(tmp_path):
    make_corpus(tmp_path / "corpus")
    return prepare_data(config(tmp_path), progress=False)


@pytest.mark.parametrize(
    "text",
    ["plain ASCII, with  double spaces\n", "accents: déjà vu, Ærøskøbing, ñandú",
     "emoji 🎉👩‍👩‍👧 and unseen scripts: Ελληνικά, 日本語, עברית", " leading space", ""],
)
def test_tokenizer_round_trips_any_text(text):
    tokenizer = train_tokenizer([Document(str(i), t) for i, t in enumerate(TEXTS)], 300)
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_has_the_byte_alphabet_the_eos_token_and_merges():
    tokenizer = train_tokenizer([Document(str(i), t) for i, t in enumerate(TEXTS)], 300)
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.get_vocab_size() == 300  # 256 bytes + EOS + 43 merges
    assert len(tokenizer.encode(TEXTS[0]).ids) < len(TEXTS[0].encode()) / 2


def test_shards_decode_to_the_documents_split_by_eos(built):
    tokenizer = Tokenizer.from_file(str(built.tokenizer_path))
    eos_id = built.meta["eos_id"]
    assert eos_id == 0 and built.dtype == np.uint16
    train = split_at(np.fromfile(built.train_path, dtype=np.uint16), eos_id)
    val = split_at(np.fromfile(built.val_path, dtype=np.uint16), eos_id)
    # One EOS per document, although a text contains the literal "<|endoftext|>".
    assert [tokenizer.decode(ids) for ids in train] == TEXTS[:-1]
    assert [tokenizer.decode(ids) for ids in val] == TEXTS[-1:]


def test_meta_counts_match_an_independent_computation(built):
    tokenizer = Tokenizer.from_file(str(built.tokenizer_path))
    tokenizer.encode_special_tokens = True
    for split, texts in [("train", TEXTS[:-1]), ("val", TEXTS[-1:])]:
        stats = built.meta["splits"][split]
        assert stats["tokens"] == sum(len(tokenizer.encode(t).ids) + 1 for t in texts)
        assert stats["tokens"] == len(built.memmap(split))
        assert stats["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert stats["documents"] == len(texts)
    names = built.meta["splits"]["val"]["names"]
    assert names == [str(Path(built.meta["sources"][0]) / "doc05.txt")]
    assert built.meta["vocab_size"] == 300 and built.meta["replaced_bytes"] == 0
    assert built.meta["cache_key"] == built.dir.name and len(built.dir.name) == 16


def test_second_call_reuses_the_cache_without_training(built, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenize, "train_tokenizer", fail)
    again = prepare_data(config(tmp_path), progress=False)
    assert again.dir == built.dir and again.meta == built.meta


def test_changed_file_or_setting_gives_a_new_cache_folder(built, tmp_path):
    assert prepare_data(config(tmp_path, vocab_size=320), progress=False).dir != built.dir
    assert prepare_data(config(tmp_path, val_fraction=0.4), progress=False).dir != built.dir
    (tmp_path / "corpus" / "doc00.txt").write_text("An edited first document.")
    edited = prepare_data(config(tmp_path), progress=False)
    assert edited.dir != built.dir
    assert edited.meta["splits"]["train"]["bytes"] != built.meta["splits"]["train"]["bytes"]


def test_crash_midway_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenize, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config(tmp_path), progress=False)
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json"]  # no temporary files
    with pytest.raises(UserError, match="not a complete token shard folder"):
        load_token_data(folder)
    monkeypatch.undo()
    assert prepare_data(config(tmp_path), progress=False).dir == folder  # rebuilt in place


def test_truncated_shard_is_a_user_error(built):
    data = built.train_path.read_bytes()
    built.train_path.write_bytes(data[:-2])
    with pytest.raises(UserError, match=r"train\.bin is missing or not \d+ bytes long: delete"):
        load_token_data(built.dir)


def test_jsonl_corpus_with_a_custom_field(tmp_path):
    path = tmp_path / "corpus" / "d.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    data = prepare_data(config(tmp_path, text_field="body"), progress=False)
    assert data.meta["splits"]["val"]["names"] == [f"{path}:6"]
    assert data.meta["splits"]["train"]["documents"] == 5


def test_replaced_bytes_are_recorded_in_meta(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "zz.txt").write_bytes(b"caf\xe9 au lait \xff")
    with pytest.warns(UserWarning, match="zz.txt: 2 byte"):
        data = prepare_data(config(tmp_path), progress=False)
    assert data.meta["replaced_bytes"] == 2


def test_a_corpus_too_small_to_split_is_a_user_error(tmp_path):
    make_corpus(tmp_path / "corpus", TEXTS[:1])
    with pytest.raises(UserError, match="too few"):
        prepare_data(config(tmp_path), progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [({"vocab_size": 257}, "vocab_size must be at least 258"),
     ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
     ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
     ({"sources": []}, "sources is empty")],
)
def test_config_rejects_impossible_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**overrides)


def test_config_is_an_omegaconf_structured_config():
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["vocab_size=512", "sources=[a,b]"]))
    assert OmegaConf.to_object(merged) == DataConfig(sources=["a", "b"], vocab_size=512)
    with pytest.raises(Exception, match="vocab_sise"):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["vocab_sise=512"]))


def test_token_dtype_widens_past_65536_tokens():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
