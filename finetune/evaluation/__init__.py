"""Evaluation: multiple-choice letter scoring, SQuAD answers and retention, pure metrics, the
contest score, the best checkpoint.

The names below are the package's face: what stages and the entrypoint import."""

from finetune.evaluation.metrics import (
    SQUAD_METRICS,
    accuracy,
    contest_score,
    macro_accuracy,
    per_subject_accuracy,
    score_squad_records,
    select_best,
)
from finetune.evaluation.scoring import (
    build_eval_prompts,
    choose,
    generated_choices,
    letter_logits,
    letter_token_ids,
    probabilities_row,
)
from finetune.evaluation.squad import answer_text, retention, squad_predictions

__all__ = [
    "SQUAD_METRICS",
    "accuracy",
    "answer_text",
    "build_eval_prompts",
    "choose",
    "contest_score",
    "generated_choices",
    "letter_logits",
    "letter_token_ids",
    "macro_accuracy",
    "per_subject_accuracy",
    "probabilities_row",
    "retention",
    "score_squad_records",
    "select_best",
    "squad_predictions",
]
