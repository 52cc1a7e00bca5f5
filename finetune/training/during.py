"""Curves during training (eval.every_n_steps=N): every N optimizer steps (and at the last),
  during_mc_accuracy          multiple-choice accuracy on a fixed, seeded sample of the eval split
                              (eval.during.limit questions, letter logits, eval.num_shots shots);
  during_general_loss_delta   the mean loss on held-out general text (the SQuAD set's passages:
                              eval.squad.path or the demo's reading set, never trained on) minus the
                              base model's loss on the same text: > 0 means general ability is going.
Logged as step metrics; `during_seconds` is the time they took (the overhead).

train.early_stopping.metric (one of the two) with .patience: the run stops when the metric has not
improved for `patience` evaluations in a row, and the best adapter is the one kept (adapter.ckpt).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np

from finetune.data.prepared import dataset_squad, load_questions
from finetune.errors import ConfigError

log = logging.getLogger(__name__)

HIGHER_IS_BETTER = {"during_mc_accuracy": True, "during_general_loss_delta": False}


def general_texts(cfg, prepared: Path, limit: int) -> list[str]:
    """Held-out general text: the distinct passages of the run's SQuAD set, in file order."""
    from finetune.data.squad import load_squad

    path = cfg.eval.squad.path or dataset_squad(prepared)
    if not path:
        return []
    seen, out = set(), []
    for r in load_squad(path):
        if r["context"] not in seen:
            seen.add(r["context"])
            out.append(r["context"])
    return out[:limit]


def text_rows(texts: list[str], tok, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """prefix text [eos] rows ([bos] text [eos] for most tokenizers) as prepared data is laid out ([N, seq_length + 1] ids and labels), the
    loss on every text token; a text longer than the window keeps its start."""
    from finetune.data.records import IGNORE_ID

    n = seq_length + 1
    ids = np.full((len(texts), n), tok.pad_id, np.int32)
    labels = np.full((len(texts), n), IGNORE_ID, np.int32)
    for i, text in enumerate(texts):
        body = tok.encode(text)[:seq_length - len(tok.prefix)] + [tok.eos_id]
        row = tok.prefix + body
        ids[i, :len(row)] = row
        labels[i, len(tok.prefix):len(row)] = body
    return ids, labels


class DuringTraining:
    """Built once before the first step (the LoRA B matrices are still zero, or are zeroed for the
    base figure): measure(step) -> {metric: value}, and the early-stopping bookkeeping."""

    def __init__(self, ctx, net, batch_size: int):
        from finetune.evaluation.scoring import build_eval_prompts, letter_token_ids

        cfg, tok = ctx.cfg, ctx.tok
        self.cfg, self.net, self.tok, self.batch_size = cfg, net, tok, batch_size
        seq = cfg.model.seq_length
        questions = load_questions(ctx.prepared, "eval")
        sample = random.Random(cfg.seed).sample(questions, min(cfg.eval.during.limit, len(questions)))
        self.answers = [q.answer for q in sample]
        self.prompts, _ = build_eval_prompts(sample, load_questions(ctx.prepared, "dev"), cfg.dataset.style,
                                             cfg.eval.num_shots, tok, seq)
        self.letter_ids = letter_token_ids(tok, cfg.dataset.style)
        texts = general_texts(cfg, ctx.prepared, cfg.eval.during.general_limit)
        self.rows = text_rows(texts, tok, seq) if texts else None
        metric = cfg.train.early_stopping.metric
        if metric == "during_general_loss_delta" and self.rows is None:
            raise ConfigError("train.early_stopping.metric=during_general_loss_delta needs held-out general text: "
                              "a SQuAD set (eval.squad.path, or the demo's dataset.demo.squad_questions)")
        self.metric, self.patience = metric, cfg.train.early_stopping.patience
        self.best, self.best_step, self.since_best, self.seconds, self.evaluations = None, None, 0, 0.0, 0
        self.base_loss = self._base_loss() if self.rows is not None else None

    def _general_loss(self) -> float:
        import mindspore as ms

        from finetune.data.batches import batch_inputs, eval_bucket, labelled_per_row
        from finetune.data.records import IGNORE_ID
        from finetune.model.forward import answer_loss_cell

        if not hasattr(self, "_loss_cell"):
            self._loss_cell = answer_loss_cell(self.net)
        ids, labels = self.rows
        k = labelled_per_row(labels)
        total, weight = 0.0, 0
        for i in range(0, len(ids), self.batch_size):
            arrays, _ = batch_inputs(ids[i:i + self.batch_size], labels[i:i + self.batch_size], self.tok.pad_id, k,
                                     fit=eval_bucket)
            n = int((labels[i:i + self.batch_size, 1:] != IGNORE_ID).sum())
            total += float(self._loss_cell(*(ms.Tensor(a) for a in arrays)).asnumpy()) * n
            weight += n
        return total / weight

    def _base_loss(self) -> float:
        """The loss with every lora_b zero (the base model), the adapter's values put back after."""
        from finetune.model.lora import restore_lora_b, zero_lora_b

        saved = zero_lora_b(self.net)
        self.net.set_train(False)
        try:
            return self._general_loss()
        finally:
            restore_lora_b(self.net, saved)
            self.net.set_train(True)

    def measure(self, step: int) -> dict:
        from finetune.evaluation.metrics import accuracy
        from finetune.evaluation.scoring import choose, letter_logits

        t0 = time.perf_counter()
        self.net.set_train(False)
        try:
            logits = letter_logits(self.net, self.prompts, self.letter_ids, self.batch_size,
                                   self.cfg.model.seq_length, self.tok.pad_id)
            preds, _ = choose(logits)
            out = {"during_mc_accuracy": accuracy(preds, self.answers)}
            if self.rows is not None:
                out["during_general_loss_delta"] = self._general_loss() - self.base_loss
        finally:
            self.net.set_train(True)
        self.seconds += time.perf_counter() - t0
        self.evaluations += 1
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def improved(self, step: int, figures: dict) -> bool:
        """Early stopping: True when this evaluation is the best so far (keep this adapter)."""
        if not self.metric:
            return False
        value = figures[self.metric]
        better = self.best is None or (value > self.best if HIGHER_IS_BETTER[self.metric] else value < self.best)
        if better:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return bool(self.metric) and self.since_best >= self.patience
