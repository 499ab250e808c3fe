"""Causal language modelling (GPT-style next-token prediction), and what it shares with
masked-LM pretraining: both learn from windows of one token stream.

After training a causal LM is judged by cross-entropy, perplexity,
next-token accuracy and top-5 accuracy, next-token precision/recall/F1
(macro and weighted over the token classes that occur), vocabulary coverage
(the share of the vocabulary predicted correctly at least once), and BLEU and
ROUGE-L of greedy continuations of held-out prompts against the true ones.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from data.load import Shards, Windows
from data.prepare import Prepared, special_ids
from models.generation import generate_ids, make_sampler
from models.losses import token_class_stats, token_stats
from models.tasks.base import Task, model_inputs
from utils import distributed
from utils.errors import UserError
from utils.metrics import Sums, classification_metrics, lm_metrics

PROMPT_TOKENS = 32  # held-out prompt length for BLEU/ROUGE-L
CONTINUATION_TOKENS = 16  # generated and reference continuation length
NUM_PROMPTS = 64
SAMPLE_PROMPT = "Return the"  # continued once after training, as a first look


class LanguageModel(Task):
    """Tasks that read windows of `model.seq_len + 1` tokens of the prepared token stream."""

    def prepare(self, progress: bool, log, tokenizer=None) -> Prepared:
        from data.prepare import prepare

        return prepare(self.config.data, progress=progress, log=log, tokenizer=tokenizer)

    @property
    def samples(self) -> str:
        return f"windows of {self.config.model.seq_len + 1} tokens"

    def shards(self, split: str) -> Shards:
        return Windows(
            self.prepared.tokens(split),
            self.config.model.seq_len,
            self.rows_per_step(split),
            distributed.data_rank(),
            distributed.data_size(),
        )

    def check_sizes(self) -> None:
        """UserError when a split is too small for seq_len and the global batch."""
        seq_len = self.config.model.seq_len
        for split in ("train", "val", "test"):
            n_tokens = self.prepared.meta["tokens"][split]
            if n_tokens < seq_len + 1:
                raise UserError(
                    f"model.seq_len={seq_len} is longer than the {split} split ({n_tokens} tokens); "
                    "lower model.seq_len or add text"
                )
        self._check_train_batches(self.samples, " or model.seq_len")


class CausalLM(LanguageModel):
    """GPT-style next-token prediction with a decoder-only Transformer."""

    name = "causal_lm"

    def compile_args(self) -> dict[str, Any]:
        """Loss and metrics for `model.compile`: token cross-entropy and accuracy."""
        return {
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        }

    def epoch_figures(self, logs: dict[str, float]) -> dict[str, float]:
        """Perplexity = exp(mean cross-entropy per token)."""
        return {
            f"{prefix}perplexity": math.exp(min(logs[f"{prefix}loss"], 700.0))
            for prefix in ("", "val_")
            if f"{prefix}loss" in logs
        }

    def build_model(self) -> keras.Model:
        if self.config.train.init_from_preset:
            from models.presets import build

            return build(self.prepared.tokenizer_path, self.name)
        from models.transformer import build_causal_lm

        return build_causal_lm(self.config.model, self.prepared.vocab_size)

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        logits = model(model_inputs(inputs, self.pad_id), training=training)  # (B, T, V)
        stats = token_stats(targets, logits, weights, -1 if self.pad_id is None else self.pad_id)
        return {**stats, "loss_weight": stats["count"]}

    def metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        return lm_metrics(totals)

    # --- after training --------------------------------------------------------

    def evaluate_split(self, model, tokenizer, split: str) -> dict[str, Any]:
        results = self.token_metrics(model, self.split_shards(split))
        if distributed.is_chief():
            results.update(
                continuation_scores(
                    model, tokenizer, self.prepared.tokens(split), self.config.model.seq_len
                )
            )
        results["unigram_perplexity"] = self.prepared.meta["unigram_perplexity"].get(split)
        return results

    def token_metrics(self, model, shards: Shards) -> dict[str, float]:
        """Every count-based metric on this rank's shards, exact across ranks."""
        vocab = self.prepared.vocab_size
        pad = -1 if self.pad_id is None else self.pad_id  # -1: every target counts

        @tf.function(jit_compile=self.config.train.xla, reduce_retracing=True)
        def stats(x, y, w):
            logits = model(model_inputs(x, self.pad_id), training=False)
            return {
                **token_stats(y, logits, w, pad),
                **token_class_stats(y, logits, w, vocab, pad),
            }

        sums = Sums()
        for x, y, w in shards.eval_dataset():
            sums.add({k: v.numpy() for k, v in stats(x, y, w).items()})
        totals = distributed.allreduce_sums(sums.values)
        out = lm_metrics(totals)
        if not out:
            return out
        cls = classification_metrics(totals["tp"], totals["support"], totals["predicted"])
        for kind in ("macro", "weighted"):
            for name in ("precision", "recall", "f1"):
                out[f"{kind}_{name}"] = cls[f"{kind}_{name}"]
        out["vocabulary_coverage"] = float((totals["tp"] > 0).sum() / vocab)
        out["token_classes_present"] = cls["classes_present"]
        return out

    def quality(self, model, split: str) -> dict[str, float]:
        m = self.token_metrics(model, self.split_shards(split))
        return {"perplexity": m["perplexity"], "accuracy": m["accuracy"]}

    def show_generated(self, prompt: str, text: str) -> str:
        """The prompt and its continuation, as one text."""
        return f"{prompt}{'' if prompt.endswith(' ') or not text else ' '}{text}"

    def after_training(self, run) -> None:
        print(f"sample: {SAMPLE_PROMPT} -> {self.generate(run, [SAMPLE_PROMPT], 30)[0]}")

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
        """Continue each text prompt with a keras-hub sampler; returns the continuations."""
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0; got {temperature}")
        chooser = make_sampler(sampler, temperature, seed)
        eos = special_ids(run.tokenizer)["eos"]
        outputs = []
        for text in prompts:
            ids = [int(i) for i in run.tokenizer.tokenize(text)]
            if not ids:
                raise UserError("the prompt is empty after tokenization")
            new = generate_ids(
                run.model, np.array([ids]), max_new_tokens, chooser, run.seq_len, eos
            )[0]
            new = new[: int(np.argmax(new == eos))] if eos in new else new
            outputs.append(run.tokenizer.detokenize(new.astype(np.int32)) if len(new) else "")
        return outputs


