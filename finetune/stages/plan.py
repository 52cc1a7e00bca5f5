"""Stage `plan`: a dry run for any config, in seconds. Builds no model and allocates no weights.

Everything is counted from the model/lora/hardware/parallel groups: parameters per module
(MindFormers' cell names), LoRA's trainable parameters (the cells mindformers.pet would wrap),
memory per device, tokens per optimizer step, which input files are missing, and the exact
command (`msrun ...` beyond one device) that runs the config. Writes run_dir/plan.json and
refuses a config whose estimate exceeds hardware.max_device_memory.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from finetune import rundir
from finetune.config import Config
from finetune.errors import ConfigError
from finetune.model import NORMS, dense_layers, module_param_counts
from finetune.runtime import msrun_command, redact, world_size

# MindSpore reads max_device_memory="58GB" as 58 x 2^30 bytes (kGBToByte = 1024 << 20 in its
# runtime), so every memory figure here is in that unit, to compare like with like.
GB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Labelled positions per training row: a multiple-choice answer's letter and EOS (the LM head runs
# on these only; longer rehearsal answers raise it for their batches).
ANSWER_TOKENS = 2   # hardware.*_type are schema enums of these


def _bytes_of(dtype: str) -> int:
    return DTYPE_BYTES[str(dtype)]


def lora_layers(model_cfg, target_modules: str) -> dict[str, tuple[int, int]]:
    """The Linear cells mindformers.pet wraps in LoRADense, {name: (in, out)}.

    Its walk (mindformers/pet/tuners/lora_adapter.py, recursive_replace_dense_cell) starts at
    LlamaForCausalLM.model (so lm_head is never wrapped) and, at each level, `re.match`es the
    regex against each child's OWN name ('layers', '0', 'attention', 'wq'), not the dotted path:
    a matching Linear is wrapped; a matching non-Linear cell (e.g. 'feed_forward' for
    '.*feed_forward.*') is skipped together with everything under it; anything else is walked into.
    So a Linear is wrapped when its own name matches and none of its ancestors' names do."""
    pattern = re.compile(target_modules)
    out = {}
    for name, shape in dense_layers(model_cfg).items():
        *ancestors, own = name.split(".")[1:]   # drop the leading 'model': the walk starts inside it
        if pattern.match(own) and not any(pattern.match(a) for a in ancestors):
            out[name] = shape
    return out


def lora_param_count(model_cfg, lora_cfg) -> int:
    """rank x (in + out) per wrapped Linear: lora_a is [rank, in], lora_b is [out, rank]."""
    layers = lora_layers(model_cfg, lora_cfg.target_modules)
    if not layers:
        raise ConfigError(f"lora.target_modules={lora_cfg.target_modules!r} matches no layer mindformers.pet would "
                          f"adapt (it matches each cell's own name, e.g. 'wq', 'w1', walking down from the model; "
                          f"a match on a non-Linear cell such as 'attention' or 'feed_forward' stops the walk there)")
    return sum(lora_cfg.rank * (n_in + n_out) for n_in, n_out in layers.values())


