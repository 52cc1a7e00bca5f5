"""Forward passes that compute only what is used (the model's own cells, fewer positions):

- training on exam questions: the LM head (hidden x vocabulary) runs on the positions that carry
  loss (the answer tokens and EOS), not on every position; MindFormers' LlamaForCausalLM computes
  [batch x seq x vocab] logits and keeps ~16 fp32 copies of them for the backward pass.
- evaluation: the head runs on the last prompt position of each row only.
- training on packed rows (data/packing.py, `packed_loss_cell`): many examples per row of exactly
  model.seq_length positions, each attending to itself only: one shape, one compiled graph.
- generation: a KV cache (`kv_cells`: prefill once, then one token per step).

The batches these cells take (lengths, flat position indices, masks) are made on the host, in
numpy, by finetune/data/batches.py and finetune/data/packing.py, so each graph has fixed shapes.
"""
from __future__ import annotations


def causal_lm(net):
    """The LlamaForCausalLM inside a mindformers.pet wrapper (PetModel -> LoraModel -> the model
    itself, whose Linears were replaced in place), or `net` when it is not wrapped."""
    while not hasattr(net, "lm_head"):
        cells = list(net.name_cells().values())
        if len(cells) != 1:
            raise TypeError(f"{type(net).__name__}: no LlamaForCausalLM inside")
        net = cells[0]
    return net


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


# Where _kept_on_model keeps each cell on the model object (drop_cells forgets both).
LAST_LOGITS_ATTR, KV_CELLS_ATTR = "_finetune_last_logits", "_finetune_kv_cells"


def last_logits_cell(net):
    """A Cell returning float32 logits at one position per row: construct(tokens [B, L], flat [B])
    -> [B, V], flat = row * L + position. Bit-identical to net(tokens)[0] at those positions.
    One cell per model, kept: its compiled graphs are reused when the same model is scored again
    with other weights (every checkpoint of a run) or other batches."""
    return _kept_on_model(net, LAST_LOGITS_ATTR, _last_logits_cell)


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


def drop_cells(net) -> None:
    """Forget the cells kept on the model (last_logits_cell, kv_cells), so that release_graphs can
    free their graphs' buffers: evaluate calls both between multiple-choice scoring and SQuAD
    decoding, which share no graph."""
    for attribute in (LAST_LOGITS_ATTR, KV_CELLS_ATTR):
        net.__dict__.pop(attribute, None)


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
    return _kept_on_model(net, KV_CELLS_ATTR, _kv_cells)


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

    def layer_body(layer, h, freqs, mask, write=None):
        """One decoder layer as LLamaDecodeLayer computes it, also returning its keys and values.
        write = (cached keys, cached values, keep, onehot): a decode step writes its k/v at one
        position of the cache (x*1 + 0 elsewhere is exact: the rest is unchanged) and attends to all."""
        attn = layer.attention
        x = layer.attention_norm(h)
        q = split_heads(ops.cast(attn.wq(x), attn.dtype), attn.n_head, attn.head_dim)
        k = split_heads(ops.cast(attn.wk(x), attn.dtype), attn.n_kv_head, attn.head_dim)
        v = split_heads(ops.cast(attn.wv(x), attn.dtype), attn.n_kv_head, attn.head_dim)
        q, k = attn.apply_rotary_emb(q, k, freqs)
        if write is not None:
            cached_k, cached_v, keep, onehot = write
            k = cached_k * keep + k * onehot
            v = cached_v * keep + v * onehot
        context = attn._attn(q, attn._repeat_kv(k, attn.n_rep), attn._repeat_kv(v, attn.n_rep), mask)
        h = residual(layer, h, ops.cast(attn.wo(context), x.dtype))
        h = residual(layer, h, layer.feed_forward(layer.ffn_norm(h)))
        return h, k, v

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
                h, k, v = layer_body(model.layers[i], h, freqs, mask)
                keys += (k,)
                values += (v,)
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
                h, k, v = layer_body(model.layers[i], h, freqs, mask, (keys[i], values[i], keep, onehot))
                new_keys += (k,)
                new_values += (v,)
            hidden = ops.reshape(model.norm_out(h), (b, -1))
            return ops.cast(self.lm.lm_head(hidden), f32), new_keys, new_values

    return Prefill(), Step()