def continuation_scores(
    model, tokenizer, tokens: np.ndarray, seq_len: int, num_prompts: int = NUM_PROMPTS
) -> dict[str, float]:
    """BLEU and ROUGE-L of greedy continuations of held-out prompts (rank 0 computes).

    Prompts are `PROMPT_TOKENS` tokens taken at evenly spaced places of the
    split; each is continued greedily by `CONTINUATION_TOKENS` tokens and
    compared, as text, with the true next tokens.
    """
    import keras_hub

    span = PROMPT_TOKENS + CONTINUATION_TOKENS
    if len(tokens) < span:
        return {}
    starts = np.linspace(0, len(tokens) - span, min(num_prompts, len(tokens) // span)).astype(
        np.int64
    )
    rows = np.stack([np.asarray(tokens[s : s + span], dtype=np.int32) for s in starts])
    prompt_len = min(PROMPT_TOKENS, seq_len - 1)
    generated = generate_ids(
        model,
        rows[:, PROMPT_TOKENS - prompt_len : PROMPT_TOKENS],
        CONTINUATION_TOKENS,
        make_sampler("greedy"),
        seq_len,
    )
    references = [tokenizer.detokenize(r[PROMPT_TOKENS:]) for r in rows]
    hypotheses = [tokenizer.detokenize(g) for g in generated]
    bleu = keras_hub.metrics.Bleu()
    if any(h.strip() for h in hypotheses):  # keras-hub divides by the hypotheses' length
        bleu.update_state([[r] for r in references], hypotheses)
    rouge = keras_hub.metrics.RougeL()
    rouge.update_state(references, hypotheses)
    return {
        "bleu": float(bleu.result()),
        "rouge_l_f1": float(rouge.result()["f1_score"]),
        "continuation_prompts": len(rows),
    }
