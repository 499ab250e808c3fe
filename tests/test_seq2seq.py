"""--task seq2seq: pairs, the encoder-decoder, generation, exact scores, the command line."""

import csv
import itertools
import json
import math
import random

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from data.load import Pairs
from data.pairs import encoded_pairs, pair_texts, prepare_pairs
from data.prepare import BOS_ID, EOS_ID, load_prepared, load_tokenizer
from data.sources import StdlibSummaries
from models.generation import make_sampler
from models.seq2seq import Seq2SeqTransformer, build_seq2seq
from models.tasks import Seq2Seq
from models.tasks.base import make_eval_fn
from models.tasks.seq2seq import (
    BASELINE_WORDS,
    SCORES,
    pair_inputs,
    summarize_ids,
    summarize_shard,
    summary_scores,
    summary_sums,
)
from tests.conftest import horovodrun_cli, requires_horovod, run_cli
from utils import distributed
from utils.config import Config, DataConfig, ModelConfig, TrainConfig
from utils.metrics import Sums

MODEL = ModelConfig(n_layers=1, n_heads=2, d_model=16, d_ff=32, seq_len=12, target_len=6, dropout=0)
SYLLABLES = "ka lo mi re su ta ne po vi da".split()
WORDS = [a + b for a, b in itertools.product(SYLLABLES, repeat=2)][::3]  # 34 made-up words


