"""models/: shapes, config round-trip, save/load, causality, masked loss and accuracy."""

import keras
import numpy as np
import pytest

from models.losses import token_stats
from models.transformer import CausalTransformer, build_causal_lm
from utils.config import ModelConfig

TINY = ModelConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, seq_len=12, dropout=0.0)


def _inputs(ids):
    ids = np.asarray(ids, dtype="int32")
    return {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}


def test_shapes_and_names():
    model = build_causal_lm(TINY, vocabulary_size=10)
    logits = model(_inputs(np.ones((3, 12))))
    assert tuple(logits.shape) == (3, 12, 10)
    names = {layer.name for layer in model.layers}
    assert {
        "token_embedding",
        "position_embedding",
        "transformer_layer_0",
        "transformer_layer_1",
        "final_norm",
    } <= names


def test_config_round_trip_and_saving(tmp_path):
    model = build_causal_lm(TINY, vocabulary_size=10)
    clone = CausalTransformer.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    x = _inputs(np.random.default_rng(0).integers(1, 10, (2, 12)))
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(restored, CausalTransformer)
    np.testing.assert_allclose(restored(x), model(x), atol=1e-6)


def test_causal_future_tokens_do_not_change_the_past():
    model = build_causal_lm(TINY, vocabulary_size=10)
    a = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    b = a.copy()
    b[0, 5:] = [9, 9, 9]
    la, lb = model(_inputs(a)).numpy(), model(_inputs(b)).numpy()
    np.testing.assert_allclose(la[0, :5], lb[0, :5], atol=1e-5)
    assert not np.allclose(la[0, 5:], lb[0, 5:])


def test_hidden_dim_must_divide_heads():
    with pytest.raises(
        ValueError,
        match=r"`hidden_dim` must be divisible by `num_heads`\. Received: hidden_dim=10, num_heads=3",
    ):
        CausalTransformer(10, 1, 3, 10, 8, 4)


def test_masked_loss_and_accuracy_by_hand():
    # vocabulary 3; logits favour class 1 everywhere
    logits = np.log(np.array([[[0.2, 0.5, 0.3]] * 3, [[0.2, 0.5, 0.3]] * 3], dtype="float32"))
    targets = np.array([[1, 2, 0], [1, 1, 1]])  # the 0 is padding
    weights = np.array([1.0, 0.0], dtype="float32")  # second row is batch padding
    stats = {k: float(v) for k, v in token_stats(targets, logits, weights).items()}
    assert stats["count"] == 2
    assert stats["correct"] == 1
    assert stats["loss_sum"] == pytest.approx(-np.log(0.5) - np.log(0.3), rel=1e-5)
