"""Tensor parallelism (utils/distributed/tensor_parallel.py, models/tensor_parallel.py).

Four kinds of test:

- one process (fast): the groups and process sets of a layout, the one-rank
  fallback of the collectives, the sharding of a full model and back, and
  the one-line errors when T does not divide the ranks, heads or FFN width;
- `multiprocess` (run inside test_multiprocess.py's `horovodrun -np 2`
  group; skipped in a one-process session): T=2 over the whole world, checked
  against the full model in every process (tests/tensor_parallel_checks.py);
- one `horovodrun -np 4` launch: T=2 x 2 data-parallel replicas, every check
  on every rank;
- the command line: one-line refusals (other tasks, --elastic, T not dividing
  the ranks), and one `horovodrun -np 2` run of main.py with T=2 whose
  model.keras evaluates and resumes in one process.
"""

import numpy as np
import pytest
import tensorflow as tf

from models.tensor_parallel import (
    TensorParallelCausalLM,
    build_shard,
    full_from_shards,
    replicated_weights,
    weight_pairs,
)
from tests import tensor_parallel_checks as checks
from tests.conftest import PYTHON, ROOT, horovodrun, requires_horovod, run_cli
from utils import distributed
from utils.distributed.core import ProcessGroup
from utils.distributed.tensor_parallel import (
    copy_to_tensor_group,
    layout,
    process_set_ranks,
    reduce_from_tensor_group,
    shard_full_weights,
)
from utils.errors import UserError

# --- one process ---------------------------------------------------------------


def test_layout_of_four_ranks_in_tensor_groups_of_two():
    grid = [layout(4, 2, r) for r in range(4)]
    assert [(g.tensor_rank, g.data_rank) for g in grid] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [g.tensor_group for g in grid] == [ProcessGroup((0, 1))] * 2 + [ProcessGroup((2, 3))] * 2
    assert [g.data_group.ranks for g in grid] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert {(g.tensor_size, g.data_size) for g in grid} == {(2, 2)}
    assert grid[3].data_group.rank_of(3) == 1


def test_process_sets_leave_out_the_world_and_single_ranks():
    assert process_set_ranks(4, 2) == [(0, 1), (0, 2), (1, 3), (2, 3)]
    assert process_set_ranks(2, 2) == []  # tensor group = the global set, data groups of one
    assert process_set_ranks(4, 1) == process_set_ranks(4, 4) == []
    assert process_set_ranks(6, 3) == [(0, 1, 2), (0, 3), (1, 4), (2, 5), (3, 4, 5)]


@pytest.mark.parametrize("tensor", [0, 3, 5])
def test_tensor_that_does_not_divide_the_ranks_is_one_line_error(tensor):
    with pytest.raises(
        UserError, match=f"parallel.tensor={tensor} must divide the number of ranks"
    ):
        layout(4, tensor, 0)


def test_tensor_that_does_not_divide_heads_or_ffn_is_one_line_error():
    shape = dict(vocabulary_size=8, num_layers=1, hidden_dim=12, max_sequence_length=4)
    with pytest.raises(UserError, match=r"must divide model.n_heads=3"):
        TensorParallelCausalLM(num_heads=3, intermediate_dim=8, tp=layout(2, 2, 0), **shape)
    with pytest.raises(UserError, match=r"must divide model.d_ff=7"):
        TensorParallelCausalLM(num_heads=2, intermediate_dim=7, tp=layout(2, 2, 0), **shape)


