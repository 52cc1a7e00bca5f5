"""Forward passes that compute only what is used (the model's own cells, fewer positions):

- training on exam questions: the LM head (hidden x vocabulary) runs on the positions that carry
  loss (the answer tokens and EOS), not on every position; MindFormers' LlamaForCausalLM computes
  [batch x seq x vocab] logits and keeps ~16 fp32 copies of them for the backward pass.
- evaluation: the head runs on the last prompt position of each row only.
- every batch is cut to a length bucket (`bucket`) instead of model.seq_length: padding after a
  row's last token cannot change its logits (causal attention), so it need not be computed.
  Rows of similar length are batched together (prepared training data is sorted by length within
  chunks, evaluation prompts are taken in order of length), so little padding is left.

Positions and labels are gathered on the host (numpy) into flat indices, so each graph has fixed
shapes: one compile per (batch, bucket length, labelled positions per row).
"""
from __future__ import annotations

import numpy as np

from .model import IGNORE_ID

# Length buckets: 64, then four steps per power of two (64 80 96 112 128 160 192 224 256 320 ...).
# A row wastes at most a fifth of its bucket on padding (about a tenth on average), and a whole
# range of lengths compiles to few shapes: 21 buckets from 64 to 2048. Below 64 tokens a graph's
# compile time (seconds) outweighs what shorter rows save.
MIN_BUCKET = 64


def bucket(length: int, limit: int) -> int:
    """The smallest bucket length that holds `length` tokens, at most `limit` (model.seq_length)."""
    if length <= MIN_BUCKET:
        return min(limit, MIN_BUCKET)
    step = (1 << ((length - 1).bit_length() - 1)) // 4      # a quarter of the power of two below length
    return min(limit, -(-length // step) * step)


def causal_lm(net):
    """The LlamaForCausalLM inside a mindformers.pet wrapper (PetModel -> LoraModel -> the model
    itself, whose Linears were replaced in place), or `net` when it is not wrapped."""
    while not hasattr(net, "lm_head"):
        cells = list(net.name_cells().values())
        if len(cells) != 1:
            raise TypeError(f"{type(net).__name__}: no LlamaForCausalLM inside")
        net = cells[0]
    return net


def row_lengths(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Tokens up to and including each row's last non-pad token (rows are right-padded)."""
    real = ids != pad_id
    return np.where(real.any(axis=1), ids.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)


def answer_positions(ids: np.ndarray, labels: np.ndarray, pad_id: int, k: int) -> tuple[np.ndarray, ...]:
    """Host side of AnswerLoss for one batch of prepared rows ([B, L+1] input ids and labels, the
    model predicts token t+1 at position t): (flat position index [B*k], target id [B*k],
    mask [B*k]) of each row's labelled positions, padded to k per row with masked entries. The
    mask is MindFormers' own: label != IGNORE_ID and input token != pad."""
    tokens, targets = ids[:, :-1], labels[:, 1:]
    b, length = tokens.shape
    flat = np.zeros((b, k), np.int32)
    target = np.zeros((b, k), np.int32)
    mask = np.zeros((b, k), np.float32)
    for r in range(b):
        pos = np.nonzero(targets[r] != IGNORE_ID)[0]
        if len(pos) > k:
            raise ValueError(f"row {r} has {len(pos)} labelled positions, more than k={k}")
        flat[r, :len(pos)] = r * length + pos
        flat[r, len(pos):] = r * length          # any valid row: masked out
        target[r, :len(pos)] = targets[r, pos]
        mask[r, :len(pos)] = (tokens[r, pos] != pad_id).astype(np.float32)
    return flat.reshape(-1), target.reshape(-1), mask.reshape(-1)


def labelled_per_row(labels: np.ndarray) -> int:
    """The most labelled positions in any row (AnswerLoss's k, fixed for a whole run)."""
    return int((labels[:, 1:] != IGNORE_ID).sum(axis=1).max())


def answer_loss_cell(net):
    """A Cell computing the LM loss of a LlamaForCausalLM (LoRA-wrapped or not) from the decoder's
    hidden states at the labelled positions only: construct(tokens [B, L], flat [B*k], target [B*k],
    mask [B*k]) -> the same mean cross-entropy as net(input_ids, labels), with the head applied to
    B*k rows instead of B*L."""
    import mindspore as ms
    from mindspore import nn, ops

    f32 = ms.float32

    class AnswerLoss(nn.Cell):
        def __init__(self):
            # auto_prefix=False: the model's parameter names stay as they are (checkpoints use them)
            super().__init__(auto_prefix=False)
            self.lm = causal_lm(net)   # LoRA's cells were put into this model in place

        def construct(self, tokens, flat, target, mask):
            hidden = self.lm.model(tokens)                               # [B, L, H]
            hidden = hidden.reshape((-1, hidden.shape[-1]))              # [B*L, H]
            logits = self.lm.lm_head(ops.gather(hidden, flat, 0))        # [B*k, V]
            return self.lm.loss(ops.cast(logits, f32), target, mask)

    return AnswerLoss()


def last_logits_cell(net):
    """A Cell returning float32 logits at one position per row: construct(tokens [B, L], flat [B])
    -> [B, V], flat = row * L + position. Bit-identical to net(tokens)[0] at those positions.
    One cell per model, kept: its compiled graphs are reused when the same model is scored again
    with other weights (every checkpoint of a run) or other batches."""
    # Kept on the model object itself, so it goes when the model goes (a module-level cache would keep
    # every model alive). Checked against the parameter count: wrapping a model with LoRA changes it
    # in place (new cells, more parameters), and a graph compiled before must not be reused for it.
    # object.__setattr__: a Cell assigned the usual way would be registered as the model's sub-cell.
    params = sum(1 for _ in causal_lm(net).get_parameters())
    cached = net.__dict__.get("_finetune_last_logits")
    if cached is not None and cached[0] == params:
        return cached[1]
    cell = _last_logits_cell(net)
    object.__setattr__(net, "_finetune_last_logits", (params, cell))
    return cell


def _last_logits_cell(net):
    import mindspore as ms
    from mindspore import nn, ops

    f32 = ms.float32

    class LastLogits(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.lm = causal_lm(net)

        def construct(self, tokens, flat):
            hidden = self.lm.model(tokens)
            hidden = hidden.reshape((-1, hidden.shape[-1]))
            return ops.cast(self.lm.lm_head(ops.gather(hidden, flat, 0)), f32)

    return LastLogits()
