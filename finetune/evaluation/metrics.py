"""Pure metric functions: multiple-choice scoring and SQuAD v1.1 EM/F1, two ways:

- official: the SQuAD v1.1 script's definitions (normalize: lower-case, drop punctuation and
  articles; F1 over bags of tokens; max over every gold answer);
- mindformers: MindFormers' own `EmF1Metric` (what the 2024 contest scored with), called, not
  rewritten: lower-case, drop a fixed list of punctuation (ASCII . , ! ? ' " ( ) ; stay), jieba
  segmentation (each CJK character a token), F1 from the longest common *contiguous* run of
  tokens, EM after dropping that punctuation. It imports MindSpore (seconds), only when asked.

The command line (`python -m finetune.evaluation squad ...`, finetune/evaluation/cli.py) reads files; nothing here does."""
from __future__ import annotations

import logging
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from finetune.data.records import LETTERS
from finetune.data.squad import squad_records


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


# --- SQuAD v1.1 extractive QA scoring (exact match and token F1, as the official evaluator) ---
# Implemented from the published definitions: answers are compared after normalization
# (lower-case, ASCII punctuation removed, the articles a/an/the removed as whole words,
# whitespace collapsed); each question scores its best match over the gold answers; the dataset
# score is the mean over every question in the dataset (a question without a prediction scores 0)
# times 100. Like the official script, a gold answer that normalizes to "" (the dev set has three
# "." answers) exact-matches an empty prediction but gives it F1 0 (no common tokens).

log = logging.getLogger(__name__)

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
SQUAD_METRICS = ("official", "mindformers")


def macro_accuracy(per_subject: dict[str, float]) -> float:
    """The mean of per-subject accuracies (CMMLU's official average; MMLU reports it too), beside
    the micro average over questions (mc_accuracy): a subject of 10 questions weighs as much as
    one of 1,000."""
    if not per_subject:
        raise ValueError("macro accuracy of zero subjects is undefined")
    return sum(per_subject.values()) / len(per_subject)


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation, drop a/an/the, collapse whitespace."""
    s = s.lower().translate(_DROP_PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def squad_f1(pred: str, gold: str) -> float:
    """Harmonic mean of token precision and recall; tokens counted with multiplicity."""
    pred_tokens = normalize_answer(pred).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)










def _emf1_metric():
    """MindFormers' EmF1Metric, imported once and quietly: its module prints nothing we want, and
    MindFormers writes its logs under LOCAL_DEFAULT_PATH (a temporary folder unless a job set one)."""
    global _EMF1
    if _EMF1 is None:
        import contextlib
        import io
        import os
        import tempfile

        os.environ.setdefault("LOCAL_DEFAULT_PATH", tempfile.mkdtemp(prefix="finetune-mindformers-"))
        with contextlib.redirect_stdout(io.StringIO()):
            import jieba
            from mindformers.core.metric.metric import EmF1Metric

        jieba.setLogLevel(logging.ERROR)   # "Building prefix dict ..." on every first use
        _EMF1 = EmF1Metric()
    return _EMF1


_EMF1 = None


def squad_mindformers(pred: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) as fractions under MindFormers' EmF1Metric, best over `golds`; the prediction is
    first cut to its first line and stripped, as EmF1Metric.update does with a generation."""
    import contextlib
    import io

    metric = _emf1_metric()
    pred = pred.strip().split("\n")[0]
    with contextlib.redirect_stdout(io.StringIO()):
        return float(metric.calc_em_score(list(golds), pred)), float(metric.calc_f1_score(list(golds), pred))


def score_squad_records(records, predictions: dict[str, str], metric: str = "official", gold: str = "all") -> dict:
    """{"exact_match", "f1"} in percent over flattened records (load_squad's form); a record
    without a prediction scores 0. metric: official | mindformers (see the module docstring);
    gold: all (the best over every gold answer) | first (the first gold answer only)."""
    if metric not in SQUAD_METRICS:
        raise ValueError(f"SQuAD metric {metric!r}: expected one of {', '.join(SQUAD_METRICS)}")
    if gold not in ("all", "first"):
        raise ValueError(f"SQuAD gold {gold!r}: expected all or first")
    em = f1 = 0.0
    total = missing = 0
    for record in records:
        total += 1
        pred = predictions.get(record["id"])
        if pred is None:
            missing += 1
            continue
        if not isinstance(pred, str):
            raise ValueError(f"prediction for {record['id']!r} is {type(pred).__name__}, not a string")
        golds = record["answers"][:1] if gold == "first" else record["answers"]
        if metric == "mindformers":
            e, f = squad_mindformers(pred, golds)
        else:
            e = max(squad_exact_match(pred, g) for g in golds)
            f = max(squad_f1(pred, g) for g in golds)
        em += e
        f1 += f
    if total == 0:
        raise ValueError("SQuAD scores of zero questions are undefined")
    if missing:
        log.warning("%d of %d questions have no prediction; they score 0", missing, total)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


def squad_scores(dataset: dict, predictions: dict[str, str]) -> dict:
    """{"exact_match", "f1"} in percent over every question of a parsed official SQuAD file
    (data[].paragraphs[].qas[]); `predictions` maps question id -> answer text. Ids in
    `predictions` that are not in the dataset are ignored."""
    return score_squad_records(squad_records(dataset, "dataset"), predictions)
def contest_score(accuracy: float, trainable_ratio: float) -> float:
    """The contest's ranking: (100% - 10 x trainable_ratio) x 0.3 + accuracy x 0.7, all as fractions.
    InternLM-7B, LoRA r8 (ratio 0.001146) at 50% accuracy: (1 - 0.01146) x 0.3 + 0.35 = 0.6466."""
    return (1.0 - 10.0 * trainable_ratio) * 0.3 + accuracy * 0.7


def select_best(scores: list[dict]) -> dict | None:
    """The checkpoint to keep: highest mc_accuracy among those not known to have lost SQuAD
    ability (retained False); ties go to the earlier step (less training, same score)."""
    eligible = [s for s in scores if s.get("retained") is not False]
    if not eligible:
        return None
    return max(eligible, key=lambda s: (s["mc_accuracy"], -s["step"]))