def write_pairs(path, n=300, seed=0, fmt="jsonl", columns=("source", "target"), long_every=10):
    """`n` pairs of made-up words: the target is "sum" and the source's first words reversed.

    Every `long_every`-th target is long (12 words), so a short target_len cuts it.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        source = [rng.choice(WORDS) for _ in range(rng.randint(4, 20))]
        k = 12 if i % long_every == 0 else rng.randint(1, 3)
        target = ["sum", *reversed(source[:k])]
        rows.append(dict(zip(columns, (" ".join(source), " ".join(target)), strict=True)))
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
    return path


def _prepare(tmp_path, path, seq_len=12, target_len=6, **kw):
    cfg = DataConfig(path=str(path), vocab_size=48, prepared_dir=str(tmp_path / "prepared"), **kw)
    return prepare_pairs(cfg, seq_len, target_len, progress=False, log=lambda *_: None)


def test_pairs_are_grouped_deduplicated_and_cut_to_length(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl")
    with open(path, "a") as f:  # a duplicate source and a blank target
        f.write(path.read_text().splitlines()[1] + "\n")
        f.write(json.dumps({"source": "a source", "target": " "}) + "\n")
    prepared = _prepare(tmp_path, path)
    meta = prepared.meta
    assert meta["skipped"] == {"duplicate source": 1, "blank target": 1}
    assert sum(meta["pairs"].values()) == 300
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    seen = set()
    for split in ("train", "val", "test"):
        sources, targets = pair_texts(prepared, split)
        assert len(sources) == meta["pairs"][split] > 0
        assert not seen & set(sources), "a source on two sides of the split"
        seen |= set(sources)
        # What meta.json counts as cut is what the tokenizer makes longer than the limits.
        for side, texts, limit in (("source", sources, 12), ("target", targets, 6)):
            lengths = [len(ids) for ids in tokenizer.tokenize(texts)]
            assert meta["truncated"][side][split] == sum(n > limit for n in lengths), (side, split)
        _, source_offsets, _, target_offsets = encoded_pairs(prepared, split)
        assert np.diff(source_offsets).max() <= 12 and np.diff(target_offsets).max() <= 6
    assert sum(meta["truncated"]["target"].values()) >= 25  # every 10th target is long
    # The lengths are part of the cache key: the same settings reuse, another target_len not.
    assert _prepare(tmp_path, path).dir == prepared.dir
    assert _prepare(tmp_path, path, target_len=20).dir != prepared.dir


def test_teacher_forcing_rows():
    # Two pairs: a source of 3 and one of 5 tokens (cut to 4); targets of 2 and 4 tokens.
    shards = Pairs(
        np.arange(10, 18),
        np.array([0, 3, 8]),
        np.arange(20, 26),
        np.array([0, 2, 6]),
        source_len=4,
        target_len=3,
        batch_size=2,
    )
    inputs, labels = shards.gather(np.array([0, 1]))
    np.testing.assert_array_equal(inputs["source"], [[10, 11, 12, 0], [13, 14, 15, 16]])
    np.testing.assert_array_equal(inputs["decoder"], [[BOS_ID, 20, 21, 0], [BOS_ID, 22, 23, 24]])
    np.testing.assert_array_equal(labels, [[20, 21, EOS_ID, 0], [22, 23, 24, EOS_ID]])
    x, y, _ = next(iter(shards.eval_dataset()))
    assert x["source"].shape == (2, 4) and x["decoder"].shape == y.shape == (2, 4)


def test_built_in_pairs_are_docstring_summaries():
    source = StdlibSummaries()
    pairs = list(itertools.islice(source.pairs(), 60))
    docs = {d.text for d in itertools.islice(source.documents(), 300)}
    assert len({p.group for p in pairs}) > 3
    for pair in pairs:
        assert "\n" not in pair.target and pair.target.strip() and pair.source.strip()
        assert f"{pair.target}\n\n{pair.source}" in docs  # summary line, blank line, body


def test_model_round_trip_and_its_two_halves(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_seq2seq(MODEL, 40)
    assert isinstance(model, keras_hub.models.Backbone)
    assert Seq2SeqTransformer.from_config(model.get_config()).get_config() == model.get_config()
    rng = np.random.default_rng(0)
    batch = {"source": rng.integers(4, 40, (3, 12)), "decoder": rng.integers(4, 40, (3, 7))}
    batch["source"][:, 9:] = 0
    inputs = pair_inputs({k: tf.constant(v, tf.int32) for k, v in batch.items()})
    logits = np.asarray(model(inputs))
    assert logits.shape == (3, 7, 40)
    encoded = model.encode(inputs["encoder_token_ids"], inputs["encoder_padding_mask"])
    halves = model.decode(
        encoded,
        inputs["encoder_padding_mask"],
        inputs["decoder_token_ids"],
        inputs["decoder_padding_mask"],
    )
    np.testing.assert_allclose(halves, logits, atol=1e-6)
    # The decoder attends to the source (cross-attention), and only to its real tokens.
    other = dict(inputs, encoder_token_ids=tf.roll(inputs["encoder_token_ids"], 1, axis=0))
    assert not np.allclose(model(other), logits, atol=1e-4)
    padded = tf.where(inputs["encoder_padding_mask"] > 0, inputs["encoder_token_ids"], 7)
    np.testing.assert_allclose(model(dict(inputs, encoder_token_ids=padded)), logits, atol=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(inputs), logits, atol=1e-6)


def test_generation_with_keras_hub_samplers():
    """Greedy is the model's argmax position by position; beam search runs on the same cache."""
    keras.utils.set_random_seed(3)
    model = build_seq2seq(MODEL, 16)
    sources = np.random.default_rng(1).integers(4, 16, (4, 12)).astype("int32")
    greedy = summarize_ids(model, sources, 6, make_sampler("greedy"))
    decoder = np.zeros((4, 7), "int32")
    decoder[:, 0] = BOS_ID
    for i in range(1, 7):
        inputs = pair_inputs({"source": tf.constant(sources), "decoder": tf.constant(decoder)})
        decoder[:, i] = np.argmax(np.asarray(model(inputs))[:, i - 1], axis=-1)
    expected = decoder[:, 1:]
    for row, want in zip(greedy, expected, strict=True):
        end = list(want).index(EOS_ID) + 1 if EOS_ID in want else len(want)
        np.testing.assert_array_equal(row[:end], want[:end])
        assert (row[end:] == EOS_ID).all()  # after its end a row only holds EOS
    one_beam = summarize_ids(model, sources, 6, keras_hub.samplers.BeamSampler(num_beams=1))
    np.testing.assert_array_equal(one_beam, greedy)


