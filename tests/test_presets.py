"""Starting from keras-hub presets (--init-from-preset): bundles, tokenizers, models, CLI, Horovod.

Nothing can be downloaded here, so the presets are built by keras-hub
itself: a tiny random GPT-2 backbone with a byte-level BPE vocabulary and
merges written below, and a tiny BERT backbone with a WordPiece vocabulary
learned from the test's texts (`compute_word_piece_vocabulary`), each saved
with `save_to_preset`.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from data.load import document_row
from data.prepare import load_tokenizer, special_ids
from tests.conftest import run_cli, write_corpus, write_labeled
from utils import distributed, presets
from utils.errors import UserError

MERGES = ["k a", "l o", "m i", "r e", "s u", "t a", "n e", "p o", "Ġ k", "Ġ l", "Ġ m", "Ġ t"]
MAX_LEN = 48  # the backbones' longest input: a longer model.seq_len is capped to it


TINY = {"hidden_dim": 32, "intermediate_dim": 64, "max_sequence_length": MAX_LEN}


def build_gpt2_preset(root: pathlib.Path) -> pathlib.Path:
    """A GPT-2-style preset: 256 byte characters, a few merges, <|endoftext|>; 2 small layers."""
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    from models.presets import save_preset

    vocabulary: dict[str, int] = {}
    for token in [*bytes_to_unicode()[1], *(m.replace(" ", "") for m in MERGES), "<|endoftext|>"]:
        vocabulary.setdefault(token, len(vocabulary))
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=MERGES)
    return save_preset(keras_hub.models.GPT2Backbone, tokenizer, root, seed=0, **TINY)


def build_bert_preset(root: pathlib.Path, texts: list[str]) -> pathlib.Path:
    """A BERT-style preset: a WordPiece vocabulary learned from `texts`; 2 small layers."""
    from models.presets import save_bert_preset

    return save_bert_preset(texts, root, vocabulary_size=200, seed=1, **TINY)


def make_presets(root: pathlib.Path) -> dict[str, pathlib.Path]:
    corpus = write_corpus(root / "corpus.txt")
    labeled = write_labeled(root / "labeled.jsonl")
    texts = [json.loads(line)["text"] for line in labeled.read_text().splitlines()]
    return {
        "corpus": corpus,
        "labeled": labeled,
        "gpt2": build_gpt2_preset(root / "gpt2"),
        "bert": build_bert_preset(root / "bert", texts),
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, pathlib.Path]:
    return make_presets(tmp_path_factory.mktemp("presets"))


def _bundle(preset: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / presets.BUNDLE_NAME
    path.write_bytes(presets.bundle(preset, {"handle": str(preset)}))
    return path


# --- bundles and tokenizers ---------------------------------------------------------------


def test_a_bundle_holds_the_preset_without_weights_and_gives_its_tokenizer(made, tmp_path):
    bundle = _bundle(made["gpt2"], tmp_path)
    files = presets.read_bundle(bundle)["files"]
    assert "model.weights.h5" in presets.preset_files(made["gpt2"])
    assert set(files) == {f for f in presets.preset_files(made["gpt2"]) if f != "model.weights.h5"}
    lines = made["corpus"].read_text().split("\n\n")[:20]
    original = keras_hub.tokenizers.Tokenizer.from_preset(str(made["gpt2"]))
    loaded = load_tokenizer(bundle)
    for line in lines:
        assert list(np.asarray(loaded.tokenize(line))) == list(np.asarray(original.tokenize(line)))
    unpacked = presets.unpack(bundle, tmp_path / "unpacked")
    assert presets.files_sha256(unpacked) != presets.files_sha256(made["gpt2"])  # no weights
    (unpacked / "model.weights.h5").write_bytes((made["gpt2"] / "model.weights.h5").read_bytes())
    assert presets.files_sha256(unpacked) == presets.files_sha256(made["gpt2"])


def test_special_ids_come_from_the_presets_tokenizer(made, tmp_path):
    gpt2 = load_tokenizer(_bundle(made["gpt2"], tmp_path / "g"))
    end = gpt2.token_to_id("<|endoftext|>")
    # GPT-2's pad id (0) is the ordinary token "!": nothing may be masked by its value.
    assert special_ids(gpt2) == {"pad": None, "unk": None, "bos": end, "eos": end}
    bert = load_tokenizer(_bundle(made["bert"], tmp_path / "b"))
    ids = special_ids(bert)
    assert (ids["pad"], ids["bos"], ids["eos"]) == tuple(
        bert.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")
    )


def test_a_roberta_preset_pads_with_its_own_pad_id(tmp_path):
    """RoBERTa's <s> is id 0 and <pad> id 1: rows open, close and pad with its ids."""
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    from models.presets import backbone_of, build, save_preset
    from models.tasks.classify import framing
    from utils.config import Config

    vocabulary: dict[str, int] = {}
    for token in ["<s>", "<pad>", "</s>", "<mask>", *bytes_to_unicode()[1], "ka"]:
        vocabulary.setdefault(token, len(vocabulary))
    tokenizer = keras_hub.models.RobertaTokenizer(vocabulary=vocabulary, merges=["k a"])
    preset = save_preset(keras_hub.models.RobertaBackbone, tokenizer, tmp_path / "roberta", **TINY)
    bundle = _bundle(preset, tmp_path / "bundle")
    ids = special_ids(load_tokenizer(bundle))
    assert (ids["pad"], ids["bos"], ids["eos"]) == (1, 0, 2)
    config = Config(task="classify")
    config.train.init_from_preset = str(preset)
    frame = framing(config, ids)
    row = document_row([40, 41, 42], 6, **frame)
    assert list(row) == [0, 40, 41, 42, 2, 1]
    model = build(bundle, "classify", num_classes=2)
    assert "segment_ids" not in backbone_of(model).input
    logits = model({"token_ids": row[None], "padding_mask": (row != 1)[None].astype("int32")})
    assert logits.shape == (1, 2)


