"""models/: shapes, config round-trip, save/load (also of files older code saved), keras-hub
presets, causality, masked loss and accuracy.
"""

import pathlib

import keras
import keras_hub
import numpy as np
import pytest

from models.encoder import BACKBONE_NAME, EncoderBackbone, build_backbone
from models.losses import token_stats
from models.transformer import CausalTransformer, build_causal_lm
from utils.config import ModelConfig

TINY = ModelConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, seq_len=12, dropout=0.0)
# model.keras files saved before the models subclassed keras-hub's Backbone, with their
# outputs on fixed inputs (tiny models: vocabulary 48, 1 layer, 2 heads, width 16).
SAVED_BEFORE_BACKBONE = pathlib.Path(__file__).parent / "fixtures" / "saved_before_backbone"


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


@pytest.mark.parametrize(
    "name, backbone_class",
    [
        ("causal_lm", CausalTransformer),
        ("masked_lm", EncoderBackbone),
        ("classifier", EncoderBackbone),
    ],
)
def test_files_saved_before_the_backbone_base_load_and_give_the_same_outputs(name, backbone_class):
    """Existing model.keras files load as the same (now Backbone) classes, with their weights."""
    saved = np.load(SAVED_BEFORE_BACKBONE / "outputs.npz")
    inputs = {"token_ids": saved["token_ids"], "padding_mask": saved["padding_mask"]}
    if name == "masked_lm":
        inputs["mask_positions"] = saved["mask_positions"]
    model = keras.saving.load_model(SAVED_BEFORE_BACKBONE / f"{name}.keras", compile=False)
    backbone = model if name == "causal_lm" else model.get_layer(BACKBONE_NAME)
    assert type(backbone) is backbone_class
    assert isinstance(backbone, keras_hub.models.Backbone)
    assert backbone.token_embedding is backbone.get_layer("token_embedding")
    np.testing.assert_allclose(model(inputs, training=False), saved[name], rtol=0, atol=1e-6)


def test_encoder_backbone_round_trips_through_a_keras_hub_preset(tmp_path):
    backbone = build_backbone(TINY, vocabulary_size=10)
    backbone.save_to_preset(str(tmp_path))
    restored = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert isinstance(restored, EncoderBackbone)
    assert restored.get_config() == backbone.get_config()
    x = _inputs(np.random.default_rng(0).integers(0, 10, (2, 12)))
    np.testing.assert_allclose(restored(x), backbone(x), rtol=0, atol=1e-6)


def test_dtype_reaches_every_layer_but_a_plain_policy_is_not_saved(tmp_path):
    """A mixed-precision model reloads in the loading process's policy (float32 here), as
    files saved before the Backbone base do; a quantized model keeps its per-layer map."""
    model = CausalTransformer(10, 1, 2, 16, 32, 12, dtype="mixed_bfloat16")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert {layer.dtype_policy.name for layer in layers} == {"mixed_bfloat16"}
    assert "dtype" not in model.get_config()
    clone = CausalTransformer.from_config(model.get_config())
    assert clone.get_layer("transformer_layer_0").compute_dtype == "float32"

    from serving.quantize import quantize_model

    quantized = build_causal_lm(TINY, vocabulary_size=10)
    quantize_model(quantized, "int8")
    assert quantized.get_config()["dtype"]["class_name"] == "DTypePolicyMap"
    quantized.save(tmp_path / "q.keras")
    reloaded = keras.saving.load_model(tmp_path / "q.keras", compile=False)
    x = _inputs(np.random.default_rng(0).integers(0, 10, (2, 12)))
    np.testing.assert_array_equal(reloaded(x), quantized(x))


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
