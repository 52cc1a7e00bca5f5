"""Pure metric functions: multiple-choice scoring and SQuAD v1.1 EM/F1, two ways:

- official: the SQuAD v1.1 script's definitions (normalize: lower-case, drop punctuation and
  articles; F1 over bags of tokens; max over every gold answer);
- mindformers: MindFormers' own `EmF1Metric` (what the 2024 contest scored with), called, not
  rewritten: lower-case, drop a fixed list of punctuation (ASCII . , ! ? ' " ( ) ; stay), jieba
  segmentation (each CJK character a token), F1 from the longest common *contiguous* run of
  tokens, EM after dropping that punctuation. It imports MindSpore (seconds), only when asked.

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
from types import SimpleNamespace

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
SQUAD_USAGE = ("usage: python -m finetune.metrics squad [--metric official|mindformers|both] [--gold all|first] "
               "DATASET.json PREDICTIONS.json")
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

    paragraph_index = -1
    for i, article in enumerate(get(dataset, "data", list, "top level")):
        where_a = f"data[{i}]"
        paragraphs = get(article, "paragraphs", list, where_a)
        title = article.get("title", "")
        for j, paragraph in enumerate(paragraphs):
            where_p = f"{where_a}.paragraphs[{j}]"
            context = get(paragraph, "context", str, where_p)
            paragraph_index += 1
            for k, qa in enumerate(get(paragraph, "qas", list, where_p)):
                where_q = f"{where_p}.qas[{k}]"
                qid = get(qa, "id", str, where_q)
                question = get(qa, "question", str, where_q)
                answers = get(qa, "answers", list, where_q)
                if not answers:
                    fail(where_q, "'answers' is empty")
                texts = [get(a, "text", str, f"{where_q}.answers[{n}]") for n, a in enumerate(answers)]
                yield {"id": qid, "title": title, "context": context, "question": question,
                       "answers": texts, "paragraph": paragraph_index}


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


def first_per_paragraph(records: list[dict]) -> list[dict]:
    """The first question of every paragraph (the contest's SQuAD set: 2,067 of dev-v1.1's 10,570)."""
    seen, out = set(), []
    for r in records:
        if r["paragraph"] not in seen:
            seen.add(r["paragraph"])
            out.append(r)
    return out


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
    return score_squad_records(_squad_records(dataset, "dataset"), predictions)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m finetune.metrics squad [--metric M] [--gold G] DATASET.json PREDICTIONS.json` ->
    JSON scores on stdout ({"exact_match", "f1"}; with --metric both, one such object per metric).
    Exit 2 on bad usage, 1 on an unreadable or malformed file."""
    options = {"--metric": "official", "--gold": "all"}
    choices = {"--metric": (*SQUAD_METRICS, "both"), "--gold": ("all", "first")}
    words, positional = list(sys.argv[1:] if argv is None else argv), []
    while words:
        word = words.pop(0)
        name, _, value = word.partition("=")
        if name in options:
            value = value or (words.pop(0) if words else "")
            if value not in choices[name]:
                positional = []   # bad usage
                break
            options[name] = value
        else:
            positional.append(word)
    if len(positional) != 3 or positional[0] != "squad":
        print(SQUAD_USAGE, file=sys.stderr)
        return 2
    args = SimpleNamespace(dataset=positional[1], predictions=positional[2], metric=options["--metric"],
                           gold=options["--gold"])
    try:
        dataset = _read_json(args.dataset)
        version = dataset.get("version") if isinstance(dataset, dict) else None
        if version != "1.1":
            log.warning("%s: expected a SQuAD v1.1 file, got version %r", args.dataset, version)
        predictions = _read_json(args.predictions)
        if not isinstance(predictions, dict):
            raise ValueError(f"{args.predictions}: expected a JSON object of question id -> answer text")
        records = list(_squad_records(dataset, args.dataset))
        if args.metric == "both":
            scores = {m: score_squad_records(records, predictions, m, args.gold) for m in SQUAD_METRICS}
        else:
            scores = score_squad_records(records, predictions, args.metric, args.gold)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
