"""Models built on keras-hub presets (--init-from-preset): GPT-2-style causal LMs, BERT-style classifiers.

The task's model is keras-hub's own task model for the preset's backbone
(`CausalLM.from_preset`, `TextClassifier.from_preset` with a new head),
wrapped so it takes this project's inputs ({"token_ids", "padding_mask"};
segment ids are zeros for backbones that want them). Every rank builds it
with random weights from the bundle (utils/presets.py); rank 0 alone reads
the preset's weights, and Horovod broadcasts them when training starts.

Handles that work with network access (keras-hub downloads them on rank 0):
`gpt2_base_en`, `gpt2_medium_en` (causal LM);
`bert_tiny_en_uncased`, `bert_base_en_uncased`, `roberta_base_en`,
`distil_bert_base_en_uncased` (classify); any local directory written by
`save_to_preset` works without a network.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Any

import keras
import keras_hub

from utils import presets
from utils.errors import UserError


def fetch(handle: str, task: str) -> tuple[bytes, dict[str, Any]]:
    """(preset.json bytes, facts to record) for `handle`; rank 0 calls this.

    A local directory is read as it is; a keras-hub handle is resolved by
    keras-hub (a download, which needs the network), its tokenizer saved
    into a scratch preset directory and bundled from there.
    """
    if presets.is_local(handle):
        root = pathlib.Path(handle)
        config = presets.check_local(handle, task)
        info = _info(handle, config, presets.files_sha256(root))
        return presets.bundle(root, info), info
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="preset-"))
    try:
        try:
            from keras_hub.src.utils.preset_utils import get_file

            config_path = pathlib.Path(get_file(handle, "config.json"))
            shutil.copyfile(config_path, scratch / "config.json")
            metadata = config_path.parent / "metadata.json"
            if metadata.is_file():
                shutil.copyfile(metadata, scratch / "metadata.json")
            keras_hub.tokenizers.Tokenizer.from_preset(handle).save_to_preset(str(scratch))
            weights = pathlib.Path(get_file(handle, "model.weights.h5"))
        except Exception as e:  # unknown handle, no network, missing file: one line
            raise UserError(
                f"--init-from-preset {handle}: cannot load the preset "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        config = presets.read_config(scratch, handle)
        presets.check_fits(handle, config, presets._metadata_tasks(scratch), task)
        (scratch / "model.weights.h5").symlink_to(weights)
        info = _info(handle, config, presets.files_sha256(scratch))
        return presets.bundle(scratch, info), info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _info(handle: str, config: dict[str, Any], sha256: str) -> dict[str, Any]:
    return {
        "handle": handle,
        "sha256": sha256,
        "backbone": presets.backbone_class(config),
        "max_sequence_length": presets.max_sequence_length(config),
    }


def _hub_task(bundle: pathlib.Path, task: str, num_classes: int | None):
    """keras-hub's task model for the bundle's backbone, with random weights."""
    with tempfile.TemporaryDirectory(prefix="preset-") as scratch:
        root = str(presets.unpack(bundle, pathlib.Path(scratch)))
        # The run's precision (train.precision), not the one the preset was saved in.
        common = {"load_weights": False, "preprocessor": None, "dtype": _policy()}
        try:
            if task == "causal_lm":
                return keras_hub.models.CausalLM.from_preset(root, **common)
            return keras_hub.models.TextClassifier.from_preset(
                root, num_classes=num_classes, **common
            )
        except ValueError as e:  # no keras-hub task of this kind for the backbone
            backbone = presets.backbone_class(presets.bundle_config(bundle))
            raise UserError(
                f"the preset's {backbone} does not fit --task {task} ({str(e).splitlines()[0]})"
            ) from None


def _policy() -> str:
    return keras.mixed_precision.global_policy().name


def build(bundle: pathlib.Path, task: str, num_classes: int | None = None) -> keras.Model:
    """The task's model on the preset's backbone, random weights; takes this project's inputs."""
    hub = _hub_task(bundle, task, num_classes)
    # keras-hub compiles its tasks on creation; the outer model is the one trained, and
    # a saved inner compile config would only warn when model.keras is loaded.
    hub.compiled = False
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    feed = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "segment_ids" in hub.backbone.input:  # BERT: one segment
        feed["segment_ids"] = keras.ops.zeros_like(token_ids)
    return keras.Model(
        {"token_ids": token_ids, "padding_mask": padding_mask}, hub(feed), name=f"preset_{task}"
    )


def backbone_of(model: keras.Model) -> keras_hub.models.Backbone:
    """The keras-hub backbone inside a model built by `build`."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras_hub.models.Backbone):
            return layer
    raise ValueError(f"{model.name} holds no keras-hub backbone")


def load_weights(model: keras.Model, handle: str) -> None:
    """Copy the preset's backbone weights into `model` (rank 0; Horovod broadcasts them)."""
    try:
        source = keras_hub.models.Backbone.from_preset(handle, dtype=_policy())
    except Exception as e:
        raise UserError(
            f"--init-from-preset {handle}: cannot load the weights ({type(e).__name__}: {e})"
        ) from None
    target = backbone_of(model)
    if [w.shape for w in source.weights] != [w.shape for w in target.weights]:
        raise UserError(
            f"--init-from-preset {handle}: its weights no longer match the model built from "
            "its config (was the preset changed since this run began?)"
        )
    target.set_weights(source.get_weights())


def save_bert_preset(
    texts: list[str],
    out: str | pathlib.Path,
    vocabulary_size: int = 8000,
    seed: int = 0,
    **shape: int,
) -> pathlib.Path:
    """Write a BERT preset of your own: a WordPiece vocabulary learned from `texts`
    (`compute_word_piece_vocabulary`, lowercased) and a backbone with random weights.

    `shape` overrides bert_tiny_en_uncased's: num_layers=2, num_heads=2,
    hidden_dim=128, intermediate_dim=512, max_sequence_length=512. What it
    writes is what `save_to_preset` writes: a valid --init-from-preset
    directory, without pretrained quality.
    """
    import tensorflow as tf

    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(texts),
        vocabulary_size=vocabulary_size,
        reserved_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        lowercase=True,
    )
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    return save_preset(keras_hub.models.BertBackbone, tokenizer, out, seed, **shape)


def save_preset(
    backbone_cls, tokenizer, out: str | pathlib.Path, seed: int = 0, **shape: int
) -> pathlib.Path:
    """A backbone of `backbone_cls` with random weights (bert_tiny's shape unless `shape`
    says otherwise) for `tokenizer`'s vocabulary, saved with the tokenizer as a preset."""
    keras.utils.set_random_seed(seed)
    sizes = {
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 128,
        "intermediate_dim": 512,
        "max_sequence_length": 512,
        **shape,
    }
    backbone = backbone_cls(vocabulary_size=tokenizer.vocabulary_size(), **sizes)
    backbone.save_to_preset(str(out))
    tokenizer.save_to_preset(str(out))
    return pathlib.Path(out)