def parse_memory(text: str | None) -> int | None:
    """'58GB' -> bytes (MindSpore's GB = 2^30); None = no limit (CPU)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*GB\s*", str(text))   # the format is checked at start-up
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"hardware.max_device_memory: expected a size like '58GB' (or null), got {text!r}")
    return int(float(m.group(1)) * GB)


def activation_bytes(model_cfg, hw, batch_size: int) -> dict[str, int]:
    """Activations kept for the backward pass, per device, for one micro-batch of batch_size x seq_length.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    eq. (1): one transformer layer stores s*b*h*(34 + 5*a*s/h) bytes at 16-bit, where 5*a*s/h
    is the [b, a, s, s] attention scores, softmax and its dropout mask; flash attention never
    stores them, leaving 34*s*b*h. (A Llama layer differs in detail: SwiGLU with FFN 11008 instead
    of 4h GeLU, no dropout; the paper's figure is the estimate used here.) Full recompute
    (their section 4.1) keeps only each layer's 16-bit input, 2*s*b*h bytes, plus one layer's
    full activations while that layer is recomputed. A 32-bit compute dtype doubles every term.
    Pipeline parallel does not reduce this: with 1F1B the first stage holds pipeline_stage
    micro-batches of num_layers / pipeline_stage layers (their section 4.2.3)."""
    s, b, h, a = model_cfg.seq_length, batch_size, model_cfg.hidden_size, model_cfg.num_heads
    scale = _bytes_of(hw.compute_dtype) / 2
    per_layer = s * b * h * (34 + (0 if hw.use_flash_attention else 5 * a * s / h)) * scale
    layers = model_cfg.num_layers
    return {"no_recompute": int(layers * per_layer),
            "recompute": int(layers * 2 * s * b * h * scale + per_layer)}


def memory_estimate(cfg, counts: dict[str, int], lora_params: int, vocab_size: int | None) -> dict[str, int]:
    """Bytes per device. Data parallel replicates everything; model_parallel x pipeline_stage
    splits the weights and adapters; model_parallel splits activations and logits (approximate:
    Korthikanti's eq. (2) keeps 10*s*b*h of 34 unsplit without sequence parallelism)."""
    hw, par, m = cfg.hardware, cfg.parallel, cfg.model
    shards = par.model_parallel * par.pipeline_stage
    param_bytes = _bytes_of(hw.param_init_type)
    # MindFormers' LlamaRMSNorm creates its weight in layernorm_compute_type, every other base
    # parameter (embedding, Linear weights and biases) in param_init_type.
    norm_bytes = _bytes_of(hw.layernorm_compute_type)
    weights = sum(n * (norm_bytes if name.endswith(NORMS + ("norm_out",)) else param_bytes)
                  for name, n in counts.items())
    act = activation_bytes(m, hw, cfg.train.batch_size)
    lora_fp32 = lora_params * 4 // shards
    return {
        "base_weights": weights // shards,
        "lora_params": lora_fp32,                 # fp32 adapters
        "lora_grads": lora_fp32,                  # fp32 gradients of the adapters
        "optimizer_state": 2 * lora_fp32,         # AdamW's two fp32 moments (MindFormers' clone_state)
        # train.py sums micro-batch gradients into fp32 buffers when accumulating
        "grad_accumulation": lora_fp32 if par.gradient_accumulation_steps > 1 else 0,
        "activations_no_recompute": act["no_recompute"] // par.model_parallel,
        "activations_recompute": act["recompute"] // par.model_parallel,
        # fp32 logits for the cross-entropy, only where the loss is (forward.answer_loss_cell):
        # b x ANSWER_TOKENS x vocab x 4 bytes (it was b x seq_length x vocab x 4 before)
        "logits": cfg.train.batch_size * ANSWER_TOKENS * (vocab_size or 0) * 4 // par.model_parallel,
    }


def memory_totals(mem: dict[str, int]) -> dict[str, int]:
    fixed = sum(v for k, v in mem.items() if not k.startswith("activations_"))
    return {"no_recompute": fixed + mem["activations_no_recompute"], "recompute": fixed + mem["activations_recompute"]}


def tokens_per_step(cfg) -> int:
    """Tokens per optimizer step = batch_size (per device, per micro-step) x data_parallel x
    gradient_accumulation_steps x seq_length (padding included: the budget, not the real tokens;
    packed, at most: the step takes the rows that hold batch_size examples, fewer than batch_size)."""
    return (cfg.train.batch_size * cfg.parallel.data_parallel * cfg.parallel.gradient_accumulation_steps
            * cfg.model.seq_length)


def missing_files(cfg) -> list[str]:
    """'key=path' for each configured input path that does not exist (plan reports, never fails)."""
    paths = {"model.checkpoint": cfg.model.checkpoint, "model.tokenizer.path": cfg.model.tokenizer.path,
             "dataset.path": cfg.dataset.path}
    return [f"{key}={path}" for key, path in paths.items() if path is not None and not Path(path).exists()]


def resolve_vocab(model_cfg) -> tuple[int | None, str]:
    """(vocab size or None, where it came from): model.vocab_size, else the tokenizer's if its
    file exists (the built-in demo encoding needs none)."""
    from finetune.data import TokenizerError, load_tokenizer

    if model_cfg.vocab_size:
        return model_cfg.vocab_size, "model.vocab_size"
    tok_cfg = model_cfg.tokenizer
    if tok_cfg.path and not Path(tok_cfg.path).is_file():
        return None, f"unknown: model.vocab_size is null and tokenizer {tok_cfg.path} is missing"
    try:
        tok = load_tokenizer(tok_cfg.kind, tok_cfg.path)
    except TokenizerError as e:
        return None, f"unknown: {e}"
    return tok.vocab_size, f"tokenizer {tok.name}"


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_command(cfg, run_dir: Path, overrides: list[str]) -> list[str]:
    """The command that runs this config for real: the same overrides with `plan` taken out of
    a stages override (dropped when plan was its only stage: the default stages run); msrun
    beyond one device, `finetune` on one."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("stages=")]
    stages = [s for s in cfg.stages if s != "plan"]
    if len(kept) < len(overrides) and stages:
        kept.append(f"stages=[{','.join(stages)}]")
    if world_size(cfg.parallel) == 1:
        return ["finetune", *kept]
    return msrun_command(cfg, run_dir, kept)


def power_of_two_lengths(seq_length: int) -> list[int]:
    """Every input length batches.eval_bucket can give up to seq_length: 64, 128, ... and seq_length."""
    from finetune.data import eval_bucket

    return sorted({eval_bucket(1 << n, seq_length) for n in range(seq_length.bit_length() + 1)})


def compiled_graphs(cfg, prepared: Path | None, tok) -> dict[str, dict]:
    """How many graphs each stage compiles: {stage: {"graphs": n, "exact": bool, "lengths": [...]}}.
    Exact for the data it will see when the data is prepared (a plan run after `prepare`, or with
    it in stages); otherwise the most any data could need (exact=False).

    train: packed rows have one shape: one graph (two with gradient accumulation, hardware.
    micro_batch_tokens included: the micro-step, the only one holding activations, and the small
    update); unpacked, one per length bucket its batches meet. evaluate:
    letter scoring at the power-of-two lengths its prompt batches need; greedy generation (SQuAD,
    eval.mc.method=generate) a prefill and a one-token step graph per cache length. predict: as
    evaluate's letter scoring on its input."""
    from finetune.data import bucket, dataset_squad, eval_buckets, row_lengths

    seq = cfg.model.seq_length
    # the stages the real run has: a plan-only run stands for the default ones (plan.run_command)
    stages = [str(s) for s in cfg.stages if str(s) != "plan"] or [str(s) for s in Config().stages]
    per_step = 2 if cfg.parallel.gradient_accumulation_steps > 1 else 1
    pow2 = power_of_two_lengths(seq)
    out: dict[str, dict] = {}
    if "train" in stages:
        if cfg.train.packing:
            # a step whose rows pass hardware.micro_batch_tokens runs as accumulated micro-steps:
            # two graphs. At most batch_size rows (one example each), so below the limit it cannot bind.
            limit, exact = cfg.hardware.micro_batch_tokens, True
            if per_step == 1 and limit and cfg.train.batch_size * seq > limit:
                if prepared is not None:
                    per_step = 2 if packed_micro_steps(cfg, prepared, tok) > 1 else 1
                else:
                    per_step, exact = 2, False
            out["train"] = {"graphs": per_step, "exact": exact, "lengths": [seq]}
        elif prepared is not None:
            from finetune.data import TRAIN_RECORDS, read_shards

            ids, _ = read_shards(prepared / TRAIN_RECORDS, cfg.parallel.data_parallel, 0)
            b = cfg.train.batch_size
            lengths = sorted({bucket(int(row_lengths(ids[i:i + b], tok.pad_id).max()) - 1, seq)
                              for i in range(0, len(ids) - b + 1, b)})
            out["train"] = {"graphs": per_step * len(lengths), "exact": True, "lengths": lengths}
        else:
            lengths = sorted({bucket(n, seq) for n in range(1, seq + 1)})
            out["train"] = {"graphs": per_step * len(lengths), "exact": False, "lengths": lengths}
    generate_mc = cfg.eval.mc.method == "generate"
    if "evaluate" in stages or "predict" in stages:
        mc = None
        if prepared is not None and not generate_mc:
            from finetune.data import load_questions
            from finetune.evaluation import build_eval_prompts

            questions = load_questions(prepared, "eval")
            if cfg.eval.limit is not None:
                questions = questions[:cfg.eval.limit]
            prompts, _ = build_eval_prompts(questions, load_questions(prepared, "dev"), cfg.dataset.style,
                                            cfg.eval.num_shots, tok, seq)
            mc = eval_buckets([len(p) for p in prompts], seq, cfg.eval.batch_size)
        if "evaluate" in stages:
            lengths = mc if mc is not None else pow2
            graphs = len(lengths) * (2 if generate_mc else 1)
            squad = bool(cfg.eval.squad.path) or (dataset_squad(prepared) is not None if prepared is not None else
                                                  cfg.dataset.name == "demo" and cfg.dataset.demo.squad_questions > 0)
            if squad:   # greedy answers: a prefill and a step graph per cache length
                graphs += 2 * len(pow2)
            out["evaluate"] = {"graphs": graphs, "exact": mc is not None and not squad, "lengths": lengths}
        if "predict" in stages:
            lengths = mc if mc is not None and not cfg.predict.input else pow2
            out["predict"] = {"graphs": len(lengths), "exact": lengths is mc, "lengths": lengths}
    return out


def packed_micro_steps(cfg, prepared: Path, tok) -> int:
    """Micro-steps per optimizer step of the packed train stage on this prepared data."""
    from finetune.data import TRAIN_RECORDS, pack, read_all_shards
    from finetune.training import packed_step_rows

    ids, labels = read_all_shards(prepared / TRAIN_RECORDS, cfg.parallel.data_parallel)
    return packed_step_rows(cfg, len(ids), len(pack(ids, labels, tok.pad_id, cfg.model.seq_length, cfg.seed)))[2]


def _group(name: str) -> str:
    if name == "model.tok_embeddings":
        return "embedding"
    if name == "lm_head":
        return "lm_head"
    if name.endswith(NORMS) or name == "model.norm_out":
        return "norms"
    return name.split(".")[-2]   # attention | feed_forward


def plan(ctx) -> dict:
    """The stage: count, estimate, print, write run_dir/plan.json, log to MLflow; ConfigError when
    the estimate does not fit hardware.max_device_memory (after writing and printing the plan)."""
    cfg, run_dir, tracker = ctx.cfg, Path(ctx.run_dir), ctx.tracker
    vocab, vocab_source = resolve_vocab(cfg.model)
    counts = module_param_counts(cfg.model, vocab)
    total = sum(counts.values())
    adapted = lora_layers(cfg.model, cfg.lora.target_modules)
    trainable = lora_param_count(cfg.model, cfg.lora)
    mem = memory_estimate(cfg, counts, trainable, vocab)
    totals = memory_totals(mem)
    chosen = "recompute" if cfg.hardware.recompute else "no_recompute"
    limit = parse_memory(cfg.hardware.max_device_memory)
    command = run_command(cfg, run_dir, hydra_overrides())
    groups: dict[str, int] = {}
    for name, n in counts.items():
        groups[_group(name)] = groups.get(_group(name), 0) + n
    result = {
        "plan_trainable_params": trainable,
        "plan_total_params": total,
        "plan_trainable_ratio_pct": 100.0 * trainable / total,
        "plan_memory_gb": totals[chosen] / GB,
        "plan_memory_gb_no_recompute": totals["no_recompute"] / GB,
        "plan_memory_gb_recompute": totals["recompute"] / GB,
        "plan_tokens_per_step": tokens_per_step(cfg),
        "plan_world_size": world_size(cfg.parallel),
        "missing_files": missing_files(cfg),
        "msrun_command": shlex.join(command),
    }
    graphs = compiled_graphs(cfg, ctx.prepared, ctx.tok)
    result.update({f"plan_{stage}_graphs": g["graphs"] for stage, g in graphs.items()})
    fits = limit is None or totals[chosen] <= limit
    report = {**result, "config": OmegaConf.to_container(cfg, resolve=True),
              "vocab_size": vocab, "vocab_source": vocab_source,
              "param_groups": groups, "params_per_module": counts,
              "lora_layers": sorted(adapted), "memory_bytes": mem,
              "memory_total_bytes": totals, "memory_chosen": chosen,
              "max_device_memory_bytes": limit, "fits": fits, "command": command, "gb_unit_bytes": GB,
              "compiled_graphs": graphs}
    path = run_dir / rundir.PLAN
    path.write_text(redact(json.dumps(report, indent=1, default=str)), encoding="utf-8")
    print(redact(format_plan(cfg, report)))
    tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
    tracker.log_artifact(path)
    if not fits:
        need, short = totals[chosen] / GB, (totals[chosen] - limit) / GB
        remedy = "lower train.batch_size or model.seq_length" + ("" if cfg.hardware.recompute else
                                                                 ", or set hardware.recompute=true")
        raise ConfigError(f"plan: needs {need:.2f} GB per device ({chosen.replace('_', ' ')}), "
                          f"hardware.max_device_memory={cfg.hardware.max_device_memory} is short by {short:.2f} GB "
                          f"({remedy}; details in {path})")
    return result


def format_plan(cfg, r: dict) -> str:
    """A few aligned lines for the terminal."""
    par, hw = cfg.parallel, cfg.hardware
    lines = [f"plan: {cfg.model.name} on {hw.device_target}, world size {r['plan_world_size']} "
             f"(data_parallel {par.data_parallel} x model_parallel {par.model_parallel} x "
             f"pipeline_stage {par.pipeline_stage}); vocab {r['vocab_size'] or '?'} ({r['vocab_source']})"]
    for group, n in r["param_groups"].items():
        lines.append(f"  {group:<28}{n:>16,}")
    lines.append(f"  {'base total':<28}{r['plan_total_params']:>16,}")
    lines.append(f"  {'LoRA trainable':<28}{r['plan_trainable_params']:>16,}  = {r['plan_trainable_ratio_pct']:.4f}% "
                 f"of base, {len(r['lora_layers'])} layers, rank {cfg.lora.rank}")
    lines.append(f"  {'memory per device, GB=2^30':<28}{'no recompute':>16}{'recompute':>12}")
    mem = r["memory_bytes"]
    for key, v in mem.items():
        if key.startswith("activations_"):
            continue
        lines.append(f"  {key:<28}{v / GB:>16.2f}{v / GB:>12.2f}")
    lines.append(f"  {'activations':<28}{mem['activations_no_recompute'] / GB:>16.2f}"
                 f"{mem['activations_recompute'] / GB:>12.2f}")
    t = r["memory_total_bytes"]
    limit = f"max_device_memory {hw.max_device_memory}" if hw.max_device_memory else "no device memory limit"
    lines.append(f"  {'total':<28}{t['no_recompute'] / GB:>16.2f}{t['recompute'] / GB:>12.2f}  "
                 f"(hardware.recompute={str(hw.recompute).lower()}; {limit}: "
                 f"{'fits' if r['fits'] else 'DOES NOT FIT'})")
    lines.append(f"  tokens per optimizer step    {cfg.train.batch_size} x {par.data_parallel} x "
                 f"{par.gradient_accumulation_steps} x {cfg.model.seq_length} = {r['plan_tokens_per_step']:,}")
    for stage, g in r["compiled_graphs"].items():
        lengths = ", ".join(map(str, g["lengths"]))
        lines.append(f"  {stage + ' graphs':<29}{'' if g['exact'] else 'at most '}{g['graphs']} "
                     f"(input lengths {lengths})")
    lines.append(f"  missing files                {', '.join(r['missing_files']) or 'none'}")
    lines.append(f"  command                      {r['msrun_command']}")
    return "\n".join(lines)
