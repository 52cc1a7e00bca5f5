"""Greedy decoding on CPU (MindFormers' generate() needs Ascend-only kernels, e.g. ArgMaxExt).

No KV cache: each new token is one full forward pass over [batch, seq_length]. Rows are
right-padded, so with causal attention a row's next token depends only on its own tokens,
never on its batch neighbours or their padding.
"""
from __future__ import annotations

import numpy as np


def greedy_generate(net, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                    seq_length: int, batch_size: int) -> list[list[int]]:
    """New token ids per prompt (EOS not included), at most max_new_tokens or up to seq_length."""
    import mindspore as ms

    net.set_train(False)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [list(p) for p in prompts[start:start + batch_size]]
        for p in seqs:
            if not 0 < len(p) <= seq_length:
                raise ValueError(f"prompt of {len(p)} tokens does not fit model.seq_length={seq_length}")
        new: list[list[int]] = [[] for _ in seqs]
        done = [len(s) >= seq_length for s in seqs]
        for _ in range(max_new_tokens):
            if all(done):
                break
            x = np.full((batch_size, seq_length), pad_id, np.int32)
            for i, s in enumerate(seqs):
                x[i, :len(s)] = s
            logits = net(ms.Tensor(x))[0].asnumpy()
            for i, s in enumerate(seqs):
                if done[i]:
                    continue
                token = int(np.argmax(logits[i, len(s) - 1]))
                if token == eos_id:
                    done[i] = True
                    continue
                s.append(token)
                new[i].append(token)
                done[i] = len(s) >= seq_length
        results.extend(new)
    return results