def test_documents_are_framed_as_in_pretraining():
    assert list(document_row([5, 6], 6, pad_id=0, start_id=2, end_id=3)) == [2, 5, 6, 3, 0, 0]
    assert list(document_row([5, 6, 7, 8, 9], 5, 1, 2, 3)) == [2, 5, 6, 7, 3]  # cut, still ends
    assert list(document_row([5, 6, 7], 2)) == [5, 6]  # this project's own rows: unchanged


# --- models -----------------------------------------------------------------------------------


def test_the_causal_lm_is_the_presets_model_with_its_weights(made, tmp_path):
    from models.presets import backbone_of, build, load_weights

    model = build(_bundle(made["gpt2"], tmp_path), "causal_lm")
    reference = keras_hub.models.CausalLM.from_preset(str(made["gpt2"]), preprocessor=None)
    before = [w.numpy() for w in backbone_of(model).weights]
    load_weights(model, str(made["gpt2"]))
    after = backbone_of(model).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    for mine, theirs in zip(after, reference.backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    ids = np.random.default_rng(0).integers(0, 200, (2, 16)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(model(inputs), reference(inputs), atol=1e-6)


def test_the_classifier_is_the_presets_backbone_with_a_new_head(made, tmp_path):
    from models.presets import backbone_of, build, load_weights

    model = build(_bundle(made["bert"], tmp_path), "classify", num_classes=3)
    load_weights(model, str(made["bert"]))
    reference = keras_hub.models.Backbone.from_preset(str(made["bert"]))
    for mine, theirs in zip(backbone_of(model).get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    ids = np.array([[2, 9, 10, 3, 0, 0]], "int32")
    logits = model({"token_ids": ids, "padding_mask": (ids != 0).astype("int32")})
    assert logits.shape == (1, 3)


def test_a_backbone_without_the_tasks_model_is_refused(made, tmp_path):
    from models.presets import build

    with pytest.raises(UserError, match="BertBackbone does not fit --task causal_lm"):
        build(_bundle(made["bert"], tmp_path), "causal_lm")


# --- the command line -----------------------------------------------------------------------


def _no_traces(work: pathlib.Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name in ("runs", "prepared"))


def test_bad_presets_fail_in_one_line_with_nothing_written(made, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(made["gpt2"], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    damaged = tmp_path / "damaged"
    shutil.copytree(made["gpt2"], damaged)
    (damaged / "config.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    corpus, gpt2 = str(made["corpus"]), str(made["gpt2"])
    cases = [
        (["--init-from-preset", str(tmp_path / "missing")], "no such directory"),
        (["--init-from-preset", str(empty)], "not a keras-hub preset directory"),
        (["--init-from-preset", str(no_tokenizer)], "no tokenizer.json"),
        (["--init-from-preset", str(damaged)], "config.json cannot be read as JSON"),
        (["--init-from-preset", str(made["bert"])], "needs a backbone with a keras-hub CausalLM"),
        (["--task", "mlm", "--init-from-preset", str(made["bert"])], "is for --task causal_lm"),
        (
            ["--task", "classify", "--data", str(made["labeled"]), "--init-from-preset", gpt2],
            "--task classify needs a backbone with a keras-hub TextClassifier",
        ),
    ]
    for args, message in cases:
        work = tmp_path / f"work{len(list(tmp_path.iterdir()))}"
        work.mkdir()
        result = run_cli("--preset", "tiny", "--data", corpus, *args, cwd=work)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr[-2000:])
        assert _no_traces(work) == [], args


@pytest.mark.slow
def test_fine_tune_a_gpt2_preset_then_evaluate_generate_and_resume_without_it(made, tmp_path):
    preset = tmp_path / "my_gpt2"
    shutil.copytree(made["gpt2"], preset)
    digest = presets.files_sha256(preset)
    run = tmp_path / "runs" / "lm"
    common = ("--preset", "tiny", "--data", str(made["corpus"]), "--train.xla=false")
    result = run_cli(
        *common,
        "--init-from-preset",
        str(preset),
        "--model.seq_len=64",
        "--train.epochs=2",
        "--train.max_steps=6",
        "--train.checkpoint_every=3",
        "--run-dir",
        str(run),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model.seq_len 64 -> {MAX_LEN}" in result.stdout
    record = json.loads((run / "config.json").read_text())
    assert record["init_from_preset"]["handle"] == str(preset)
    assert record["init_from_preset"]["sha256"] == digest
    assert record["init_from_preset"]["backbone"] == "GPT2Backbone"
    assert record["config"]["model"]["seq_len"] == MAX_LEN
    assert (run / "preset.json").is_file() and not (run / "tokenizer.model").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and np.isfinite(metrics["test_perplexity"])

    shutil.rmtree(preset)  # from here on the run directory is all there is
    evaluated = run_cli("evaluate", "--run-dir", str(run), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["test_perplexity"] == pytest.approx(
        metrics["test_perplexity"], rel=1e-5
    )
    generated = run_cli("generate", "--run-dir", str(run), "--prompt", "Kalo", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("Kalo")
    beam = run_cli(
        "generate", "--run-dir", str(run), "--prompt", "Ka", "--sampler", "beam", cwd=tmp_path
    )
    assert beam.returncode == 2 and "is for seq2seq runs" in beam.stderr, beam.stderr[-2000:]
    resumed = run_cli(
        *common,
        "--run-dir",
        str(run),
        "--resume",
        "--train.epochs=2",
        "--train.max_steps=9",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at" in resumed.stdout
    assert json.loads((run / "metrics.json").read_text())["steps"] == 9


@pytest.mark.slow
def test_fine_tune_a_bert_preset_to_classify_then_predict_and_export(made, tmp_path):
    import tensorflow_text  # noqa: F401  (the exported graph's ops)

    from models.inference import load_run, predict
    from serving.export import export_run

    run = tmp_path / "runs" / "cls"
    result = run_cli(
        "--task",
        "classify",
        "--preset",
        "tiny",
        "--data",
        str(made["labeled"]),
        "--init-from-preset",
        str(made["bert"]),
        "--train.xla=false",
        "--train.epochs=3",
        "--run-dir",
        str(run),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.6, metrics  # three topics of distinct words
    texts = ["message header inbox reply sender", "coroutine await callback task future"]
    loaded = load_run(run)
    predictions = predict(loaded, texts)
    assert [p[0] for p in predictions] == ["mail", "loop"]
    exported = tf.saved_model.load(str(export_run(str(run), out=str(tmp_path / "export"))))
    out = exported.signatures["serving_default"](texts=tf.constant(texts))
    np.testing.assert_allclose(
        out["probabilities"].numpy(),
        [[p[2][label] for label in loaded.labels] for p in predictions],
        atol=1e-5,
    )


# --- under Horovod (tests/test_multiprocess.py runs these on 2 ranks) -----------------------


@pytest.fixture(scope="module")
def world():
    return distributed.init()


class FirstStepWeights(keras.callbacks.Callback):
    """The backbone's weights when the first step begins (after Horovod's broadcast)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.weights_seen = backbone, None

    def on_train_batch_begin(self, batch, logs=None):
        if self.weights_seen is None:
            self.weights_seen = self.backbone.get_weights()


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "task, preset, data",
    [("causal_lm", "gpt2", "corpus.txt"), ("classify", "bert", "labeled.jsonl")],
)
def test_preset_fine_tunes_under_horovod_from_rank_0s_reading(world, task, preset, data):
    """Rank 0 alone reads the preset (bundle and weights); every rank starts from the preset's
    weights and the ranks end identical."""
    import tempfile

    import main
    import train
    from models.presets import backbone_of
    from models.tasks import make_task
    from utils.config import resolve
    from utils.run_dir import RunDir

    if world.size < 2:
        pytest.skip("needs 2 ranks: runs under horovodrun -np 2 in test_multiprocess.py")

    def make() -> str:
        root = pathlib.Path(tempfile.mkdtemp(prefix="presets-"))  # the ranks share this host
        make_presets(root)
        return str(root)

    root = pathlib.Path(distributed.chief_runs(make, "make_presets"))
    try:
        overrides = {
            "data.path": str(root / data),
            "data.prepared_dir": str(root / "prepared"),
            "train.init_from_preset": str(root / preset),
            "train.epochs": "1",
            "train.max_steps": "3",
            "train.xla": "false",
        }
        config = resolve("tiny", None, overrides, task)
        bundle = main.fetch_preset(config)
        job = make_task(config)
        main.prepare_data(job, world, bundle)
        run_dir = RunDir(root / "run")
        distributed.chief_runs(lambda: run_dir.create(False), "run_dir")
        built = job.build_model()
        probe = FirstStepWeights(backbone_of(built))
        job.build_model = lambda: built  # so the probe sees the model that trains
        model, final = train.run_training(job, run_dir, False, {}, callbacks=[probe])
        assert final["steps"] == 3
        expected = keras_hub.models.Backbone.from_preset(str(root / preset)).get_weights()
        for seen, preset_weight in zip(probe.weights_seen, expected, strict=True):
            np.testing.assert_array_equal(seen, preset_weight)  # on every rank
        trained = backbone_of(model).get_weights()
        assert any(not np.array_equal(a, b) for a, b in zip(trained, expected, strict=True))
        every = distributed.allgather_object(trained, name="trained_weights")
        for a, b in zip(every[0], every[1], strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        distributed.chief_runs(lambda: shutil.rmtree(root, ignore_errors=True), "cleanup")
