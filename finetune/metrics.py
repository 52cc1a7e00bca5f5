"""Pure metric functions (no MindSpore, no files): multiple-choice scoring."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

LETTERS = ("A", "B", "C", "D")


def mc_predictions(letter_logits: np.ndarray) -> list[str]:
    """[N, 4] logits of the tokens A, B, C, D at the last prompt position -> predicted letters.
    Ties go to the earlier letter (np.argmax), so the result never depends on float noise order."""
    letter_logits = np.asarray(letter_logits)
    if letter_logits.ndim != 2 or letter_logits.shape[1] != len(LETTERS):
        raise ValueError(f"expected [N, 4] letter logits, got shape {letter_logits.shape}")
    return [LETTERS[i] for i in np.argmax(letter_logits, axis=1)]


def letter_probabilities(letter_logits: np.ndarray) -> np.ndarray:
    """Softmax over the four letters only (what a user reads as the model's confidence)."""
    z = np.asarray(letter_logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("accuracy of zero questions is undefined")
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def per_subject_accuracy(subjects: Sequence[str], predictions: Sequence[str], answers: Sequence[str]
                         ) -> dict[str, float]:
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for s, p, a in zip(subjects, predictions, answers, strict=True):
        total[s] += 1
        right[s] += p == a
    return {s: right[s] / total[s] for s in sorted(total)}
