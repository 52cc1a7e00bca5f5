"""SQuAD v1.1 retained-ability check: greedy answers for passage + question, scored with the
official EM/F1 definitions (finetune.metrics), for the base model and base + adapter."""
from __future__ import annotations

import logging

from .generate import greedy_generate

log = logging.getLogger("finetune.squad")


# eval.squad.prompt=mindformers: the contest's template (an Alpaca layout with the passage as the
# instruction and the question as the input).
CONTEST_TEMPLATE = ("Read the passage and answer the question below.\n\n### Instruction:\n{context}\n\n"
                    "### Input:\n{question}\n\n### Response:")


def squad_prompt(context: str, question: str, style: str = "plain") -> str:
    if str(style) == "mindformers":
        return CONTEST_TEMPLATE.format(context=context, question=question)
    return f"{context}\n\nQuestion: {question}\nAnswer:"


def squad_prompt_ids(records: list[dict], tok, seq_length: int, max_new_tokens: int, style: str = "plain",
                     truncate: str = "start") -> tuple[list[list[int]], int]:
    """[bos] + prompt per question. A prompt longer than the window is cut: truncate=start keeps
    its end (the question) and loses the start of the passage; truncate=end keeps its head (the
    contest's way). Returns (ids, number truncated)."""
    room = seq_length - max_new_tokens
    if room < 8:
        raise ValueError(f"eval.squad.max_new_tokens={max_new_tokens} leaves no room in model.seq_length={seq_length}")
    out, truncated = [], 0
    for r in records:
        ids = [tok.bos_id] + tok.encode(squad_prompt(r["context"], r["question"], style))
        if len(ids) > room:
            ids = ids[:room] if str(truncate) == "end" else [tok.bos_id] + ids[-(room - 1):]
            truncated += 1
        out.append(ids)
    return out, truncated


def answer_text(ids: list[int], tok) -> str:
    """The first line of the generation, stripped: the short answer."""
    return tok.decode(ids).strip().split("\n")[0].strip()


def squad_predictions(net, records: list[dict], prompt_ids, tok, scfg, seq_length: int) -> dict[str, str]:
    outs = greedy_generate(net, prompt_ids, scfg.max_new_tokens, tok.eos_id, tok.pad_id, seq_length,
                           scfg.batch_size)
    return {r["id"]: answer_text(o, tok) for r, o in zip(records, outs)}


def retention(tuned: dict, base: dict, threshold: float) -> dict:
    """squad_retention_* = fine-tuned / base; retained when both reach the threshold. A base score
    of 0 makes the ratio undefined (reported as null, and not retained)."""
    out = {}
    for key, name in (("f1", "f1"), ("exact_match", "em")):
        out[f"squad_retention_{name}"] = tuned[key] / base[key] if base[key] > 0 else None
    out["retained"] = all(v is not None and v >= threshold for v in out.values())
    return out


def contest_score(accuracy: float, trainable_ratio: float) -> float:
    """The contest's ranking: (100% - 10 x trainable_ratio) x 0.3 + accuracy x 0.7, all as fractions.
    InternLM-7B, LoRA r8 (ratio 0.001146) at 50% accuracy: (1 - 0.01146) x 0.3 + 0.35 = 0.6466."""
    return (1.0 - 10.0 * trainable_ratio) * 0.3 + accuracy * 0.7
