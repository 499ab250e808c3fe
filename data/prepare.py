"""Turn raw text into token-id shards: clean, split, learn a vocabulary, encode.

    python main.py prepare                      # the built-in corpus
    python main.py prepare --data notes.txt --data.vocab_size=8000

Output, in `<prepared_dir>/<source>-<key>/` where `key` hashes the raw input
and every setting that changes the result (so unchanged input is never
prepared twice, and a changed one never reuses stale shards):

    train.bin, val.bin, test.bin   token ids (uint16, or uint32 for vocabularies
                                   over 65,536), documents separated by </s>
    tokenizer.model                the SentencePiece model (keras-hub tokenizer), or
    preset.json                    a keras-hub preset's tokenizer and config
                                   (--init-from-preset; utils/presets.py)
    meta.json                      sizes, hashes, token counts, settings

The input is streamed, never held in memory whole: a first pass (pure Python,
no TensorFlow, so bad input fails fast) cleans each document and appends it
to its split's text file; the vocabulary is learned from a bounded sample of
the training text; a second pass encodes the split files in batches. The
directory appears atomically (written under a temporary name, then renamed;
see utils.io.build_once, which also settles two processes preparing at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from data.clean import clean_text
from data.sources import Document, Source, open_source
from utils.config import DataConfig
from utils.errors import UserError
from utils.io import build_once
from utils.presets import BUNDLE_NAME, is_bundle, unpack

PREP_VERSION = 2  # bump when the same input and settings would give other output
SPLITS = ("train", "val", "test")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # keras-hub's SentencePiece trainer ids
SENTENCEPIECE_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
_MAX_SAMPLE_LINE = 2000  # SentencePiece skips training sentences over 4,192 bytes
_ENCODE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A prepared dataset on disk: token shards, tokenizer and meta.json."""

    dir: pathlib.Path
    meta: dict[str, Any]

    @property
    def tokenizer_path(self) -> pathlib.Path:
        """tokenizer.model (learned here) or preset.json (a keras-hub preset's)."""
        return tokenizer_file(self.dir)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (nothing is read until used)."""
        path = self.dir / f"{split}.bin"
        if self.meta["tokens"][split] == 0:
            return np.zeros((0,), dtype=self.meta["dtype"])
        return np.memmap(path, dtype=self.meta["dtype"], mode="r")


def tokenizer_file(directory: pathlib.Path) -> pathlib.Path:
    """The tokenizer a prepared or run directory holds: preset.json if present, else tokenizer.model."""
    bundle = directory / BUNDLE_NAME
    return bundle if bundle.is_file() else directory / "tokenizer.model"


def load_tokenizer(path: str | os.PathLike):
    """The keras-hub tokenizer saved at `path`: a SentencePiece model, or a preset bundle."""
    import keras_hub

    if is_bundle(path):
        with tempfile.TemporaryDirectory(prefix="tokenizer-") as scratch:
            return keras_hub.tokenizers.Tokenizer.from_preset(
                str(unpack(path, pathlib.Path(scratch)))
            )
    # Passed as bytes: given a path, keras-hub leaves the file open.
    return keras_hub.tokenizers.SentencePieceTokenizer(proto=pathlib.Path(path).read_bytes())


def special_ids(tokenizer) -> dict[str, int | None]:
    """The ids that pad, open and end a text, for this project's or a preset's tokenizer.

    A learned SentencePiece model has fixed ones. A preset's tokenizer names
    them (keras-hub's start/end/pad tokens); "pad" is None when its pad id is
    an ordinary token (GPT-2's is id 0, "!"), so nothing is masked by value.
    """
    if getattr(tokenizer, "end_token_id", None) is None:
        return dict(SENTENCEPIECE_IDS)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and tokenizer.id_to_token(pad) not in tokenizer.special_tokens:
        pad = None
    start = getattr(tokenizer, "start_token_id", None)  # RoBERTa's <s> is id 0
    return {
        "pad": pad,
        "unk": None,
        "bos": int(tokenizer.end_token_id if start is None else start),
        "eos": int(tokenizer.end_token_id),
    }


def copy_tokenizer(tokenizer: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    """Put a given tokenizer file into a directory being built, under its kind's name."""
    target = work / (BUNDLE_NAME if is_bundle(tokenizer) else "tokenizer.model")
    shutil.copyfile(tokenizer, target)
    return target


def load_prepared(path: str | os.PathLike) -> Prepared:
    """Open a prepared dataset directory (as written by `prepare`)."""
    path = pathlib.Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{path}: not a prepared dataset (no meta.json)")
    return Prepared(path, json.loads(meta_path.read_text()))


def split_of(doc: Document, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of a document: by its position if it has one, else a stable hash of its group.

    By position, the source's first part trains, then come validation and
    test, each contiguous. By group, a seeded blake2b hash (not Python's
    salted hash()) places each group; the same input always splits the same.
    """
    if doc.position is not None:
        u = doc.position
        eps = 1e-9  # a document ending exactly on a boundary belongs before it
        return (
            "train"
            if u <= 1 - val_fraction - test_fraction + eps
            else "val"
            if u <= 1 - test_fraction + eps
            else "test"
        )
    digest = hashlib.blake2b(f"{seed}:{doc.group}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def settings_key(fingerprint: str, cfg: DataConfig) -> str:
    """Hash of the raw input's fingerprint and every setting that changes the output."""
    settings = {
        "prep_version": PREP_VERSION,
        "source": fingerprint,
        **{
            k: getattr(cfg, k)
            for k in (
                "lowercase",
                "vocab_size",
                "max_chars",
                "val_fraction",
                "test_fraction",
                "split_seed",
                "vocab_sample_chars",
            )
        },
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _bar(total: int | None, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )


def clean_and_split(
    source: Source, cfg: DataConfig, work: pathlib.Path, progress: bool
) -> dict[str, Any]:
    """Pass 1: clean every document and append it, one per line, to `<split>.txt`."""
    docs = dict.fromkeys(SPLITS, 0)
    chars = dict.fromkeys(SPLITS, 0)
    text_hash = hashlib.sha256()
    total = 0
    with contextlib.ExitStack() as stack:
        out = {
            s: stack.enter_context(open(work / f"{s}.txt", "w", encoding="utf-8")) for s in SPLITS
        }
        size = source.total_bytes()
        bar = stack.enter_context(_bar(size, "cleaning", "B", progress))
        # With max_chars, positions run over the part that is read (bytes ~ characters),
        # so a capped single file still has its validation and test stretches.
        stretch = size / cfg.max_chars if cfg.max_chars and size > cfg.max_chars else 1.0
        source.bytes_read = 0
        for doc in source.documents():
            bar.update(source.bytes_read - bar.n)
            text = clean_text(doc.text, cfg.lowercase)
            if not text:
                continue
            if cfg.max_chars and total + len(text) > cfg.max_chars:
                break
            if doc.position is not None:
                doc = doc._replace(position=min(doc.position * stretch, 1.0))
            split = split_of(doc, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
            out[split].write(text + "\n")
            text_hash.update(text.encode() + b"\n")
            docs[split] += 1
            chars[split] += len(text)
            total += len(text)
    if total == 0:
        raise UserError(
            f"{source.name}: no text left after cleaning (the input is empty or only whitespace/control characters)"
        )
    for split in ("val", "test"):
        if docs[split] == 0:
            raise UserError(
                f"{source.name}: too little text to hold out a {split} split "
                f"({sum(docs.values())} documents, split by file or by position); "
                f"add more text or raise --data.{split}_fraction"
            )
    return {"documents": docs, "chars": chars, "text_sha256": text_hash.hexdigest()}


def _sample_lines(path: pathlib.Path, total_chars: int, budget: int, seed: int) -> Iterator[str]:
    """A seeded Bernoulli sample of about `budget` characters, long lines cut at spaces."""
    keep = min(1.0, budget / max(total_chars, 1))
    rng = random.Random(seed)
    with open(path, encoding="utf-8") as f:
        for line in f:
            if keep < 1.0 and rng.random() >= keep:
                continue
            line = line.rstrip("\n")
            while len(line) > _MAX_SAMPLE_LINE:
                cut = line.rfind(" ", 0, _MAX_SAMPLE_LINE)
                cut = cut if cut > 0 else _MAX_SAMPLE_LINE
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


@contextlib.contextmanager
def _stderr_to(path: pathlib.Path):
    """Send file descriptor 2 (where SentencePiece's C++ code logs) to a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def learn_vocabulary(work: pathlib.Path, cfg: DataConfig, train_chars: int) -> pathlib.Path:
    """Learn a SentencePiece unigram vocabulary from a sample of the training text."""
    import keras_hub

    sample = work / "vocab-sample.txt"
    with open(sample, "w", encoding="utf-8") as f:
        for line in _sample_lines(
            work / "train.txt", train_chars, cfg.vocab_sample_chars, cfg.split_seed
        ):
            f.write(line + "\n")
    model = work / "tokenizer.model"
    log = work / "sentencepiece.log"
    try:
        with _stderr_to(log):
            proto = keras_hub.tokenizers.compute_sentence_piece_proto(
                [str(sample)], vocabulary_size=cfg.vocab_size
            )
    except RuntimeError as e:
        raise UserError(
            f"learning a {cfg.vocab_size}-token vocabulary failed: {_vocabulary_advice(str(e))}"
        ) from None
    model.write_bytes(proto)
    sample.unlink()
    log.unlink()
    return model


def _vocabulary_advice(message: str) -> str:
    """SentencePiece's complaint, said in this project's terms."""
    too_high = re.search(r"value <= (\d+)", message)
    if too_high:
        return f"this text supports at most {too_high.group(1)} tokens; lower --data.vocab_size or add text"
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (
            f"the text has {too_low.group(2)} distinct characters, more than the vocabulary holds; "
            "raise --data.vocab_size"
        )
    return message.strip().splitlines()[-1] if message.strip() else "SentencePiece failed"


def encode_splits(
    work: pathlib.Path, tokenizer_path: pathlib.Path, docs: dict[str, int], progress: bool
) -> tuple[dict[str, int], int, str]:
    """Pass 2: encode each split's text into `<split>.bin`, </s> after every document."""
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = int(tokenizer.vocabulary_size())
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    eos = special_ids(tokenizer)["eos"]
    counts = {}
    with _bar(sum(docs.values()), "encoding", "doc", progress) as bar:
        for split in SPLITS:
            n = 0
            with (
                open(work / f"{split}.txt", encoding="utf-8") as src,
                open(work / f"{split}.bin", "wb") as dst,
            ):
                for batch in _batches(src, _ENCODE_BATCH):
                    ids = _encode_batch(tokenizer, batch, dtype, eos)
                    dst.write(ids.tobytes())
                    n += len(ids)
                    bar.update(len(batch))
            counts[split] = n
            (work / f"{split}.txt").unlink()
    return counts, vocab_size, np.dtype(dtype).name


def _batches(lines, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(tokenizer, texts: list[str], dtype, eos: int = EOS_ID) -> np.ndarray:
    """Token ids of `texts`, concatenated, each followed by `eos`."""
    ids = tokenizer(texts)  # a RaggedTensor, or lists when keras-hub runs SentencePiece directly
    if hasattr(ids, "flat_values"):
        values, lengths = ids.flat_values.numpy(), ids.row_lengths().numpy()
    else:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())
        )
    out = np.empty(len(values) + len(lengths), dtype=dtype)
    eos_at = np.cumsum(lengths + 1) - 1
    is_eos = np.zeros(len(out), dtype=bool)
    is_eos[eos_at] = True
    out[is_eos] = eos
    out[~is_eos] = values
    return out


def unigram_perplexity(train: np.ndarray, test: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `test` of add-one-smoothed unigram frequencies from `train`.

    The baseline a language model must beat: it knows how often each token
    occurs, but nothing of context.
    """
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[test].mean()))


def cached_build(
    source: Source,
    cfg: DataConfig,
    tokenizer: pathlib.Path | None,
    build: Callable[[pathlib.Path, str, str], None],
    log: Callable[[str], None],
    kind: str = "",
) -> tuple[Prepared, bool]:
    """The prepared directory of `source` under `cfg`'s settings, built once per key.

    The key hashes the input (and `tokenizer`, when one is given) and every
    setting that changes the result, so the same input and settings find the
    same directory, on any rank or host; `build(work, key, fingerprint)` fills
    a new one (utils/io.py `build_once`: whole or not at all, and a builder
    that lost the race to another uses the winner's).

    Returns:
        (the prepared data, whether it was built now rather than reused).
    """
    fingerprint = kind + source.fingerprint()
    if tokenizer is not None:
        fingerprint += hashlib.sha256(pathlib.Path(tokenizer).read_bytes()).hexdigest()
    key = settings_key(fingerprint, cfg)
    out = pathlib.Path(cfg.prepared_dir) / f"{source.name}-{key[:12]}"

    def build_here(work: pathlib.Path) -> None:
        log(f"data: preparing {source.name} into {out}")
        build(work, key, fingerprint)

    out, built = build_once(out, build_here, complete="meta.json")
    if not built:
        log(f"data: reusing {out}")
    return load_prepared(out), built


def prepare(
    cfg: DataConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tokenizer: pathlib.Path | None = None,
) -> Prepared:
    """Prepare (or reuse) the token shards for `cfg`; see the module docstring.

    Args:
        cfg: the data section of the run's config.
        progress: show progress bars (rank 0 only, under Horovod).
        log: where one-line status messages go.
        tokenizer: encode with this tokenizer (a SentencePiece model, or a
            preset's preset.json) instead of learning one (to evaluate a
            trained run on other text, or to start from a preset).
    """
    source = open_source(cfg.path, cfg.format, cfg.text_column)
    prepared, built = cached_build(
        source,
        cfg,
        tokenizer,
        lambda work, key, fingerprint: _build(
            work, source, cfg, key, fingerprint, tokenizer, progress
        ),
        log,
    )
    if not built:
        return prepared
    counts = prepared.meta["tokens"]
    log(
        f"data: {counts['train']:,} train / {counts['val']:,} val / {counts['test']:,} test "
        f"tokens, vocabulary {prepared.vocab_size:,}"
    )
    return prepared


def _build(
    work: pathlib.Path,
    source: Source,
    cfg: DataConfig,
    key: str,
    fingerprint: str,
    tokenizer: pathlib.Path | None,
    progress: bool,
) -> None:
    """Write a prepared dataset into the empty directory `work`, meta.json last."""
    split_stats = clean_and_split(source, cfg, work, progress)
    if tokenizer is None:
        tokenizer_path = learn_vocabulary(work, cfg, split_stats["chars"]["train"])
    else:
        tokenizer_path = copy_tokenizer(tokenizer, work)
    counts, vocab_size, dtype = encode_splits(
        work, tokenizer_path, split_stats["documents"], progress
    )
    meta = {
        "prep_version": PREP_VERSION,
        "key": key,
        "source": {**source.describe(), "fingerprint": fingerprint},
        "python": sys.version.split()[0],
        "settings": dataclasses.asdict(cfg),
        **split_stats,
        "tokens": counts,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "special_ids": special_ids(load_tokenizer(tokenizer_path)),
    }
    prepared = Prepared(work, meta)
    meta["unigram_perplexity"] = {
        s: unigram_perplexity(prepared.tokens("train"), prepared.tokens(s), vocab_size)
        for s in ("val", "test")
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
