"""The model: the MindFormers Llama, LoRA and its adapter file, checkpoint I/O, Hugging Face weights and
tensor names, the forward cells (head only where used), generation with a KV cache.

The names below are the package's face: what stages and the entrypoint import."""

from finetune.model.adapter import (
    MERGED_KEY_HF,
    MERGED_META,
    adapter_path,
    base_tensors,
    check_run_adapter,
    load_adapter,
    merge_lora,
    merged_marker,
    read_adapter,
    refuse_merged_base,
    save_adapter,
    save_merged,
)
from finetune.model.checkpoint import read_checkpoint, save_checkpoint
from finetune.model.forward import drop_cells
from finetune.model.generate import greedy_generate
from finetune.model.layout import NORMS, dense_layers, module_param_counts, to_hf
from finetune.model.llama import count_params, load_model, param_summary, release_graphs, setup_context
from finetune.model.lora import apply_lora, with_adapter, zero_lora_b

__all__ = [
    "MERGED_KEY_HF",
    "MERGED_META",
    "NORMS",
    "adapter_path",
    "apply_lora",
    "base_tensors",
    "check_run_adapter",
    "count_params",
    "dense_layers",
    "drop_cells",
    "greedy_generate",
    "load_adapter",
    "load_model",
    "merge_lora",
    "merged_marker",
    "module_param_counts",
    "param_summary",
    "read_adapter",
    "read_checkpoint",
    "refuse_merged_base",
    "release_graphs",
    "save_adapter",
    "save_checkpoint",
    "save_merged",
    "setup_context",
    "to_hf",
    "with_adapter",
    "zero_lora_b",
]
