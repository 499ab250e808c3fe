"""Where raw text comes from: the built-in corpus or the user's local files.

Every source yields `Document(group, text, position)`. The split follows
`group` (a stable hash of it: all documents of a group land in the same
split, so text of one file never sits on both sides) or, for a single text
file, `position` (the file's first part trains, then validation, then test,
as contiguous stretches). Pair sources (task seq2seq: `open_pairs`) also
yield `Pair(group, source, target)` from `pairs()`.

Sources are pure Python (no TensorFlow) and check their input as they read
it: a missing path, an empty or binary file, text that is not UTF-8, a JSONL
line that is not JSON or lacks the text key, a CSV without the text column,
each raise `UserError` naming the file and line.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import pathlib
import sys
import sysconfig
from collections.abc import Collection, Iterator
from typing import NamedTuple

from utils.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
_SNIFF_BYTES = 8192


class Document(NamedTuple):
    group: str  # documents of one group always land in the same split
    text: str
    position: float | None = None  # share of the source read so far: for contiguous splits
    label: str | None = None  # the class, for labelled sources ("" when blank)


class Source:
    """Base class: a named, fingerprinted stream of documents."""

    name: str = "source"
    bytes_read: int = 0  # of total_bytes(), as documents() advances: for progress bars

    def files(self) -> list[pathlib.Path]:
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "name": self.name}

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def fingerprint(self) -> str:
        """sha256 of the raw input (file names and bytes, in order) and how it is read."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for p in self.files():
            h.update(str(p.name).encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()

    def _lines(self, path: pathlib.Path) -> Iterator[tuple[int, str]]:
        """(line number, line) of a UTF-8 file, with decode errors naming the line."""
        # Read bytes and decode line by line, so an error names the exact line.
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                self.bytes_read += len(raw)
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # byte-order mark
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                        "convert the file, e.g. with iconv -t UTF-8"
                    ) from None
                if "\0" in line:
                    raise UserError(f"{path}:{lineno}: contains NUL bytes; expected UTF-8 text")
                yield lineno, line

    def _paragraphs(self, path: pathlib.Path) -> Iterator[tuple[int, str]]:
        """(paragraph index, text) of a text file, paragraphs separated by blank lines."""
        buf: list[str] = []
        index = 0
        for _, line in self._lines(path):
            if line.strip():
                buf.append(line)
            elif buf:
                yield index, "".join(buf)
                index, buf = index + 1, []
        if buf:
            yield index, "".join(buf)


def _check_text_file(path: pathlib.Path) -> None:
    """Fail fast on a file that is missing, empty, binary or not UTF-8 at its start."""
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        raise UserError(
            f"{path}: looks like a binary file (contains NUL bytes), expected UTF-8 text"
        )
    try:
        # The sniffed block may end inside a multi-byte character: ignore that tail.
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            raise UserError(
                f"{path}: not UTF-8 text (byte 0x{head[e.start]:02x} at offset {e.start}); "
                "convert it, e.g. with iconv -t UTF-8"
            ) from None


class TextFile(Source):
    """One plain text file; paragraphs are documents, split by position in the file."""

    def __init__(self, path: pathlib.Path):
        _check_text_file(path)
        self.path = path
        self.name = path.stem

    def files(self) -> list[pathlib.Path]:
        return [self.path]

    def documents(self) -> Iterator[Document]:
        total = max(self.total_bytes(), 1)
        for index, text in self._paragraphs(self.path):
            # A huge paragraph (a file that is one 10 MB line) becomes several
            # documents, so it can still be split into train/val/test by position.
            pieces = list(split_long(text))
            start = self.bytes_read - sum(len(p) for p in pieces)
            for piece in pieces:
                start += len(piece)
                yield Document(f"{self.path.name}#{index}", piece, max(start, 0) / total)


MAX_DOCUMENT_CHARS = 100_000


