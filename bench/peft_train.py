"""The PyTorch side of `python -m bench train`: LoRA training of a transformers LlamaForCausalLM with
PEFT on the very token rows the tool trained on, in the same batch order. The only module of the
project that imports torch / transformers' torch model / peft (the `bench` extra).

    python -m bench.peft_train train --rows ROWS.npz --model MODEL.json --pad longest [full] --out OUT.json
    python -m bench.peft_train peak --size 2048 --out OUT.json      # torch fp32 matmul GFLOP/s

ROWS.npz (written by bench.workers rows): ids / labels [examples, seq_length + 1] int32 (the
tool's prepared rows: [bos] prompt answer [eos] pad..., labels -100 except on the answer and EOS)
in step order, offsets [steps + 1] (step s trains on examples offsets[s] .. offsets[s+1] - 1:
the examples of the tool's packed rows of that step), pad_id. The standard causal-LM recipe:
each step's examples as one batch, padded to the batch's longest row (what
DataCollatorForSeq2Seq / a padding collator gives; `--pad longest`, the reference) or every row
padded to seq_length (`--pad full`), attention_mask = not padding, labels as given (-100 ignored);
LlamaForCausalLM shifts labels by one inside, as the tool's rows expect.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def vm_hwm_gb() -> float:
    """This process's peak resident set (VmHWM) in GB, a cross-check of the parent's wait4 figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def build(model: dict, lora: dict, seed: int):
    """transformers LlamaForCausalLM with the tool's architecture (random init, fp32), wrapped by PEFT
    LoRA on q/k/v/o. `model` holds the tool's model keys (hidden_size, num_layers, ...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=model["vocab_size"], hidden_size=model["hidden_size"],
        intermediate_size=model["intermediate_size"], num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"], num_key_value_heads=model["n_kv_heads"] or model["num_heads"],
        max_position_embeddings=model["seq_length"] + 1, rms_norm_eps=model["rms_norm_eps"],
        rope_theta=model["rope_theta"], tie_word_embeddings=model["tie_word_embeddings"],
        initializer_range=model["init_std"], attention_bias=False, mlp_bias=False,
        bos_token_id=model["bos_id"], eos_token_id=model["eos_id"], pad_token_id=model["pad_id"],
        use_cache=False)
    # sdpa: transformers' default attention on CPU (torch's fused scaled_dot_product_attention)
    net = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32)
    peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none",
                             task_type="CAUSAL_LM")
    return get_peft_model(net, peft_config)


def train(args, pad: str) -> dict:
    """One training run of len(ids) steps; rows padded as `pad` says (longest | full)."""
    import peft
    import torch
    import transformers
    from transformers import get_cosine_schedule_with_warmup

    rows = np.load(args.rows)
    ids_all, labels_all, pad_id, offsets = rows["ids"], rows["labels"], int(rows["pad_id"]), rows["offsets"]
    spec = json.loads(Path(args.model).read_text())
    model, lora, opt_cfg = spec["model"], spec["lora"], spec["optimizer"]
    net = build(model, lora, spec.get("seed", 0))
    trainable = [p for p in net.parameters() if p.requires_grad]
    # The tool's optimizer settings: AdamW (beta 0.9/0.999, eps 1e-8, weight decay 0.01), cosine
    # schedule with warm-up, global-norm clipping 1.0.
    opt = torch.optim.AdamW(trainable, lr=opt_cfg["learning_rate"], betas=(opt_cfg["beta1"], opt_cfg["beta2"]),
                            eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"])
    steps = len(offsets) - 1
    sched = get_cosine_schedule_with_warmup(opt, int(opt_cfg["warmup_ratio"] * steps), steps)
    net.train()
    seq_length = ids_all.shape[1] - 1
    per_step = []
    for step in range(steps):
        ids, labels = ids_all[offsets[step]:offsets[step + 1]], labels_all[offsets[step]:offsets[step + 1]]
        t0 = time.perf_counter()
        real = ids != pad_id
        if pad == "longest":   # the batch's longest row (up to its last non-pad token)
            length = int(np.where(real.any(1), ids.shape[1] - np.argmax(real[:, ::-1], 1), 0).max())
            length = min(length, seq_length)
        else:                       # every row padded to seq_length
            length = seq_length
        x = torch.from_numpy(ids[:, :length].astype(np.int64))
        mask = torch.from_numpy(real[:, :length].astype(np.int64))
        y = torch.from_numpy(labels[:, :length].astype(np.int64))
        loss = net(input_ids=x, attention_mask=mask, labels=y).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, opt_cfg["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.item())   # waits for the step, like the tool's loss.asnumpy()
        dt = time.perf_counter() - t0
        # useful tokens: the tool's count (non-pad tokens of the row's first seq_length), same rows
        per_step.append({"seconds": dt, "tokens": int((ids[:, :-1] != pad_id).sum()), "processed": int(x.numel()),
                         "length": length, "loss": loss_value, "grad_norm": float(norm)})
    return {"pad": pad, "steps": steps, "examples_per_step": float(np.diff(offsets).mean()), "seq_length": seq_length,
            "per_step": per_step, "peak_rss_gb_self": vm_hwm_gb(), "torch_threads": torch.get_num_threads(),
            "attn_implementation": "sdpa", "trainable_params": sum(p.numel() for p in trainable),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


def peak(args) -> dict:
    """fp32 matmul throughput of torch on this CPU: C = A @ B, n x n, 2 n^3 FLOPs per product;
    the best of `repeat` timed products after one warm-up."""
    import torch

    n = args.size
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(args.repeat))
    return {"torch_gflops": 2 * n ** 3 / best / 1e9, "size": n, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peft_train")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--rows", required=True)
    t.add_argument("--model", required=True, help="JSON: model, lora, optimizer settings")
    t.add_argument("--pad", choices=["longest", "full"], nargs="+", default=["longest"],
                   help="one run per value, one after the other in this process (OUT: {pad: result})")
    t.add_argument("--out", required=True)
    p = sub.add_parser("peak")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = {pad: train(args, pad) for pad in args.pad} if args.cmd == "train" else peak(args)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
