"""Prompt formatting for multiple-choice exams (the usual MMLU k-shot protocol). Pure, no I/O
except write_alpaca_json."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from finetune.data.records import LETTERS, DataError, Question
from finetune.files import write_json

STYLES = ("mmlu", "cmmlu", "contest")

_QUESTION = {"mmlu": ("{q}", "Answer:"), "cmmlu": ("题目：{q}", "答案是："), "contest": ("Question: {q} ", "")}
_OPTION = {"mmlu": "\n{l}. {t}", "cmmlu": "\n{l}. {t}", "contest": "\n{l}.{t}"}
_HEADER = {
    "mmlu": "The following are multiple choice questions (with answers) about {s}.",
    "cmmlu": "以下是关于{s}的单项选择题，请直接给出正确答案的选项。",
    # The 2024 contest's entries (MMLU and CMMLU alike): the answer is a sentence, scored by
    # generating it and reading the letter (eval.mc.method=generate).
    "contest": ("Here is a question about {s}, the correct answer is one of the options A/B/C/D. Please select "
                "the correct option and answer the question with 'The right option is'."),
}
CONTEST_ANSWER = "The right option is {a}."


# CMMLU's header names the subject in Chinese, as the official evaluation code does
# ("以下是关于农学的单项选择题…"): the 67 subjects' file names -> names. Others keep the file name.
CMMLU_SUBJECTS_ZH = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则", "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史", "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理", "economics": "经济学", "education": "教育学",
    "electrical_engineering": "电气工程", "elementary_chinese": "小学语文", "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术", "elementary_mathematics": "初等数学",
    "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学", "global_facts": "全球事实",
    "high_school_biology": "高中生物", "high_school_chemistry": "高中化学", "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学", "high_school_politics": "高中政治",
    "human_sexuality": "人类性行为", "international_law": "国际法学", "journalism": "新闻学",
    "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学",
    "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销", "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学", "professional_accounting": "专业会计",
    "professional_law": "专业法学", "professional_medicine": "专业医学", "professional_psychology": "专业心理学",
    "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学", "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "world_history": "世界历史",
    "world_religions": "世界宗教",
}


def _check(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}, expected one of {STYLES}")


def format_question(q: Question, style: str) -> str:
    _check(style)
    first, last = _QUESTION[style]
    options = "".join(_OPTION[style].format(l=letter, t=text) for letter, text in zip(LETTERS, q.choices))
    return first.format(q=q.question) + options + "\n" + last


def header(subject: str, style: str) -> str:
    _check(style)
    if style == "cmmlu" and subject in CMMLU_SUBJECTS_ZH:
        return _HEADER[style].format(s=CMMLU_SUBJECTS_ZH[subject])
    return _HEADER[style].format(s=subject.replace("_", " "))


def target(q: Question, style: str) -> str:
    _check(style)
    # MMLU scores the token " B" after "Answer:"; the Chinese prompt ends in a full-width
    # colon, after which no space is conventional.
    if style == "contest":
        return CONTEST_ANSWER.format(a=q.answer)
    return (" " if style == "mmlu" else "") + q.answer


def _body(q: Question, style: str, shots: Sequence[Question]) -> str:
    """Everything after the header: worked shots, then the unanswered question."""
    return "".join(format_question(s, style) + target(s, style) + "\n\n" for s in shots) + format_question(q, style)


def build_prompt(q: Question, style: str, shots: Sequence[Question] = ()) -> str:
    return header(q.subject, style) + "\n\n" + _body(q, style, shots)


def to_alpaca(q: Question, style: str, shots: Sequence[Question] = ()) -> dict:
    """Alpaca record with instruction + "\\n\\n" + input + output == build_prompt(...) + target(...)."""
    return {
        "instruction": header(q.subject, style),
        "input": _body(q, style, shots),
        "output": target(q, style),
        "id": q.id,
        "subject": q.subject,
    }


def from_alpaca_prompt(rec: dict) -> str:
    return rec["instruction"] + "\n\n" + rec["input"]


def read_alpaca_json(path: str | Path, key: str, require_output: bool) -> list[dict]:
    """Alpaca records [{instruction, input?, output?, id?}] from a JSON list, checked one by one;
    errors name `key` (the config key that gave the path), the file and the record index."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: {path}: not a JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise DataError(f"{key}: {path}: expected a JSON list of Alpaca records, got {type(data).__name__}")
    fields = ("instruction", "output") if require_output else ("instruction",)
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(f), str) for f in fields):
            raise DataError(f"{key}: {path}: record [{i}]: expected an object with string "
                            + " and ".join(repr(f) for f in fields))
        if not isinstance(rec.get("input", ""), str):
            raise DataError(f"{key}: {path}: record [{i}]: 'input' must be a string")
    return data


def alpaca_prompt(rec: dict) -> str:
    """The prompt of an Alpaca record: instruction, then its input when it has one."""
    return from_alpaca_prompt(rec) if rec.get("input") else rec["instruction"]


def write_alpaca_json(records: list[dict], path: str | Path) -> None:
    """Write UTF-8 JSON atomically: readers never see a half-written file."""
    write_json(path, records, ensure_ascii=False)
