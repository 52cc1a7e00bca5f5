"""Stage `evaluate`: multiple-choice accuracy from the answer-letter logits at the last prompt
position (finetune/evaluation/scoring.py), zero- or k-shot, overall and per subject, for the base model and
base + adapter; the SQuAD retained-ability check (finetune/evaluation/squad.py) for both; with
eval.checkpoints=true, every saved checkpoint too."""
from __future__ import annotations

import json
import logging

from finetune import rundir
from finetune.data import dataset_squad, first_per_paragraph, load_questions, load_squad, squad_prompt_ids
from finetune.errors import DataError, ModelError
from finetune.evaluation import (
    SQUAD_METRICS,
    accuracy,
    build_eval_prompts,
    choose,
    contest_score,
    generated_choices,
    letter_logits,
    letter_token_ids,
    macro_accuracy,
    per_subject_accuracy,
    probabilities_row,
    retention,
    score_squad_records,
    select_best,
    squad_predictions,
)
from finetune.model import (
    adapter_path,
    apply_lora,
    count_params,
    drop_cells,
    load_adapter,
    param_summary,
    release_graphs,
    with_adapter,
    zero_lora_b,
)
from finetune.training import read_index

log = logging.getLogger(__name__)


def evaluate(ctx) -> dict:
    cfg, run_dir, tok = ctx.cfg, ctx.run_dir, ctx.tok
    questions = load_questions(ctx.prepared, "eval")
    if cfg.eval.limit is not None:
        questions = questions[:cfg.eval.limit]
    dev = load_questions(ctx.prepared, "dev")
    style = cfg.dataset.style
    generate = cfg.eval.mc.method == "generate"
    letter_ids = None if generate else letter_token_ids(tok, style)
    # generate: the prompt leaves room for the answer in the window
    room = cfg.model.seq_length - (cfg.eval.mc.max_new_tokens if generate else 0)
    token_lists, prompt_stats = build_eval_prompts(questions, dev, style, cfg.eval.num_shots, tok, room)
    answers, subjects = [q.answer for q in questions], [q.subject for q in questions]

    mc_stats: dict = {}

    def score_mc(net) -> dict:
        texts = probs = None
        if generate:   # the contest's way: greedy answer, letter parsed; unparsed counts as wrong
            preds, texts = generated_choices(net, token_lists, tok, cfg.eval.mc.max_new_tokens, cfg.model.seq_length,
                                             cfg.eval.batch_size)
        else:
            logits = letter_logits(net, token_lists, letter_ids, cfg.eval.batch_size, cfg.model.seq_length,
                                   tok.pad_id, mc_stats)
            preds, probs = choose(logits)
        scored = [p or "" for p in preds]
        return {"accuracy": accuracy(scored, answers),
                "per_subject": per_subject_accuracy(subjects, scored, answers),
                "predictions": preds, "probabilities": probs, "texts": texts,
                "unparsed": sum(p is None for p in preds)}

    squad_records, squad_ids = [], []
    scfg = cfg.eval.squad
    # eval.squad.path wins; otherwise the dataset's own reading set (the demo writes one).
    squad_path = cfg.eval.squad.path or dataset_squad(ctx.prepared)
    if squad_path:
        try:  # eval.squad.path's existence was checked at start-up (checks.check_input_files)
            squad_records = load_squad(squad_path)
        except ValueError as e:
            raise DataError(f"eval.squad.path: {e}") from None
        log.info("SQuAD: %s", squad_path)
        if scfg.questions == "first_per_paragraph":
            squad_records = first_per_paragraph(squad_records)
        if scfg.limit is not None:
            squad_records = squad_records[:scfg.limit]
        squad_ids, truncated = squad_prompt_ids(squad_records, tok, cfg.model.seq_length, scfg.max_new_tokens,
                                                scfg.prompt, scfg.truncate)
        if truncated:
            log.warning("SQuAD: %d of %d passages cut to fit model.seq_length=%d", truncated, len(squad_records),
                        cfg.model.seq_length)

    def squad(net, tag: str) -> dict:
        preds = squad_predictions(net, squad_records, squad_ids, tok, cfg.eval.squad, cfg.model.seq_length)
        (run_dir / rundir.squad_predictions(tag)).write_text(json.dumps(preds, ensure_ascii=False, indent=0))
        return score_squad(squad_records, preds, scfg, tag)

    adapter = adapter_path(cfg, run_dir)   # eval.adapter, if set, was checked to exist at start-up
    if not adapter.is_file() and not cfg.eval.base:
        raise ModelError(f"evaluate: nothing to evaluate (eval.base=false and no adapter at {adapter})")
    net = ctx.load_base(cfg.eval.batch_size)
    if adapter.is_file():   # LoRA in place, lora_b zero: still exactly the base, and the adapter reuses its graphs
        net = with_adapter(net, adapter, cfg.lora, ctx.given, cfg.seed, load=False)
    # The weights scored: the base (every lora_b zero: W x + 0, the base bit for bit) and base + adapter.
    # All multiple-choice scoring runs first, then its graphs are freed, then all SQuAD decoding: the
    # two share no graph, so decoding does not start on top of the scoring graphs' buffers.
    weights = ([("_base", lambda: zero_lora_b(net))] if cfg.eval.base else []) + \
        ([("", lambda: load_adapter(net, adapter))] if adapter.is_file() else [])
    mc = {}
    for tag, use in weights:
        use()
        mc[tag] = score_mc(net)
        log.info("%s: accuracy %.4f on %d questions", "base model" if tag else "base + adapter", mc[tag]["accuracy"],
                 len(questions))
    checkpoint_rows = checkpoint_mc(net, run_dir, score_mc) if cfg.eval.checkpoints else []
    squads = {}
    if squad_records:
        drop_cells(net)
        release_graphs()
        for tag, use in weights:
            use()
            squads[tag] = squad(net, tag)

    result: dict = {"eval_questions": len(questions), "eval_num_shots": cfg.eval.num_shots, **prompt_stats}
    base, tuned = mc.get("_base"), mc.get("")
    base_squad, tuned_squad = squads.get("_base"), squads.get("")
    if base is not None:
        result.update(mc_accuracy_base=base["accuracy"], per_subject_accuracy_base=base["per_subject"],
                      mc_accuracy_macro_base=macro_accuracy(base["per_subject"]))
        if generate:
            result["mc_unparsed_base"] = base["unparsed"]
        if base_squad is not None:
            result.update(squad_keys(base_squad, "_base"))
    if tuned is not None:
        result.update(mc_accuracy=tuned["accuracy"], per_subject_accuracy=tuned["per_subject"],
                      mc_accuracy_macro=macro_accuracy(tuned["per_subject"]), evaluated_adapter=str(adapter))
        if generate:
            result["mc_unparsed"] = tuned["unparsed"]
        if tuned_squad is not None:
            result.update(squad_keys(tuned_squad, ""))
            if base_squad is not None:
                result.update(retention(tuned_squad, base_squad, cfg.eval.retention_threshold))
            if scfg.min_f1 is not None or scfg.min_em is not None:
                result["retained_absolute"] = ((scfg.min_f1 is None or tuned_squad["f1"] >= scfg.min_f1) and
                                               (scfg.min_em is None or tuned_squad["exact_match"] >= scfg.min_em))
    else:
        log.warning("evaluate: no adapter at %s (run the train stage, or set eval.adapter); "
                    "mc_accuracy is the base model's", adapter)
        net = apply_lora(net, cfg.lora, cfg.seed)   # only to count what LoRA would train
        result.update(mc_accuracy=base["accuracy"], per_subject_accuracy=base["per_subject"],
                      mc_accuracy_macro=macro_accuracy(base["per_subject"]), evaluated_adapter=None)
    result.update(param_summary(count_params(net)))

    if cfg.eval.checkpoints:
        squad_fn = squad if squad_records and base_squad is not None else None
        result.update(score_checkpoints(net, ctx.tracker, checkpoint_rows, squad_fn, base_squad,
                                        cfg.eval.retention_threshold))
    if mc_stats:   # one pass over the questions: padded / processed tokens and the compiled shapes
        result.update(eval_pad_fraction=1 - mc_stats["tokens"] / mc_stats["processed"], eval_shapes=mc_stats["shapes"])
    result["contest_score"] = contest_score(result["mc_accuracy"], result["trainable_ratio_pct"] / 100.0)
    result["squad_questions"] = len(squad_records)
    result["eval_protocol"] = cfg.eval.protocol
    result["eval_mc_method"] = str(cfg.eval.mc.method)
    if squad_records:
        result["squad_metric"] = str(scfg.metric)
    result["squad_set"] = str(squad_path) if squad_path else None
    with open(run_dir / rundir.EVAL_PREDICTIONS, "w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            row = {"id": q.id, "subject": q.subject, "answer": q.answer}
            if tuned is not None:
                row["prediction"] = tuned["predictions"][i]     # None: no letter in the generated answer
                if generate:
                    row["generation"] = tuned["texts"][i]
                else:
                    row["probabilities"] = probabilities_row(tuned["probabilities"][i])
            if base is not None:
                row["prediction_base"] = base["predictions"][i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return result


def score_squad(records: list[dict], preds: dict[str, str], scfg, tag: str) -> dict:
    """{"exact_match", "f1"} under eval.squad.metric (official for `both`), and with `both` every
    metric's figures as exact_match_<metric> / f1_<metric>."""
    names = list(SQUAD_METRICS) if scfg.metric == "both" else [str(scfg.metric)]
    scores = {}
    for name in names:
        s = score_squad_records(records, preds, name, str(scfg.gold))
        scores.update({f"exact_match_{name}": s["exact_match"], f"f1_{name}": s["f1"]})
        log.info("SQuAD%s (%s): EM %.2f F1 %.2f on %d questions", tag, name, s["exact_match"], s["f1"], len(records))
    primary = names[0]
    scores.update(exact_match=scores[f"exact_match_{primary}"], f1=scores[f"f1_{primary}"])
    return scores


def squad_keys(scores: dict, tag: str) -> dict:
    """summary.json keys: squad_f1<tag>, squad_em<tag>; with eval.squad.metric=both also
    squad_f1_<metric><tag> / squad_em_<metric><tag> for each metric."""
    out = {f"squad_f1{tag}": scores["f1"], f"squad_em{tag}": scores["exact_match"]}
    names = [k[len("f1_"):] for k in scores if k.startswith("f1_")]
    if len(names) > 1:
        for name in names:
            out.update({f"squad_f1_{name}{tag}": scores[f"f1_{name}"], f"squad_em_{name}{tag}": scores[f"exact_match_{name}"]})
    return out


def checkpoint_mc(net, run_dir, score_mc) -> list[dict]:
    """[{"step", "adapter", "mc_accuracy"}] for every checkpoint in run_dir/checkpoints, in order."""
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    entries = read_index(ckpt_dir)
    if not entries:
        raise ModelError(f"eval.checkpoints: no checkpoints in {ckpt_dir} (train with train.save.num_checkpoints > 0)")
    rows = []
    for entry in entries:
        load_adapter(net, ckpt_dir / entry["adapter"], "eval.checkpoints")
        rows.append({"step": entry["step"], "adapter": str(ckpt_dir / entry["adapter"]),
                     "mc_accuracy": score_mc(net)["accuracy"]})
        log.info("checkpoint step %d: accuracy %.4f", entry["step"], rows[-1]["mc_accuracy"])
    return rows


def score_checkpoints(net, tracker, rows: list[dict], squad, base_squad, threshold: float) -> dict:
    """The checkpoints' rows (checkpoint_mc) with SQuAD retention when measured, and the best by
    evaluation.select_best. Each is logged to MLflow at its step."""
    for row in rows:
        if squad is not None:
            load_adapter(net, row["adapter"], "eval.checkpoints")
            row.update(retention(squad(net, f"_step{row['step']:06d}"), base_squad, threshold))
        tracker.log_metrics({"checkpoint_mc_accuracy": row["mc_accuracy"]}, step=row["step"])
    best = select_best(rows)
    tracker.set_tags({"best_checkpoint": best["adapter"] if best else "none"})
    return {"checkpoint_scores": rows, "best_checkpoint_step": best["step"] if best else None,
            "best_checkpoint_mc_accuracy": best["mc_accuracy"] if best else None,
            "best_checkpoint_adapter": best["adapter"] if best else None}
