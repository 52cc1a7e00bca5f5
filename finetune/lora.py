"""LoRA through mindformers.pet: wrap the attention projections, freeze the base, save/load the adapter."""
from __future__ import annotations

import os
import re

from .model import ModelError, load_checkpoint, save_checkpoint

ADAPTER_TAG = "mindpet_delta_lora"
ADAPTER_FILE = "adapter.ckpt"   # what the train stage writes into the run dir


def matching_layers(net, target_modules: str) -> list[str]:
    """Dense layers whose cell name matches the target regex (mindformers.pet uses re.match)."""
    import mindspore.nn as nn
    from mindformers.modules.layers import Linear

    pattern = re.compile(target_modules)
    return [name for name, cell in net.cells_and_names()
            if isinstance(cell, (nn.Dense, Linear)) and pattern.match(name)]


def apply_lora(net, lora_cfg, output_dir: str | None = None):
    """Add LoRA to every layer matched by lora.target_modules and freeze everything else.

    A regex that matches nothing would silently train nothing (or, after MindFormers'
    freeze, leave no trainable parameter), so it is an error here."""
    from mindformers.pet import LoraConfig, get_pet_model

    if lora_cfg.rank < 1:
        raise ModelError(f"lora.rank: expected >= 1, got {lora_cfg.rank}")
    if not 0.0 <= lora_cfg.dropout < 1.0:
        raise ModelError(f"lora.dropout: expected in [0, 1), got {lora_cfg.dropout}")
    layers = matching_layers(net, lora_cfg.target_modules)
    if not layers:
        raise ModelError(f"lora.target_modules={lora_cfg.target_modules!r} matches no layer of the model "
                         f"(layers look like 'model.layers.0.attention.wq', 'model.layers.0.feed_forward.w1')")
    if output_dir:  # MindFormers writes adapter_config.json into its output root
        os.environ["LOCAL_DEFAULT_PATH"] = str(output_dir)
    config = LoraConfig(lora_rank=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=lora_cfg.target_modules)
    return get_pet_model(net, config)


def adapter_path(cfg, run_dir) -> "Path":
    """eval.adapter if set, else the adapter the train stage writes into the run dir."""
    from pathlib import Path

    return Path(cfg.eval.adapter) if cfg.eval.adapter else Path(run_dir) / ADAPTER_FILE


def adapter_params(net) -> list:
    return [(p.name, p) for p in net.get_parameters() if ADAPTER_TAG in p.name]


def save_adapter(net, path) -> None:
    save_checkpoint(adapter_params(net), path)


def load_adapter(net, path) -> None:
    """Load adapter weights saved by save_adapter; names and shapes must match exactly."""
    import mindspore as ms
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"eval.adapter: adapter checkpoint {path} not found")
    params = ms.load_checkpoint(str(path))
    expected = dict(adapter_params(net))
    if set(params) != set(expected):
        diff = sorted(set(params) ^ set(expected))
        raise ModelError(f"eval.adapter: {path} does not fit this model + lora config "
                         f"({len(diff)} name(s) differ, e.g. {diff[:3]}); was it trained with other lora/model settings?")
    for name, p in expected.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise ModelError(f"eval.adapter: {path}: {name} has shape {tuple(params[name].shape)}, expected {tuple(p.shape)}")
    ms.load_param_into_net(net, params, strict_load=True)
