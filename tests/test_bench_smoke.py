"""The benchmark harness (bench/, `make bench`) end to end in --smoke mode: every benchmark runs on
tiny shapes (2-3 training steps, a handful of questions, a few decoded tokens) into a temporary
folder and writes its JSON with the keys BENCHMARKS.md and `make bench-train` rely on. Speed is
not checked here (that is `make bench`), only that each figure was measured (a positive number).
Needs .venv-bench (`make bench-venv`: torch, peft) for the PyTorch side and ../shared for MMLU, CMMLU, the cl100k
tokenizer and stories260K."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest

from helpers import IN_CI, REPO, shared_path, spawn

# Per benchmark: the keys that must hold positive numbers (train: in every size).
TRAIN_KEYS = ("tool_tokens_per_s", "peft_tokens_per_s", "ratio_vs_peft", "tool_peak_rss_gb", "peft_peak_rss_gb",
              "peft_full_pad_tokens_per_s", "memory_ratio_vs_peft", "tool_tokens_per_s_all_steps", "ratio_all_steps",
              "ratio_first_steps", "tool_examples_per_step")
EXPECTED = {
    "mfu": ("peak_gflops", "mfu"),
    "eval": ("time_ratio_long_vs_short", "peak_rss_gb"),
    "decode": ("no_cache_tokens_per_s", "peak_rss_gb"),
    "prepare": ("total_seconds", "peak_rss_gb"),
}
META = ("machine", "date", "command", "versions")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.process
def test_every_benchmark_writes_its_json(tmp_path):
    for part in (("data", "mmlu"), ("data", "cmmlu"), ("tokenizers", "cl100k_base.tiktoken"),
                 ("models", "stories260K-hf")):
        shared_path(*part)
    peft_python = REPO / ".venv-bench" / "bin" / "python"
    if not peft_python.is_file():   # `make test` creates it; a bare `pytest` may not have it
        message = f"{peft_python} is missing (the PyTorch side of the benchmarks): make bench-venv"
        if IN_CI:
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    out, work = tmp_path / "results", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = spawn([sys.executable, "-m", "bench", "all", "--smoke", "--out", str(out), "--work", str(work)],
                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # the harness kills its own subprocesses
            proc.communicate(timeout=60)
    assert proc.returncode == 0, log[-4000:]

    train = json.loads((out / "train.json").read_text())
    assert train, "train.json: no size"
    for size, figures in train.items():
        bad = {k: figures.get(k) for k in TRAIN_KEYS if not positive(figures.get(k))}
        assert not bad, f"train.json[{size}]: {bad}"
        assert all(k in figures for k in META), sorted(figures)
        assert figures["peft_versions"]["torch"] and figures["peft_versions"]["peft"]
    for name, keys in EXPECTED.items():
        result = json.loads((out / f"{name}.json").read_text())
        bad = {k: result.get(k) for k in keys if not positive(result.get(k))}
        assert not bad, f"{name}.json: {bad}"
        assert all(k in result for k in META), f"{name}.json: {sorted(result)}"
    ev = json.loads((out / "eval.json").read_text())
    assert all(positive(v) for v in ev["examples_per_s"].values()) and len(ev["examples_per_s"]) == 2
    assert ev["max_abs_logit_diff_across_lengths"] < 1e-4   # padding beyond a prompt changes nothing
    dec = json.loads((out / "decode.json").read_text())
    # greedy_generate has the KV cache: both paths measured, and the cached one gives the very same tokens
    assert dec["cache"] == "available" and dec["same_tokens"] is True, dec
    assert positive(dec["cache_tokens_per_s"]) and positive(dec["cache_seconds"]) and positive(dec["new_tokens"])
    prep = json.loads((out / "prepare.json").read_text())
    assert all(positive(prep[d]["seconds"]) and positive(prep[d]["peak_rss_gb"]) for d in ("mmlu", "cmmlu"))
