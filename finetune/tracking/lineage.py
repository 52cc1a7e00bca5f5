"""What a run trained and was scored on, as MLflow dataset inputs (the run page's "Datasets used"):
the training questions (context `training`), the evaluation questions and the SQuAD set
(context `evaluation`). Each is named after the dataset and split, points at its source (the CSV
folder, the SQuAD file, or the generated demo), and carries a content digest, so two runs on the
same data show the same digest and a changed file shows a new one.

Digests: the training and evaluation sets take the prepared data's content hash (the cache key
of finetune/data/prepare.py: the input files' bytes, the dataset settings, the tokenizer and the
format — what decides the examples); the SQuAD set the sha256 of its file.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from finetune.data.prepared import dataset_squad, questions_file

CONTEXT_TAG = "mlflow.data.context"   # MLflow's own tag for a dataset input's role


def _questions_frame(prepared: Path, split: str):
    import pandas as pd

    rows = json.loads(questions_file(prepared, split).read_text(encoding="utf-8"))
    return pd.DataFrame([{"id": r["id"], "subject": r["subject"], "question": r["question"],
                          **dict(zip("ABCD", r["choices"])), "answer": r["answer"]} for r in rows],
                        columns=["id", "subject", "question", "A", "B", "C", "D", "answer"])


def _squad_frame(path: Path):
    import pandas as pd

    from finetune.data.squad import load_squad

    return pd.DataFrame([{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
                          "answers": " | ".join(r["answers"])} for r in load_squad(path)],
                        columns=["id", "title", "context", "question", "answers"])


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def dataset_inputs(cfg, prepared: Path) -> list[dict]:
    """[{name, source, digest, context, frame}] for this run's stages: training when it trains,
    evaluation (and SQuAD, when there is a set) when it evaluates."""
    prepared = Path(prepared)
    ds = cfg.dataset
    source = str(Path(ds.path).resolve()) if ds.path else f"generated {ds.name} (dataset.demo.seed={ds.demo.seed})"
    digest = prepared.name.rsplit("-", 1)[-1]   # <dataset>-<content hash>
    stages = set(cfg.stages)
    out = []
    if "train" in stages:
        out.append({"name": f"{ds.name}-{ds.train_split}", "source": source, "digest": digest, "context": "training",
                    "frame": _questions_frame(prepared, "train")})
    if stages & {"evaluate", "predict"}:
        out.append({"name": f"{ds.name}-{ds.eval_split}", "source": source, "digest": digest, "context": "evaluation",
                    "frame": _questions_frame(prepared, "eval")})
    squad = cfg.eval.squad.path or dataset_squad(prepared)
    if "evaluate" in stages and squad:
        squad = Path(squad).resolve()
        out.append({"name": f"squad-{squad.stem}", "source": str(squad), "digest": _file_digest(squad),
                    "context": "evaluation", "frame": _squad_frame(squad)})
    return out


def to_mlflow(inputs: list[dict]) -> list:
    """MLflow DatasetInput entities (schema and row count from the frame, via mlflow.data)."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    out = []
    for d in inputs:
        with warnings.catch_warnings():   # a source that is not a URI MLflow knows is kept as text
            warnings.simplefilter("ignore")
            entity = mlflow.data.from_pandas(d["frame"], source=d["source"], name=d["name"],
                                             digest=d["digest"])._to_mlflow_entity()
        out.append(DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, d["context"])]))
    return out
