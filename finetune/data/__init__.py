"""Readers for MMLU / CMMLU multiple-choice CSVs and prompt formatting."""
