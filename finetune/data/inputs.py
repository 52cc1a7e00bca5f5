"""Input files checked before any work (dataset.path, eval.squad.path, predict.input, tokenizer and
checkpoint paths: one line naming the key and file), and the predict stage's input read into prompts."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from finetune.data import prompts
from finetune.data.cmmlu import read_cmmlu_file
from finetune.data.mmlu import read_mmlu_file
from finetune.data.records import DataError
from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def check_input_files(cfg) -> None:
    """Input files named in the config must exist before any long work (training) starts.
    Called inside the tracked run, so a missing file is recorded as a FAILED run."""
    stages = set(cfg.stages)
    files = {"dataset.general.path": cfg.dataset.general.path if "prepare" in stages else None,
             "eval.squad.path": cfg.eval.squad.path if "evaluate" in stages else None,
             "eval.adapter": cfg.eval.adapter if {"evaluate", "merge", "predict", "export"} & stages else None,
             "predict.input": cfg.predict.input if "predict" in stages else None}
    for key, path in files.items():
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: {path} not found")
    # ... and parse (one line naming the record), rather than fail after training
    from finetune.data.prompts import read_alpaca_json
    from finetune.data.records import DataError
    from finetune.data.squad import load_squad

    if files["eval.squad.path"]:
        try:
            load_squad(files["eval.squad.path"])
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"eval.squad.path: {e}") from None
    if files["dataset.general.path"]:
        read_alpaca_json(files["dataset.general.path"], "dataset.general.path", require_output=True)


def is_multiple_choice(prompt: str, style: str) -> bool:
    if style == "contest":
        return bool(_CONTEST_OPTIONS.search(prompt))
    return prompt.rstrip().endswith(_CUES[style])


def read_predict_input(path: str | Path, dataset: str, style: str, encoding: str | None = None) -> list[dict]:
    """[{id, prompt}] from an Alpaca JSON list or an MMLU/CMMLU CSV; one-line errors name the record.
    The CSV layout follows the dataset (CMMLU has a header and an index column), the prompt its style
    (`contest` is one style for both datasets)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predict.input: {path} not found")
    if path.suffix.lower() == ".csv":
        subject = path.stem.removesuffix("_test").removesuffix("_val").removesuffix("_dev")
        read = read_cmmlu_file if dataset == "cmmlu" else read_mmlu_file
        return [{"id": str(row), "prompt": prompts.build_prompt(q, style)}
                for row, q in enumerate(read(path, "input", subject, answer_required=False, encoding=encoding))]
    return [{"id": str(rec.get("id", i)), "prompt": prompts.alpaca_prompt(rec)}
            for i, rec in enumerate(prompts.read_alpaca_json(path, "predict.input", require_output=False))]


_CUES = {"mmlu": "Answer:", "cmmlu": "答案是："}


# dataset.style=contest: a multiple-choice prompt ends with its four options ("\nA.x\nB.y\nC.z\nD.w\n")
_CONTEST_OPTIONS = re.compile(r"\nA\..*\nB\..*\nC\..*\nD\.[^\n]*\n?$", re.DOTALL)
