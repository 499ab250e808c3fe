"""Masked-LM pretraining and text classification: data, model, init-from, baseline, predict."""

import csv
import json

import keras
import numpy as np
import pytest

from data.labeled import assign_groups, documents, prepare_labeled, texts
from data.load import Documents, Windows
from models.encoder import BACKBONE_NAME, EncoderBackbone, build_backbone, build_classifier
from models.tasks import MASK_ID, Classify, MaskedLM
from tests.conftest import TOPICS, run_cli, write_labeled
from utils.config import Config, DataConfig, ModelConfig
from utils.errors import UserError

ENCODER = ModelConfig(n_layers=1, n_heads=2, d_model=16, d_ff=32, seq_len=24, dropout=0.0)


def _prepare(tmp_path, path, **kw):
    cfg = DataConfig(
        path=str(path), vocab_size=kw.pop("vocab_size", 60), prepared_dir=str(tmp_path / "p"), **kw
    )
    return prepare_labeled(cfg, progress=False, log=lambda *_: None)


def test_masking_statistics():
    config = Config(task="mlm", model=ModelConfig(seq_len=64))
    task = MaskedLM(config)
    task.prepared = type("P", (), {"vocab_size": 500})()
    tokens = np.random.default_rng(0).integers(4, 500, 64 * 400 + 1).astype(np.uint16)
    selected = replaced = kept = total = 0
    for inputs, targets, weights in task.transform(
        Windows(tokens, 64, 50).eval_dataset(), training=True
    ):
        positions, w = inputs["mask_positions"].numpy(), weights.numpy() > 0
        originals = np.take_along_axis(np.asarray(inputs["token_ids"]), positions, axis=1)
        truth = targets.numpy()
        selected += w.sum()
        replaced += ((originals == MASK_ID) & w).sum()
        kept += ((originals == truth) & w).sum()
        total += inputs["token_ids"].shape[0] * 64
    assert selected / total == pytest.approx(0.15, abs=0.01)
    assert replaced / selected == pytest.approx(0.8, abs=0.03)
    assert kept / selected == pytest.approx(0.1, abs=0.03)


