"""Stage `evaluate`: multiple-choice accuracy from the answer-letter logits at the last prompt
position, zero- or k-shot, overall and per subject, for the base model and base + adapter."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from . import metrics
from .data import prompts
from .data.records import LETTERS, DataError, Question
from .lora import adapter_path, apply_lora, load_adapter
from .model import ModelError, count_params
from .prepare import dataset_squad, load_questions
from .squad import contest_score, retention, squad_predictions, squad_prompt_ids
from .train import load_base, param_summary

log = logging.getLogger("finetune.evaluate")


def letter_token_ids(tok, style: str) -> list[int]:
    """Token ids of the four answer targets (" A".." D" for mmlu, "A".."D" for cmmlu). Each must
    be a single token, or last-position scoring would compare the wrong things."""
    ids = []
    for letter in LETTERS:
        q = Question(id="", subject="", question="", choices=("", "", "", ""), answer=letter, source="")
        t = tok.encode(prompts.target(q, style))
        if len(t) != 1:
            raise ModelError(f"tokenizer {tok.name}: answer {prompts.target(q, style)!r} is {len(t)} tokens, "
                             f"expected 1 for letter scoring (dataset.style={style})")
        ids.append(t[0])
    return ids


def build_eval_prompts(questions: list[Question], dev: list[Question], style: str, num_shots: int, tok,
                       seq_length: int) -> tuple[list[list[int]], dict]:
    """Token ids per question: [bos] + k-shot prompt. Shots are the subject's first dev questions;
    when a prompt does not fit, shots are dropped one at a time, and a zero-shot prompt that
    still does not fit keeps its last seq_length tokens (the question end, where scoring happens)."""
    by_subject: dict[str, list[Question]] = {}
    for q in dev:
        by_subject.setdefault(q.subject, []).append(q)
    out, fewer_shots, truncated = [], 0, 0
    for q in questions:
        shots = by_subject.get(q.subject, [])[:num_shots]
        while True:
            ids = [tok.bos_id] + tok.encode(prompts.build_prompt(q, style, shots))
            if len(ids) <= seq_length or not shots:
                break
            shots = shots[:-1]
        if len(shots) < min(num_shots, len(by_subject.get(q.subject, []))):
            fewer_shots += 1
        if len(ids) > seq_length:
            ids = ids[-seq_length:]
            truncated += 1
        out.append(ids)
    return out, {"eval_fewer_shots": fewer_shots, "eval_truncated": truncated}


def letter_logits(net, token_lists: list[list[int]], letter_ids: list[int], batch_size: int, seq_length: int,
                  pad_id: int) -> np.ndarray:
    """[N, 4] logits of the letter tokens at each prompt's last position.

    Every batch has the same shape [batch_size, seq_length] (right-padded; the last batch filled
    with padding rows), so graph mode compiles once; with causal attention, padding after a
    prompt cannot change the logits at its last position."""
    import mindspore as ms

    net.set_train(False)
    out = np.zeros((len(token_lists), len(letter_ids)), np.float32)
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start:start + batch_size]
        x = np.full((batch_size, seq_length), pad_id, np.int32)
        for i, ids in enumerate(chunk):
            x[i, :len(ids)] = ids
        logits = net(ms.Tensor(x))[0].asnumpy()  # eval mode: (logits [B, S, V], tokens, mask)
        for i, ids in enumerate(chunk):
            out[start + i] = logits[i, len(ids) - 1, letter_ids]
    return out


def score(net, questions: list[Question], token_lists, letter_ids, cfg, tok) -> dict:
    logits = letter_logits(net, token_lists, letter_ids, cfg.eval.batch_size, cfg.model.seq_length, tok.pad_id)
    preds = metrics.mc_predictions(logits)
    answers = [q.answer for q in questions]
    return {"accuracy": metrics.accuracy(preds, answers),
            "per_subject": metrics.per_subject_accuracy([q.subject for q in questions], preds, answers),
            "predictions": preds, "probabilities": metrics.letter_probabilities(logits)}


def evaluate(cfg, run_dir: Path, tok, prepared: Path, tracker) -> dict:
    questions = load_questions(prepared, "eval")
    if cfg.eval.limit is not None:
        questions = questions[:cfg.eval.limit]
    dev = load_questions(prepared, "dev")
    style = cfg.dataset.style
    letter_ids = letter_token_ids(tok, style)
    token_lists, prompt_stats = build_eval_prompts(questions, dev, style, cfg.eval.num_shots, tok,
                                                   cfg.model.seq_length)
    adapter = adapter_path(cfg, run_dir)   # eval.adapter, if set, was checked to exist at start-up

    squad_records, squad_ids = [], []
    # eval.squad.path wins; otherwise the dataset's own reading set (the demo writes one).
    squad_path = cfg.eval.squad.path or dataset_squad(prepared)
    if squad_path:
        try:  # eval.squad.path's existence was checked at start-up (app.check_input_files)
            squad_records = metrics.load_squad(squad_path)
        except ValueError as e:
            raise DataError(f"eval.squad.path: {e}") from None
        log.info("SQuAD: %s", squad_path)
        if cfg.eval.squad.limit is not None:
            squad_records = squad_records[:cfg.eval.squad.limit]
        squad_ids, truncated = squad_prompt_ids(squad_records, tok, cfg.model.seq_length, cfg.eval.squad.max_new_tokens)
        if truncated:
            log.warning("SQuAD: %d of %d passages cut to fit model.seq_length=%d", truncated, len(squad_records),
                        cfg.model.seq_length)

    def squad(net, tag: str) -> dict:
        preds = squad_predictions(net, squad_records, squad_ids, tok, cfg.eval.squad, cfg.model.seq_length)
        (run_dir / f"squad_predictions{tag}.json").write_text(json.dumps(preds, ensure_ascii=False, indent=0))
        scores = metrics.score_squad_records(squad_records, preds)
        log.info("SQuAD%s: EM %.2f F1 %.2f on %d questions", tag, scores["exact_match"], scores["f1"],
                 len(squad_records))
        return scores

    net = load_base(cfg, tok, prepared, tracker, cfg.eval.batch_size)
    result: dict = {"eval_questions": len(questions), "eval_num_shots": cfg.eval.num_shots, **prompt_stats}
    base = base_squad = None
    if cfg.eval.base:
        base = score(net, questions, token_lists, letter_ids, cfg, tok)
        result["mc_accuracy_base"] = base["accuracy"]
        result["per_subject_accuracy_base"] = base["per_subject"]
        log.info("base model: accuracy %.4f on %d questions", base["accuracy"], len(questions))
        if squad_records:
            base_squad = squad(net, "_base")
            result.update(squad_f1_base=base_squad["f1"], squad_em_base=base_squad["exact_match"])
    tuned = None
    net = apply_lora(net, cfg.lora, run_dir / "mindformers")
    result.update(param_summary(count_params(net)))
    if adapter.is_file():
        load_adapter(net, adapter)
        tuned = score(net, questions, token_lists, letter_ids, cfg, tok)
        result["mc_accuracy"] = tuned["accuracy"]
        result["per_subject_accuracy"] = tuned["per_subject"]
        result["evaluated_adapter"] = str(adapter)
        log.info("base + adapter: accuracy %.4f", tuned["accuracy"])
        if squad_records:
            tuned_squad = squad(net, "")
            result.update(squad_f1=tuned_squad["f1"], squad_em=tuned_squad["exact_match"])
            if base_squad is not None:
                result.update(retention(tuned_squad, base_squad, cfg.eval.retention_threshold))
                # the summary keeps the boolean; the tracker skips booleans, so MLflow gets 1.0 / 0.0
                tracker.log_metrics({"retained": float(result["retained"])})
    else:
        log.warning("evaluate: no adapter at %s (run the train stage, or set eval.adapter); "
                    "mc_accuracy is the base model's", adapter)
        if base is None:
            raise ModelError("evaluate: nothing to evaluate (eval.base=false and no adapter)")
        result["mc_accuracy"] = base["accuracy"]
        result["per_subject_accuracy"] = base["per_subject"]
        result["evaluated_adapter"] = None

    if cfg.eval.checkpoints:
        def score_mc(n):
            return score(n, questions, token_lists, letter_ids, cfg, tok)

        squad_fn = squad if squad_records and base_squad is not None else None
        result.update(score_checkpoints(net, run_dir, tracker, score_mc, squad_fn, base_squad,
                                        cfg.eval.retention_threshold))
    result["contest_score"] = contest_score(result["mc_accuracy"], result["trainable_ratio_pct"] / 100.0)
    result["squad_questions"] = len(squad_records)
    result["squad_set"] = str(squad_path) if squad_path else None
    with open(run_dir / "eval_predictions.jsonl", "w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            row = {"id": q.id, "subject": q.subject, "answer": q.answer}
            if tuned is not None:
                row["prediction"] = tuned["predictions"][i]
                row["probabilities"] = dict(zip(LETTERS, np.round(tuned["probabilities"][i], 6).tolist()))
            if base is not None:
                row["prediction_base"] = base["predictions"][i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return result


def score_checkpoints(net, run_dir: Path, tracker, score_mc, squad, base_squad, threshold: float) -> dict:
    """mc_accuracy (and SQuAD retention when measured) of every checkpoint in run_dir/checkpoints;
    the best by checkpoints.select_best. Each is logged to MLflow at its step."""
    from .checkpoints import read_index, select_best

    ckpt_dir = run_dir / "checkpoints"
    entries = read_index(ckpt_dir)
    if not entries:
        raise ModelError(f"eval.checkpoints: no checkpoints in {ckpt_dir} (train with train.save.num_checkpoints > 0)")
    scores = []
    for entry in entries:
        load_adapter(net, ckpt_dir / entry["adapter"])
        row = {"step": entry["step"], "adapter": str(ckpt_dir / entry["adapter"]),
               "mc_accuracy": score_mc(net)["accuracy"]}
        if squad is not None:
            row.update(retention(squad(net, f"_step{entry['step']:06d}"), base_squad, threshold))
        tracker.log_metrics({"checkpoint_mc_accuracy": row["mc_accuracy"]}, step=entry["step"])
        log.info("checkpoint step %d: accuracy %.4f", entry["step"], row["mc_accuracy"])
        scores.append(row)
    best = select_best(scores)
    out = {"checkpoint_scores": scores, "best_checkpoint_step": best["step"] if best else None,
           "best_checkpoint_mc_accuracy": best["mc_accuracy"] if best else None,
           "best_checkpoint_adapter": best["adapter"] if best else None}
    tracker.set_tags({"best_checkpoint": best["adapter"] if best else "none"})
    return out
