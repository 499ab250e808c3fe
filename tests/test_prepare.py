"""data/prepare.py and data/sources.py: splits, tokenizer, shards, caching, bad input."""

import csv
import json

import numpy as np
import pytest

import data.prepare
from data.prepare import (
    EOS_ID,
    load_prepared,
    load_tokenizer,
    prepare,
    split_of,
    unigram_perplexity,
)
from data.sources import Document, open_source
from tests.conftest import write_corpus
from utils.config import DataConfig
from utils.errors import UserError


def _cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(
        path=str(path),
        vocab_size=kw.pop("vocab_size", 200),
        prepared_dir=str(tmp_path / "prepared"),
        **kw,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    corpus = write_corpus(tmp / "corpus.txt", paragraphs=600)
    return prepare(_cfg(tmp, corpus), progress=False, log=lambda *_: None)


def test_outputs_and_meta(prepared):
    meta = prepared.meta
    assert {p.name for p in prepared.dir.iterdir()} == {
        "train.bin",
        "val.bin",
        "test.bin",
        "tokenizer.model",
        "meta.json",
    }
    for split in ("train", "val", "test"):
        tokens = prepared.tokens(split)
        assert len(tokens) == meta["tokens"][split] > 0
        assert tokens.dtype == np.uint16 and tokens.max() < meta["vocab_size"]
        # one end-of-text token after every document
        assert int((np.asarray(tokens) == EOS_ID).sum()) == meta["documents"][split]
    assert meta["vocab_size"] == 200
    assert meta["documents"]["train"] > 8 * meta["documents"]["test"]
    assert len(meta["text_sha256"]) == 64 and meta["python"].count(".") == 2
    assert 1 < meta["unigram_perplexity"]["test"] < meta["vocab_size"]


def test_tokenizer_round_trip(prepared):
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    text = "Kalo mire suta nepo."
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    # the first training document decodes back to the cleaned source text
    train = np.asarray(prepared.tokens("train"))
    first = train[: int(np.argmax(train == EOS_ID))]
    source_start = (prepared.dir.parent.parent / "corpus.txt").read_text().split("\n\n")[0]
    assert tokenizer.detokenize(first.astype("int32")) == source_start.strip()


def test_unchanged_input_is_reused_and_changed_input_is_not(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", paragraphs=300)
    messages = []
    first = prepare(_cfg(tmp_path, corpus), progress=False, log=messages.append)
    again = prepare(_cfg(tmp_path, corpus), progress=False, log=messages.append)
    assert again.dir == first.dir and messages[-1].startswith("data: reusing")
    relowered = prepare(_cfg(tmp_path, corpus, lowercase=True), progress=False, log=messages.append)
    assert relowered.dir != first.dir
    write_corpus(corpus, paragraphs=300, seed=1)
    changed = prepare(_cfg(tmp_path, corpus), progress=False, log=messages.append)
    assert changed.dir != first.dir
    assert not [
        p for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".")
    ]  # no temp dirs left


def test_prepare_that_loses_the_race_uses_the_winners_directory(tmp_path, monkeypatch):
    """Another process prepares the same input while this one builds: one directory, theirs."""
    cfg = _cfg(tmp_path, write_corpus(tmp_path / "c.txt", paragraphs=300))
    real_build, builds, winner = data.prepare._build, [], []

    def build_while_another_finishes(work, *args):
        builds.append(work)
        real_build(work, *args)
        if len(builds) == 1:  # the other process's own build, started here, starts no third
            winner.append(prepare(cfg, progress=False, log=lambda *_: None))

    monkeypatch.setattr(data.prepare, "_build", build_while_another_finishes)
    loser = prepare(cfg, progress=False, log=lambda *_: None)
    assert len(builds) == 2 and builds[0] != builds[1]
    assert loser.dir == winner[0].dir and loser.meta == winner[0].meta
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == [loser.dir.name]


def test_split_is_deterministic_and_grouped():
    docs = [Document(f"file{i % 50}.py", f"text {i}") for i in range(1000)]
    splits = [split_of(d, 0, 0.1, 0.1) for d in docs]
    assert splits == [split_of(d, 0, 0.1, 0.1) for d in docs]
    by_group = {}
    for d, s in zip(docs, splits, strict=True):
        by_group.setdefault(d.group, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    assert set(splits) == {"train", "val", "test"}
    assert splits != [split_of(d, 1, 0.1, 0.1) for d in docs]  # the seed matters


def test_split_by_position_is_contiguous():
    positions = [i / 100 for i in range(1, 101)]
    splits = [split_of(Document("g", "t", p), 0, 0.1, 0.05) for p in positions]
    assert splits == ["train"] * 85 + ["val"] * 10 + ["test"] * 5


def test_default_corpus_is_stdlib_docstrings():
    source = open_source("")
    assert source.name == "stdlib-docstrings"
    files = source.files()
    assert files == sorted(files) and len(files) > 300
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    first = next(source.documents())
    assert first.text and first.group.endswith(".py")


def test_unigram_perplexity_by_hand():
    train = np.array([0, 0, 1, 1, 1, 1])  # add-one counts: [3, 5, 1] / 9
    test = np.array([0, 1, 2])
    expected = np.exp(-np.mean(np.log([3 / 9, 5 / 9, 1 / 9])))
    assert unigram_perplexity(train, test, 3) == pytest.approx(expected)


def test_jsonl_and_csv_and_folder_inputs(tmp_path):
    rows = [
        {"body": f"record number {i} says something about item {i % 7}", "id": i}
        for i in range(300)
    ]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "body"])
        writer.writeheader()
        writer.writerows(rows)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(60):
        (folder / f"doc{i:02d}.txt").write_text(
            f"document {i} talks about value {i * 3}.\n\nSecond paragraph.\n"
        )
    (folder / "ignored.bin").write_bytes(b"\0\1\2")
    for path in (jsonl, tmp_path / "d.csv", folder):
        p = prepare(
            _cfg(tmp_path, path, text_column="body", vocab_size=60),
            progress=False,
            log=lambda *_: None,
        )
        assert sum(p.meta["tokens"].values()) > 0 and p.meta["vocab_size"] == 60


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "the file is empty"),
        ("binary.txt", b"\x7fELF\x00\x00\x01", "looks like a binary file"),
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        (
            "late.txt",
            b"fine line\n" * 2000 + b"bad \xff byte\n",
            "late.txt:2001: not valid UTF-8 (byte 0xff)",
        ),
        ("nocol.csv", b"id,body\n1,hello\n", "nocol.csv:1: no 'text' column (columns: id, body)"),
        ("badjson.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "badjson.jsonl:2: not valid JSON"),
        (
            "nokey.jsonl",
            b'{"text": "ok"}\n{"body": "x"}\n',
            "nokey.jsonl:2: no 'text' key (keys: body)",
        ),
        ("type.jsonl", b'{"text": 5}\n', "type.jsonl:1: 'text' must be a string, got int"),
        ("blank.txt", b"   \n\t\n", "no text left after cleaning"),
        # control and format characters (escape, DEL, zero-width space, BOM) are cleaned away too
        (
            "controls.txt",
            b" \x01\x02\n\x1b\x7f\n\n\xe2\x80\x8b\xef\xbb\xbf\t\x0b\x0c\r\n",
            "no text left after cleaning (the input is empty or only whitespace/control",
        ),
        # but NUL is never taken for blank text: the file is binary, or the line is named
        ("nul.txt", b"   \n\x00\n", "nul.txt: looks like a binary file (contains NUL bytes)"),
        ("late-nul.txt", b"fine line\n" * 2000 + b"a \x00 b\n", "late-nul.txt:2001: contains NUL"),
        ("small.txt", b"just one paragraph of text\n", "too little text to hold out a val split"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        prepare(_cfg(tmp_path, path), progress=False, log=lambda *_: None)
    assert message in str(e.value)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        open_source(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no text files"):
        open_source(str(tmp_path / "empty"))


def test_vocab_too_large_is_a_clear_error(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", paragraphs=100)
    with pytest.raises(
        UserError,
        match=r"learning a 50000-token vocabulary failed: this text supports at most \d+ tokens; lower --data.vocab_size",
    ):
        prepare(_cfg(tmp_path, corpus, vocab_size=50000), progress=False, log=lambda *_: None)


def test_load_prepared_requires_meta(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_prepared(tmp_path)