def test_encoder_config_round_trip_and_classifier_shapes(tmp_path):
    backbone = build_backbone(ENCODER, 50)
    assert EncoderBackbone.from_config(backbone.get_config()).get_config() == backbone.get_config()
    model = build_classifier(backbone, 3)
    ids = np.random.default_rng(0).integers(1, 50, (4, 24)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    assert tuple(model(inputs).shape) == (4, 3)
    model.save(tmp_path / "c.keras")
    np.testing.assert_allclose(
        keras.saving.load_model(tmp_path / "c.keras")(inputs), model(inputs), atol=1e-6
    )


def test_labels_and_splits(tmp_path):
    extra = [
        {"text": "duplicate text here", "label": "mail"},
        {"text": "duplicate text here", "label": "loop"},
        {"text": "no label at all", "label": ""},
        {"text": "a numeric label", "label": 7},
    ]
    prepared = _prepare(tmp_path, write_labeled(tmp_path / "d.jsonl", extra=extra))
    meta = prepared.meta
    assert meta["labels"] == sorted(meta["labels"]) and {"file", "loop", "mail"} <= set(
        meta["labels"]
    )
    assert meta["skipped"] == {"duplicate text": 1, "blank label": 1}
    seen = {}
    for split in ("train", "val", "test"):
        ids, offsets, labels = documents(prepared, split)
        split_texts, names = texts(prepared, split)
        assert len(offsets) == len(labels) + 1 == len(split_texts) + 1 and offsets[-1] == len(ids)
        assert [meta["labels"][i] for i in labels] == names  # ids -> names round trip
        for text in split_texts:
            assert text not in seen, "the same text on two sides"
            seen[text] = split
    # the label seen once ("7") has fewer than 3 groups: it stays in training, with a warning
    assert any("no documents of class(es) 7" in w for w in meta["warnings"])


def test_group_assignment_is_stratified_deterministic_and_grouped():
    groups = {label: [f"{label}/{i}.py" for i in range(20)] for label in ("a", "b", "c")}
    split = assign_groups(groups, seed=0, val_fraction=0.1, test_fraction=0.1)
    assert split == assign_groups(groups, seed=0, val_fraction=0.1, test_fraction=0.1)
    for label in groups:
        mine = [split[g] for g in groups[label]]
        assert mine.count("test") == mine.count("val") == 2 and mine.count("train") == 16
    assert split != assign_groups(groups, seed=1, val_fraction=0.1, test_fraction=0.1)


def test_labeled_input_errors(tmp_path):
    (tmp_path / "nolabel.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(UserError, match=r"nolabel\.jsonl:1: no 'label' key"):
        _prepare(tmp_path, tmp_path / "nolabel.jsonl")
    (tmp_path / "text.txt").write_text("plain text\n")
    with pytest.raises(UserError, match=r"labelled data must be a \.jsonl or \.csv file"):
        _prepare(tmp_path, tmp_path / "text.txt")
    (tmp_path / "badlabel.jsonl").write_text('{"text": "hello", "label": [1, 2]}\n')
    with pytest.raises(UserError, match="'label' must be a string or an integer label, got list"):
        _prepare(tmp_path, tmp_path / "badlabel.jsonl")
    (tmp_path / "one.csv").write_text("text,label\nfirst,a\nsecond,a\n")
    with pytest.raises(UserError, match="at least 2 labels"):
        _prepare(tmp_path, tmp_path / "one.csv")


def test_classify_task_stats_use_class_weights():
    config = Config(task="classify")
    task = Classify(config)
    task.prepared = type("P", (), {"meta": {"labels": ["a", "b"], "class_weights": [0.5, 2.0]}})()
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], "float32"))
    model = lambda inputs, training: logits  # noqa: E731
    stats = {
        k: np.asarray(v)
        for k, v in task.stats(
            model,
            np.ones((3, 4), "int32"),
            np.array([0, 1, 1]),
            np.array([1.0, 1.0, 0.0], "float32"),
            False,
        ).items()
    }
    assert stats["loss_sum"] == pytest.approx(0.5 * -np.log(0.9) + 2.0 * -np.log(0.8), rel=1e-5)
    assert (
        stats["loss_weight"] == pytest.approx(2.5) and stats["count"] == 2 and stats["correct"] == 2
    )
    np.testing.assert_array_equal(stats["confusion"], [[1, 0], [0, 1]])


@pytest.fixture(scope="module")
def pretrained_and_finetuned(tmp_path_factory):
    """A tiny MLM run on a labelled corpus's text, and a classifier started from it."""
    work = tmp_path_factory.mktemp("cls")
    data = write_labeled(work / "topics.jsonl", per_class=150)
    common = (
        "--preset",
        "tiny",
        "--train.epochs=2",
        "--train.steps_per_epoch=10",
        "--data.vocab_size=60",
        "--model.seq_len=24",
    )
    mlm = run_cli(
        "--task", "mlm", *common, "--data", str(data), "--run-dir", str(work / "mlm"), cwd=work
    )
    assert mlm.returncode == 0, mlm.stderr[-3000:]
    cls = run_cli(
        "--task",
        "classify",
        *common,
        "--data",
        str(data),
        "--init-from",
        str(work / "mlm"),
        "--run-dir",
        str(work / "cls"),
        cwd=work,
    )
    assert cls.returncode == 0, cls.stderr[-3000:]
    return work, cls.stdout


