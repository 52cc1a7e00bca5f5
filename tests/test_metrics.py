import numpy as np
import pytest

from finetune.evaluation import metrics


def test_mc_predictions_argmax_over_letters():
    logits = np.array([[0.1, 2.0, -1.0, 0.5],   # B
                       [3.0, 3.0, 1.0, 0.0],    # tie A/B -> A (first)
                       [-5, -4, -3, -2.5]])     # D
    assert metrics.mc_predictions(logits) == ["B", "A", "D"]


def test_mc_predictions_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        metrics.mc_predictions(np.zeros((2, 5)))


def test_accuracy_and_per_subject():
    preds = ["A", "B", "C", "D", "A"]
    answers = ["A", "B", "D", "D", "B"]
    subjects = ["x", "x", "y", "y", "y"]
    assert metrics.accuracy(preds, answers) == pytest.approx(3 / 5)
    assert metrics.per_subject_accuracy(subjects, preds, answers) == {"x": 1.0, "y": pytest.approx(1 / 3)}
    with pytest.raises(ValueError):
        metrics.accuracy([], [])


def test_letter_probabilities_softmax():
    p = metrics.letter_probabilities(np.array([[0.0, 0.0, 0.0, np.log(3.0)]]))
    np.testing.assert_allclose(p, [[1 / 6, 1 / 6, 1 / 6, 1 / 2]], rtol=1e-12)
