"""SQuAD v1.1 retained-ability check: greedy answers for passage + question, scored with the
official EM/F1 definitions (finetune.evaluation.metrics), for the base model and base + adapter."""
from __future__ import annotations

import logging

from finetune.model.generate import greedy_generate

log = logging.getLogger(__name__)








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


