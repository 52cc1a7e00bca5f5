"""SQuAD v1.1 reading data: load the official dev-set layout, pick questions (all, or the contest's
first per paragraph), and build the passage + question prompts (plain or the contest's template) cut
to fit model.seq_length with room for the answer."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
import json
from pathlib import Path


def squad_prompt(context: str, question: str, style: str = "plain") -> str:
    if str(style) == "mindformers":
        return CONTEST_TEMPLATE.format(context=context, question=question)
    return f"{context}\n\nQuestion: {question}\nAnswer:"


def squad_prompt_ids(records: list[dict], tok, seq_length: int, max_new_tokens: int, style: str = "plain",
                     truncate: str = "start") -> tuple[list[list[int]], int]:
    """The prompt's ids per question (tok.wrap: [bos] + prompt, or a chat turn around it). A prompt
    longer than the window is cut inside: truncate=start keeps its end (the question) and loses the
    start of the passage; truncate=end keeps its head (the contest's way). Returns (ids, number truncated)."""
    room = seq_length - max_new_tokens - len(tok.wrap([]))
    if room < 8:
        raise ValueError(f"eval.squad.max_new_tokens={max_new_tokens} leaves no room in model.seq_length={seq_length}")
    out, truncated = [], 0
    for r in records:
        content = tok.encode(squad_prompt(r["context"], r["question"], style))
        if len(content) > room:
            content = content[:room] if str(truncate) == "end" else content[-room:]
            truncated += 1
        out.append(tok.wrap(content))
    return out, truncated


def squad_records(dataset, source: str):
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


def read_json(path) -> object:
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
    return list(squad_records(read_json(path), str(path)))


def first_per_paragraph(records: list[dict]) -> list[dict]:
    """The first question of every paragraph (the contest's SQuAD set: 2,067 of dev-v1.1's 10,570)."""
    seen, out = set(), []
    for r in records:
        if r["paragraph"] not in seen:
            seen.add(r["paragraph"])
            out.append(r)
    return out


# eval.squad.prompt=mindformers: the contest's template (an Alpaca layout with the passage as the
# instruction and the question as the input).
CONTEST_TEMPLATE = ("Read the passage and answer the question below.\n\n### Instruction:\n{context}\n\n"
                    "### Input:\n{question}\n\n### Response:")
