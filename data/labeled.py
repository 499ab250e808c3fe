"""Prepare labelled text for classification: clean, deduplicate, split, encode.

    python main.py prepare --task classify                    # the built-in labelled dataset
    python main.py prepare --task classify --data reviews.csv --data.label_column=stars

Output, in `<prepared_dir>/<source>-<key>/`:

    <split>.ids.bin       every document's token ids, concatenated (uint16/uint32)
    <split>.offsets.npy   document i is ids[offsets[i]:offsets[i+1]]
    <split>.labels.npy    class ids
    <split>.jsonl         the cleaned text, label and group of each document (for
                          the TF-IDF baseline and for inspection)
    tokenizer.model, meta.json (labels, counts per class and split, warnings)

Splitting: identical texts are kept once (the first), so no text is on both
sides; documents of one group (a source file, or one record of a JSONL/CSV
file) stay together; groups are split per class, in a seeded hash order, so
each class with at least 3 groups has some in validation and test.
Labels come from the training split: validation/test documents with a label
never seen in training are dropped, with a warning in meta.json and the log.
"""

from __future__ import annotations

import collections
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
    special_ids,
)
from data.sources import Source, open_source
from utils.config import DataConfig
from utils.errors import UserError

_ENCODE_BATCH = 256


def _group_order(group: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest()


def assign_groups(
    groups_by_label: dict[str, list[str]], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, str]:
    """group -> split, stratified by label; deterministic for a seed.

    Each label's groups are ordered by a seeded hash; the first
    round(test_fraction * n) go to test and the next round(val_fraction * n)
    to validation (at least one each when the label has 3 groups or more).
    """
    split = {}
    for label in sorted(groups_by_label):
        groups = sorted(set(groups_by_label[label]), key=lambda g: _group_order(g, seed))
        n = len(groups)
        n_test = max(1, round(test_fraction * n)) if n >= 3 else 0
        n_val = max(1, round(val_fraction * n)) if n >= 3 else 0
        for i, group in enumerate(groups):
            if group not in split:
                split[group] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def _collect(source: Source, cfg: DataConfig, work: pathlib.Path, progress: bool) -> dict:
    """Pass 1: clean, drop blanks and duplicates; write all.jsonl; note each group's label."""
    groups_by_label: dict[str, list[str]] = collections.defaultdict(list)
    seen: set[bytes] = set()
    skipped = collections.Counter()
    total = 0
    with (
        open(work / "all.jsonl", "w", encoding="utf-8") as out,
        _bar(source.total_bytes(), "cleaning", "B", progress) as bar,
    ):
        source.bytes_read = 0
        for doc in source.documents():
            bar.update(source.bytes_read - bar.n)
            text = clean_text(doc.text, cfg.lowercase)
            if not doc.label:
                skipped["blank label"] += 1
                continue
            if not text:
                skipped["blank text"] += 1
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                skipped["duplicate text"] += 1
                continue
            if cfg.max_chars and total + len(text) > cfg.max_chars:
                break
            seen.add(digest)
            total += len(text)
            groups_by_label[doc.label].append(doc.group)
            out.write(json.dumps({"group": doc.group, "label": doc.label, "text": text}) + "\n")
    if not groups_by_label:
        raise UserError(
            f"{source.name}: no labelled text (every document had a blank text or label)"
        )
    return {"groups_by_label": groups_by_label, "skipped": dict(skipped)}


def _split(
    work: pathlib.Path, cfg: DataConfig, groups_by_label: dict[str, list[str]]
) -> tuple[list[str], dict, list[str]]:
    """Pass 2: write <split>.jsonl; labels are those of the training split."""
    split_of = assign_groups(groups_by_label, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    warnings = []
    rows = {s: [] for s in SPLITS}
    with open(work / "all.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            rows[split_of[record["group"]]].append(record)
    labels = sorted({r["label"] for r in rows["train"]})
    if len(labels) < 2:
        raise UserError(
            f"classification needs at least 2 labels in the training split; found {labels}"
        )
    known = set(labels)
    for split in ("val", "test"):
        unseen = collections.Counter(r["label"] for r in rows[split] if r["label"] not in known)
        if unseen:
            warnings.append(
                f"{split}: dropped {sum(unseen.values())} documents whose labels never occur in "
                f"training: {', '.join(sorted(unseen))}"
            )
            rows[split] = [r for r in rows[split] if r["label"] in known]
        missing = known - {r["label"] for r in rows[split]}
        if missing:
            warnings.append(
                f"{split}: no documents of class(es) {', '.join(sorted(missing))} "
                "(too few groups to hold some out); their recall there is undefined"
            )
        if not rows[split]:
            raise UserError(
                f"the {split} split is empty: add labelled documents or raise --data.{split}_fraction"
            )
    counts = {}
    for split in SPLITS:
        with open(work / f"{split}.jsonl", "w", encoding="utf-8") as out:
            for r in rows[split]:
                out.write(
                    json.dumps({"text": r["text"], "label": r["label"], "group": r["group"]}) + "\n"
                )
        counts[split] = dict(sorted(collections.Counter(r["label"] for r in rows[split]).items()))
    with open(work / "train.txt", "w", encoding="utf-8") as out:  # for learning the vocabulary
        out.writelines(r["text"] + "\n" for r in rows["train"])
    (work / "all.jsonl").unlink()
    return labels, counts, warnings


def _encode(
    work: pathlib.Path, tokenizer_path: pathlib.Path, labels: list[str], progress: bool
) -> dict:
    """Pass 3: token ids, offsets and label ids of every split."""
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = np.uint16 if int(tokenizer.vocabulary_size()) <= 2**16 else np.uint32
    index = {label: i for i, label in enumerate(labels)}
    tokens = {}
    for split in SPLITS:
        with open(work / f"{split}.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        lengths, label_ids = [], []
        with (
            open(work / f"{split}.ids.bin", "wb") as out,
            _bar(len(records), f"encoding {split}", "doc", progress) as bar,
        ):
            for start in range(0, len(records), _ENCODE_BATCH):
                batch = records[start : start + _ENCODE_BATCH]
                for ids in tokenizer.tokenize([r["text"] for r in batch]):
                    ids = np.asarray(ids, dtype=dtype)
                    out.write(ids.tobytes())
                    lengths.append(len(ids))
                label_ids.extend(index[r["label"]] for r in batch)
                bar.update(len(batch))
        np.save(
            work / f"{split}.offsets.npy",
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )
        np.save(work / f"{split}.labels.npy", np.asarray(label_ids, dtype=np.int32))
        tokens[split] = int(sum(lengths))
    return {
        "tokens": tokens,
        "vocab_size": int(tokenizer.vocabulary_size()),
        "dtype": np.dtype(dtype).name,
    }


def prepare_labeled(
    cfg: DataConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tokenizer: pathlib.Path | None = None,
) -> Prepared:
    """Prepare (or reuse) a labelled dataset for classification; see the module docstring.

    Args:
        cfg: the data section of the config (path, text_column, label_column...).
        progress: show progress bars.
        log: where status lines and warnings go.
        tokenizer: encode with this SentencePiece model (e.g. a pretrained
            encoder's) instead of learning one from the training split.
    """
    source = open_source(cfg.path, cfg.format, cfg.text_column, cfg.label_column)
    prepared, built = cached_build(
        source,
        cfg,
        tokenizer,
        lambda work, key, fingerprint: _build(
            work, source, cfg, key, fingerprint, tokenizer, progress
        ),
        log,
        kind="labeled:",
    )
    if not built:
        return prepared
    meta = prepared.meta
    for warning in meta["warnings"]:
        log(f"data: warning: {warning}")
    docs = meta["documents"]
    log(
        f"data: {len(meta['labels'])} classes; {docs['train']:,} train / {docs['val']:,} val / "
        f"{docs['test']:,} test documents; skipped {sum(meta['skipped'].values()):,} "
        "(blank or duplicate)"
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
    """Write a labelled dataset into the empty directory `work`, meta.json last."""
    collected = _collect(source, cfg, work, progress)
    labels, counts, warnings = _split(work, cfg, collected["groups_by_label"])
    train_chars = (work / "train.txt").stat().st_size
    if tokenizer is None:
        tokenizer_path = learn_vocabulary(work, cfg, train_chars)
    else:
        tokenizer_path = copy_tokenizer(tokenizer, work)
    (work / "train.txt").unlink()
    encoded = _encode(work, tokenizer_path, labels, progress)
    train_counts = np.array([counts["train"][label] for label in labels], dtype=np.float64)
    meta = {
        "kind": "labeled",
        "prep_version": PREP_VERSION,
        "key": key,
        "source": {**source.describe(), "fingerprint": fingerprint},
        "python": sys.version.split()[0],
        "settings": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "labels": labels,
        "documents": {s: sum(counts[s].values()) for s in SPLITS},
        "class_counts": counts,
        # "balanced" weights: n_samples / (n_classes * n_class), as scikit-learn computes them
        "class_weights": (train_counts.sum() / (len(labels) * train_counts)).tolist(),
        "skipped": collected["skipped"],
        "warnings": warnings,
        "text_sha256": _hash_texts(work),
        "special_ids": special_ids(load_tokenizer(tokenizer_path)),
        **encoded,
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _hash_texts(work: pathlib.Path) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update((work / f"{split}.jsonl").read_bytes())
    return h.hexdigest()


def documents(prepared: Prepared, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, offsets, labels) of a split of a labelled dataset, ids memory-mapped."""
    offsets = np.load(prepared.dir / f"{split}.offsets.npy")
    ids = (
        np.memmap(prepared.dir / f"{split}.ids.bin", dtype=prepared.meta["dtype"], mode="r")
        if offsets[-1]
        else np.zeros(0, prepared.meta["dtype"])
    )
    return ids, offsets, np.load(prepared.dir / f"{split}.labels.npy")


def texts(prepared: Prepared, split: str) -> tuple[list[str], list[str]]:
    """The cleaned texts and label names of a split."""
    with open(prepared.dir / f"{split}.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [r["text"] for r in records], [r["label"] for r in records]
