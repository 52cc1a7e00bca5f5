"""Forward passes that compute only what is used (the model's own cells, fewer positions):

- training on exam questions: the LM head (hidden x vocabulary) runs on the positions that carry
  loss (the answer tokens and EOS), not on every position; MindFormers' LlamaForCausalLM computes
  [batch x seq x vocab] logits and keeps ~16 fp32 copies of them for the backward pass.
- evaluation: the head runs on the last prompt position of each row only.
- training on packed rows (data/packing.py, `packed_loss_cell`): many examples per row of exactly
  model.seq_length positions, each attending to itself only: one shape, one compiled graph.
- every other batch is cut to a length instead of model.seq_length: padding after a row's last
  token cannot change its logits (causal attention), so it need not be computed. Evaluation,
  prediction and generation use powers of two (`eval_bucket`: few shapes, known in advance);
  unpacked training (train.packing=false) finer buckets (`bucket`: less padding, more graphs).
  Rows of similar length are batched together (prepared training data is sorted by length within
  chunks, evaluation prompts are taken in order of length), so little padding is left.

Positions and labels are gathered on the host (numpy) into flat indices, so each graph has fixed
shapes: one compile per (batch, bucket length, labelled positions per row).
"""
from __future__ import annotations

import numpy as np

from finetune.data.packing import labelled_per_row as packed_labelled_per_row
from finetune.data.packing import labelled_positions

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


def eval_bucket(length: int, limit: int) -> int:
    """The input length of an evaluation, prediction or generation batch: the smallest power of two
    from MIN_BUCKET up that holds `length` tokens, at most `limit` (model.seq_length). Inference
    graphs are cheap to keep but each costs a compile: at most 6 shapes up to 2048 (64 .. 2048),
    known before any data is read (plan counts them)."""
    return min(limit, max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()))


# Rows of an evaluation batch hold at most this many tokens' attention square each, times the batch:
# past 512 tokens a batch takes fewer rows (1024: a quarter, 2048: a sixteenth), so that the score
# matrices [rows, heads, L, L] of a long batch are no larger than those of a full batch at 512.
# (128M model, eval batch 16 at 2048 tokens: ~2 GB per score tensor, and the job passed 24 GB.)
EVAL_SQUARE = 512