def test_beam_search_finds_the_most_likely_summary():
    """With as many beams as there are 2-token prefixes, beam search over 3 tokens is exact:
    it returns the summary of highest log-probability, counted up to its end (EOS)."""
    vocab, length = 6, 3
    keras.utils.set_random_seed(5)
    model = build_seq2seq(MODEL, vocab)
    sources = np.random.default_rng(2).integers(4, vocab, (3, 12)).astype("int32")
    beams = summarize_ids(model, sources, length, keras_hub.samplers.BeamSampler(vocab**2))
    # Every summary: 3 tokens, EOS after the first EOS. Scored with the decoder, teacher-forced.
    every = np.array(list(itertools.product(range(vocab), repeat=length)), "int32")
    ended = np.cumsum(every == EOS_ID, axis=1) > 0
    every = np.unique(np.where(ended, EOS_ID, every), axis=0)
    counted = np.cumsum(every == EOS_ID, axis=1) - (every == EOS_ID) == 0  # up to the first EOS
    decoder = np.concatenate([np.full((len(every), 1), BOS_ID), every[:, :-1]], axis=1)
    for source, found in zip(sources, beams, strict=True):
        repeated = tf.constant(np.repeat(source[None], len(every), axis=0))
        logits = model(pair_inputs({"source": repeated, "decoder": tf.constant(decoder, tf.int32)}))
        log_p = np.asarray(tf.nn.log_softmax(logits, axis=-1))
        scores = (np.take_along_axis(log_p, every[..., None], axis=-1)[..., 0] * counted).sum(1)
        np.testing.assert_array_equal(found, every[np.argmax(scores)])


def _split(items, cuts):
    return [items[a:b] for a, b in itertools.pairwise([0, *cuts, len(items)])]


def test_summed_scores_equal_the_metrics_on_all_outputs_at_once():
    rng = random.Random(0)
    references, hypotheses = [], []
    for i in range(40):
        ref = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        hyp = [w if rng.random() < 0.6 else rng.choice(WORDS) for w in ref[: rng.randint(1, 9)]]
        references.append(" ".join(ref))
        hypotheses.append(" ".join(ref) if i % 7 == 0 else " ".join(hyp))
    hypotheses[30:34] = [""] * 4  # a shard of empty summaries only (keras-hub's BLEU fails there)
    shards = list(
        zip(_split(references, [5, 18, 30, 34]), _split(hypotheses, [5, 18, 30, 34]), strict=True)
    )
    total = Sums()
    for refs, hyps in shards:
        total.add(summary_sums(refs, hyps))
    scores = summary_scores(total.values)
    bleu = keras_hub.metrics.Bleu()
    bleu.update_state([[r] for r in references], hypotheses)
    assert scores["bleu"] == pytest.approx(float(bleu.result()), rel=1e-5)
    assert 0 < scores["bleu"] < 1
    for name, metric in (
        ("rouge1", keras_hub.metrics.RougeN(order=1)),
        ("rouge2", keras_hub.metrics.RougeN(order=2)),
        ("rougeL", keras_hub.metrics.RougeL()),
    ):
        metric.update_state(references, hypotheses)
        assert scores[name] == pytest.approx(float(metric.result()["f1_score"]), rel=1e-5), name
    exact = sum(h == r for r, h in zip(references, hypotheses, strict=True))
    assert exact >= 6 and scores["exact_match"] == pytest.approx(exact / 40)
    assert scores["examples"] == 40
    # BLEU is corpus-level: the mean of the shards' BLEU is not the BLEU of the whole.
    per_shard = [summary_scores(summary_sums(r, h))["bleu"] for r, h in shards]
    assert abs(np.mean(per_shard) - scores["bleu"]) > 0.01


def test_missing_or_equal_columns_are_caught_by_the_config_and_sources(tmp_path):
    from utils.config import resolve
    from utils.errors import UserError

    with pytest.raises(UserError, match=r"data\.source_column and data\.target_column must differ"):
        resolve("small", None, {"data.target_column": "source"}, task="seq2seq")
    with pytest.raises(UserError, match=r"model\.target_len must be > 0"):
        resolve("small", None, {"model.target_len": "0"}, task="seq2seq")
    (tmp_path / "t.txt").write_text("plain text\n")
    with pytest.raises(UserError, match=r"pairs must be a \.jsonl or \.csv file"):
        _prepare(tmp_path, tmp_path / "t.txt")
    (tmp_path / "late.jsonl").write_text(
        '{"source": "a b", "target": "a"}\n{"source": "c d", "summary": "c"}\n'
    )
    with pytest.raises(UserError, match=r"late\.jsonl:2: no 'target' key"):
        _prepare(tmp_path, tmp_path / "late.jsonl")
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


# --- under Horovod (tests/test_multiprocess.py runs these on 2 ranks) -----------------------


@pytest.fixture(scope="module")
def world():
    return distributed.init()


def _task(vocab=24):
    task = Seq2Seq(Config(task="seq2seq", model=MODEL))
    task.prepared = type("P", (), {"vocab_size": vocab})()
    return task


