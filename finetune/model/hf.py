"""Hugging Face Llama-family model folders: weight files -> numpy tensors (config.json -> model
config keys is finetune/config/hf_config.py; the tensor-name mapping is finetune/model/layout.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.errors import ModelError


def load_hf_state(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of *.safetensors (or *.bin when torch is installed) as float32 numpy arrays."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, np.ndarray] = {}
    if files:
        from safetensors.numpy import load_file

        for f in files:
            try:
                state.update(load_file(str(f)))
            except Exception as e:  # a truncated or foreign file: say which
                raise ModelError(f"{f}: cannot read safetensors ({e})") from None
    else:
        bins = sorted(path.glob("*.bin"))
        if not bins:
            raise ModelError(f"model.checkpoint: {path} has no *.safetensors or *.bin weight files")
        try:
            import torch
        except ImportError:
            raise ModelError(f"{path}: weights are PyTorch *.bin, which need torch (pip install torch); "
                             f"or convert them to safetensors") from None
        for f in bins:
            for k, v in torch.load(str(f), map_location="cpu", weights_only=True).items():
                state[k] = v.float().numpy()
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