def split_long(text: str, limit: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, cut at whitespace where there is some."""
    while len(text) > limit:
        cut = text.rfind(" ", limit // 2, limit)
        cut = cut if cut > 0 else limit
        yield text[:cut]
        text = text[cut:]
    yield text


class TextFolder(Source):
    """Every .txt/.text/.md/.rst file under a folder (sorted); each file is one split group."""

    def __init__(self, path: pathlib.Path):
        self.root = path
        self.name = path.resolve().name or "folder"
        self._files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not self._files:
            raise UserError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
        for p in self._files:
            _check_text_file(p)

    def files(self) -> list[pathlib.Path]:
        return self._files

    def documents(self) -> Iterator[Document]:
        for p in self._files:
            group = str(p.relative_to(self.root))
            for _, text in self._paragraphs(p):
                yield Document(group, text)


def _label(value: object, where: str, column: str) -> str:
    """A label as text: strings, integers and booleans are accepted; blank means none."""
    if value is None:
        return ""
    if isinstance(value, bool | int | str):
        return str(value).strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise UserError(
        f"{where}: {column!r} must be a string or an integer label, got {type(value).__name__}"
    )


class RecordFile(Source):
    """Base of the JSONL and CSV readers: one file of records, text (and a label) in columns.

    Each record is its own split group, named by its line number (`record<line>`);
    errors name the file and line. Subclasses yield (line, text, label) from
    `_records` and check their columns with `_require_columns`.
    """

    column_word = "column"  # what the format calls a column, for error messages

    def __init__(self, path: pathlib.Path, text_column: str, label_column: str | None = None):
        _check_text_file(path)
        self.path, self.column, self.label_column, self.name = (
            path,
            text_column,
            label_column,
            path.stem,
        )

    def describe(self) -> dict:
        return {**super().describe(), "column": self.column, "label_column": self.label_column}

    def files(self) -> list[pathlib.Path]:
        return [self.path]

    def _where(self, lineno: int) -> str:
        return f"{self.path}:{lineno}"

    def _columns(self) -> Iterator[tuple[str, str]]:
        """(column, option setting it) of each column read: the text's, then the label's."""
        for key, option in ((self.column, "text_column"), (self.label_column, "label_column")):
            if key is not None:
                yield key, option

    def _require_columns(self, lineno: int, present: Collection[str]) -> None:
        """Fail, naming the file, line and the columns there are, unless all read are present."""
        for key, option in self._columns():
            if key not in present:
                word, listing = self.column_word, self._listing(present)
                raise UserError(
                    f"{self._where(lineno)}: no {key!r} {word} ({word}s: {listing}); "
                    f"set --data.{option}"
                )

    def _listing(self, present: Collection[str]) -> str:
        """The columns there are, for an error message."""
        return ", ".join(present)

    def _records(self) -> Iterator[tuple[int, str, str | None]]:
        """(line number, text, label or None) of each record."""
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        for lineno, text, label in self._records():
            yield Document(f"record{lineno}", text, label=label)


class JsonlFile(RecordFile):
    """JSON Lines: one object per line, the text under `text_column` (and a label)."""

    column_word = "key"

    def __init__(self, path: pathlib.Path, text_column: str, label_column: str | None = None):
        super().__init__(path, text_column, label_column)
        for lineno, line in self._lines(path):
            if line.strip():  # check the first record now, the rest while reading
                self._record(lineno, line)
                break

    def _listing(self, present: Collection[str]) -> str:
        return ", ".join(sorted(map(str, present))) or "none"

    def _record(self, lineno: int, line: str) -> tuple[str, str | None]:
        where = self._where(lineno)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        self._require_columns(lineno, record)
        text = record[self.column]
        if text is not None and not isinstance(text, str):
            raise UserError(f"{where}: {self.column!r} must be a string, got {type(text).__name__}")
        label = (
            None
            if self.label_column is None
            else _label(record[self.label_column], where, self.label_column)
        )
        return text or "", label

    def _records(self) -> Iterator[tuple[int, str, str | None]]:
        for lineno, line in self._lines(self.path):
            if line.strip():
                yield lineno, *self._record(lineno, line)


class CsvFile(RecordFile):
    """CSV with a header row; the text under the `text_column` column (and a label)."""

    def __init__(self, path: pathlib.Path, text_column: str, label_column: str | None = None):
        super().__init__(path, text_column, label_column)
        header = next(self._rows(), None)
        if header is None:
            raise UserError(f"{path}: no header row")
        self._require_columns(1, header[1])
        self.index = {key: header[1].index(key) for key, _ in self._columns()}

    def _rows(self) -> Iterator[tuple[int, list[str]]]:
        csv.field_size_limit(sys.maxsize)
        lines = self._lines(self.path)
        reader = csv.reader(line for _, line in lines)
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as e:
            raise UserError(f"{self._where(reader.line_num)}: malformed CSV ({e})") from None

    def _records(self) -> Iterator[tuple[int, str, str | None]]:
        rows = self._rows()
        next(rows)  # header
        width = max(self.index.values()) + 1
        for lineno, row in rows:
            if not row:
                continue
            if len(row) < width:
                raise UserError(
                    f"{self._where(lineno)}: row has {len(row)} fields, the header {width} or more"
                )
            label = row[self.index[self.label_column]].strip() if self.label_column else None
            yield lineno, row[self.index[self.column]], label


class StdlibDocstrings(Source):
    """The built-in corpus: docstrings of the Python standard library.

    Parsed with `ast` from the standard library's own source files (nothing
    is imported), excluding site-packages and test folders, files sorted, so
    the corpus depends only on the Python release. Each docstring is a
    document; each source file is a split group.
    """

    name = "stdlib-docstrings"
    _EXCLUDED_PARTS = frozenset(
        ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")
    )

    def __init__(self) -> None:
        self.root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        self._files = sorted(
            p
            for p in self.root.rglob("*.py")
            if not self._EXCLUDED_PARTS.intersection(p.relative_to(self.root).parts)
        )
        if not self._files:
            raise UserError(f"no standard-library sources under {self.root}; pass --data PATH")

    def describe(self) -> dict:
        return {**super().describe(), "python": sys.version.split()[0]}

    def files(self) -> list[pathlib.Path]:
        return self._files

    def documents(self) -> Iterator[Document]:
        for p in self._files:
            try:
                tree = ast.parse(p.read_bytes(), filename=str(p))
            except (SyntaxError, ValueError):
                self.bytes_read += p.stat().st_size
                continue  # e.g. deliberately broken files in lib2to3 data
            group = str(p.relative_to(self.root))
            self.bytes_read += p.stat().st_size
            for node in ast.walk(tree):
                if isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                ):
                    doc = ast.get_docstring(node, clean=True)
                    if doc:
                        yield Document(group, doc)


class StdlibFamilies(StdlibDocstrings):
    """The built-in labelled dataset: standard-library docstrings labelled by module family.

    The label is the top-level package a docstring comes from; only the
    families below, the ten largest that span many source files, are kept,
    so that every class has files in train, validation and test (the split
    is grouped by source file: no file contributes to two splits).
    """

    name = "stdlib-families"
    FAMILIES = (
        "asyncio",
        "distutils",
        "email",
        "idlelib",
        "importlib",
        "lib2to3",
        "multiprocessing",
        "tkinter",
        "unittest",
        "xml",
    )

    def documents(self) -> Iterator[Document]:
        for doc in super().documents():
            family = doc.group.split("/")[0]
            if family in self.FAMILIES:
                yield doc._replace(label=family)


class Pair(NamedTuple):
    """A text and the text to learn from it (task seq2seq): a body and its summary."""

    group: str  # pairs of one group always land in the same split
    source: str
    target: str


class _PairRecords:
    """Mixin for the JSONL and CSV readers: the label column holds the target text.

    The record readers' text column is the source column, their label column
    the target column; a missing one is named with its own option
    (--data.source_column, --data.target_column).
    """

    def _columns(self) -> Iterator[tuple[str, str]]:
        yield self.column, "source_column"
        yield self.label_column, "target_column"

    def pairs(self) -> Iterator[Pair]:
        """(group, source, target) of each record; each record is its own group."""
        for lineno, source, target in self._records():
            yield Pair(f"record{lineno}", source, target)


class JsonlPairs(_PairRecords, JsonlFile):
    """JSON Lines of source/target pairs: both strings (null reads as blank)."""

    def __init__(self, path: pathlib.Path, source_column: str, target_column: str):
        super().__init__(path, source_column, target_column)

    def _record(self, lineno: int, line: str) -> tuple[str, str]:
        where = self._where(lineno)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        self._require_columns(lineno, record)
        texts = []
        for key, _ in self._columns():
            value = record[key]
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
            texts.append(value or "")
        return texts[0], texts[1]


class CsvPairs(_PairRecords, CsvFile):
    """CSV of source/target pairs, with a header row naming the two columns."""

    def __init__(self, path: pathlib.Path, source_column: str, target_column: str):
        super().__init__(path, source_column, target_column)


class StdlibSummaries(StdlibDocstrings):
    """The built-in pairs: standard-library docstrings written as PEP 257 asks.

    A docstring whose first line is a one-line summary, followed by a blank
    line and a body, gives a pair: the body is the source, the summary line
    the target. Other docstrings are left out. Each source file is a split
    group, as for the other built-in data.
    """

    name = "stdlib-summaries"

    def pairs(self) -> Iterator[Pair]:
        for doc in self.documents():
            lines = doc.text.split("\n")
            if len(lines) >= 3 and lines[0].strip() and not lines[1].strip():
                body = "\n".join(lines[2:])
                if body.strip():
                    yield Pair(doc.group, body, lines[0])


PairSource = JsonlPairs | CsvPairs | StdlibSummaries  # what `open_pairs` returns


def open_pairs(
    path: str, fmt: str = "auto", source_column: str = "source", target_column: str = "target"
) -> PairSource:
    """The pair source for `--data PATH` (empty: the built-in docstring summaries), checked cheaply.

    Args:
        path: a .jsonl or .csv file of pairs.
        fmt: "auto" (from the extension), "jsonl" or "csv".
        source_column, target_column: the key/column of the source and of the target.
    """
    if not path:
        return StdlibSummaries()
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(p.suffix.lower(), "text")
    if fmt == "text" or p.is_dir():
        raise UserError(
            f"{path}: pairs must be a .jsonl or .csv file with {source_column!r} and "
            f"{target_column!r} columns"
        )
    reader = JsonlPairs if fmt == "jsonl" else CsvPairs
    return reader(p, source_column, target_column)


def open_source(
    path: str, fmt: str = "auto", text_column: str = "text", label_column: str | None = None
) -> Source:
    """The Source for `--data PATH` (empty: the built-in corpus), checked cheaply.

    Args:
        path: a text file, a folder of text files, a .jsonl or a .csv file.
        fmt: "auto" (from the extension), "text", "jsonl" or "csv".
        text_column: key/column holding the text in JSONL/CSV.
        label_column: key/column holding the label, for labelled data
            (classification); None for plain text.
    """
    if not path:
        return StdlibDocstrings() if label_column is None else StdlibFamilies()
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if fmt == "auto":
        fmt = (
            "text"
            if p.is_dir()
            else {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(
                p.suffix.lower(), "text"
            )
        )
    if label_column is not None and fmt == "text":
        raise UserError(
            f"{path}: labelled data must be a .jsonl or .csv file with a {label_column!r} column"
        )
    if p.is_dir():
        if fmt != "text":
            raise UserError(
                f"{path}: a folder is read as text files; --data.format={fmt} needs a file"
            )
        return TextFolder(p)
    if fmt == "jsonl":
        return JsonlFile(p, text_column, label_column)
    if fmt == "csv":
        return CsvFile(p, text_column, label_column)
    return TextFile(p)