def _pair_batch(rng, rows, vocab=24):
    """(x, y, w) rows of unequal source and target lengths: padding differs between rows."""
    lengths = rng.integers(1, 7, rows)
    shards = Pairs(
        rng.integers(4, vocab, rows * 12),
        np.arange(0, rows * 12 + 1, 12)
        - np.concatenate([[0], np.cumsum(rng.integers(0, 9, rows))]),
        rng.integers(4, vocab, lengths.sum()),
        np.concatenate([[0], np.cumsum(lengths)]),
        source_len=12,
        target_len=6,
        batch_size=rows,
    )
    x, y = shards.gather(np.arange(rows))
    return x, y, np.ones(rows, "float32")


def _step(task, model, x, y, w):
    """One call of the train function model.fit runs, on the task's form of (x, y, w)."""
    dataset = tf.data.Dataset.from_tensors((x, y, w))
    batch = next(iter(task.fit_dataset(dataset, training=True)))
    model.make_train_function()
    return model.train_function(iter(tf.data.Dataset.from_tensors(batch)))


@pytest.mark.multiprocess
def test_np2_with_half_batches_equals_np1_with_the_whole_batch(world):
    """Rank r fed rows [rB, (r+1)B) of a 2B batch ends with the weights of one process fed all
    2B: the loss's divisor (every target position) is the same on each rank, so averaged
    gradients are the global batch's, whatever each half's padding."""
    from train import build_optimizer, compile_model

    task = _task()
    cfg = TrainConfig(
        optimizer="sgd", momentum=0.0, lr=0.5, schedule="constant", warmup_steps=0,
        clip_norm=0.0, weight_decay=0.0, xla=False,
    )  # fmt: skip
    keras.utils.set_random_seed(7)
    reference = task.build_model()  # one process: the plain optimizer, no allreduce
    reference.compile(optimizer=build_optimizer(cfg, cfg.lr, 10), **task.compile_args())
    reference.optimizer.build(reference.trainable_variables)
    distributed.broadcast_variables(reference.trainable_variables)
    replica = task.build_model()
    compile_model(task, replica, cfg, cfg.lr, 10)
    replica.set_weights(reference.get_weights())
    initial = [v.numpy() for v in reference.get_layer("token_embedding").trainable_variables]
    rng = np.random.default_rng(3)
    rows = 8 // world.size
    for _ in range(3):
        x, y, w = _pair_batch(rng, 8)
        _step(task, reference, x, y, w)  # one process, the whole batch
        mine = slice(world.rank * rows, (world.rank + 1) * rows)
        _step(task, replica, {k: v[mine] for k, v in x.items()}, y[mine], w[mine])
    for a, b in zip(reference.trainable_variables, replica.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    embedding = reference.get_layer("token_embedding").trainable_variables[0]
    assert not np.allclose(embedding.numpy(), initial[0])  # trained: not two idle models


@pytest.mark.multiprocess
def test_evaluation_is_exact_across_ranks(world, tmp_path):
    """The task's evaluation on 2 ranks' shards equals one process's on the whole split."""
    path = write_pairs(tmp_path / "pairs.jsonl", n=160)
    prepared = _prepare(tmp_path, path, test_fraction=0.2)
    task = Seq2Seq(Config(task="seq2seq", model=MODEL, train=TrainConfig(batch_size=4, xla=False)))
    task.prepared = prepared
    keras.utils.set_random_seed(11)
    model = task.build_model()
    # A few steps on the training split (the same on every rank): summaries that score > 0.
    model.compile(optimizer=keras.optimizers.Adam(1e-2), **task.compile_args())
    train = Pairs(*encoded_pairs(prepared, "train"), 12, 6, 16)
    stream = task.fit_dataset(train.train_stream(seed=0, epoch=0, start_step=0, end_epoch=3), True)
    model.fit(stream, steps_per_epoch=3 * train.steps_per_epoch, verbose=0, shuffle=False)
    distributed.broadcast_variables(model.trainable_variables)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    assert task.shards("test").num_samples % 8  # shards of unequal size, batches padded
    results = task.evaluate_split(model, tokenizer, "test")  # this rank's share, then sums
    whole = Pairs(*encoded_pairs(prepared, "test"), 12, 6, 4)  # one process: every pair
    local = Sums()
    eval_fn = make_eval_fn(task, model, xla=False)
    for x, y, w in whole.eval_dataset():
        local.add({k: v.numpy() for k, v in eval_fn(x, y, w).items()})
    everything, summaries = summarize_shard(model, tokenizer, whole, MODEL.target_len)
    _, targets = pair_texts(prepared, "test")
    assert everything == list(range(len(targets)))
    assert results["tokens"] == local.values["count"]
    assert results["loss"] == pytest.approx(local.values["loss_sum"] / local.values["count"])
    expected = summary_scores(summary_sums(targets, summaries))
    assert expected["rouge1"] > 0
    for name in (*SCORES, "examples"):
        assert results[name] == pytest.approx(expected[name]), name


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "columns", "flags", "message"),
    [
        (
            "jsonl",
            ("source", "summary"),
            [],
            "no 'target' key (keys: source, summary); set --data.target_column",
        ),
        (
            "csv",
            ("body", "target"),
            [],
            "no 'source' column (columns: body, target); set --data.source_column",
        ),
        (
            "jsonl",
            ("body", "target"),
            ["--data.source_column=body", "--data.target_column=title"],
            "no 'title' key (keys: body, target); set --data.target_column",
        ),
    ],
)
def test_a_missing_column_is_one_line_and_exit_code_2(tmp_path, fmt, columns, flags, message):
    path = write_pairs(tmp_path / f"pairs.{fmt}", n=20, fmt=fmt, columns=columns)
    run_dir = tmp_path / "runs" / "r"
    result = run_cli(
        "--task", "seq2seq", "--data", str(path), *flags, "--run-dir", str(run_dir),
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"main.py: error: {path}:1: {message}"], result.stderr
    assert "tensorflow" not in result.stderr.lower()  # before TensorFlow was imported
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written


