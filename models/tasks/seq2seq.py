"""Sequence to sequence: summarize a text with an encoder-decoder Transformer.

Trained with teacher forcing: the decoder reads BOS + target and learns
target + EOS (data/load.py `Pairs`), with Keras's cross-entropy; padding
positions weigh 0 in the loss and the metrics.

Judged after training by the decoder's loss, perplexity and token accuracy
on the split's targets, and, from greedy summaries generated for every
source, by BLEU, ROUGE-1, ROUGE-2, ROUGE-L (F1) and exact match against the
true summaries; beside them, a baseline that takes the first N words of the
source, N tuned on the validation split by ROUGE-L.

Exact under Horovod: each rank generates for its own share of the split
and keeps sums that add up across ranks (`summary_sums`): BLEU's n-gram
matches, possible matches and lengths (BLEU is computed from those totals,
as a corpus-level score must be), the per-example ROUGE F1 sums and the
number of examples, the exact matches. The figures equal those computed on
all summaries at once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from data.load import Pairs, Shards
from data.prepare import BOS_ID, EOS_ID, PAD_ID, Prepared
from models.generation import make_sampler
from models.losses import token_stats
from models.seq2seq import Seq2SeqTransformer  # registers the class for load_run
from models.tasks.base import Task, evaluate_shards, format_table, make_eval_fn
from utils import distributed
from utils.errors import UserError
from utils.metrics import Sums, lm_metrics

if TYPE_CHECKING:
    import keras_hub

BEAMS = 4  # beam search's width (sampler "beam")
BLEU_ORDER = 4  # n-grams up to 4 words, keras-hub's (and SacreBLEU's) default
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SCORES = ("bleu", *ROUGE_TYPES, "exact_match")
BASELINE_WORDS = range(1, 41)  # the first N words of the source, N tuned on validation
SAMPLES = 3  # generated summaries kept in metrics.json, as a first look


def pair_inputs(inputs: dict) -> dict:
    """The model's input dict for a batch of {"source", "decoder"} ids (padding is id 0)."""
    source, decoder = inputs["source"], inputs["decoder"]
    return {
        "encoder_token_ids": source,
        "encoder_padding_mask": ops.cast(ops.not_equal(source, PAD_ID), "int32"),
        "decoder_token_ids": decoder,
        "decoder_padding_mask": ops.cast(ops.not_equal(decoder, PAD_ID), "int32"),
    }


