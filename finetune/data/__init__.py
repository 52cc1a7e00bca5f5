"""Data: MMLU/CMMLU/demo readers, prompts, tokenizers, preparation into Alpaca JSON and MindRecord,
packing and batching of prepared rows, SQuAD files. Imports no model code.

The names below are the package's face: what stages and the entrypoint import."""

from finetune.data.batches import bucket, eval_bucket, eval_buckets, row_lengths
from finetune.data.inputs import check_input_files, is_multiple_choice, read_predict_input
from finetune.data.mindrecord import read_all_shards, read_shards
from finetune.data.hf_tokenizer import hf_tokenizer_files
from finetune.data.packing import micro_batches, pack, pad_fraction, rows_per_step
from finetune.data.prepare import prepare
from finetune.data.prepared import TRAIN_RECORDS, alpaca_file, dataset_squad, load_meta, load_questions
from finetune.data.records import LETTERS
from finetune.data.squad import first_per_paragraph, load_squad, squad_prompt_ids
from finetune.data.tokenizer import PAT_STR, TokenizerError, builtin_ranks, load_tokenizer, read_tiktoken_file

__all__ = [
    "LETTERS",
    "PAT_STR",
    "TRAIN_RECORDS",
    "TokenizerError",
    "alpaca_file",
    "bucket",
    "builtin_ranks",
    "check_input_files",
    "dataset_squad",
    "eval_bucket",
    "eval_buckets",
    "first_per_paragraph",
    "hf_tokenizer_files",
    "is_multiple_choice",
    "load_meta",
    "load_questions",
    "load_squad",
    "load_tokenizer",
    "micro_batches",
    "pack",
    "pad_fraction",
    "prepare",
    "read_all_shards",
    "read_predict_input",
    "read_shards",
    "read_tiktoken_file",
    "row_lengths",
    "rows_per_step",
    "squad_prompt_ids",
]
