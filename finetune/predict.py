"""Stage `predict`: a file of questions in, answers out.

Input (predict.input; default: the dataset's prepared eval split): an Alpaca JSON list ({instruction, input, output?}, optional id), or one
MMLU/CMMLU CSV file (answer column optional). A record whose prompt ends in the style's answer
cue ("Answer:" / "答案是：") is multiple choice: letter probabilities at the last position, as in
evaluate. Any other record gets a greedy free-text answer (first line).
Model: the run's merged.ckpt when the merge stage wrote one, else base + adapter, else the base.
Output: JSON Lines {id, prediction, probabilities?}; predict.format=npy also writes results.npy
(predicted option index 0-3 per record, -1 for free text), the seed's submission format.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from . import metrics
from .data import prompts
from .data.records import LETTERS, DataError, load_csv, make_question
from .evaluate import letter_logits, letter_token_ids
from .generate import greedy_generate
from .lora import adapter_path, apply_lora, load_adapter
from .model import build_model, load_checkpoint
from .squad import answer_text
from .train import load_base

log = logging.getLogger("finetune.predict")
_CUES = {"mmlu": "Answer:", "cmmlu": "答案是："}


def read_predict_input(path: str | Path, style: str) -> list[dict]:
    """[{id, prompt}] from an Alpaca JSON list or an MMLU/CMMLU CSV; one-line errors name the record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predict.input: {path} not found")
    if path.suffix.lower() == ".csv":
        return _read_csv(path, style)
    return [{"id": str(rec.get("id", i)), "prompt": prompts.alpaca_prompt(rec)}
            for i, rec in enumerate(prompts.read_alpaca_json(path, "predict.input", require_output=False))]


def _read_csv(path: Path, style: str) -> list[dict]:
    header = ("Question", "A", "B", "C", "D") if style == "cmmlu" else None
    frame, lines = load_csv(path, header=header, width=None, what="question,A,B,C,D[,answer]")
    if style == "cmmlu":
        frame = frame[[c for c in ("Question", "A", "B", "C", "D") if c in frame.columns]]
    elif frame.shape[1] not in (5, 6):
        raise DataError(f"{path}:{lines[0]}: expected 5 or 6 columns (question,A,B,C,D[,answer]), "
                        f"found {frame.shape[1]}")
    subject = path.stem.removesuffix("_test").removesuffix("_val").removesuffix("_dev")
    out = []
    for row, (values, line) in enumerate(zip(frame.itertuples(index=False), lines)):
        fields = [str(v) for v in values][:5] + ["A"]   # answer unknown/unused for prediction
        q = make_question("predict", "input", subject, row, f"{path}:{line}", fields)
        out.append({"id": str(row), "prompt": prompts.build_prompt(q, style)})
    return out


def predict(cfg, run_dir: Path, tok, prepared: Path, tracker) -> dict:
    p = cfg.predict   # format was checked at start-up (app.validate)
    style = cfg.dataset.style
    # No input given: the prepared eval split (Alpaca JSON), i.e. predict on the dataset's test set.
    source = p.input or prepared / "alpaca" / "eval.json"
    records = read_predict_input(source, style)
    cue = _CUES[style]
    is_mc = [r["prompt"].rstrip().endswith(cue) for r in records]
    mc = [i for i, m in enumerate(is_mc) if m]
    free = [i for i, m in enumerate(is_mc) if not m]

    merged = run_dir / "merged.ckpt"
    adapter = adapter_path(cfg, run_dir)
    if merged.is_file() and not cfg.eval.adapter:   # the seed's flow: predict with the merged model
        net = build_model(cfg.model, cfg.hardware, tok, p.batch_size, cfg.seed)
        load_checkpoint(net, merged, what="merged model")
        model_used = str(merged)
    else:
        net = load_base(cfg, tok, prepared, tracker, p.batch_size)
        if adapter.is_file():
            net = apply_lora(net, cfg.lora, run_dir / "mindformers")
            load_adapter(net, adapter)
            model_used = f"base + {adapter}"
        else:
            log.warning("predict: no adapter at %s; predicting with the base model", adapter)
            model_used = "base"
    t0 = time.perf_counter()
    seq = cfg.model.seq_length
    ids = [[tok.bos_id] + tok.encode(r["prompt"]) for r in records]
    too_long = [records[i]["id"] for i, x in enumerate(ids) if len(x) > seq]
    if too_long:
        raise DataError(f"{source}: {len(too_long)} record(s) longer than model.seq_length={seq} tokens, "
                        f"e.g. id {too_long[0]}")
    results: list[dict] = [{"id": r["id"]} for r in records]
    if mc:
        logits = letter_logits(net, [ids[i] for i in mc], letter_token_ids(tok, style), p.batch_size, seq,
                               tok.pad_id)
        probs = metrics.letter_probabilities(logits)
        for k, i in enumerate(mc):
            results[i]["prediction"] = LETTERS[int(np.argmax(logits[k]))]
            results[i]["probabilities"] = dict(zip(LETTERS, np.round(probs[k], 6).tolist()))
    if free:
        outs = greedy_generate(net, [ids[i] for i in free], p.max_new_tokens, tok.eos_id, tok.pad_id, seq,
                               p.batch_size)
        for i, o in zip(free, outs):
            results[i]["prediction"] = answer_text(o, tok)
    seconds = time.perf_counter() - t0

    output = Path(p.output) if p.output else run_dir / "predictions.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    tmp.replace(output)
    out = {"predict_output": str(output), "predict_input": str(source), "predict_model": model_used,
           "predict_records": len(records), "predict_multiple_choice": len(mc),
           "predict_examples_per_s": len(records) / seconds if seconds else float("nan")}
    if p.format == "npy":
        indices = np.array([LETTERS.index(r["prediction"]) if "probabilities" in r else -1 for r in results],
                           dtype=np.int64)
        np.save(output.with_name("results.npy"), indices)
        out["predict_results_npy"] = str(output.with_name("results.npy"))
    log.info("predict: %d records -> %s (%.1f examples/s)", len(records), output, out["predict_examples_per_s"])
    return out
