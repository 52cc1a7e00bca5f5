"""LoRA through mindformers.pet: wrap the attention projections, freeze the base, save/load the adapter."""
from __future__ import annotations

import os

from .model import ModelError, load_checkpoint, save_checkpoint

ADAPTER_TAG = "mindpet_delta_lora"
ADAPTER_FILE = "adapter.ckpt"   # what the train stage writes into the run dir


def apply_lora(net, lora_cfg, output_dir: str | None = None):
    """Add LoRA to every layer matched by lora.target_modules and freeze everything else.

    mindformers.pet matches the regex against each cell's own name ('wq', not the dotted path)
    and stops at a matching non-Linear cell (plan.lora_layers has the exact rule), so whether
    anything was wrapped is checked afterwards: a regex that wraps nothing would silently train
    nothing. LoRA weights are float32 whatever the base's dtype (fp16 on Ascend): small updates
    to B and A would round away in float16."""
    from mindformers.pet import LoraConfig, get_pet_model

    if lora_cfg.rank < 1:
        raise ModelError(f"lora.rank: expected >= 1, got {lora_cfg.rank}")
    if not 0.0 <= lora_cfg.dropout < 1.0:
        raise ModelError(f"lora.dropout: expected in [0, 1), got {lora_cfg.dropout}")
    if output_dir:  # MindFormers writes adapter_config.json into its output root
        os.environ["LOCAL_DEFAULT_PATH"] = str(output_dir)
    config = LoraConfig(lora_rank=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=lora_cfg.target_modules, param_init_type="float32",
                        compute_dtype=net.config.compute_dtype)
    net = get_pet_model(net, config)
    if not adapter_params(net):
        raise ModelError(f"lora.target_modules={lora_cfg.target_modules!r} matches no layer of the model "
                         f"(it is matched against each cell's own name: e.g. '.*wq|.*wv', 'w1|w3')")
    if lora_cfg.dropout > 0:
        seed_dropout(net, lora_cfg.dropout)
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


def seed_dropout(net, p: float) -> int:
    """Replace the dropout of every LoRA layer by seeded_dropout_cell (seeds: the global seed that
    build_model set, and the layer's position). Returns how many were replaced."""
    import mindspore as ms
    from mindspore import nn

    seed = ms.get_seed() or 0
    layers = [cell for _, cell in net.cells_and_names() if isinstance(getattr(cell, "lora_dropout", None), nn.Dropout)]
    for i, cell in enumerate(layers):
        cell.lora_dropout = seeded_dropout_cell(p, seed, i + 1)
    return len(layers)


def adapter_path(cfg, run_dir) -> "Path":
    """eval.adapter if set, else the adapter the train stage writes into the run dir."""
    from pathlib import Path

    return Path(cfg.eval.adapter) if cfg.eval.adapter else Path(run_dir) / ADAPTER_FILE


def adapter_params(net) -> list:
    return [(p.name, p) for p in net.get_parameters() if ADAPTER_TAG in p.name]


# The LoRA settings an adapter was trained with, stored inside its checkpoint so that `merge`
# takes the scaling alpha/rank from the file itself, never from whoever runs the merge.
# Stored as tensors (text as UTF-8 bytes), not as MindSpore append_dict strings: model.save_checkpoint
# takes tensors only, and model.load_checkpoint calls .asnumpy() on every entry (a str would break
# loading a merged checkpoint as a base). None of these names contains ADAPTER_TAG.
META_RANK, META_ALPHA, META_TARGETS = "lora_rank", "lora_alpha", "lora_target_modules"
ADAPTER_META = (META_RANK, META_ALPHA, META_TARGETS)


def text_tensor(text: str):
    import mindspore as ms
    import numpy as np

    return ms.Tensor(np.frombuffer(text.encode("utf-8"), np.uint8).copy())


def tensor_text(value) -> str:
    import numpy as np

    return np.asarray(value.asnumpy() if hasattr(value, "asnumpy") else value, np.uint8).tobytes().decode("utf-8")


def adapter_config(net) -> dict:
    """rank / alpha / target_modules of the LoRA that mindformers.pet applied to `net` (the values
    its LoRADense layers compute with: scaling = alpha / rank)."""
    pet = getattr(getattr(net, "config", None), "pet_config", None)
    if pet is None or not hasattr(pet, "lora_rank"):
        raise ModelError("save_adapter: the network has no LoRA config (was apply_lora called on it?)")
    return {"rank": int(pet.lora_rank), "alpha": float(pet.lora_alpha), "target_modules": str(pet.target_modules)}


def save_adapter(net, path, lora_cfg=None) -> None:
    """The adapter tensors plus the rank, alpha and target regex they were trained with (read from
    the net's LoRA layers; `lora_cfg`, when given, must agree with them)."""
    import mindspore as ms
    import numpy as np

    lora = adapter_config(net)
    if lora_cfg is not None and (lora_cfg.rank, float(lora_cfg.alpha)) != (lora["rank"], lora["alpha"]):
        raise ModelError(f"save_adapter: lora.rank={lora_cfg.rank} lora.alpha={lora_cfg.alpha} differ from the "
                         f"network's LoRA layers (rank {lora['rank']}, alpha {lora['alpha']})")
    meta = [(META_RANK, ms.Tensor(np.array(lora["rank"], np.int32))),
            (META_ALPHA, ms.Tensor(np.array(lora["alpha"], np.float64))),   # float64: alpha exactly as given
            (META_TARGETS, text_tensor(lora["target_modules"]))]
    save_checkpoint(adapter_params(net) + meta, path)


def load_adapter(net, path) -> None:
    """Load adapter weights saved by save_adapter (its rank/alpha entries are skipped: the net's
    own LoRA layers define those); names and shapes must match exactly."""
    import mindspore as ms
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"eval.adapter: adapter checkpoint {path} not found")
    params = {k: v for k, v in ms.load_checkpoint(str(path)).items() if k not in ADAPTER_META}
    expected = dict(adapter_params(net))
    if set(params) != set(expected):
        diff = sorted(set(params) ^ set(expected))
        raise ModelError(f"eval.adapter: {path} does not fit this model + lora config "
                         f"({len(diff)} name(s) differ, e.g. {diff[:3]}); was it trained with other lora/model settings?")
    for name, p in expected.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise ModelError(f"eval.adapter: {path}: {name} has shape {tuple(params[name].shape)}, expected {tuple(p.shape)}")
    ms.load_param_into_net(net, params, strict_load=True)
