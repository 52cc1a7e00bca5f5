"""Reference figures from Hugging Face transformers, run in .venv-bench (torch, transformers, gguf),
never in the tool's own environment. The tests compare the tool's MindSpore numbers with these.

    python hf_reference.py qwen2 OUT_DIR
        a random small Qwen2ForCausalLM written by transformers (safetensors, config.json) and its
        logits for fixed ids: OUT_DIR/reference_input.json, OUT_DIR/reference_logits.npy
    python hf_reference.py gguf FILE.gguf REQUEST.json OUT.npz
        transformers' own GGUF loading (from_pretrained(..., gguf_file=...)): for REQUEST's
        {"logits": [ids...], "greedy": [ids], "new_tokens": n, "letters": {"prompts": [[ids]...],
        "letter_ids": [a, b, c, d]}}: the logits of `logits`, the greedy continuation of `greedy`,
        and the argmax letter (0-3) of each prompt's last position
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

torch.manual_seed(0)
torch.set_num_threads(2)


def qwen2(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=299, pad_token_id=299)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():   # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    ids = [5, 17, 123, 42, 7, 250, 3, 99, 180, 11, 64, 2]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    (out / "reference_input.json").write_text(json.dumps({"input_ids": ids}))
    np.save(out / "reference_logits.npy", logits)


def gguf(file: Path, request: dict, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, torch_dtype=torch.float32).eval()
    result = {}
    with torch.no_grad():
        if "logits" in request:
            result["logits"] = model(torch.tensor([request["logits"]])).logits[0].numpy()
        if "greedy" in request:
            seq = list(request["greedy"])
            for _ in range(request["new_tokens"]):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            result["greedy"] = np.array(seq[len(request["greedy"]):])
        if "letters" in request:
            letter_ids = request["letters"]["letter_ids"]
            result["letters"] = np.array([int(model(torch.tensor([p])).logits[0, -1, letter_ids].argmax())
                                          for p in request["letters"]["prompts"]])
    np.savez(out, **result)


if __name__ == "__main__":
    if sys.argv[1] == "qwen2":
        qwen2(Path(sys.argv[2]))
    elif sys.argv[1] == "gguf":
        gguf(Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()), Path(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
