"""model=smollm2_135m: SmolLM2-135M-Instruct, a real pretrained model, fetched from the package index
as a Q4_1 GGUF file and dequantized by the tool, against transformers' own GGUF loading of the same
file (tests/reference/hf_reference.py in .venv-bench): logits, greedy decoding and 5-shot MMLU letters."""
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, resolved, shared_path

BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
# The four MMLU subjects with the shortest 5-shot prompts (287-343 tokens on average with the chat
# template): 100 questions fit 512-token batches.
SUBJECTS = ("world_religions", "management", "conceptual_physics", "miscellaneous")
# transformers' letters for those 100 questions (tests/reference/smollm2_letters.py, ~5 min here in
# .venv-bench: kept as a file rather than recomputed by every test run)
REFERENCE_LETTERS = REPO / "tests" / "data" / "smollm2_mmlu_letters.json"
# Measured: max |ours - transformers| 1.2e-4 over 412 positions x 49,152 logits of magnitude up to 43
# (float32 sums in a different order through 30 layers)
LOGITS_TOLERANCE = 2e-4


def smollm2_config():
    return resolved(["model=smollm2_135m", f"output_root={REPO / 'outputs'}"])   # fetched once into outputs/cache


def mmlu_prompts():
    """(config, tokenizer, 100 five-shot MMLU prompts as the evaluate stage builds them, letter ids)."""
    from finetune.data.mmlu import read_mmlu_file
    from finetune.data.tokenizer import load_tokenizer
    from finetune.evaluation.scoring import build_eval_prompts, letter_token_ids

    cfg = smollm2_config()
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path, True)
    questions, dev = [], []
    for subject in SUBJECTS:
        questions += read_mmlu_file(shared_path("data", "mmlu", "test", f"{subject}_test.csv"), "test", subject)[:25]
        dev += read_mmlu_file(shared_path("data", "mmlu", "dev", f"{subject}_dev.csv"), "dev", subject)
    prompts, stats = build_eval_prompts(questions, dev, "mmlu", 5, tok, cfg.model.seq_length)
    assert stats == {"eval_fewer_shots": 0, "eval_truncated": 0}
    return cfg, tok, prompts, letter_token_ids(tok, "mmlu")


def prompts_digest(prompts) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


@pytest.fixture(scope="module")
def smol(ms_cpu, tmp_path_factory):
    """The converted model, its tokenizer (with the file's chat template) and transformers' logits and
    greedy tokens for a real prompt."""
    from types import SimpleNamespace

    from finetune.model.llama import load_model
    from finetune.training.base import convert_gguf

    if not BENCH_PYTHON.is_file():
        pytest.fail(f"{BENCH_PYTHON} is missing: `make bench-venv` (make test creates it)")
    cfg, tok, prompts, letters = mmlu_prompts()
    ckpt, _ = convert_gguf(Path(cfg.model.checkpoint), cfg)
    net = load_model(cfg.model, cfg.hardware, tok, 1, ckpt)
    probe = max(prompts, key=len)
    greedy = tok.wrap(tok.encode("What is the capital of France?"))
    work = tmp_path_factory.mktemp("smollm2")
    (work / "request.json").write_text(json.dumps({"logits": probe, "greedy": greedy, "new_tokens": 32}))
    subprocess.run([str(BENCH_PYTHON), str(REPO / "tests" / "reference" / "hf_reference.py"), "gguf",
                    cfg.model.checkpoint, str(work / "request.json"), str(work / "reference.npz")],
                   check=True, capture_output=True, timeout=1200)
    return SimpleNamespace(cfg=cfg, tok=tok, net=net, prompts=prompts, letters=letters, probe=probe, greedy=greedy,
                           reference=dict(np.load(work / "reference.npz")))


pytestmark = pytest.mark.process   # transformers runs in .venv-bench


def test_logits_equal_transformers(smol):
    """The longest of the 5-shot MMLU prompts, in the file's chat template: every position's logits."""
    import mindspore as ms

    from finetune.data.batches import eval_bucket

    length = eval_bucket(len(smol.probe), smol.cfg.model.seq_length)
    x = np.full((1, length), smol.tok.pad_id, np.int32)
    x[0, :len(smol.probe)] = smol.probe
    smol.net.set_train(False)
    logits = smol.net(ms.Tensor(x))[0].asnumpy().reshape(length, -1)[:len(smol.probe)]
    ref = smol.reference["logits"]
    assert len(smol.probe) > 300 and ref.shape == logits.shape
    assert smol.tok.eos_id in smol.probe      # <|im_end|> inside the prompt is a token, not padding
    np.testing.assert_allclose(logits, ref, atol=LOGITS_TOLERANCE, rtol=0)


def test_greedy_decoding_equals_transformers_and_knows_things(smol):
    from finetune.model.generate import greedy_generate

    (new,) = greedy_generate(smol.net, [smol.greedy], 32, -1, smol.tok.pad_id, smol.cfg.model.seq_length, 1)
    assert new == smol.reference["greedy"].tolist()
    assert "The capital of France is Paris." in smol.tok.decode(new)


def test_mmlu_letters_equal_transformers(smol):
    """5-shot MMLU letter predictions as the evaluate stage scores them, on 100 real questions: the
    same letter as transformers for at least 99."""
    from finetune.evaluation.scoring import letter_logits

    reference = json.loads(REFERENCE_LETTERS.read_text())
    assert reference["prompts_sha256"] == prompts_digest(smol.prompts), \
        "the prompts changed: regenerate the reference with tests/reference/smollm2_letters.py"
    assert reference["letter_ids"] == smol.letters
    ours = letter_logits(smol.net, smol.prompts, smol.letters, 16, smol.cfg.model.seq_length, smol.tok.pad_id).argmax(1)
    assert len(ours) == 100 and (ours == np.array(reference["letters"])).sum() >= 99
