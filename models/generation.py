"""Token-by-token generation with keras-hub samplers: the model's logits -> new token ids.

Used by the causal LM's `generate` (models/tasks/language_model.py), by its
evaluation (BLEU/ROUGE-L of continuations) and by the export tests.
"""

from __future__ import annotations

import numpy as np

from utils.config import SAMPLERS
from utils.errors import UserError


def make_sampler(
    name: str = "greedy",
    temperature: float = 1.0,
    seed: int | None = None,
    k: int = 10,
    p: float = 0.9,
):
    """A keras-hub sampler: greedy, top_k or top_p (nucleus); seeded for repeatable output."""
    import keras_hub

    if name == "greedy":
        return keras_hub.samplers.GreedySampler(temperature=temperature)
    if name == "top_k":
        return keras_hub.samplers.TopKSampler(k=k, seed=seed, temperature=temperature)
    if name == "top_p":
        return keras_hub.samplers.TopPSampler(p=p, k=None, seed=seed, temperature=temperature)
    if name == "beam":
        raise UserError(
            "--sampler beam (beam search) is for seq2seq runs; this run generates with "
            "greedy, top_k or top_p"
        )
    raise UserError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def generate_ids(
    model,
    prompts: np.ndarray,
    max_new_tokens: int,
    sampler,
    seq_len: int,
    stop_id: int | None = None,
) -> np.ndarray:
    """Continue equal-length prompts token by token; returns [batch, max_new_tokens] ids.

    The model sees at most its context length (`seq_len`): each step feeds
    the last `seq_len` tokens (right-padded to a fixed shape, so the forward
    pass is traced once) and the sampler picks the next token from the
    logits at the last real position. Rows that produced `stop_id` keep
    producing it.
    """
    import tensorflow as tf

    prompts = np.asarray(prompts, dtype=np.int32)
    batch = prompts.shape[0]

    @tf.function(reduce_retracing=True)
    def next_logits(window, last):
        real = tf.range(tf.shape(window)[1])[None, :] <= last[0]  # not by id: GPT-2 has no pad
        mask = tf.cast(tf.broadcast_to(real, tf.shape(window)), "int32")
        logits = model({"token_ids": window, "padding_mask": mask}, training=False)
        return tf.gather(logits, last, axis=1, batch_dims=0)[:, 0, :]

    tokens = prompts
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        window = tokens[:, -seq_len:]
        length = window.shape[1]
        padded = np.zeros((batch, seq_len), np.int32)
        padded[:, :length] = window
        logits = next_logits(tf.constant(padded), tf.constant([length - 1]))
        probabilities = sampler.compute_probabilities(logits)
        chosen = np.asarray(sampler.get_next_token(probabilities), dtype=np.int32)
        if stop_id is not None:
            chosen = np.where(done, stop_id, chosen)
            done |= chosen == stop_id
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
    return tokens[:, prompts.shape[1] :]
