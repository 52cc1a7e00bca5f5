"""The prepared-data folder (written by the prepare stage, read by every other stage):

  meta.json                 counts, subjects, seq_length, tokenizer, shards
  questions/{train,eval,dev}.json   the chosen questions (finetune.data.records.Question fields)
  alpaca/{train,eval,dev}.json      the same as Alpaca records; alpaca/general.json: rehearsal records
  mindrecord/train.mindrecord[N]    tokenized training examples, one shard per data-parallel rank
  corpus.json               the base model's pretraining text (the demo only)
  squad.json                the dataset's own SQuAD v1.1-layout reading set (the demo only)
"""
from __future__ import annotations

import json
from pathlib import Path

from finetune.data.records import Question

META = "meta.json"
SQUAD_FILE = "squad.json"
CORPUS_FILE = "corpus.json"
TRAIN_RECORDS = Path("mindrecord") / "train.mindrecord"
GENERAL = "general"   # alpaca/general.json


def questions_file(prepared: Path, split: str) -> Path:
    return Path(prepared) / "questions" / f"{split}.json"


def alpaca_file(prepared: Path, split: str) -> Path:
    """alpaca/<split>.json; split "general" is the rehearsal records."""
    return Path(prepared) / "alpaca" / f"{split}.json"


def load_meta(prepared: Path) -> dict:
    return json.loads((Path(prepared) / META).read_text(encoding="utf-8"))


def load_questions(prepared: Path, name: str) -> list[Question]:
    rows = json.loads(questions_file(prepared, name).read_text(encoding="utf-8"))
    return [Question(**{**r, "choices": tuple(r["choices"])}) for r in rows]


def dataset_squad(prepared: Path) -> Path | None:
    """The dataset's own SQuAD-format reading set, if prepare wrote one (the demo does)."""
    path = Path(prepared) / SQUAD_FILE
    return path if path.is_file() else None
