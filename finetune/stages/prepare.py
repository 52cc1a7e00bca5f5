"""The prepare stage: the data set (MMLU / CMMLU CSV or the embedded demo) -> questions -> Alpaca
JSON -> tokens -> MindRecord shards, built once per content hash under output_root/cache/data
(data/prepare.py does the work; this stage reports what it found)."""
from __future__ import annotations

import logging

from finetune.data import load_meta

log = logging.getLogger(__name__)


def prepare_stage(ctx) -> dict:
    """The `prepare` stage's figures (the folder itself is built by app.run before any stage)."""
    meta = load_meta(ctx.prepared)
    return {"prepared_data": str(ctx.prepared), "dataset_rows": meta["dataset_rows"],
            "train_questions": meta["train_questions"], "train_too_long": meta["train_too_long"],
            "general_examples": meta["general_examples"], "eval_questions_total": meta["eval_questions"],
            "eval_dropped_in_train": meta.get("eval_dropped_in_train", 0),
            "eval_dropped_repeated": meta.get("eval_dropped_repeated", 0)}
