"""Prepare source/target pairs for sequence-to-sequence learning: clean, split, encode.

    python main.py prepare --task seq2seq                     # the built-in docstring summaries
    python main.py prepare --task seq2seq --data pairs.jsonl --data.source_column=body

Output, in `<prepared_dir>/<source>-<key>/`:

    <split>.source.bin, <split>.target.bin   token ids of every source and target,
                                             concatenated (uint16/uint32)
    <split>.source.npy, <split>.target.npy   offsets: pair i is ids[offsets[i]:offsets[i+1]]
    <split>.jsonl         the cleaned source and target text of each pair, and its group
                          (the references of BLEU/ROUGE and the baseline's input)
    tokenizer.model, meta.json (pairs per split, what was skipped and cut)

Sources are cut to `model.seq_len` tokens and targets to `model.target_len`
when encoded; how many were cut, per split, is in meta.json (`truncated`).
The cut depends on those two settings, so they are part of the cache key
along with the data settings. Identical sources are kept once (the first),
so no source is on both sides of a split; blank sources or targets are
skipped and counted. Pairs of one group (a source file, or one record of a
JSONL/CSV file) stay in one split, placed by a seeded hash of the group as
for plain text. The vocabulary is learned from the training split's sources
and targets.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import pathlib
import sys
from collections.abc import Callable

import numpy as np

from data.clean import clean_text
from data.prepare import (
    PREP_VERSION,
    SPLITS,
    Prepared,
    _bar,
    cached_build,
    copy_tokenizer,
    learn_vocabulary,
    load_tokenizer,
    split_of,
)
from data.sources import Document, PairSource, open_pairs
from utils.config import DataConfig
from utils.errors import UserError

_ENCODE_BATCH = 256
SIDES = ("source", "target")


def prepare_pairs(
    cfg: DataConfig,
    seq_len: int,
    target_len: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tokenizer: pathlib.Path | None = None,
) -> Prepared:
    """Prepare (or reuse) source/target pairs; see the module docstring.

    Args:
        cfg: the data section of the config (path, source_column, target_column...).
        seq_len: sources are cut to this many tokens.
        target_len: targets are cut to this many tokens.
        progress: show progress bars.
        log: where status lines go.
        tokenizer: encode with this SentencePiece model (a trained run's, to
            evaluate it on other pairs) instead of learning one.
    """
    source = open_pairs(cfg.path, cfg.format, cfg.source_column, cfg.target_column)
    prepared, built = cached_build(
        source,
        cfg,
        tokenizer,
        lambda work, key, fingerprint: _build(
            work, source, cfg, (seq_len, target_len), key, fingerprint, tokenizer, progress
        ),
        log,
        kind=f"pairs:seq_len={seq_len}:target_len={target_len}:",
    )
    if not built:
        return prepared
    meta = prepared.meta
    counts, cut = meta["pairs"], meta["truncated"]
    log(
        f"data: {counts['train']:,} train / {counts['val']:,} val / {counts['test']:,} test "
        f"pairs, vocabulary {prepared.vocab_size:,}; skipped {sum(meta['skipped'].values()):,} "
        f"(blank or duplicate); cut to length: {sum(cut['source'].values()):,} sources "
        f"(seq_len {seq_len}), {sum(cut['target'].values()):,} targets (target_len {target_len})"
    )
    return prepared


def _collect(source: PairSource, cfg: DataConfig, work: pathlib.Path, progress: bool) -> dict:
    """Pass 1: clean, drop blanks and duplicate sources, and write each pair to `<split>.jsonl`."""
    seen: set[bytes] = set()
    skipped: collections.Counter = collections.Counter()
    pairs = dict.fromkeys(SPLITS, 0)
    total = 0
    text_hash = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        out = {
            s: stack.enter_context(open(work / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS
        }
        vocab_text = stack.enter_context(open(work / "train.txt", "w", encoding="utf-8"))
        bar = stack.enter_context(_bar(source.total_bytes(), "cleaning", "B", progress))
        source.bytes_read = 0
        for pair in source.pairs():
            bar.update(source.bytes_read - bar.n)
            text = clean_text(pair.source, cfg.lowercase)
            target = clean_text(pair.target, cfg.lowercase)
            if not text or not target:
                skipped["blank source" if not text else "blank target"] += 1
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                skipped["duplicate source"] += 1
                continue
            if cfg.max_chars and total + len(text) + len(target) > cfg.max_chars:
                break
            seen.add(digest)
            total += len(text) + len(target)
            split = split_of(
                Document(pair.group, text), cfg.split_seed, cfg.val_fraction, cfg.test_fraction
            )
            line = json.dumps({"source": text, "target": target, "group": pair.group}) + "\n"
            out[split].write(line)
            text_hash.update(line.encode())
            pairs[split] += 1
            if split == "train":  # the vocabulary is learned from both sides
                vocab_text.write(f"{text}\n{target}\n")
    if not sum(pairs.values()):
        raise UserError(f"{source.name}: no pairs (every source or target was blank)")
    for split in SPLITS:
        if pairs[split] == 0:
            raise UserError(
                f"{source.name}: too few pairs to fill a {split} split ({sum(pairs.values())} "
                "pairs, split by group); add pairs"
                + (f" or raise --data.{split}_fraction" if split != "train" else "")
            )
    return {"pairs": pairs, "skipped": dict(skipped), "text_sha256": text_hash.hexdigest()}


def _encode(
    work: pathlib.Path, tokenizer_path: pathlib.Path, lengths: dict[str, int], progress: bool
) -> dict:
    """Pass 2: token ids and offsets of every split's sources and targets, cut to `lengths`."""
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = int(tokenizer.vocabulary_size())
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tokens = {s: dict.fromkeys(SIDES, 0) for s in SPLITS}
    truncated = {side: dict.fromkeys(SPLITS, 0) for side in SIDES}
    for split in SPLITS:
        records = read_jsonl(work / f"{split}.jsonl")
        with _bar(2 * len(records), f"encoding {split}", "text", progress) as bar:
            for side in SIDES:
                limit, sizes = lengths[side], [0]
                with open(work / f"{split}.{side}.bin", "wb") as out:
                    for start in range(0, len(records), _ENCODE_BATCH):
                        batch = [r[side] for r in records[start : start + _ENCODE_BATCH]]
                        for ids in tokenizer.tokenize(batch):
                            ids = np.asarray(ids, dtype=dtype)
                            truncated[side][split] += int(len(ids) > limit)
                            ids = ids[:limit]
                            out.write(ids.tobytes())
                            sizes.append(len(ids))
                        bar.update(len(batch))
                offsets = np.cumsum(sizes).astype(np.int64)
                np.save(work / f"{split}.{side}.npy", offsets)
                tokens[split][side] = int(offsets[-1])
    return {
        "tokens": {s: sum(tokens[s].values()) for s in SPLITS},
        "tokens_by_side": tokens,
        "truncated": truncated,
        "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name,
    }


