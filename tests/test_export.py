"""main.py export: a SavedModel that takes raw strings and needs no Python of this project.

The exports are loaded in a child process that imports only tensorflow and
tensorflow_text, and must give the token ids the Python inference code gives.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

from tests.conftest import CHILD_ENV, PYTHON, run_cli, write_labeled

PROMPTS = [
    "Return the",
    "The",
    "Raise ValueError if the value is not present.",
    # Longer than seq_len, and not periodic: its first and last seq_len tokens differ.
    "Return the number of items in a list; raise ValueError when the value is missing, "
    "otherwise parse the email message header and write it to the file in the directory "
    "given by path, then close the buffer and open the next one for reading",
    "Parse an email message and",
]

# Runs in a fresh interpreter: tensorflow + tensorflow_text only (no keras-hub, no project code).
CHILD = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops
calls = json.loads(sys.stdin.read())
loaded = {d: tf.saved_model.load(d) for d in sorted({call["dir"] for call in calls})}
out = []
for call in calls:
    fn = loaded[call["dir"]].signatures[call["signature"]]
    result = fn(**{k: tf.constant(v) for k, v in call["inputs"].items()})
    out.append({k: v.numpy().tolist() for k, v in result.items()})
project = {"keras_hub", "main", "train", "evaluate", "models", "data", "utils", "serving"}
imported = sorted(project & set(sys.modules))
print(json.dumps({"results": out, "imported": imported}, default=bytes.decode))
"""


