"""Prompt strings for both styles and the alpaca round trip."""
from __future__ import annotations

import json

import pytest

from finetune.data.prompts import (
    STYLES,
    build_prompt,
    format_question,
    from_alpaca_prompt,
    header,
    target,
    to_alpaca,
    write_alpaca_json,
)
from finetune.data.records import Question


def _q(i: int, answer: str = "B") -> Question:
    return Question(
        id=f"mmlu/test/high_school_math/{i}",
        subject="high_school_math",
        question=f"What is {i}+1?",
        choices=(str(i), str(i + 1), str(i + 2), "None"),
        answer=answer,
        source=f"x.csv:{i + 1}",
    )


Q, S1, S2 = _q(0), _q(1, "A"), _q(2, "C")


def test_mmlu_zero_shot():
    assert build_prompt(Q, "mmlu") == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 0+1?\nA. 0\nB. 1\nC. 2\nD. None\nAnswer:"
    )
    assert target(Q, "mmlu") == " B"


def test_mmlu_two_shot():
    assert build_prompt(Q, "mmlu", [S1, S2]) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. None\nAnswer: A\n\n"
        "What is 2+1?\nA. 2\nB. 3\nC. 4\nD. None\nAnswer: C\n\n"
        "What is 0+1?\nA. 0\nB. 1\nC. 2\nD. None\nAnswer:"
    )


def test_cmmlu_zero_and_two_shot():
    assert header("high_school_math", "cmmlu") == "以下是关于high school math的单项选择题，请直接给出正确答案的选项。"
    assert format_question(Q, "cmmlu") == "题目：What is 0+1?\nA. 0\nB. 1\nC. 2\nD. None\n答案是："
    assert target(Q, "cmmlu") == "B"
    assert build_prompt(Q, "cmmlu") == (
        "以下是关于high school math的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：What is 0+1?\nA. 0\nB. 1\nC. 2\nD. None\n答案是："
    )
    assert build_prompt(Q, "cmmlu", (S1, S2)) == (
        "以下是关于high school math的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：What is 1+1?\nA. 1\nB. 2\nC. 3\nD. None\n答案是：A\n\n"
        "题目：What is 2+1?\nA. 2\nB. 3\nC. 4\nD. None\n答案是：C\n\n"
        "题目：What is 0+1?\nA. 0\nB. 1\nC. 2\nD. None\n答案是："
    )


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shots", [(), (S1, S2)])
def test_alpaca_round_trip(style, shots):
    rec = to_alpaca(Q, style, shots)
    assert set(rec) == {"instruction", "input", "output", "id", "subject"}
    assert rec["instruction"] == header(Q.subject, style)
    assert rec["output"] == target(Q, style)
    assert (rec["id"], rec["subject"]) == (Q.id, Q.subject)
    assert rec["instruction"] + "\n\n" + rec["input"] + rec["output"] == build_prompt(Q, style, shots) + target(Q, style)
    assert from_alpaca_prompt(rec) == build_prompt(Q, style, shots)


def test_unknown_style():
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_prompt(Q, "gsm8k")


def test_write_alpaca_json(tmp_path):
    recs = [to_alpaca(Q, "cmmlu", (S1,)), to_alpaca(S2, "mmlu")]
    out = tmp_path / "sub" / "train.json"
    write_alpaca_json(recs, out)
    raw = out.read_text(encoding="utf-8")
    assert "以下是关于" in raw  # ensure_ascii=False: Chinese stays readable
    assert raw.startswith('[\n {\n  "instruction"')  # indent=1
    assert json.loads(raw) == recs
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json"]  # no .tmp left behind
    write_alpaca_json(recs[:1], out)  # overwrite in place
    assert json.loads(out.read_text(encoding="utf-8")) == recs[:1]


def test_cmmlu_headers_name_the_subject_in_chinese(shared):
    from finetune.data.prompts import CMMLU_SUBJECTS_ZH

    assert header("agronomy", "cmmlu") == "以下是关于农学的单项选择题，请直接给出正确答案的选项。"
    assert header("high_school_mathematics", "cmmlu").startswith("以下是关于高中数学的")
    assert header("agronomy", "mmlu") == "The following are multiple choice questions (with answers) about agronomy."
    files = sorted(p.stem for p in (shared / "data" / "cmmlu" / "test").glob("*.csv"))
    assert sorted(CMMLU_SUBJECTS_ZH) == files and len(files) == 67   # every official subject has its name


def test_macro_accuracy_weighs_subjects_equally():
    from finetune.evaluation.metrics import macro_accuracy, per_subject_accuracy

    subjects = ["a"] * 9 + ["b"]
    preds, answers = ["A"] * 10, ["A"] * 9 + ["B"]    # a: 9/9, b: 0/1 -> micro 0.9, macro 0.5
    assert macro_accuracy(per_subject_accuracy(subjects, preds, answers)) == 0.5


def test_contest_style_prompt_and_answer():
    q = Question(id="x", subject="high_school_physics", question="What falls?", choices=("a", "b", "c", "d"),
                 answer="C", source="")
    rec = to_alpaca(q, "contest")
    assert rec["instruction"] == ("Here is a question about high school physics, the correct answer is one of the "
                                  "options A/B/C/D. Please select the correct option and answer the question with "
                                  "'The right option is'.")
    assert rec["input"] == "Question: What falls? \nA.a\nB.b\nC.c\nD.d\n"
    assert rec["output"] == "The right option is C."


@pytest.mark.parametrize("text,letter", [
    ("The right option is B.", "B"), (" the right option is (D) because", "D"), ("The right option is: A", "A"),
    (" B", "B"), ("(C) tool", "C"), ("Answer: D.", "D"),
    # the stated answer wins over an earlier standalone letter
    ("A and B are wrong. The right option is C.", "C"),
    # no letter standing alone: unparsed
    ("The right option isn't clear", None), ("", None), ("Because ABBA sang it", None), ("\n\n", None),
])
def test_parse_choice_on_generations(text, letter):
    from finetune.evaluation.scoring import parse_choice

    assert parse_choice(text) == letter
