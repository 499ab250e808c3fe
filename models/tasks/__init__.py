"""What is learned: causal LM, masked LM (BERT-style pretraining), text classification,
sequence to sequence (summarization).

One class per task (models/tasks/base.py says what a task provides); the
training loop, evaluate.py and main.py call its methods and never branch on
its name.
"""

from __future__ import annotations

from data.prepare import Prepared
from models.tasks.base import Task, model_inputs
from models.tasks.classify import Classify
from models.tasks.language_model import CausalLM, LanguageModel
from models.tasks.masked_lm import MASK_ID, MaskedLM
from models.tasks.seq2seq import Seq2Seq
from utils.config import Config

TASK_CLASSES: dict[str, type[Task]] = {
    cls.name: cls for cls in (CausalLM, MaskedLM, Classify, Seq2Seq)
}


def make_task(config: Config, prepared: Prepared | None = None) -> Task:
    """The task `config.task` names, for `config` and (optionally) its prepared data."""
    return TASK_CLASSES[config.task](config, prepared)


__all__ = [
    "MASK_ID",
    "TASK_CLASSES",
    "CausalLM",
    "Classify",
    "LanguageModel",
    "MaskedLM",
    "Seq2Seq",
    "Task",
    "make_task",
    "model_inputs",
]
