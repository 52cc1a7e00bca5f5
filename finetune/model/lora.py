"""LoRA through mindformers.pet: wrap the matching projections, freeze the base, seed the dropout.
(The adapter *file* (save, read, merge) is finetune/model/adapter.py.)"""
from __future__ import annotations

import numpy as np

from finetune.errors import ModelError
from finetune.model.adapter import adapter_params


def apply_lora(net, lora, seed: int):
    """Add LoRA (rank, alpha, dropout, target_modules: a lora config group or the dict that
    adapter.lora_settings returns) to every layer matched by target_modules; freeze the rest.

    `seed` draws lora_a's initial values and seeds the dropout masks: passed in, not read from
    MindSpore's global seed, so a LoRA model is the same whatever was built before it.
    mindformers.pet matches the regex against each cell's own name ('wq', not the dotted path)
    and stops at a matching non-Linear cell (plan.lora_layers has the exact rule), so whether
    anything was wrapped is checked afterwards: a regex that wraps nothing would silently train
    nothing. LoRA weights are float32 whatever the base's dtype (fp16 on Ascend): small updates
    to B and A would round away in float16."""
    import mindspore as ms
    from mindformers.pet import LoraConfig, get_pet_model

    config = LoraConfig(lora_rank=int(lora["rank"]), lora_alpha=float(lora["alpha"]),
                        lora_dropout=float(lora["dropout"]), target_modules=str(lora["target_modules"]),
                        param_init_type="float32", compute_dtype=net.config.compute_dtype)
    ms.set_seed(seed)
    net = get_pet_model(net, config)
    if not adapter_params(net):
        raise ModelError(f"lora.target_modules={lora['target_modules']!r} matches no layer of the model "
                         f"(it is matched against each cell's own name: e.g. '.*wq|.*wv', 'w1|w3')")
    if lora["dropout"] > 0:
        seed_dropout(net, float(lora["dropout"]), seed)
    return net


def seeded_dropout_cell(p: float, seed: int, seed2: int):
    """Dropout whose mask is drawn by UniformReal with explicit seeds, so the same seed gives the
    same masks in every process. MindSpore 2.9's CPU Dropout kernel does not: two processes with
    the same seed agree for 5 calls and then differ (measured; with ms.set_seed, deterministic="ON",
    one thread, PyNative, or Seed0/Seed1 alike), which made identical demo runs end anywhere in
    0.93-1.00 accuracy. UniformReal reproduced over every call tried."""
    import mindspore as ms
    from mindspore import nn, ops

    class SeededDropout(nn.Cell):
        def __init__(self):
            super().__init__()
            self.keep = 1.0 - p
            self.uniform = ops.UniformReal(seed=seed, seed2=seed2)

        def construct(self, x):
            if not self.training:
                return x
            mask = (self.uniform(x.shape) < self.keep).astype(x.dtype)
            return x * mask / ms.Tensor(self.keep, x.dtype)   # inverted dropout: expectation unchanged

    return SeededDropout()


def seed_dropout(net, p: float, seed: int) -> int:
    """Replace the dropout of every LoRA layer by seeded_dropout_cell (seeds: `seed` and the
    layer's position). Returns how many were replaced."""
    from mindspore import nn

    layers = [cell for _, cell in net.cells_and_names() if isinstance(getattr(cell, "lora_dropout", None), nn.Dropout)]
    for i, cell in enumerate(layers):
        cell.lora_dropout = seeded_dropout_cell(p, seed, i + 1)
    return len(layers)


def with_adapter(net, path, lora_cfg, given: frozenset[str], seed: int, what: str = "eval.adapter",
                 load: bool = True):
    """Wrap `net` with the LoRA an adapter file records (adapter.lora_settings: a conflicting
    `lora.*` override is an error) and load the adapter's weights into it. load=False: every
    lora_b stays zero, so the network computes exactly the base model (bit for bit: W x + 0) with
    the graphs the adapter will use (evaluate scores the base this way: one compile, not two)."""
    from finetune.model.adapter import load_adapter, lora_settings, read_adapter

    _, meta = read_adapter(path, what)
    net = apply_lora(net, lora_settings(meta, lora_cfg, given, path), seed)
    if load:
        load_adapter(net, path, what)
    else:
        zero_lora_b(net)
    return net


def zero_lora_b(net) -> dict[str, np.ndarray]:
    """Set every lora_b to zero, so the network computes the base model exactly (W x + 0);
    returns the values it had, for restore_lora_b."""
    import mindspore as ms

    saved = {}
    for name, p in adapter_params(net):
        if "lora_b" in name:
            saved[name] = p.asnumpy().copy()
            p.set_data(ms.Tensor(np.zeros(p.shape, np.float32), p.dtype))
    return saved


def restore_lora_b(net, saved: dict[str, np.ndarray]) -> None:
    import mindspore as ms

    for name, p in adapter_params(net):
        if name in saved:
            p.set_data(ms.Tensor(saved[name], p.dtype))
