"""TensorFlow functions that run inside the exported graph (no Python at serving time).

- `clean_text`: data/clean.py's cleaning (NFKC, invisible characters dropped,
  whitespace collapsed, optional lowercasing) with tensorflow-text and RE2.
- `context_windows`: each row's last `seq_len` tokens, right-padded, as
  inference.generate_ids feeds the model.
- `row_uniforms` / `next_tokens`: greedy or seeded top-k choice per row; a
  row's random numbers depend only on its seed, the step and the token id, so
  its output never depends on its batch-mates.
- `generation_loop`: the whole decode loop as one `tf.while_loop`.
"""

from __future__ import annotations

import tensorflow as tf

from models.dropout import _GOLDEN
from models.dropout import _mix as mix32

# Characters Python's str.isspace() accepts (data/clean.py collapses them),
# and the invisible categories it drops (Cn, unassigned, has no RE2 class).
_WHITESPACE = r"[\t\n\x{0B}\f\r\x{1C}-\x{1F}\x{85}\p{Z}]"
_INVISIBLE = r"[\p{Cc}\p{Cf}\p{Co}]"


def clean_text(texts: tf.Tensor, lowercase: bool) -> tf.Tensor:
    """data.clean.clean_text for a string tensor, in graph ops."""
    import tensorflow_text as tf_text

    texts = tf_text.normalize_utf8(texts, "NFKC")
    texts = tf.strings.regex_replace(texts, _WHITESPACE, " ")
    texts = tf.strings.regex_replace(texts, _INVISIBLE, "")
    texts = tf.strings.strip(tf.strings.regex_replace(texts, " +", " "))
    return tf.strings.lower(texts, encoding="utf-8") if lowercase else texts


def context_windows(
    tokens: tf.Tensor, lengths: tf.Tensor, seq_len: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Each row's last `seq_len` real tokens, right-padded with 0, and the index of its last one.

    tokens: int32 [B, W] (row r holds lengths[r] real tokens from column 0).
    Returns (window int32 [B, seq_len], last int32 [B]).
    """
    start = tf.maximum(lengths - seq_len, 0)
    offsets = tf.range(seq_len, dtype=tf.int32)[None, :]
    index = tf.minimum(start[:, None] + offsets, tf.shape(tokens)[1] - 1)
    real = offsets < (lengths - start)[:, None]
    window = tf.where(real, tf.gather(tokens, index, batch_dims=1), 0)
    return window, tf.minimum(lengths, seq_len) - 1


def row_uniforms(seeds: tf.Tensor, step: tf.Tensor, vocab: int) -> tf.Tensor:
    """float32 [B, vocab] in (0, 1): a counter hash of (row's seed, step, token id).

    The same keyed lowbias32 rounds as models/dropout.py, keyed per row.
    """
    seeds = tf.bitcast(tf.cast(seeds, tf.int32), tf.uint32)[:, None]
    step = tf.bitcast(tf.cast(step, tf.int32), tf.uint32)
    key0 = mix32(seeds * tf.constant(_GOLDEN, tf.uint32) + tf.constant(1, tf.uint32))
    key1 = mix32(tf.bitwise.bitwise_xor(step, key0))
    index = tf.bitcast(tf.range(vocab, dtype=tf.int32), tf.uint32)[None, :]
    bits = mix32(mix32(tf.bitwise.bitwise_xor(index, key0)) + key1)
    top24 = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32)
    return (top24 + 0.5) / float(1 << 24)


def next_tokens(
    logits: tf.Tensor, seeds: tf.Tensor, step: tf.Tensor, top_k: int, temperature: float
) -> tf.Tensor:
    """int32 [B]: per row, greedy when its seed < 0, else a top-k sample keyed by (seed, step).

    Greedy is keras-hub's GreedySampler: argmax of softmax(logits) in float32.
    Sampling is Gumbel-max over the `top_k` largest logits / temperature.
    """
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=tf.int32)
    scaled = logits / temperature
    vocab = logits.shape[-1]
    kth = tf.math.top_k(scaled, k=min(top_k, vocab)).values[:, -1:]
    candidates = tf.where(scaled >= kth, scaled, float("-inf"))
    gumbel = -tf.math.log(-tf.math.log(row_uniforms(seeds, step, vocab)))
    sampled = tf.argmax(candidates + gumbel, axis=-1, output_type=tf.int32)
    return tf.where(seeds < 0, greedy, sampled)


def generation_loop(
    next_logits,
    prompt_ids: tf.RaggedTensor,
    max_new_tokens: tf.Tensor,
    seeds: tf.Tensor,
    *,
    seq_len: int,
    limit: int,
    stop_id: int,
    top_k: int,
    temperature: float,
) -> tf.Tensor:
    """Decode every row; int32 [B, T] new ids, -1 after a row's end (T = longest row's steps).

    A row ends after its own `max_new_tokens` (clamped to [0, limit]) or at
    `stop_id` (not included). Only a prompt's last `seq_len` tokens can
    reach the model, so longer prompts are cut from the left; an empty
    prompt starts from `stop_id` (the start of a new document).
    `next_logits(window [B, seq_len], last [B])` returns [B, vocab] logits.
    """
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    lengths = tf.cast(prompt_ids.row_lengths(), tf.int32)
    dense = prompt_ids.to_tensor(0)
    # At least one column, also when every prompt is empty (then `dense` is [B, 0]).
    dense = tf.concat([dense, tf.zeros([tf.shape(dense)[0], 1], tf.int32)], axis=1)
    empty = lengths == 0
    dense = tf.where(empty[:, None] & (tf.range(tf.shape(dense)[1]) == 0)[None, :], stop_id, dense)
    lengths = tf.where(empty, 1, lengths)
    prompt, kept = context_windows(dense, lengths, seq_len)
    kept = kept + 1
    budget = tf.clip_by_value(tf.cast(max_new_tokens, tf.int32), 0, limit)
    steps = tf.reduce_max(tf.concat([budget, [0]], axis=0))
    batch = tf.shape(prompt)[0]
    tokens = tf.concat([prompt, tf.zeros([batch, limit], tf.int32)], axis=1)
    rows = tf.range(batch)

    def body(step, tokens, lengths, done, out):
        window, last = context_windows(tokens, lengths, seq_len)
        chosen = next_tokens(next_logits(window, last), seeds, step, top_k, temperature)
        keep = (step < budget) & ~done & (chosen != stop_id)
        column = tf.stack([rows, tf.fill([batch], step)], axis=1)
        out = tf.tensor_scatter_nd_update(out, column, tf.where(keep, chosen, -1))
        tokens = tf.tensor_scatter_nd_update(tokens, tf.stack([rows, lengths], axis=1), chosen)
        return step + 1, tokens, lengths + 1, done | ~keep, out

    def cond(step, tokens, lengths, done, out):
        return (step < steps) & tf.reduce_any(~done & (step < budget))

    out = tf.fill([batch, limit], -1)
    final, _, _, _, out = tf.while_loop(
        cond, body, (tf.constant(0), tokens, kept, tf.zeros([batch], tf.bool), out)
    )
    return out[:, :final]