def load_and_call(calls: list[dict]) -> dict:
    """Run `calls` ({dir, signature, inputs}) in a child with only TensorFlow and tf-text."""
    env = {k: v for k, v in {**os.environ, **CHILD_ENV}.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [PYTHON, "-c", CHILD],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def valid(row: list[int]) -> list[int]:
    """A token_ids row without its -1 padding (which only ever trails)."""
    n = row.index(-1) if -1 in row else len(row)
    assert all(t == -1 for t in row[n:])
    return row[:n]


@pytest.fixture(scope="module")
def lm_exports(tiny_run, tmp_path_factory) -> dict[str, pathlib.Path]:
    """The tiny causal LM exported as float32 (by the command line) and int8."""
    from serving.export import export_run

    work = tmp_path_factory.mktemp("export")
    result = run_cli("export", "--run-dir", str(tiny_run), "--out", str(work / "f32"), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"exported: {work / 'f32'}"
    export_run(tiny_run, work / "int8", "int8")
    return {"float32": work / "f32", "int8": work / "int8"}


@pytest.mark.slow
def test_causal_lm_export_matches_python_inference(tiny_run, lm_exports):
    from data.prepare import EOS_ID
    from models.generation import generate_ids, make_sampler
    from models.inference import load_run

    f32, int8 = lm_exports["float32"], lm_exports["int8"]
    manifest = json.loads((f32 / "serving.json").read_text())
    assert manifest["task"] == "causal_lm" and manifest["quantize"] is None
    assert manifest["signatures"]["generate"]["inputs"] == {
        "prompts": "string",
        "max_new_tokens": "int32",
        "seed": "int32",
    }
    assert manifest["signatures"]["serving_default"]["outputs"] == {
        "completions": "string",
        "token_ids": "int32",
    }
    int8_manifest = json.loads((int8 / "serving.json").read_text())
    assert int8_manifest["quantize"] == "int8" and int8_manifest["quantized_layers"]["Dense"] > 0
    size = {
        k: (d / "variables").stat().st_size
        + sum(f.stat().st_size for f in (d / "variables").iterdir())
        for k, d in lm_exports.items()
    }
    assert size["int8"] < 0.7 * size["float32"]

    gen = {"dir": str(f32), "signature": "generate"}
    alone = [
        {**gen, "inputs": {"prompts": ["Return the"], "max_new_tokens": [12], "seed": [s]}}
        for s in (7, 7, 8, 9, 10, 11)
    ]
    batch = {
        "prompts": ["The", "Return the", "", "Parse an email"],
        "max_new_tokens": [3, 12, 0, 40],
        "seed": [-1, 7, 5, 3],
    }
    child = load_and_call(
        [
            {"dir": str(f32), "signature": "serving_default", "inputs": {"prompts": PROMPTS}},
            {"dir": str(int8), "signature": "serving_default", "inputs": {"prompts": PROMPTS}},
            *alone,
            {**gen, "inputs": batch},
        ]
    )
    assert child["imported"] == []  # nothing but TensorFlow and tensorflow-text ran
    greedy, greedy_int8, *sampled, batched = child["results"]

    # Greedy: the same ids (and text) as the Python generation loop, prompt by prompt.
    run = load_run(tiny_run)
    n = manifest["default_max_new_tokens"]
    total = 0
    for i, prompt in enumerate(PROMPTS):
        ids = [int(t) for t in run.tokenizer.tokenize(prompt)]
        new = generate_ids(run.model, np.array([ids]), n, make_sampler(), run.seq_len, EOS_ID)
        new = [int(t) for t in new[0]]
        new = new[: new.index(EOS_ID)] if EOS_ID in new else new
        assert valid(greedy["token_ids"][i]) == new, prompt
        text = run.tokenizer.detokenize(np.array(new, np.int32)) if new else ""  # as generate()
        assert greedy["completions"][i] == text
        total += len(new)
    assert total >= 5  # the comparison is not between empty outputs
    assert len(greedy_int8["token_ids"]) == len(PROMPTS)

    # Sampling: the same seed gives the same row, whatever the batch around it.
    rows = [valid(r["token_ids"][0]) for r in sampled]
    assert rows[0] == rows[1] == valid(batched["token_ids"][1])
    assert len({tuple(r) for r in rows}) > 1  # seeds do change the sample
    assert all(len(r) <= 12 for r in rows)
    # Each row stops at its own max_new_tokens; 0 gives nothing.
    lengths = [len(valid(r)) for r in batched["token_ids"]]
    assert lengths[0] <= 3 and lengths[2] == 0 and lengths[3] <= 40
    assert batched["completions"][2] == ""
    assert valid(batched["token_ids"][0]) == valid(greedy["token_ids"][1])[:3]  # seed < 0: greedy


@pytest.mark.slow
def test_classify_export_agrees_with_predict(tmp_path):
    import tensorflow as tf

    from models import inference
    from serving.export import export_run

    data = write_labeled(tmp_path / "topics.jsonl", per_class=60)
    run_dir = tmp_path / "cls"
    result = run_cli(
        "--task",
        "classify",
        "--preset",
        "tiny",
        "--train.epochs=1",
        "--train.steps_per_epoch=5",
        "--data.vocab_size=60",
        "--data.lowercase=true",
        "--model.seq_len=24",
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = export_run(run_dir)
    assert out == run_dir / "export"
    texts = [
        "message header address sender inbox",
        "  Coroutine\tTASK\n\nfuture\u200b event  ",  # cleaned: lowercased, whitespace collapsed
        "path directory read write open close buffer " * 10,  # longer than seq_len
        "",
    ]
    served = tf.saved_model.load(str(out)).signatures["serving_default"](texts=tf.constant(texts))
    run = inference.load_run(run_dir)
    expected = inference.predict(run, texts)
    assert [s.decode() for s in served["labels"].numpy()] == [e[0] for e in expected]
    np.testing.assert_allclose(
        served["probabilities"].numpy(),
        [[e[2][label] for label in run.labels] for e in expected],
        atol=1e-5,
    )
    manifest = json.loads((out / "serving.json").read_text())
    assert manifest["labels"] == run.labels and manifest["task"] == "classify"


def test_bad_exports_exit_2_with_one_line_and_write_nothing(tmp_path):
    config = {"config": {"task": "causal_lm", "model": {"seq_len": 8}}}
    no_model = tmp_path / "unfinished"
    no_model.mkdir()
    (no_model / "config.json").write_text(json.dumps(config))
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    (mlm / "config.json").write_text(json.dumps({"config": {"task": "mlm"}}))
    for name in ("model.keras", "tokenizer.model"):
        (mlm / name).write_text("x")
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")

    cases = [
        (["--run-dir", str(no_model)], "no model.keras"),
        (["--run-dir", str(mlm)], "nothing to serve"),
        (["--run-dir", str(no_model), "--quantize", "int3"], "int3"),
        (["--run-dir", str(mlm), "--out", str(user_dir)], "not an earlier export"),
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args, message in cases:
        result = run_cli("export", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr, result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (user_dir / "notes.txt").read_text() == "keep me"


VOCAB = 50


def fake_lm(inputs, training=False):
    """A causal 'model' whose next token is a hash of the exact window: any mistake in
    which tokens reach it, at which positions, changes its output."""
    import tensorflow as tf

    ids = tf.cast(inputs["token_ids"], tf.int32)
    positions = tf.range(1, tf.shape(ids)[1] + 1)[None, :]
    prefix = tf.math.cumsum(ids * positions * 7 + ids * ids, axis=1) % (VOCAB - 4) + 4
    prefix = tf.where(tf.math.cumsum(ids, axis=1) % 11 == 5, 3, prefix)  # sometimes end-of-text
    return tf.one_hot(prefix, VOCAB) * 5.0


def test_generation_loop_feeds_the_windows_python_inference_feeds():
    import tensorflow as tf

    from models.generation import generate_ids, make_sampler
    from serving.export import next_logits_fn
    from serving.graph import generation_loop

    seq_len, n, stop = 8, 12, 3
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(4, VOCAB, size)) for size in (1, 3, 8, 9, 20)]

    def decode(rows, budgets, seeds):
        return generation_loop(
            next_logits_fn(fake_lm),
            tf.ragged.constant(rows, dtype=tf.int32, ragged_rank=1, inner_shape=()),
            tf.constant(budgets),
            tf.constant(seeds),
            seq_len=seq_len,
            limit=16,
            stop_id=stop,
            top_k=5,
            temperature=1.0,
        ).numpy()

    budgets = [12, 5, 12, 0, 12]
    ids = decode(prompts, budgets, [-1] * len(prompts))
    lengths = []
    for prompt, budget, row in zip(prompts, budgets, ids.tolist(), strict=True):
        expected = list(
            generate_ids(fake_lm, np.array([prompt]), n, make_sampler(), seq_len, stop)[0]
        )
        expected = expected[: expected.index(stop)] if stop in expected else expected
        assert valid(row) == expected[:budget], prompt
        lengths.append(len(valid(row)))
    assert lengths[3] == 0 and max(lengths) >= 5  # budgets hold; not all cut short

    def sample(rows, seeds):
        return decode([prompts[i] for i in rows], [10] * len(rows), seeds)

    alone = valid(sample([4], [11])[0].tolist())
    assert valid(sample([0, 4, 2], [5, 11, -1])[1].tolist()) == alone
    assert len({tuple(valid(sample([4], [s])[0].tolist())) for s in range(6)}) > 1

    # An empty prompt starts a new document: the same answer alone as beside a non-empty one.
    empty_alone = valid(decode([[]], [6], [-1])[0].tolist())
    assert empty_alone == valid(decode([[], prompts[1]], [6, 6], [-1, -1])[0].tolist())
