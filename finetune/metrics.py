"""Pure metric functions (no MindSpore): multiple-choice scoring and SQuAD v1.1 EM/F1.

Only `load_squad` and the command line (`python -m finetune.metrics squad ...`) read files."""
from __future__ import annotations

import json
import logging
import re
import string
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.records import LETTERS


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

log = logging.getLogger("finetune.metrics")

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
SQUAD_USAGE = "usage: python -m finetune.metrics squad DATASET.json PREDICTIONS.json"


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


def _squad_records(dataset, source: str):
    """Yield {id, title, context, question, answers} from the official layout, checking each
    level; a malformed record raises ValueError("<source>: data[i].paragraphs[j].qas[k]: ...")."""
    def fail(where: str, what: str):
        raise ValueError(f"{source}: {where}: {what}")

    def get(obj, key: str, kind: type, where: str):
        if not isinstance(obj, dict):
            fail(where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            fail(where, f"missing {key!r}")
        value = obj[key]
        if not isinstance(value, kind):
            fail(f"{where}.{key}", f"expected {'a list' if kind is list else 'a string'}, "
                                   f"got {type(value).__name__}")
        return value

    for i, article in enumerate(get(dataset, "data", list, "top level")):
        where_a = f"data[{i}]"
        paragraphs = get(article, "paragraphs", list, where_a)
        title = article.get("title", "")
        for j, paragraph in enumerate(paragraphs):
            where_p = f"{where_a}.paragraphs[{j}]"
            context = get(paragraph, "context", str, where_p)
            for k, qa in enumerate(get(paragraph, "qas", list, where_p)):
                where_q = f"{where_p}.qas[{k}]"
                qid = get(qa, "id", str, where_q)
                question = get(qa, "question", str, where_q)
                answers = get(qa, "answers", list, where_q)
                if not answers:
                    fail(where_q, "'answers' is empty")
                texts = [get(a, "text", str, f"{where_q}.answers[{n}]") for n, a in enumerate(answers)]
                yield {"id": qid, "title": title, "context": context, "question": question,
                       "answers": texts}


def _read_json(path) -> object:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON: {e}") from None


def load_squad(path) -> list[dict]:
    """The official SQuAD v1.1 JSON file flattened to one record per question:
    {id, title, context, question, answers: [gold texts]}, in file order."""
    path = Path(path)
    return list(_squad_records(_read_json(path), str(path)))


def score_squad_records(records, predictions: dict[str, str]) -> dict:
    """{"exact_match", "f1"} in percent over flattened records (load_squad's form); a record
    without a prediction scores 0."""
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
        em += max(squad_exact_match(pred, gold) for gold in record["answers"])
        f1 += max(squad_f1(pred, gold) for gold in record["answers"])
    if total == 0:
        raise ValueError("SQuAD scores of zero questions are undefined")
    if missing:
        log.warning("%d of %d questions have no prediction; they score 0", missing, total)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


def squad_scores(dataset: dict, predictions: dict[str, str]) -> dict:
    """{"exact_match", "f1"} in percent over every question of a parsed official SQuAD file
    (data[].paragraphs[].qas[]); `predictions` maps question id -> answer text. Ids in
    `predictions` that are not in the dataset are ignored."""
    return score_squad_records(_squad_records(dataset, "dataset"), predictions)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m finetune.metrics squad DATASET.json PREDICTIONS.json` -> JSON scores on stdout.
    Exit 2 on bad usage, 1 on an unreadable or malformed file."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "squad":
        print(SQUAD_USAGE, file=sys.stderr)
        return 2
    _, dataset_path, predictions_path = args
    try:
        dataset = _read_json(dataset_path)
        version = dataset.get("version") if isinstance(dataset, dict) else None
        if version != "1.1":
            log.warning("%s: expected a SQuAD v1.1 file, got version %r", dataset_path, version)
        predictions = _read_json(predictions_path)
        if not isinstance(predictions, dict):
            raise ValueError(f"{predictions_path}: expected a JSON object of question id -> answer text")
        scores = score_squad_records(_squad_records(dataset, dataset_path), predictions)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
