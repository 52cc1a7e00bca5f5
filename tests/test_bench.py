"""Benchmarks (slow; not part of `make test`): `make bench` or `pytest -m slow -s tests/test_bench.py`."""
import json
import time
from types import SimpleNamespace

import pytest

from conftest import resolved
from finetune.base import convert_hf
from finetune.generate import greedy_generate
from finetune.model import load_model


@pytest.mark.slow
def test_decode_tokens_per_second(shared, ms_cpu, tmp_path):
    """Greedy decoding of the real stories260K Llama, batch 4 x 100 new tokens, seq window 128."""
    path = shared / "models" / "stories260K-hf"
    cfg = resolved([f"model.checkpoint={path}", "model.seq_length=128", f"output_root={tmp_path}"])
    tok = SimpleNamespace(vocab_size=512, bos_id=1, eos_id=-1, pad_id=0)   # eos -1: never stop early
    net = load_model(cfg.model, cfg.hardware, tok, 4, convert_hf(path, cfg)[0])
    greedy_generate(net, [[1]] * 4, 2, -1, 0, 128, 4)   # compile
    t0 = time.perf_counter()
    outs = greedy_generate(net, [[1]] * 4, 100, -1, 0, 128, 4)
    dt = time.perf_counter() - t0
    rate = sum(map(len, outs)) / dt
    print(json.dumps({"decode_tokens_per_s": round(rate, 1), "batch": 4, "new_tokens": 100, "seconds": round(dt, 2)}))
    assert rate > 0