def test_collectives_are_the_identity_for_one_rank():
    tp = layout(1, 1, 0)
    x = tf.constant([[1.0, -2.0, 3.0]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        copied, reduced = copy_to_tensor_group(x, tp), reduce_from_tensor_group(x, tp)
        loss_c, loss_r = tf.reduce_sum(copied * x), tf.reduce_sum(reduced * x)
    np.testing.assert_array_equal(copied, x)
    np.testing.assert_array_equal(reduced, x)
    np.testing.assert_array_equal(tape.gradient(loss_c, x), 2 * x)
    np.testing.assert_array_equal(tape.gradient(loss_r, x), 2 * x)


def test_one_shard_model_equals_the_full_model_and_round_trips():
    full = checks.full_model()
    shard = build_shard(full, layout(1, 1, 0))
    x, _ = checks.batch(3)
    np.testing.assert_allclose(shard(x), full(x), atol=1e-6)
    back = full_from_shards(shard)
    for a, b in zip(back.weights, full.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(back(x), full(x), atol=1e-6)


def test_two_shards_hold_whole_heads_and_concatenate_to_the_full_weights():
    """Sharding for T=2 in one process: each shard's slices, put together, are the full weights."""
    full = checks.full_model()
    shards = [build_shard(full, layout(2, 2, r)) for r in range(2)]
    block = shards[0].blocks[0]
    assert block.query_kernel.shape == (
        checks.WIDTH,
        checks.HEADS // 2,
        checks.WIDTH // checks.HEADS,
    )
    assert block.ffn1_kernel.shape == (checks.WIDTH, checks.FFN // 2)
    assert block.ffn2_kernel.shape == (checks.FFN // 2, checks.WIDTH)
    pairs = [weight_pairs(s, full) for s in shards]
    for (s0, f, axis), (s1, _, _) in zip(*pairs, strict=True):
        if axis is None:
            np.testing.assert_array_equal(s0.numpy(), f.numpy())
            np.testing.assert_array_equal(s1.numpy(), f.numpy())
        else:
            joined = np.concatenate([s0.numpy(), s1.numpy()], axis=axis)
            np.testing.assert_array_equal(joined, f.numpy())
    n_replicated = len(replicated_weights(shards[0]))
    assert n_replicated == sum(axis is None for _, _, axis in pairs[0]) == 4 + 6 * checks.LAYERS


def test_xla_segments_compile_forward_and_backward_and_equal_the_full_model():
    """build_shard(xla=True): every segment and its gradient is an XLA function of its own."""
    full = checks.full_model()
    shard = build_shard(full, layout(1, 1, 0), xla=True)
    x, y = checks.batch(3)

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = checks._loss(shard(x, training=True), y)
        return tape.gradient(loss, shard.trainable_variables)

    library = gradients.get_concrete_function().graph.as_graph_def().library.function
    compiled = [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]
    # Per block LN1, attention, LN2 + residual, feed-forward, residual; embedding; head.
    segments = 5 * checks.LAYERS + 2
    assert len(compiled) == 3 * segments, compiled  # forward, and its forward/backward pair
    assert sum("backward" in name for name in compiled) == segments, compiled
    np.testing.assert_allclose(shard(x), full(x), atol=1e-5)

    with pytest.raises(UserError, match="does not divide a weight's dimension 3"):
        shard_full_weights([np.zeros((4, 3))], [1], layout(2, 2, 0))


# --- horovodrun -np 2 (the `multiprocess` group) ----------------------------------


@pytest.fixture(scope="module")
def tp2():
    world = distributed.init()
    if world.size != 2:
        pytest.skip("needs 2 ranks: runs under horovodrun -np 2 in test_multiprocess.py")
    from utils.distributed import tensor_parallel

    return tensor_parallel.current(2)


@pytest.mark.multiprocess
def test_np2_tensor_parallel_logits_equal_the_full_model(tp2):
    """Also the negative control: without the row-parallel allreduce the logits differ."""
    assert checks.check_forward(tp2) <= 1e-5


@pytest.mark.multiprocess
def test_np2_gathered_gradients_equal_the_full_model(tp2):
    assert checks.check_gradients(tp2) <= 1e-5


@pytest.mark.multiprocess
def test_np2_sgd_steps_equal_the_full_model_and_replicas_stay_identical(tp2):
    assert checks.check_training(tp2) <= 1e-5


@pytest.mark.multiprocess
def test_np2_with_dropout_shards_keep_replicated_weights_identical(tp2):
    assert checks.check_dropout(tp2) > 0


@pytest.mark.multiprocess
def test_np2_accumulated_steps_equal_the_full_model_on_the_whole_batch(tp2):
    """train.accumulate_steps=2 (clipped by the whole model's norm): 3 updates of 2 passes."""
    assert checks.check_accumulation(tp2) <= 1e-5


@pytest.mark.multiprocess
def test_np2_mixed_bfloat16_trains_with_identical_replicated_weights(tp2):
    """bfloat16 activations through the allreduces; the loss stays close to T=1's."""
    assert checks.check_mixed_bfloat16(tp2) <= checks.BF16_LOSS_RTOL


@pytest.mark.multiprocess
def test_np2_xla_segments_equal_the_full_model(tp2):
    """build_shard(xla=True) (off in training: no faster on CPUs): logits and gradients.

    The collectives stay between the XLA segments, their gradients too.
    """
    assert checks.check_forward(tp2, xla=True) <= 1e-5
    assert checks.check_gradients(tp2, xla=True) <= 1e-5


# --- horovodrun -np 4 ---------------------------------------------------------------


@pytest.mark.slow
@requires_horovod
def test_np4_two_replicas_of_two_shards_equal_one_process():
    """T=2 x 2 replicas, each reading its own rows: forward, gradients, 3 SGD steps, on every rank."""
    result = horovodrun(
        4,
        PYTHON,
        str(ROOT / "tests" / "tensor_parallel_checks.py"),
        "--tensor",
        "2",
        cwd=ROOT,
        timeout=600,
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    for rank in range(4):
        assert f"rank {rank}: tensor {rank % 2}/2 data {rank // 2}/2" in result.stdout, output
    assert result.stdout.count(" OK") == 4, output


# --- the parallel section of the config ----------------------------------------------


def test_parallel_tensor_is_checked_against_heads_ffn_and_ranks():
    from utils.config import ParallelConfig, parallel_layout, resolve

    assert resolve("tiny", None, {}).parallel.tensor == 1
    assert resolve("tiny", None, {}).to_dict()["parallel"] == {"tensor": 1}
    assert resolve("small", None, {"parallel.tensor": "2"}).parallel.tensor == 2
    cases = {
        "0": "parallel.tensor must be >= 1",
        "3": r"parallel.tensor \(3\) must divide model.n_heads \(4\)",
    }
    for value, message in cases.items():
        with pytest.raises(UserError, match=message):
            resolve("small", None, {"parallel.tensor": value})
    with pytest.raises(UserError, match=r"must divide model.d_ff \(30\)"):
        resolve("small", None, {"parallel.tensor": "4", "model.d_ff": "30"})
    assert parallel_layout(ParallelConfig(tensor=2), 4) == {"tensor": 2, "data": 2}
    with pytest.raises(UserError, match=r"parallel.tensor=2 must divide the number of ranks \(3\)"):
        parallel_layout(ParallelConfig(tensor=2), 3)


# --- the command line ------------------------------------------------------------------


def _one_line_error(result, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr[-3000:]


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--task", "mlm"], ["parallel.tensor=2", "causal_lm", "mlm"]),
        (["--task", "classify"], ["parallel.tensor=2", "causal_lm", "classify"]),
        (["--elastic"], ["parallel.tensor=2", "--elastic"]),
    ],
)
def test_tensor_parallel_refuses_other_tasks_and_elastic_in_one_line(tmp_path, flags, words):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--preset", "tiny", "--parallel.tensor=2", *flags, "--run-dir", str(run_dir), cwd=tmp_path
    )
    _one_line_error(result, *words)
    assert not run_dir.exists()


def test_tensor_that_does_not_divide_the_launched_ranks_stops_in_one_line(tmp_path, corpus_file):
    """What horovodrun -np 3 would say (the world size is read from HOROVOD_SIZE before Horovod)."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "--preset", "tiny", "--data", str(corpus_file), "--parallel.tensor=2",
        "--run-dir", str(run_dir), cwd=tmp_path, env={"HOROVOD_SIZE": "3"},
    )  # fmt: skip
    _one_line_error(result, "parallel.tensor=2", "number of ranks (3)")
    assert not run_dir.exists()


@pytest.mark.slow
@requires_horovod
def test_np2_tensor_parallel_run_saves_the_full_model_and_resumes_at_t1(tmp_path, corpus_file):
    """horovodrun -np 2 --parallel.tensor=2: config.json's layout; model.keras is the full
    model (one process reproduces the run's test loss); a resume with T=4 is refused
    (2 heads), and a resume in one process (T=1) continues from the checkpoint."""
    import json

    run_dir = tmp_path / "run"
    common = ["--data", str(corpus_file), "--data.vocab_size=256", "--run-dir", str(run_dir)]
    result = horovodrun(
        2, PYTHON, str(ROOT / "main.py"), "--preset", "tiny", "--parallel.tensor=2",
        "--train.epochs=1", "--train.steps_per_epoch=3", "--train.eval_batches=2", *common,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["parallel"] == {"tensor": 2, "data": 1}
    assert saved["global_batch"] == saved["batch_size_per_rank"] == 16
    assert saved["learning_rate"]["scaled_by"] == 1.0
    metrics = json.loads((run_dir / "metrics.json").read_text())

    from models.inference import load_run

    model = load_run(str(run_dir)).model  # the ordinary full model
    assert type(model).__name__ == "CausalTransformer"
    assert (run_dir / "best.keras").exists()

    ev = run_cli("evaluate", "--run-dir", str(run_dir), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    assert again["test_perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    assert again["test_tokens"] == metrics["test_tokens"]  # each replica counted once

    bad = run_cli("--run-dir", str(run_dir), "--resume", "--parallel.tensor=4", cwd=tmp_path)
    _one_line_error(bad, "parallel.tensor", "model.n_heads")

    resumed = run_cli(
        "--run-dir",
        str(run_dir),
        "--resume",
        "--train.epochs=2",
        "--train.eval_batches=2",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2" in resumed.stdout
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["epochs_completed"] == 2 and final["steps"] == 6