@pytest.mark.slow
@requires_horovod
def test_tiny_run_under_horovodrun_np2_then_generate(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=400)
    run_dir = tmp_path / "runs" / "s2s"
    result = horovodrun_cli(
        2, "--task", "seq2seq", "--preset", "tiny", "--data", str(data),
        "--data.vocab_size=48", "--model.target_len=6", "--model.seq_len=24",
        "--train.epochs=2", "--train.steps_per_epoch=12", "--train.xla=false",
        "--run-dir", str(run_dir), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    meta = json.loads((run_dir / "data.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world"]["size"] == 2 and config["config"]["model"]["target_len"] == 6
    assert metrics["test_examples"] == meta["pairs"]["test"] > 0
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert 0 < metrics["test_loss"] < math.log(48)
    for name in ("accuracy", *SCORES):
        assert 0 <= metrics[f"test_{name}"] <= 1, name
    baseline = metrics["test_baseline_lead"]
    assert baseline["words"] in BASELINE_WORDS and 0 < baseline["rougeL"] <= 1
    # rank 0 alone prints; the model's scores beside the baseline's
    assert "[1]<stdout>:" not in result.stdout and "first " in result.stdout
    # Targets longer than target_len are cut and counted; every 10th target is 13 words.
    tokenizer = load_tokenizer(run_dir / "tokenizer.model")
    prepared = load_prepared(config["data"]["dir"])
    for split in ("train", "val", "test"):
        _, targets = pair_texts(prepared, split)
        cut = sum(len(ids) > 6 for ids in tokenizer.tokenize(targets))
        assert meta["truncated"]["target"][split] == cut
    assert sum(meta["truncated"]["target"].values()) >= 35
    generated = run_cli(
        "generate", "--run-dir", str(run_dir), "--prompt", "ka lo mi re su", cwd=tmp_path
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    line = generated.stdout.strip().splitlines()[-1]
    prompt, _, summary = line.partition("\t")  # the prompt, a tab, its summary
    assert prompt == "ka lo mi re su" and summary.strip(), line
    beam = run_cli(
        "generate", "--run-dir", str(run_dir), "--prompt", "ka lo mi re su", "--sampler", "beam",
        cwd=tmp_path,
    )  # fmt: skip
    assert beam.returncode == 0, beam.stderr[-3000:]
    assert beam.stdout.strip().splitlines()[-1].partition("\t")[2].strip()
    exported = run_cli("export", "--run-dir", str(run_dir), cwd=tmp_path, timeout=60)
    assert exported.returncode == 2 and "a --task seq2seq run" in exported.stderr
    assert not (run_dir / "export").exists()
