"""SQuAD v1.1 exact match / F1 (finetune.evaluation.metrics): hand-computed cases, the real dev set, the CLI."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.data.squad import first_per_paragraph, load_squad
from finetune.evaluation import cli, metrics
from helpers import REPO, run_process, shared_path

DEV_FULL = 10570      # questions in the official dev-v1.1.json
DEV_300 = 303         # questions in dev-v1.1.first300q.json (the first 303 of the full file)


def _squad_file(name: str) -> Path:
    return shared_path("data", "squad", name)


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def dev_full():
    """(parsed JSON, flattened records) of the full official dev set, read once."""
    path = _squad_file("dev-v1.1.json")
    return json.loads(path.read_text(encoding="utf-8")), load_squad(path)


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def dev_300_path() -> Path:
    return _squad_file("dev-v1.1.first300q.json")


def _squad_json(*articles) -> dict:
    """Official layout from [(title, [(context, [(id, question, [gold texts])...])...])...]."""
    return {"version": "1.1", "data": [
        {"title": title, "paragraphs": [
            {"context": context, "qas": [
                {"id": qid, "question": question,
                 "answers": [{"answer_start": 0, "text": t} for t in golds]}
                for qid, question, golds in qas]}
            for context, qas in paragraphs]}
        for title, paragraphs in articles]}


# Three questions whose scores are worked out by hand:
#   q1: "The Eiffel Tower!" normalizes to "eiffel tower" = the 2nd gold -> EM 1, F1 1
#   q2: "big red dog" vs "blue cat" (F1 0) and "red" (common 1, P 1/3, R 1, F1 0.5) -> EM 0, F1 0.5
#   q3: no prediction -> 0, 0
# dataset: EM = 100 * 1/3, F1 = 100 * 1.5/3 = 50.
TINY = _squad_json(("Paris", [("Paris has a tower. A dog is red.", [
    ("q1", "Which tower?", ["Paris", "eiffel tower"]),
    ("q2", "What is red?", ["blue cat", "red"]),
    ("q3", "Where?", ["Paris"]),
])]))
TINY_PREDICTIONS = {"q1": "The Eiffel Tower!", "q2": "big red dog"}
TINY_SCORES_JSON = '{"exact_match": 33.333333333333336, "f1": 50.0}'


# --- normalization, EM, F1 ---

@pytest.mark.parametrize("raw, normalized", [
    ("The  Cat!", "cat"),
    ("an apple a day", "apple day"),
    ("Theatre, an Anthem; the thE end", "theatre anthem end"),   # articles only as whole words
    ("U.S.A.", "usa"),                                           # punctuation dropped, not spaced
    ("don't\tstop\n the music", "dont stop music"),
    ("A", ""),
    ("...", ""),
])
def test_normalize_answer(raw, normalized):
    assert metrics.normalize_answer(raw) == normalized


def test_exact_match_after_normalization():
    assert metrics.squad_exact_match("The Cat.", "cat") == 1.0
    assert metrics.squad_exact_match("cats", "cat") == 0.0
    assert metrics.squad_exact_match("red dog", "dog red") == 0.0         # order matters for EM


def test_f1_by_hand():
    # after article removal: pred [big, red, dog], gold [red, dog]: common 2, P 2/3, R 1
    assert metrics.squad_f1("the big red dog", "red dog") == pytest.approx(0.8)
    assert metrics.squad_f1("red dog", "dog red") == 1.0                  # bag of tokens
    assert metrics.squad_f1("cat", "dog") == 0.0
    # common tokens counted with multiplicity (Counter intersection)
    assert metrics.squad_f1("dog dog dog", "dog") == pytest.approx(0.5)   # P 1/3, R 1
    assert metrics.squad_f1("dog", "dog dog") == pytest.approx(2 / 3)     # P 1, R 1/2


def test_empty_after_normalization_matches_but_has_no_f1():
    """As the official v1.1 evaluator: "" == "" is an exact match, but no common tokens -> F1 0."""
    assert metrics.squad_exact_match("", ".") == 1.0
    assert metrics.squad_f1("", ".") == 0.0
    assert metrics.squad_f1("the", "") == 0.0


def test_scores_take_max_over_golds_and_missing_scores_zero(caplog):
    with caplog.at_level(logging.WARNING, logger="finetune.evaluation"):
        scores = metrics.squad_scores(TINY, TINY_PREDICTIONS)
    assert scores == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(50.0)}
    assert "1 of 3 questions have no prediction" in caplog.text
    # all three answered with a gold -> 100/100 and no warning; extra ids are ignored
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.evaluation"):
        full = metrics.squad_scores(TINY, {"q1": "Paris", "q2": "RED", "q3": "paris.", "zz": "x"})
    assert full == {"exact_match": 100.0, "f1": 100.0}
    assert caplog.text == ""


# --- malformed files ---

def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_load_squad_names_the_file_and_json_path_of_a_malformed_record(tmp_path):
    data = _squad_json(("A", [("c", [("a1", "q?", ["x"])])]),
                       ("B", [("c", [("b1", "q?", ["x"])]), ("c", [("b2", "q?", ["x"])])]))
    del data["data"][1]["paragraphs"][1]["qas"][0]["answers"]
    path = _write(tmp_path / "dev.json", data)
    with pytest.raises(ValueError) as err:
        load_squad(path)
    assert str(err.value) == f"{path}: data[1].paragraphs[1].qas[0]: missing 'answers'"
    # the same check guards squad_scores on an already-parsed dict
    with pytest.raises(ValueError, match=r"^dataset: data\[1\]\.paragraphs\[1\]\.qas\[0\]: missing 'answers'$"):
        metrics.squad_scores(data, {})


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d.pop("data"), "top level: missing 'data'"),
    (lambda d: d["data"][0]["paragraphs"][0].update(qas={}), "data[0].paragraphs[0].qas: expected a list"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].pop("text"),
     "data[0].paragraphs[0].qas[1].answers[0]: missing 'text'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(answers=[]),
     "data[0].paragraphs[0].qas[1]: 'answers' is empty"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"].__setitem__(0, "oops"),
     "data[0].paragraphs[0].qas[0]: expected an object, got str"),
])
def test_load_squad_other_malformations(tmp_path, break_it, where):
    data = _squad_json(("A", [("c", [("a1", "q?", ["x"]), ("a2", "q?", ["y"])])]))
    break_it(data)
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError) as err:
        load_squad(path)
    assert str(err.value).startswith(f"{path}: {where}")
    assert "\n" not in str(err.value)


def test_load_squad_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid UTF-8 JSON"):
        load_squad(path)


# --- the real dev set ---

def test_load_squad_flattens_the_official_files(dev_full, dev_300_path):
    _, records = dev_full
    assert len(records) == DEV_FULL
    assert len({r["id"] for r in records}) == DEV_FULL
    first = records[0]
    assert set(first) == {"id", "title", "context", "question", "answers", "paragraph"}
    assert first["title"] == "Super_Bowl_50"
    assert first["answers"] and all(isinstance(a, str) for a in first["answers"])
    assert first["answers"][0] in first["context"]
    first300 = load_squad(dev_300_path)
    assert len(first300) == DEV_300
    assert first300 == records[:DEV_300]


def test_dev_set_first_gold_scores_100(dev_full, caplog):
    dataset, records = dev_full
    with caplog.at_level(logging.WARNING, logger="finetune.evaluation"):
        scores = metrics.squad_scores(dataset, {r["id"]: r["answers"][0] for r in records})
    assert scores == {"exact_match": 100.0, "f1": 100.0}
    assert caplog.text == ""


def test_dev_set_empty_predictions(dev_full):
    """F1 is 0. EM is not quite 0: three dev questions have the gold answer ".", which
    normalizes to "" and so exact-matches an empty prediction (the official script does the same)."""
    dataset, records = dev_full
    empty_golds = sum(any(metrics.normalize_answer(a) == "" for a in r["answers"]) for r in records)
    assert empty_golds == 3
    scores = metrics.squad_scores(dataset, {r["id"]: "" for r in records})
    assert scores["f1"] == 0.0
    assert scores["exact_match"] == pytest.approx(100 * 3 / DEV_FULL)


def test_dev_set_missing_predictions_score_zero(dev_full, dev_300_path, caplog):
    dataset, _ = dev_full
    predictions = {r["id"]: r["answers"][0] for r in load_squad(dev_300_path)}
    with caplog.at_level(logging.WARNING, logger="finetune.evaluation"):
        scores = metrics.squad_scores(dataset, predictions)
    assert scores["exact_match"] == pytest.approx(100 * DEV_300 / DEV_FULL)
    assert scores["f1"] == pytest.approx(100 * DEV_300 / DEV_FULL)
    assert f"{DEV_FULL - DEV_300} of {DEV_FULL} questions have no prediction" in caplog.text


# --- command line: python -m finetune.evaluation squad DATASET.json PREDICTIONS.json ---

def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_process([sys.executable, "-m", "finetune.evaluation", *map(str, args)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.process
def test_cli_last_gold_on_first_300_questions(dev_300_path, tmp_path):
    last = {r["id"]: r["answers"][-1] for r in load_squad(dev_300_path)}
    assert len(last) == DEV_300
    preds = _write(tmp_path / "predictions.json", last)
    run = _cli("squad", dev_300_path, preds)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"exact_match": 100.0, "f1": 100.0}
    assert run.stderr == ""


@pytest.mark.process
def test_cli_hand_computed_scores_exact_output(tmp_path):
    dataset = _write(tmp_path / "tiny.json", TINY)
    preds = _write(tmp_path / "preds.json", TINY_PREDICTIONS)
    run = _cli("squad", dataset, preds)
    assert run.returncode == 0, run.stderr
    assert run.stdout == TINY_SCORES_JSON + "\n"
    assert "1 of 3 questions have no prediction; they score 0" in run.stderr


@pytest.mark.process
def test_cli_bad_usage_exits_2(capsys):
    run = _cli()
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr == cli.SQUAD_USAGE + "\n"
    for argv in (["squad", "only-one.json"], ["bleu", "a.json", "b.json"], ["squad", "a", "b", "c"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == cli.SQUAD_USAGE + "\n"


def test_cli_malformed_or_missing_file_exits_1(tmp_path, capsys):
    data = _squad_json(("A", [("c", [("a1", "q?", ["x"])])]))
    del data["data"][0]["paragraphs"][0]["qas"][0]["id"]
    bad = _write(tmp_path / "dev.json", data)
    preds = _write(tmp_path / "preds.json", {})
    assert cli.main(["squad", str(bad), str(preds)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {bad}: data[0].paragraphs[0].qas[0]: missing 'id'\n"

    good = _write(tmp_path / "tiny.json", TINY)
    assert cli.main(["squad", str(good), str(tmp_path / "nope.json")]) == 1
    assert "nope.json" in capsys.readouterr().err
    not_a_dict = _write(tmp_path / "list.json", ["Paris"])
    assert cli.main(["squad", str(good), str(not_a_dict)]) == 1
    assert "list.json: expected a JSON object" in capsys.readouterr().err


# --- MindFormers' EmF1Metric (eval.squad.metric=mindformers: the contest's scorer) ---
# Worked examples where the two definitions disagree: (prediction, golds, official (EM, F1),
# MindFormers (EM, F1)); figures computed by hand from each definition.
DISAGREE = [
    # an article: official drops a/an/the; EmF1Metric keeps "the" (2 of 4 segments with the
    # spaces: precision 3/5 ("the", " ", "denver", " ", "broncos" vs "denver", " ", "broncos")
    ("The Denver Broncos", ["Denver Broncos"], (1.0, 1.0), (0.0, 0.75)),
    # a trailing period: official drops it; EmF1Metric keeps ASCII "." (precision 3/4, recall 1)
    ("Denver Broncos.", ["Denver Broncos"], (1.0, 1.0), (0.0, 6 / 7)),
    # word order: a bag of tokens officially; the longest common contiguous run for MindFormers
    ("Broncos Denver", ["Denver Broncos"], (0.0, 1.0), (0.0, 1 / 3)),
    # a comma in a number: official drops it (1000 == 1,000); MindFormers segments "1,000"
    ("1,000 people", ["1000 people"], (1.0, 1.0), (0.0, 0.5)),
    # CJK: "。" is not ASCII punctuation (official: different strings); MindFormers drops it
    ("郑州市。", ["郑州市"], (0.0, 0.0), (1.0, 1.0)),
    ("郑州", ["郑州市"], (0.0, 0.0), (0.0, 0.8)),
    # several golds: both take the best
    ("Broncos", ["Denver Broncos", "Broncos"], (1.0, 1.0), (1.0, 1.0)),
    # only the first line of a generation counts under EmF1Metric
    ("Paris\nand more text", ["Paris"], (0.0, 0.4), (1.0, 1.0)),   # official: P 1/4, R 1
]


@pytest.mark.slow   # MindFormers' metric: imports MindFormers (~12 s)
@pytest.mark.parametrize("pred,golds,official,mindformers", DISAGREE)
def test_official_and_mindformers_metrics_disagree_as_defined(pred, golds, official, mindformers):
    assert max(metrics.squad_exact_match(pred, g) for g in golds) == official[0]
    assert max(metrics.squad_f1(pred, g) for g in golds) == pytest.approx(official[1])
    em, f1 = metrics.squad_mindformers(pred, golds)
    assert (em, f1) == (mindformers[0], pytest.approx(mindformers[1]))


@pytest.mark.slow   # MindFormers' metric: imports MindFormers (~12 s)
def test_gold_first_scores_against_the_first_answer_only():
    records = [{"id": "q", "answers": ["Denver Broncos", "Broncos"]}]
    assert metrics.score_squad_records(records, {"q": "Broncos"}, "official", "all")["exact_match"] == 100.0
    first = metrics.score_squad_records(records, {"q": "Broncos"}, "official", "first")
    assert first == {"exact_match": 0.0, "f1": pytest.approx(100 * 2 / 3)}
    assert metrics.score_squad_records(records, {"q": "Broncos"}, "mindformers", "first") == \
        {"exact_match": 0.0, "f1": pytest.approx(100 * 2 * (1 / 3) / (1 + 1 / 3))}   # "broncos" of 3 segments


def test_first_question_of_every_paragraph_is_the_contest_set(dev_full):
    _, records = dev_full
    contest = first_per_paragraph(records)
    assert len(contest) == 2067                     # every paragraph of dev-v1.1 once
    assert len({r["context"] for r in contest}) == 2067       # one question per distinct passage
    assert contest[0] == records[0] and contest[1]["paragraph"] == 1


@pytest.mark.process
def test_cli_metric_both_and_gold_first(tmp_path):
    data = _write(tmp_path / "d.json", _squad_json(("A", [("c", [("q1", "q?", ["Denver Broncos", "Broncos"])])])))
    preds = _write(tmp_path / "p.json", {"q1": "The Denver Broncos"})
    run = _cli("squad", "--metric", "both", data, preds)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"official": {"exact_match": 100.0, "f1": 100.0},
                                      "mindformers": {"exact_match": 0.0, "f1": pytest.approx(75.0)}}
    run = _cli("squad", "--metric=mindformers", "--gold", "first", data, preds)
    assert json.loads(run.stdout) == {"exact_match": 0.0, "f1": pytest.approx(75.0)}
    assert _cli("squad", "--metric", "rouge", data, preds).returncode == 2