class Seq2Seq(Task):
    """Summarize: an encoder-decoder Transformer (models/seq2seq.py) on source/target pairs."""

    name = "seq2seq"
    samples = "pairs"

    # --- data ----------------------------------------------------------------

    def prepare(self, progress: bool, log, tokenizer=None) -> Prepared:
        from data.pairs import prepare_pairs

        m = self.config.model
        return prepare_pairs(
            self.config.data,
            m.seq_len,
            m.target_len,
            progress=progress,
            log=log,
            tokenizer=tokenizer,
        )

    def shards(self, split: str) -> Pairs:
        from data.pairs import encoded_pairs

        return Pairs(
            *encoded_pairs(self.prepared, split),
            self.config.model.seq_len,
            self.config.model.target_len,
            self.rows_per_step(split),
            distributed.data_rank(),
            distributed.data_size(),
        )

    def fit_dataset(self, dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        """(model inputs, labels, per-token weights): padding targets and padding rows weigh 0."""

        def features(x, y, w):
            weights = tf.cast(tf.not_equal(y, PAD_ID), tf.float32) * tf.expand_dims(w, -1)
            return pair_inputs(x), y, weights

        return self.transform(dataset, training).map(features, num_parallel_calls=tf.data.AUTOTUNE)

    # --- model and loss --------------------------------------------------------

    def compile_args(self) -> dict[str, Any]:
        """Keras's cross-entropy; accuracy and perplexity over the real target tokens only.

        The loss is Keras's default reduction: the weighted sum over the batch
        divided by all its target positions, padding included. That divisor is
        the same on every rank and step, so averaging gradients across ranks is
        exactly the gradient of the global batch (dividing by each rank's own
        count of real tokens would not be). The weighted metrics are per real
        token: their state is sums, summed across ranks.
        """
        import keras_hub

        return {
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "weighted_metrics": [
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras_hub.metrics.Perplexity(from_logits=True, name="perplexity"),
            ],
        }

    def build_model(self) -> keras.Model:
        from models.seq2seq import build_seq2seq

        return build_seq2seq(self.config.model, self.prepared.vocab_size)

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        logits = model(pair_inputs(inputs), training=training)  # (B, T, V)
        stats = token_stats(targets, logits, weights, PAD_ID)
        return {**stats, "loss_weight": stats["count"]}

    def metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        """Loss (mean cross-entropy per target token), perplexity and token accuracy."""
        return lm_metrics(totals)

    # --- after training --------------------------------------------------------

    def evaluate_split(self, model, tokenizer, split: str) -> dict[str, Any]:
        """Token metrics and generated-summary scores of `split`, exact across ranks."""
        from data.pairs import pair_texts

        shards = self.split_shards(split)
        results = evaluate_shards(self, make_eval_fn(self, model, self.config.train.xla), shards)
        sources, targets = pair_texts(self.prepared, split)
        mine, summaries = summarize_shard(model, tokenizer, shards, self.config.model.target_len)
        references = [targets[i] for i in mine]
        totals = distributed.allreduce_sums(summary_sums(references, summaries))
        results.update(summary_scores(totals))
        if distributed.is_chief():
            results["samples"] = [
                {"source": sources[i], "target": targets[i], "generated": text}
                for i, text in list(zip(mine, summaries, strict=True))[:SAMPLES]
            ]
            results["baseline_lead"] = lead_baseline(self.prepared, split)
        return results

    def report(self, results: dict[str, Any], run_dir) -> None:
        """The table, the scores beside the lead-N baseline's, and a few summaries."""
        split = next(iter(results)).split("_", 1)[0]
        print(format_table(results), flush=True)
        print(format_comparison(results, split), flush=True)
        for sample in results.get(f"{split}_samples", []):
            print(
                f"source:    {shorten(sample['source'])}\n"
                f"target:    {sample['target']}\n"
                f"generated: {sample['generated']}",
                flush=True,
            )
        run_dir.merge_metrics(results)

    # --- using a trained run -----------------------------------------------------

    def generate(
        self,
        run,
        prompts: list[str],
        max_new_tokens: int = 40,
        sampler: str = "greedy",
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """The summary of each text, generated with a keras-hub sampler.

        `sampler` is greedy, top_k, top_p or beam (beam search, BEAMS beams).
        Summaries end at EOS, after `max_new_tokens` tokens or after the run's
        `model.target_len` tokens, whichever comes first. Texts are cleaned
        as in preparation and cut to the run's `model.seq_len` tokens.
        """
        from data.clean import clean_text

        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0; got {temperature}")
        texts = [clean_text(t, run.config.data.lowercase) for t in prompts]
        if not all(texts):
            raise UserError("a prompt is empty after cleaning")
        chooser = beam_sampler(temperature) if sampler == "beam" else None
        chooser = chooser or make_sampler(sampler, temperature, seed)
        rows = np.zeros((len(texts), run.seq_len), np.int32)
        for i, ids in enumerate(run.tokenizer.tokenize(texts)):
            ids = np.asarray(ids, np.int32)[: run.seq_len]
            rows[i, : len(ids)] = ids
        length = min(max_new_tokens, run.config.model.target_len)
        return [
            detokenize(run.tokenizer, ids)
            for ids in summarize_ids(run.model, rows, length, chooser)
        ]


def beam_sampler(temperature: float = 1.0) -> keras_hub.samplers.BeamSampler:
    """keras-hub's BeamSampler with BEAMS beams."""
    import keras_hub

    return keras_hub.samplers.BeamSampler(num_beams=BEAMS, temperature=temperature)


_COMPILED: dict[tuple[int, int, int], Any] = {}  # (model, sampler, length) -> tf.function


def summarize_ids(
    model: Seq2SeqTransformer, sources: np.ndarray, length: int, sampler: keras_hub.samplers.Sampler
) -> np.ndarray:
    """Generate up to `length` target ids for each row of source ids (B, S), with `sampler`.

    The encoder runs once per batch; keras-hub's sampler then calls `next`
    for each new position, which runs the decoder over the tokens so far
    (no cache: targets are short) and returns the logits of the last. The
    encoder's output travels in the sampler's cache, which BeamSampler
    repeats per beam. A row that has produced EOS is given logits that only
    allow EOS (log-probability 0): a finished beam keeps its score instead
    of adding the scores of tokens after its end, which keras-hub's
    BeamSampler would otherwise do. Returns (B, length) ids, EOS after a
    row's end.
    """
    key = (id(model), id(sampler), length)
    if key not in _COMPILED:
        _COMPILED.clear()  # one model at a time: drop traces of others
        vocab = int(model.vocabulary_size)

        @tf.function(reduce_retracing=True)
        def run(source):
            source_mask = tf.cast(tf.not_equal(source, PAD_ID), tf.int32)
            encoded = model.encode(source, source_mask, training=False)
            batch = tf.shape(source)[0]
            prompt = tf.concat(
                [tf.fill([batch, 1], BOS_ID), tf.zeros([batch, length], tf.int32)], axis=1
            )
            only_eos = tf.where(tf.range(vocab) == EOS_ID, 0.0, -1e9)[None, :]

            def next_logits(prompt, cache, index):
                encoded, source_mask = cache
                logits = model.decode(
                    encoded, source_mask, prompt, tf.ones_like(prompt), training=False
                )
                logits = tf.cast(logits[:, index - 1, :], tf.float32)
                finished = tf.reduce_any(tf.equal(prompt[:, 1:], EOS_ID), axis=-1, keepdims=True)
                return tf.where(finished, only_eos, logits), None, cache

            out = sampler(
                next_logits,
                prompt,
                cache=(encoded, source_mask),
                index=1,
                mask=tf.broadcast_to(tf.range(length + 1) < 1, [batch, length + 1]),
                stop_token_ids=[EOS_ID],
            )
            ids = out[:, 1:]
            ended = tf.cumsum(tf.cast(tf.equal(ids, EOS_ID), tf.int32), axis=1) > 0
            return tf.where(ended, EOS_ID, ids)

        _COMPILED[key] = run
    return _COMPILED[key](tf.constant(sources, tf.int32)).numpy()


def detokenize(tokenizer: keras_hub.tokenizers.Tokenizer, ids: np.ndarray) -> str:
    """The text of generated ids, up to the first EOS."""
    ids = np.asarray(ids, np.int32)
    if EOS_ID in ids:
        ids = ids[: int(np.argmax(ids == EOS_ID))]
    return tokenizer.detokenize(ids) if len(ids) else ""


def summarize_shard(
    model: Seq2SeqTransformer,
    tokenizer: keras_hub.tokenizers.Tokenizer,
    shards: Shards,
    length: int,
) -> tuple[list[int], list[str]]:
    """Greedy summaries of this rank's share of a split: (pair indices, summaries).

    Batches keep their full size (rows that only pad one are dropped after),
    so the generation function is traced once.
    """
    sampler = make_sampler("greedy")
    indices, weights = shards.eval_indices()
    mine, summaries = [], []
    for batch, w in zip(indices, weights, strict=True):
        ids = summarize_ids(model, shards.gather(batch)[0]["source"], length, sampler)
        for i, row, keep in zip(batch, ids, w > 0, strict=True):
            if keep:
                mine.append(int(i))
                summaries.append(detokenize(tokenizer, row))
    return mine, summaries


def summary_sums(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Sums of the summary scores over pairs: add them over shards, then `summary_scores`.

    BLEU is keras-hub's (`keras_hub.metrics.Bleu`: SacreBLEU's 13a
    tokenization, n-grams up to 4, no smoothing): its state is the n-gram
    matches and possible matches per order and the hypotheses' and
    references' lengths. ROUGE is rouge-score's F1 per pair, without
    stemming (as keras-hub's RougeN and RougeL compute it), summed. Exact
    match compares the texts with whitespace collapsed.
    """
    import keras_hub
    from rouge_score import rouge_scorer

    sums = Sums(
        {
            "bleu_matches": np.zeros(BLEU_ORDER),
            "bleu_possible": np.zeros(BLEU_ORDER),
            "bleu_hypothesis_length": 0.0,
            "bleu_reference_length": 0.0,
            "examples": float(len(references)),
            "exact_match": 0.0,
            **{f"{kind}_f1": 0.0 for kind in ROUGE_TYPES},
        }
    )
    if not references:
        return sums.values
    # keras-hub computes the score after every update and divides by the hypotheses' length:
    # with no hypothesis token at all, only the references' length is counted (through
    # a copy of the references standing in for the hypotheses).
    empty = not any(h.strip() for h in hypotheses)
    bleu = keras_hub.metrics.Bleu(max_order=BLEU_ORDER)
    bleu.update_state([[r] for r in references], references if empty else hypotheses)
    state = {v.name: np.asarray(v.numpy(), np.float64) for v in bleu.variables}
    sums.add({"bleu_reference_length": state["bleu_reference_length"]})
    if not empty:
        sums.add(
            {
                "bleu_matches": state["bleu_matches"],
                "bleu_possible": state["bleu_possible_matches"],
                "bleu_hypothesis_length": state["bleu_translation_length"],
            }
        )
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        scores = scorer.score(reference, hypothesis)
        sums.add({f"{kind}_f1": scores[kind].fmeasure for kind in ROUGE_TYPES})
        sums.add({"exact_match": float(hypothesis.split() == reference.split())})
    return sums.values


def summary_scores(totals: dict[str, Any]) -> dict[str, float]:
    """BLEU, ROUGE-1/2/L F1 and exact match from `summary_sums` totals (0 with no examples)."""
    n = totals["examples"]
    if n <= 0:
        return {}
    matches, possible = np.asarray(totals["bleu_matches"]), np.asarray(totals["bleu_possible"])
    hypothesis, reference = totals["bleu_hypothesis_length"], totals["bleu_reference_length"]
    precisions = np.divide(matches, possible, out=np.zeros(BLEU_ORDER), where=possible > 0)
    bleu = 0.0
    if hypothesis > 0 and precisions.min() > 0:
        brevity = 1.0 if hypothesis > reference else math.exp(1 - reference / hypothesis)
        bleu = math.exp(np.log(precisions).mean()) * brevity
    return {
        "bleu": bleu,
        **{kind: totals[f"{kind}_f1"] / n for kind in ROUGE_TYPES},
        "exact_match": totals["exact_match"] / n,
        "examples": int(n),
    }


def lead(text: str, words: int) -> str:
    """The first `words` words of `text`."""
    return " ".join(text.split()[:words])


def lead_baseline(prepared: Prepared, split: str) -> dict[str, Any]:
    """The first N words of each source as its summary: N tuned on validation, scored on `split`.

    N is the one of BASELINE_WORDS with the best mean ROUGE-L F1 on the
    validation split; the scores are those of the model (`summary_scores`).
    """
    from rouge_score import rouge_scorer

    from data.pairs import pair_texts

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    val_sources, val_targets = pair_texts(prepared, "val")
    tuned = {
        n: float(
            np.mean(
                [
                    scorer.score(t, lead(s, n))["rougeL"].fmeasure
                    for s, t in zip(val_sources, val_targets, strict=True)
                ]
            )
        )
        for n in BASELINE_WORDS
    }
    words = max(tuned, key=lambda n: (tuned[n], -n))
    sources, targets = pair_texts(prepared, split)
    scores = summary_scores(summary_sums(targets, [lead(s, words) for s in sources]))
    return {"words": words, "val_rougeL": tuned[words], **scores}


def format_comparison(results: dict[str, Any], split: str) -> str:
    """The summary scores beside the lead-N baseline's, one per line."""
    baseline = results.get(f"{split}_baseline_lead", {})
    words = baseline.get("words", "?")
    lines = [f"{'':<12}{'model':>10}{f'first {words} words':>18}"]
    for name in SCORES:
        model = results.get(f"{split}_{name}", float("nan"))
        lines.append(f"{name:<12}{model:>10.4f}{baseline.get(name, float('nan')):>18.4f}")
    return "\n".join(lines)


def shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