@pytest.mark.slow
def test_init_from_copies_the_encoder_and_trains_a_new_head(pretrained_and_finetuned, tmp_path):
    from models.inference import load_run

    work, _ = pretrained_and_finetuned
    pretrained = load_run(work / "mlm").model.get_layer(BACKBONE_NAME)
    config = json.loads((work / "cls" / "config.json").read_text())
    assert config["config"]["train"]["init_from"] == str(work / "mlm")
    assert config["config"]["model"]["seq_len"] == 24
    # Build the classifier as training does and apply init-from: the encoder is the pretrained one.
    from train import init_from

    model = build_classifier(
        build_backbone(ModelConfig(**config["config"]["model"]), pretrained.vocabulary_size), 3
    )
    head_before = model.get_layer("classification_head").get_weights()[0].copy()
    init_from(model, str(work / "mlm"))
    for a, b in zip(
        model.get_layer(BACKBONE_NAME).get_weights(), pretrained.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        model.get_layer("classification_head").get_weights()[0], head_before
    )
    assert (work / "cls" / "tokenizer.model").read_bytes() == (
        work / "mlm" / "tokenizer.model"
    ).read_bytes()


@pytest.mark.slow
def test_classification_report_and_baseline_on_the_same_split(pretrained_and_finetuned):
    work, stdout = pretrained_and_finetuned
    metrics = json.loads((work / "cls" / "metrics.json").read_text())
    model_support = {k: v["support"] for k, v in metrics["test_per_class"].items()}
    baseline_support = {
        k: v["support"] for k, v in metrics["test_baseline_tfidf"]["per_class"].items()
    }
    assert (
        model_support == baseline_support
        and sum(model_support.values()) == metrics["test_examples"]
    )
    confusion = np.array(metrics["test_confusion_matrix"])
    assert confusion.shape == (3, 3) and confusion.sum() == metrics["test_examples"]
    assert np.trace(confusion) / confusion.sum() == pytest.approx(metrics["test_accuracy"])
    assert "baseline p" in stdout and "macro avg" in stdout
    assert (work / "cls" / "confusion_test.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_predict_output(pretrained_and_finetuned):
    work, _ = pretrained_and_finetuned
    result = run_cli(
        "predict", "--run-dir", str(work / "cls"), "--text", "message header inbox", cwd=work
    )
    assert result.returncode == 0, result.stderr[-2000:]
    label, probability, text = result.stdout.strip().split("\t")
    assert label in TOPICS and 0 < float(probability) <= 1 and text == "message header inbox"
    for suffix in (".csv", ".jsonl"):
        out = work / f"pred{suffix}"
        result = run_cli(
            "predict",
            "--run-dir",
            str(work / "cls"),
            "--data",
            str(work / "topics.jsonl"),
            "--out",
            str(out),
            cwd=work,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        if suffix == ".csv":
            with open(out) as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 450
        for row in rows[:5]:
            probabilities = [float(row[f"p_{k}"]) for k in sorted(TOPICS)]
            assert sum(probabilities) == pytest.approx(1, abs=1e-4)
            assert row["label"] == sorted(TOPICS)[int(np.argmax(probabilities))]
    bad = run_cli("predict", "--run-dir", str(work / "mlm"), "--text", "x", cwd=work)
    assert bad.returncode == 2 and "predict needs a --task classify run" in bad.stderr


@pytest.mark.slow
def test_evaluating_on_data_with_other_labels_is_an_error(pretrained_and_finetuned):
    work, _ = pretrained_and_finetuned
    other = write_labeled(
        work / "other.jsonl",
        per_class=60,
        seed=3,
        extra=[{"text": f"unknown topic {i}", "label": "zzz"} for i in range(60)],
    )
    result = run_cli("evaluate", "--run-dir", str(work / "cls"), "--data", str(other), cwd=work)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "differ from the model's ['file', 'loop', 'mail']" in result.stderr


def test_documents_pad_and_truncate():
    ids = np.arange(1, 11, dtype=np.uint16)
    docs = Documents(ids, np.array([0, 3, 10]), np.array([1, 0]), seq_len=5, batch_size=2)
    x, y = docs.gather(np.array([0, 1]))
    np.testing.assert_array_equal(x, [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(y, [1, 0])