def _build(
    work: pathlib.Path,
    source: PairSource,
    cfg: DataConfig,
    lengths: tuple[int, int],
    key: str,
    fingerprint: str,
    tokenizer: pathlib.Path | None,
    progress: bool,
) -> None:
    """Write a pairs dataset into the empty directory `work`, meta.json last."""
    collected = _collect(source, cfg, work, progress)
    if tokenizer is None:
        tokenizer_path = learn_vocabulary(work, cfg, (work / "train.txt").stat().st_size)
    else:
        tokenizer_path = copy_tokenizer(tokenizer, work)
    (work / "train.txt").unlink()
    seq_len, target_len = lengths
    encoded = _encode(work, tokenizer_path, {"source": seq_len, "target": target_len}, progress)
    meta = {
        "kind": "pairs",
        "prep_version": PREP_VERSION,
        "key": key,
        "source": {**source.describe(), "fingerprint": fingerprint},
        "python": sys.version.split()[0],
        "settings": {**dataclasses.asdict(cfg), "seq_len": seq_len, "target_len": target_len},
        **collected,
        "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3},
        **encoded,
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The records of a JSON Lines file written by this module."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def encoded_pairs(
    prepared: Prepared, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source ids, source offsets, target ids, target offsets) of a split, ids memory-mapped."""
    out = []
    for side in SIDES:
        offsets = np.load(prepared.dir / f"{split}.{side}.npy")
        ids = (
            np.memmap(prepared.dir / f"{split}.{side}.bin", dtype=prepared.meta["dtype"], mode="r")
            if offsets[-1]
            else np.zeros(0, prepared.meta["dtype"])
        )
        out += [ids, offsets]
    return out[0], out[1], out[2], out[3]


def pair_texts(prepared: Prepared, split: str) -> tuple[list[str], list[str]]:
    """The cleaned sources and targets of a split, in the order of its encoded pairs."""
    records = read_jsonl(prepared.dir / f"{split}.jsonl")
    return [r["source"] for r in records], [r["target"] for r in records]
