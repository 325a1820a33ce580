"""Tokenizer training, token shards, meta.json and the cache: tiny corpora, a 300-token vocab."""

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer, pre_tokenizers

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


# ---------------------------------------------------------------------------------------------
# Long lines and long runs: linear time, bounded memory, the same ids


def _runs_text(rng: random.Random, runs: int = 300) -> str:
    """Runs of every length around MAX_RUN, of spaces (each Unicode kind) and of other characters,
    including U+001C..U+001F, which Python's `\\s` counts as space and the tokenizer does not."""
    spaces = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
    others = "abcXYZ0123.,!'-éß東🎉\x1c\x1f_"
    parts = []
    for _ in range(runs):
        length = rng.choice([1, 1, 2, 3, 5, 255, 256, 257, 511, 512, 513, 700])
        if rng.random() < 0.3:
            parts.append("".join(rng.choices(spaces, k=min(length, rng.choice([1, 2, 300])))))
        elif rng.random() < 0.5:
            parts.append("".join(rng.choices(others, k=length)))
        else:
            parts.append(rng.choice(others) * length)
        if rng.random() < 0.3:
            parts.append(" ")
    return "".join(parts)


@pytest.fixture(scope="module")
def run_texts() -> list[str]:
    rng = random.Random(0)
    # Hand-made: a long space run ending in " " before a word of 230 to 255 characters (the space
    # begins that word's token; 256 and more would make the word a run of its own).
    tricky = "w " + " " * 299 + "b" * 240 + " c " + "\t" * 600 + " " + "d" * 230 + " e" + "f" * 1000 + " " + "g" * 255
    return [_runs_text(rng) for _ in range(4)] + [tricky * 3]


def test_pieces_encode_exactly_like_the_whole_text(run_texts, monkeypatch):
    tokenizer = train_tokenizer([Document(str(i), t) for i, t in enumerate(run_texts)], 400)
    for text in run_texts:
        whole = tokenizer.encode(text).ids
        for size in (1, 7, 300, 5000):  # 1 and 7: a cut at nearly every possible place
            parts = list(tokenize.pieces(text, size))
            assert "".join(parts) == text
            assert [i for part in parts for i in tokenizer.encode(part).ids] == whole, f"size {size}"
    monkeypatch.setattr(tokenize, "PIECE_CHARS", 100)
    assert [tokenize.encode(tokenizer, text) for text in run_texts] == [tokenizer.encode(t).ids for t in run_texts]


def test_training_on_pieces_learns_what_training_on_whole_documents_learns(run_texts, monkeypatch):
    docs = [Document(str(i), t) for i, t in enumerate(run_texts)]
    whole = train_tokenizer(docs, 400)  # every text is shorter than PIECE_CHARS: one piece each
    monkeypatch.setattr(tokenize, "PIECE_CHARS", 50)
    assert len(list(tokenize.pieces(run_texts[0]))) > 100
    assert train_tokenizer(docs, 400).get_vocab() == whole.get_vocab()


def test_ordinary_text_is_pre_tokenized_as_by_byte_level_alone():
    tokenizer = train_tokenizer([Document(str(i), t) for i, t in enumerate(TEXTS)], 300)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in [*TEXTS, " x" * 200 + "\n\n  " + "y" * 255 + " " * 255]:
        assert tokenizer.pre_tokenizer.pre_tokenize_str(text) == byte_level.pre_tokenize_str(text)


def test_a_megabyte_without_a_space_is_tokenized_in_seconds(tmp_path):
    """Before runs were cut, BPE training took ~11 s on 100k characters of one repeated letter and
    grew with the square of the length (1 MB: about 20 minutes)."""
    rng = random.Random(0)
    texts = ["".join(rng.choices("ACGT", k=1_000_000)), "a" * 1_000_000, " " * 300_000 + "end", *TEXTS]
    make_corpus(tmp_path / "corpus", texts)
    start = time.perf_counter()
    data = prepare_data(config(tmp_path, val_fraction=0.1), progress=False)
    assert time.perf_counter() - start < 60
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    train = split_at(np.fromfile(data.train_path, dtype=np.uint16), data.meta["eos_id"])
    assert [tokenizer.decode(ids) for ids in train] == texts[:-1]
