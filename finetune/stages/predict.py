"""Stage `predict`: a file of questions in, answers out.

Input (predict.input; default: the dataset's prepared eval split): an Alpaca JSON list ({instruction,
input, output?}, optional id), or one MMLU/CMMLU CSV file (answer column optional). A record whose
prompt ends in the style's answer cue ("Answer:" / "答案是：") is multiple choice: letter
probabilities at the last position, scored as evaluate scores (finetune/evaluation/scoring.py). Any other
record gets a greedy free-text answer (first line).
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

from finetune import rundir
from finetune.data import LETTERS, alpaca_file, is_multiple_choice, read_predict_input
from finetune.evaluation import (
    answer_text,
    choose,
    generated_choices,
    letter_logits,
    letter_token_ids,
    probabilities_row,
)
from finetune.files import write_text
from finetune.model import adapter_path, greedy_generate, load_model, with_adapter

log = logging.getLogger(__name__)






def predict(ctx) -> dict:
    cfg, run_dir, tok = ctx.cfg, ctx.run_dir, ctx.tok
    p = cfg.predict
    style = cfg.dataset.style
    # No input given: the prepared eval split (Alpaca JSON), i.e. predict on the dataset's test set.
    source = p.input or alpaca_file(ctx.prepared, "eval")
    records = read_predict_input(source, cfg.dataset.name, style, cfg.dataset.encoding)
    seq = cfg.model.seq_length
    # multiple choice by generation (the contest's style, or eval.mc.method=generate) or by letter logits
    generate = style == "contest" or cfg.eval.mc.method == "generate"
    is_mc = [is_multiple_choice(r["prompt"], style) for r in records]
    ids, truncated = [], 0
    for r, mc_record in zip(records, is_mc):
        content = tok.encode(r["prompt"])
        # The same rule as evaluate: a prompt that does not fit keeps its end (the question, where the
        # answer is read or generated); generated answers also get room in the window.
        room = seq if mc_record and not generate else seq - (cfg.eval.mc.max_new_tokens if mc_record else
                                                               p.max_new_tokens)
        room -= len(tok.wrap([]))
        if len(content) > room:
            content, truncated = content[-room:], truncated + 1
        x = tok.wrap(content)
        ids.append(x)
    if truncated:
        log.warning("predict: %d of %d prompts cut to fit model.seq_length=%d (their start is dropped)", truncated,
                    len(records), seq)
    mc = [i for i, m in enumerate(is_mc) if m]
    free = [i for i, m in enumerate(is_mc) if not m]

    merged = run_dir / rundir.MERGED
    adapter = adapter_path(cfg, run_dir)
    if merged.is_file() and not cfg.eval.adapter:   # the seed's flow: predict with the merged model
        net = load_model(cfg.model, cfg.hardware, tok, p.batch_size, merged, what="merged model")
        model_used = str(merged)
    elif adapter.is_file():
        net = with_adapter(ctx.load_base(p.batch_size), adapter, cfg.lora, ctx.given, cfg.seed)
        model_used = f"base + {adapter}"
    else:
        log.warning("predict: no adapter at %s; predicting with the base model", adapter)
        net, model_used = ctx.load_base(p.batch_size), "base"
    t0 = time.perf_counter()
    results: list[dict] = [{"id": r["id"]} for r in records]
    mc_stats: dict = {}
    if mc and generate:
        letters, texts = generated_choices(net, [ids[i] for i in mc], tok, cfg.eval.mc.max_new_tokens, seq,
                                           p.batch_size)
        for k, i in enumerate(mc):
            results[i].update(prediction=letters[k], generation=texts[k])   # None: no letter stated
    elif mc:
        logits = letter_logits(net, [ids[i] for i in mc], letter_token_ids(tok, style), p.batch_size, seq, tok.pad_id,
                               mc_stats)
        preds, probs = choose(logits)
        for k, i in enumerate(mc):
            results[i]["prediction"] = preds[k]
            results[i]["probabilities"] = probabilities_row(probs[k])
    if free:
        outs = greedy_generate(net, [ids[i] for i in free], p.max_new_tokens, tok.eos_id, tok.pad_id, seq,
                               p.batch_size)
        for i, o in zip(free, outs):
            results[i]["prediction"] = answer_text(o, tok)
    seconds = time.perf_counter() - t0

    output = Path(p.output) if p.output else run_dir / rundir.PREDICTIONS
    write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    out = {"predict_output": str(output), "predict_input": str(source), "predict_model": model_used,
           "predict_records": len(records), "predict_multiple_choice": len(mc), "predict_truncated": truncated,
           "predict_examples_per_s": len(records) / seconds if seconds else float("nan")}
    if mc_stats:
        out.update(predict_pad_fraction=1 - mc_stats["tokens"] / mc_stats["processed"], predict_shapes=mc_stats["shapes"])
    if p.format == "npy":
        chosen = set(mc)   # -1: free text, or a generated answer that states no letter
        indices = np.array([LETTERS.index(r["prediction"]) if i in chosen and r.get("prediction") in LETTERS else -1
                            for i, r in enumerate(results)], dtype=np.int64)
        np.save(output.with_name(rundir.RESULTS), indices)
        out["predict_results_npy"] = str(output.with_name(rundir.RESULTS))
    log.info("predict: %d records -> %s (%.1f examples/s)", len(records), output, out["predict_examples_per_s"])
    return out
