"""app/data.py: training batches as a pure function of (seed, index), data-parallel slicing,
validation windows, the resumable position, and byte lengths of tokens for bits per byte.

Every window is checked against the token file itself (ids written here with numpy).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app.data import Shards, TokenDataModule, TrainWindows, ValWindows, token_byte_lengths
from app.errors import UserError

SEQ = 16
VOCAB = 500


def write_ids(path: Path, ids: np.ndarray, dtype: str = "uint16") -> Path:
    np.asarray(ids, dtype=dtype).tofile(path)
    return path


@pytest.fixture
def shards(tmp_path: Path) -> Shards:
    # Ids are position mod 500: every window is recognisable, and it says where in the file it starts.
    train = write_ids(tmp_path / "train.bin", np.arange(5000) % VOCAB)
    val = write_ids(tmp_path / "val.bin", (np.arange(300) * 7) % VOCAB)
    return Shards(train, val, "uint16", val_bytes=1000, val_tokens=300)


def file_ids(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16).astype(np.int64)


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def windows(path: Path, **kwargs) -> TrainWindows:
    settings = dict(batch_size=3, seq_len=SEQ, seed=11, start=0)
    return TrainWindows(path, "uint16", **{**settings, **kwargs})


def fake_trainer(**fields) -> SimpleNamespace:
    return SimpleNamespace(**{"global_rank": 0, "world_size": 1, "global_step": 0, **fields})


def datamodule(shards: Shards, **kwargs) -> TokenDataModule:
    settings = dict(batch_size=3, seq_len=SEQ, val_batches=2, seed=11)
    return TokenDataModule(shards, **{**settings, **kwargs})


# ---------------------------------------------------------------------------------------------
# TrainWindows
# ---------------------------------------------------------------------------------------------


def test_batch_is_a_pure_function_of_seed_and_index(shards):
    from_zero = take(iter(windows(shards.train_path, start=0)), 8)
    from_five = take(iter(windows(shards.train_path, start=5)), 3)
    assert [int(b["index"]) for b in from_zero] == list(range(8))
    assert [int(b["index"]) for b in from_five] == [5, 6, 7]
    for i, batch in enumerate(from_five, start=5):
        torch.testing.assert_close(batch["tokens"], from_zero[i]["tokens"], rtol=0, atol=0)
    # ...and not a constant: consecutive batches and other seeds differ.
    assert not torch.equal(from_zero[0]["tokens"], from_zero[1]["tokens"])
    other_seed = next(iter(windows(shards.train_path, seed=12)))
    assert not torch.equal(other_seed["tokens"], from_zero[0]["tokens"])


def test_rows_are_contiguous_windows_of_the_file(shards):
    ids = file_ids(shards.train_path)
    for batch in take(iter(windows(shards.train_path, batch_size=4)), 5):
        tokens = batch["tokens"]
        assert tokens.shape == (4, SEQ + 1) and tokens.dtype == torch.int64
        for row in tokens.numpy():
            # With ids = position % 500 the first id does not fix the offset: find all candidates.
            starts = [o for o in range(len(ids) - SEQ) if ids[o] == row[0] and np.array_equal(ids[o : o + SEQ + 1], row)]
            assert starts, f"row {row[:4]}... is not a window of the file"


def test_windows_reach_the_end_of_the_file_but_never_past_it(tmp_path):
    # A file of SEQ + 3 tokens has exactly 3 window offsets (0, 1, 2); all of them appear.
    path = write_ids(tmp_path / "short.bin", np.arange(SEQ + 3) + 100)
    seen = set()
    for batch in take(iter(windows(path, batch_size=8)), 10):
        for row in batch["tokens"].numpy():
            assert len(row) == SEQ + 1
            seen.add(int(row[0]) - 100)
    assert seen == {0, 1, 2}


def test_data_parallel_ranks_split_the_single_process_batch(shards):
    """N ranks with batch B see exactly what one process with batch N*B sees."""
    single = take(iter(windows(shards.train_path, batch_size=6, start=3)), 4)
    rank0 = take(iter(windows(shards.train_path, batch_size=3, start=3, rank=0, world=2)), 4)
    rank1 = take(iter(windows(shards.train_path, batch_size=3, start=3, rank=1, world=2)), 4)
    for one, r0, r1 in zip(single, rank0, rank1):
        assert int(r0["index"]) == int(r1["index"]) == int(one["index"])
        torch.testing.assert_close(torch.cat([r0["tokens"], r1["tokens"]]), one["tokens"], rtol=0, atol=0)
    assert not torch.equal(rank0[0]["tokens"], rank1[0]["tokens"])


def test_train_dataloader_uses_the_trainers_rank_and_world(shards):
    dm = datamodule(shards, batch_size=2)
    dm.trainer = fake_trainer(global_rank=1, world_size=2)
    got = next(iter(dm.train_dataloader()))
    reference = next(iter(windows(shards.train_path, batch_size=4)))  # one process, 2 x 2 windows
    torch.testing.assert_close(got["tokens"], reference["tokens"][2:], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# ValWindows
# ---------------------------------------------------------------------------------------------


def test_val_windows_are_consecutive_and_non_overlapping(shards):
    ids = file_ids(shards.val_path)
    val = ValWindows(shards.val_path, "uint16", seq_len=SEQ, count=5)
    assert len(val) == 5
    for i in range(5):
        tokens = val[i]["tokens"]
        assert tokens.dtype == torch.int64
        np.testing.assert_array_equal(tokens.numpy(), ids[i * SEQ : i * SEQ + SEQ + 1])
    # The targets (tokens[1:]) of all windows tile the file with no token predicted twice.
    targets = torch.cat([val[i]["tokens"][1:] for i in range(5)]).numpy()
    np.testing.assert_array_equal(targets, ids[1 : 5 * SEQ + 1])


def test_val_window_count_is_capped_by_the_file(shards):
    n = len(file_ids(shards.val_path))  # 300 tokens, SEQ 16: windows start at 0, 16, ..., 272 -> 18
    val = ValWindows(shards.val_path, "uint16", seq_len=SEQ, count=1000)
    assert len(val) == 18 == (n - 1) // SEQ
    last = val[len(val) - 1]["tokens"]
    assert len(last) == SEQ + 1  # the last window is complete
    assert len(val) * SEQ + SEQ + 1 > n  # and one more would not be


def test_val_dataloader_batches(shards):
    dm = datamodule(shards, batch_size=3, val_batches=2)
    batches = list(dm.val_dataloader())
    assert [tuple(b["tokens"].shape) for b in batches] == [(3, SEQ + 1), (3, SEQ + 1)]
    ids = file_ids(shards.val_path)
    np.testing.assert_array_equal(batches[1]["tokens"][0].numpy(), ids[3 * SEQ : 4 * SEQ + 1])


# ---------------------------------------------------------------------------------------------
# The resumable position
# ---------------------------------------------------------------------------------------------


def test_state_dict_counts_micro_batches(shards):
    dm = datamodule(shards, accumulate=3)
    assert dm.state_dict() == {"micro_batches": 0, "seed": 11}  # not attached: the start position
    dm.trainer = fake_trainer(global_step=5)
    assert dm.state_dict() == {"micro_batches": 15, "seed": 11}


def test_load_state_dict_resumes_at_the_next_micro_batch(shards):
    fresh = datamodule(shards)
    fresh.trainer = fake_trainer()
    reference = take(iter(fresh.train_dataloader()), 9)

    resumed = datamodule(shards)
    resumed.load_state_dict({"micro_batches": 7, "seed": 11})
    resumed.trainer = fake_trainer()
    first, second = take(iter(resumed.train_dataloader()), 2)
    assert int(first["index"]) == 7 and int(second["index"]) == 8
    torch.testing.assert_close(first["tokens"], reference[7]["tokens"], rtol=0, atol=0)
    torch.testing.assert_close(second["tokens"], reference[8]["tokens"], rtol=0, atol=0)


def test_state_round_trip_between_datamodules(shards):
    saving = datamodule(shards, accumulate=2)
    saving.trainer = fake_trainer(global_step=4)
    loading = datamodule(shards, accumulate=2)
    loading.load_state_dict(saving.state_dict())
    loading.trainer = fake_trainer()
    assert int(next(iter(loading.train_dataloader()))["index"]) == 8


# ---------------------------------------------------------------------------------------------
# Too-short files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_file_shorter_than_a_window_is_a_user_error(shards, split):
    short = write_ids(shards.train_path.with_name(f"short-{split}.bin"), np.arange(SEQ))
    if split == "train":
        shards.train_path = short
    else:
        shards.val_path = short
    with pytest.raises(UserError) as err:
        datamodule(shards)
    message = str(err.value)
    assert str(short) in message and "seq_len" in message
    assert "\n" not in message


def test_file_of_exactly_one_window_is_accepted(shards):
    shards.val_path = write_ids(shards.val_path.with_name("one.bin"), np.arange(SEQ + 1))
    dm = datamodule(shards, val_batches=1)
    assert len(dm.val_dataloader().dataset) == 1


# ---------------------------------------------------------------------------------------------
# Bytes per token
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from pipelines.corpus import Document
    from pipelines.tokenize import train_tokenizer

    texts = ["the cat sat on the mat. " * 20, "café crème ☕ au lait, naïve résumé " * 10,
             "hello world, 東京 🎉 " * 10]
    tokenizer = train_tokenizer([Document(f"doc{i}", t) for i, t in enumerate(texts)], 300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("text", [
    "the cat sat on the mat",
    "café ☕",
    "naïve résumé, 東京 🎉 and unseen ǅ ꙮ 𝄞 scripts\n\ttabs",
])
def test_token_bytes_sum_to_the_utf8_length(tokenizer_file, text):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    lengths = token_byte_lengths(tokenizer_file)
    assert lengths.shape == (tokenizer.get_vocab_size(),) and lengths.dtype == torch.long
    ids = tokenizer.encode(text).ids
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    # Per token, too: each id's length is the byte length of what it decodes to on its own
    # (only ids that decode to whole characters can be checked this way).
    for i in ids:
        piece = tokenizer.decode([i])
        if "\ufffd" not in piece:
            assert int(lengths[i]) == len(piece.encode("utf-8")), (i, piece)


def test_special_token_has_no_bytes(tokenizer_file):
    from tokenizers import Tokenizer

    from pipelines.tokenize import EOS_TOKEN

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    lengths = token_byte_lengths(tokenizer_file)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    assert eos is not None and int(lengths[eos]) == 0
    assert int((lengths == 0).sum()) == 1  # every other id (the 256 bytes and merges) has bytes
    ids = tokenizer.encode(EOS_TOKEN + "ab").ids
    assert ids[0] == eos and int(lengths[ids].sum()) == 2
