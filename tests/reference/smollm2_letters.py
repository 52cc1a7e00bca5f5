"""Write tests/data/smollm2_mmlu_letters.json: transformers' 5-shot MMLU letters for the 100 questions
of tests/test_real_model.py, from its own GGUF loading of SmolLM2-135M-Instruct (in .venv-bench).
Run from the repository root with the tool's environment (it builds the prompts as the tool does):

    .venv/bin/python tests/reference/smollm2_letters.py
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import finetune  # noqa: E402,F401  (the protobuf backend first)
from test_real_model import BENCH_PYTHON, REFERENCE_LETTERS, mmlu_prompts, prompts_digest  # noqa: E402


def main() -> None:
    cfg, tok, prompts, letters = mmlu_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "out.npz"
        request.write_text(json.dumps({"letters": {"prompts": prompts, "letter_ids": letters}}))
        subprocess.run([str(BENCH_PYTHON), str(REPO / "tests" / "reference" / "hf_reference.py"), "gguf",
                        cfg.model.checkpoint, str(request), str(out)], check=True)
        chosen = np.load(out)["letters"].tolist()
    REFERENCE_LETTERS.write_text(json.dumps({
        "what": "transformers 4.57.1 + gguf 0.19.0 (.venv-bench), from_pretrained(gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf), "
                "argmax of the letter logits at each prompt's last position",
        "command": ".venv/bin/python tests/reference/smollm2_letters.py",
        "prompts_sha256": prompts_digest(prompts), "letter_ids": letters, "letters": chosen}, indent=1))



if __name__ == "__main__":
    main()