def eval_rows(batch_size: int, length: int) -> int:
    """Rows of an evaluation batch of prompts cut to `length` (at least 1, at most batch_size)."""
    return max(1, min(batch_size, batch_size * EVAL_SQUARE ** 2 // length ** 2))


def eval_batches(lengths, limit: int, batch_size: int) -> list[tuple[list[int], int, int]]:
    """How scoring runs prompts of these lengths: [(indices, rows, length)], indices taken in order of
    length, each batch right-padded to (rows, length): length = eval_bucket of its longest prompt,
    rows = eval_rows(batch_size, length) (fewer rows for long prompts), so each length is one shape."""
    out, chunk = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if len(chunk) >= eval_rows(batch_size, eval_bucket(lengths[i], limit)):   # i would not fit: close
            length = eval_bucket(lengths[chunk[-1]], limit)
            out.append((chunk, eval_rows(batch_size, length), length))
            chunk = []
        chunk.append(i)
    if chunk:
        length = eval_bucket(lengths[chunk[-1]], limit)
        out.append((chunk, eval_rows(batch_size, length), length))
    return out


def eval_buckets(lengths, limit: int, batch_size: int) -> list[int]:
    """The distinct lengths scoring.letter_logits runs prompts of these lengths at (eval_batches)."""
    return sorted({length for _, _, length in eval_batches(list(lengths), limit, batch_size)})


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
    tokens = ids[:, :-1]
    flat, target, filled = labelled_positions(labels[:, 1:], k)
    real = np.take_along_axis(tokens, flat - np.arange(len(tokens))[:, None] * tokens.shape[1], axis=1) != pad_id
    return flat.reshape(-1), target.reshape(-1), (filled & real).astype(np.float32).reshape(-1)


def labelled_per_row(labels: np.ndarray) -> int:
    """The most labelled positions in any row of prepared [B, L+1] labels (AnswerLoss's k, fixed
    for a whole run)."""
    return packed_labelled_per_row(labels[:, 1:])


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


def packed_loss_cell(net):
    """A Cell for training on packed rows (data/packing.py): construct(tokens, segments, positions
    [B, L], flat [B*k], target [B*k], weight [B*k]) -> sum(weight * cross-entropy) over the
    labelled positions `flat`. Each example of a row attends only to its own earlier tokens (a
    block-diagonal causal mask from the segments) and has its own rotary positions (restarting at
    0), so its logits are those of the example run alone; the head runs on the labelled positions
    only. With weight = 1 / (labelled positions of the optimizer step) the loss is the step's mean."""
    from mindspore import nn, ops

    logits_cell = packed_logits_cell(net)

    class PackedLoss(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.logits = logits_cell

        def construct(self, tokens, segments, positions, flat, target, weight):
            logits = self.logits(tokens, segments, positions, flat)                    # [B*k, V] float32
            logp = ops.log_softmax(logits, -1)
            picked = ops.gather_elements(logp, 1, ops.reshape(target, (-1, 1)))         # [B*k, 1]
            return -ops.reduce_sum(ops.reshape(picked, (-1,)) * weight)

    return PackedLoss()


def packed_logits_cell(net):
    """construct(tokens, segments, positions [B, L], flat [N]) -> float32 logits [N, V] at the
    flattened positions `flat` of packed rows (the same attention and positions as training)."""
    import mindspore as ms
    from mindspore import nn, ops

    decoder = packed_decoder(net)

    class PackedLogits(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.decoder = decoder
            self.lm = decoder.lm

        def construct(self, tokens, segments, positions, flat):
            hidden = self.decoder(tokens, segments, positions)
            return ops.cast(self.lm.lm_head(ops.gather(hidden, flat, 0)), ms.float32)

    return PackedLogits()


def packed_decoder(net):
    """The model's decoder over packed rows: construct(tokens, segments, positions [B, L]) ->
    final-norm hidden states [B*L, H]. It runs the model's own cells (embedding, every decoder
    layer as it is, recompute included, final norm); only the mask and the rotary tables differ
    from LLamaModel.construct: the mask lets position i see position j when j <= i and both
    belong to the same segment, in the model's own convention (an additive -10000 for the plain
    attention, a uint8 'masked' flag for flash attention); the rotary tables are gathered at each
    token's position id."""
    import mindspore as ms
    from mindspore import nn, ops

    lm = causal_lm(net)
    model = lm.model
    if getattr(model, "rmsnorm_compute_2d", False):
        raise ValueError("packed training: rmsnorm_compute_2d (2-D hidden states) is not supported")

    class PackedDecoder(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.lm = lm
            self.num_layers = len(lm.model.layers)

        def construct(self, tokens, segments, positions):
            model = self.lm.model
            b, length = tokens.shape
            causal = model.casual_mask
            same = ops.cast(ops.equal(ops.expand_dims(segments, 2), ops.expand_dims(segments, 1)), causal.dtype)
            lower = ops.expand_dims(causal.lower_triangle_mask[:length, :length], 0)          # [1, L, L]
            hidden_mask = ops.expand_dims(ops.sub(causal.one, ops.mul(same, lower)), 1)      # 1 = masked
            if causal.use_flash_attention:
                mask = ops.cast(hidden_mask, ms.uint8)
            else:
                mask = ops.mul(hidden_mask, causal.multiply_data)
            freqs_mgr = model.freqs_mgr
            head_dim = freqs_mgr.head_dim
            where = ops.reshape(positions, (-1,))
            cos = ops.reshape(ops.gather(freqs_mgr.freqs_cos, where, 0), (b, 1, length, head_dim))
            sin = ops.reshape(ops.gather(freqs_mgr.freqs_sin, where, 0), (b, 1, length, head_dim))
            freqs = (cos, sin, freqs_mgr.swap_mask)
            h = ops.reshape(ops.cast(model.tok_embeddings(tokens), model.dtype), (b, length, -1))
            for i in range(self.num_layers):
                h = model.layers[i](h, freqs, mask)
            h = model.norm_out(h)
            return ops.reshape(h, (b * length, -1))

    return PackedDecoder()


def last_logits_cell(net):
    """A Cell returning float32 logits at one position per row: construct(tokens [B, L], flat [B])
    -> [B, V], flat = row * L + position. Bit-identical to net(tokens)[0] at those positions.
    One cell per model, kept: its compiled graphs are reused when the same model is scored again
    with other weights (every checkpoint of a run) or other batches."""
    return _kept_on_model(net, "_finetune_last_logits", _last_logits_cell)


def _kept_on_model(net, attribute: str, build):
    """build(net), made once per model and kept on the model object itself, so it goes when the
    model goes (a module-level cache would keep every model alive). Checked against the parameter
    count: wrapping a model with LoRA changes it in place (new cells, more parameters), and a graph
    compiled before must not be reused for it. object.__setattr__: a Cell assigned the usual way
    would be registered as the model's sub-cell."""
    params = sum(1 for _ in causal_lm(net).get_parameters())
    cached = net.__dict__.get(attribute)
    if cached is not None and cached[0] == params:
        return cached[1]
    made = build(net)
    object.__setattr__(net, attribute, (params, made))
    return made


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


def kv_cells(net):
    """(prefill, step) Cells for greedy decoding with a key/value cache, over the model's own cells
    (embedding, norms, the q/k/v/o projections with their LoRA, rotary embedding, attention core,
    feed-forward, head): only the caching is ours. MindFormers' incremental inference (use_past)
    needs Ascend kernels; this path runs anywhere.

    prefill(tokens [B, C], flat [B]) -> (logits [B, V] at the flat positions, keys, values): the
      prompt, right-padded to the cache length C, exactly as the model computes it; keys/values
      per layer [B, kv_heads, C, head_dim] after rotary embedding (before grouped-query repeat).
    step(token [B, 1], pos [B], visible [B, C], onehot [B, 1, C, 1], keys, values) -> (logits,
      keys, values): one new token per row at position pos; its key/value is written into the
      cache at pos (onehot), and it attends to the cache positions marked visible (earlier
      positions that are not padding: the same mask the model builds from the tokens).
    One pair per model, kept on the model object like last_logits_cell."""
    return _kept_on_model(net, "_finetune_kv_cells", _kv_cells)


def _kv_cells(net):
    import mindspore as ms
    from mindspore import nn, ops

    f32 = ms.float32
    lm = causal_lm(net)
    if getattr(lm.model.layers[0].attention, "qkv_concat", False):
        raise ValueError("kv cache: fused w_qkv projections are not supported (LoRA targets wq/wk/wv)")

    def split_heads(x, heads, head_dim):   # [B, L, heads*head_dim] -> [B, heads, L, head_dim]
        b, length = x.shape[0], x.shape[1]
        return ops.transpose(ops.reshape(x, (b, length, heads, head_dim)), (0, 2, 1, 3))

    def residual(layer, x, y):             # LLamaDecodeLayer's residual add, with its casts
        if layer.residual_cast_flag:
            return ops.cast(ops.add(ops.cast(x, layer.residual_dtype), ops.cast(y, layer.residual_dtype)),
                            layer.dtype)
        return ops.add(x, y)

    class Prefill(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.lm = lm
            self.num_layers = len(lm.model.layers)

        def construct(self, tokens, flat):
            model = self.lm.model
            b, length = tokens.shape
            mask = model.casual_mask(tokens)
            freqs = model.freqs_mgr(length)
            h = ops.reshape(ops.cast(model.tok_embeddings(tokens), model.dtype), (b, length, -1))
            keys, values = (), ()
            for i in range(self.num_layers):
                layer = model.layers[i]
                attn = layer.attention
                x = layer.attention_norm(h)
                q = split_heads(ops.cast(attn.wq(x), attn.dtype), attn.n_head, attn.head_dim)
                k = split_heads(ops.cast(attn.wk(x), attn.dtype), attn.n_kv_head, attn.head_dim)
                v = split_heads(ops.cast(attn.wv(x), attn.dtype), attn.n_kv_head, attn.head_dim)
                q, k = attn.apply_rotary_emb(q, k, freqs)
                keys += (k,)
                values += (v,)
                context = attn._attn(q, attn._repeat_kv(k, attn.n_rep), attn._repeat_kv(v, attn.n_rep), mask)
                h = residual(layer, h, ops.cast(attn.wo(context), x.dtype))
                h = residual(layer, h, layer.feed_forward(layer.ffn_norm(h)))
            hidden = ops.reshape(model.norm_out(h), (b * length, -1))
            logits = ops.cast(self.lm.lm_head(ops.gather(hidden, flat, 0)), f32)
            return logits, keys, values

    class Step(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.lm = lm
            self.num_layers = len(lm.model.layers)

        def construct(self, token, pos, visible, onehot, keys, values):
            model = self.lm.model
            b = token.shape[0]
            freqs_mgr = model.freqs_mgr
            head_dim = freqs_mgr.head_dim
            # the rotary tables' rows at each token's position, [B, 1, 1, head_dim]
            cos = ops.reshape(ops.gather(freqs_mgr.freqs_cos, pos, 0), (b, 1, 1, head_dim))
            sin = ops.reshape(ops.gather(freqs_mgr.freqs_sin, pos, 0), (b, 1, 1, head_dim))
            freqs = (cos, sin, freqs_mgr.swap_mask)
            causal = model.casual_mask   # the model's own mask arithmetic: (1 - visible) * -10000
            mask = ops.mul(ops.sub(causal.one, ops.reshape(ops.cast(visible, causal.dtype), (b, 1, 1, -1))),
                           causal.multiply_data)
            keep = 1 - onehot
            h = ops.reshape(ops.cast(model.tok_embeddings(token), model.dtype), (b, 1, -1))
            new_keys, new_values = (), ()
            for i in range(self.num_layers):
                layer = model.layers[i]
                attn = layer.attention
                x = layer.attention_norm(h)
                q = split_heads(ops.cast(attn.wq(x), attn.dtype), attn.n_head, attn.head_dim)
                k = split_heads(ops.cast(attn.wk(x), attn.dtype), attn.n_kv_head, attn.head_dim)
                v = split_heads(ops.cast(attn.wv(x), attn.dtype), attn.n_kv_head, attn.head_dim)
                q, k = attn.apply_rotary_emb(q, k, freqs)
                # write position pos: x*1 + 0 elsewhere is exact, so the rest of the cache is unchanged
                k_all = keys[i] * keep + k * onehot
                v_all = values[i] * keep + v * onehot
                new_keys += (k_all,)
                new_values += (v_all,)
                context = attn._attn(q, attn._repeat_kv(k_all, attn.n_rep), attn._repeat_kv(v_all, attn.n_rep),
                                     mask)
                h = residual(layer, h, ops.cast(attn.wo(context), x.dtype))
                h = residual(layer, h, layer.feed_forward(layer.ffn_norm(h)))
            hidden = ops.reshape(model.norm_out(h), (b, -1))
            return ops.cast(self.lm.lm_head(hidden), f32), new_keys, new_values

    return Prefill(), Step()


def batch_inputs(ids: np.ndarray, labels: np.ndarray, pad_id: int, answers_per_row: int | None,
                 fit=bucket) -> tuple:
    """The step's inputs for rows of prepared data ([B, seq_length + 1] ids and labels) and the tokens
    the model processes. answers_per_row None: the whole rows, for the model's own loss over every
    position (pretraining on packed text). Otherwise (LoRA on exam questions) the rows are cut to a
    length `fit(longest, seq_length)` (a training bucket, or eval_bucket for a loss measured during
    training) and the loss is taken at the labelled positions only (forward.answer_loss_cell)."""
    if answers_per_row is None:
        return (ids, labels), ids[:, :-1].size
    length = fit(int(row_lengths(ids, pad_id).max()) - 1, ids.shape[1] - 1)   # tokens the model reads
    flat, target, mask = answer_positions(ids[:, :length + 1], labels[:, :length + 1], pad_id, answers_per_row)
    return (ids[:, :length], flat, target, mask), ids.shape[0] * length
