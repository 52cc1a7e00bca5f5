"""The MindSpore side of the benchmarks that are not the `finetune` command itself, each run by
bench/run.py in a process of its own (so its peak RSS is its own):

    python -m bench.workers rows|eval|decode|peak|prepare ARGS.json OUT.json

rows     the tool's prepared training rows, in the order the tool's train stage takes them
eval     examples/s of multiple-choice scoring (finetune.evaluation.scoring.letter_logits) at two seq lengths
decode   greedy decode tokens/s of the real stories260K Llama, with and without the KV cache
peak     fp32 matmul GFLOP/s of MindSpore (CPU, graph mode) and numpy on this machine
prepare  finetune.data.prepare.prepare() alone: one data set, an empty output_root
"""
from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import finetune  # noqa: F401  (selects the protobuf backend MindSpore needs, before anything imports it)

CONF = Path(finetune.__file__).resolve().parents[1] / "conf"


def config(overrides: list[str]):
    """The real conf/ composed with overrides and checked, as `finetune` would run it."""
    from hydra import compose, initialize_config_dir

    from finetune.config.checks import resolve
    from finetune.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return resolve(compose("config", overrides=list(overrides)))


def ms_setup(cfg, work: Path) -> None:
    import os

    from finetune.model.llama import setup_context
    from finetune.runtime.logs import quiet_libraries

    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(work / "mindformers"))
    quiet_libraries(work)   # MindFormers' import chatter into work/mindformers, not the terminal
    setup_context(cfg.hardware, cfg.seed)


def rows(args: dict) -> dict:
    """Prepare the data (finetune.data.prepare.prepare, cached in output_root) and write, per size, the
    examples of the tool's train stage step by step in its order, so that PEFT trains on exactly
    the same examples in the same steps: train.run_steps takes global batch order[s]
    (train.batch_order) at step s, i.e. packed rows k*B..k*B+B-1 (train.packing, the default: the
    rows' examples) or MindRecord rows k*B..k*B+B-1 (train.packing=false). Written: ids / labels
    [examples, seq_length + 1] in step order, offsets [steps + 1] (step s = examples offsets[s] ..
    offsets[s+1] - 1), the tool's processed rows x length per step (`row_length`: seq_length
    packed, the batch's length bucket unpacked), and which steps compile a graph (a shape not seen
    before: left out of the tool's tokens/s, and out of PEFT's too)."""
    from finetune.data.batches import bucket, labelled_per_row, row_lengths
    from finetune.data.mindrecord import read_all_shards
    from finetune.data.packing import pack, rows_per_step
    from finetune.data.prepare import prepare
    from finetune.data.prepared import TRAIN_RECORDS
    from finetune.data.tokenizer import load_tokenizer
    from finetune.training.loop import batch_order

    cfg = config(args["overrides"])
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    prepared = prepare(cfg, tok)
    ids, labels = read_all_shards(prepared / TRAIN_RECORDS)
    pad_id, seq_length, k = tok.pad_id, ids.shape[1] - 1, labelled_per_row(labels)
    packed = pack(ids, labels, pad_id, seq_length, cfg.seed) if cfg.train.packing else None
    out = {"prepared": str(prepared), "sizes": {}, "packing": bool(cfg.train.packing),
           "tokenizer": {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": pad_id}}
    for size, spec in args["sizes"].items():
        b, steps = spec["batch_size"], spec["steps"]
        if packed is not None:   # train.batch_size examples -> rows (as train.train)
            b = rows_per_step(b, len(ids), len(packed))   # one device, no accumulation
        per_epoch = (len(packed) if packed is not None else len(ids)) // b
        chosen, offsets, row_length, compiled, seen = [], [0], [], [], set()
        for step in range(steps):
            epoch, s = divmod(step, per_epoch)
            j = int(batch_order(per_epoch, epoch, cfg.seed, spec["shuffle"])[s])
            if packed is not None:
                members = [i for r in range(j * b, (j + 1) * b) for i in packed.examples[r]]
                length = seq_length
            else:
                members = list(range(j * b, (j + 1) * b))
                length = bucket(int(row_lengths(ids[members], pad_id).max()) - 1, seq_length)  # batch_inputs' length
            chosen += members
            offsets.append(len(chosen))
            compiled.append(length not in seen)
            seen.add(length)
            row_length.append(length)
        Path(spec["out_rows"]).parent.mkdir(parents=True, exist_ok=True)
        np.savez(spec["out_rows"], ids=ids[chosen], labels=labels[chosen], offsets=np.asarray(offsets),
                 rows_per_step=b, pad_id=pad_id, row_length=np.asarray(row_length), compiled=np.asarray(compiled),
                 answers_per_row=k, packing=packed is not None)
        out["sizes"][size] = {"examples_total": int(len(ids)),
                              "rows_total": int(len(packed) if packed is not None else len(ids)),
                              "steps": steps, "row_lengths": sorted(seen)}
    return out


def eval_mc(args: dict) -> dict:
    """letter_logits (what stage `evaluate` runs) on the same questions at each seq length: a first
    pass (compiles a graph per length bucket) and a second, warm pass, timed separately. Random-init
    tiny model from `seed`: the time does not depend on the weights. The logits of prompts that fit
    the smallest seq length must agree across lengths (padding beyond a prompt changes nothing)."""
    from finetune.data.prepare import prepare
    from finetune.data.prepared import load_questions
    from finetune.data.tokenizer import load_tokenizer
    from finetune.evaluation.scoring import build_eval_prompts, letter_logits, letter_token_ids
    from finetune.model.llama import build_model

    work = Path(args["work"])
    # the questions: from data prepared at prepare_seq_length (the train bench's cache, when it ran;
    # which questions are evaluated does not depend on seq_length)
    cfg = config(args["overrides"] + [f"model.seq_length={args['prepare_seq_length']}"])
    ms_setup(cfg, work)
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    prepared = prepare(cfg, tok)
    questions = load_questions(prepared, "eval")[:args["limit"]]
    dev = load_questions(prepared, "dev")
    letters = letter_token_ids(tok, cfg.dataset.style)
    out, logits = {}, {}
    for seq in args["seq_lengths"]:
        model_cfg = config(args["overrides"] + [f"model.seq_length={seq}"]).model
        net = build_model(model_cfg, cfg.hardware, tok, args["batch_size"], seed=cfg.seed)
        prompts, prompt_stats = build_eval_prompts(questions, dev, cfg.dataset.style, args["num_shots"], tok, seq)
        t0 = time.perf_counter()
        letter_logits(net, prompts, letters, args["batch_size"], seq, tok.pad_id)
        cold = time.perf_counter() - t0
        stats: dict = {}
        t0 = time.perf_counter()
        logits[seq] = letter_logits(net, prompts, letters, args["batch_size"], seq, tok.pad_id, stats)
        warm = time.perf_counter() - t0
        out[str(seq)] = {"questions": len(prompts), "seconds": warm, "examples_per_s": len(prompts) / warm,
                         "first_pass_seconds": cold, "first_pass_examples_per_s": len(prompts) / cold,
                         "pad_fraction": 1 - stats["tokens"] / stats["processed"], "shapes": stats["shapes"],
                         "prompt_tokens": stats["tokens"], "truncated_prompts": prompt_stats["eval_truncated"]}
        del net
    shortest = min(args["seq_lengths"])
    fits = [i for i, q in enumerate(build_eval_prompts(questions, dev, cfg.dataset.style, args["num_shots"], tok,
                                                       10 ** 6)[0]) if len(q) <= shortest]
    diff = max(float(np.abs(logits[s][fits] - logits[shortest][fits]).max()) for s in logits) if fits else 0.0
    return {"per_seq_length": out, "max_abs_logit_diff_across_lengths": diff, "questions": len(questions),
            "num_shots": args["num_shots"], "batch_size": args["batch_size"]}


def decode(args: dict) -> dict:
    """greedy_generate on the real stories260K Llama (finetune.training.base.convert_hf + model.load_model, as
    tests/test_hf_import.py loads it). Prompts: `batch` rows of a few hundred token ids drawn from the
    512-token vocabulary with a fixed seed (BOS first; no text tokenizer ships with the model, and
    the work per new token does not depend on which ids they are). eos_id -1: never stops early,
    every row gets max_new_tokens. Each path runs once to compile its graphs, then is timed."""
    from finetune.model.generate import greedy_generate
    from finetune.model.llama import load_model
    from finetune.training.base import convert_hf

    work = Path(args["work"])
    path = Path(args["model"])
    cfg = config([f"model.checkpoint={path}", f"model.seq_length={args['seq_length']}",
                  f"output_root={work / 'root'}"])
    ms_setup(cfg, work)
    vocab = len(json.loads((path / "tok512_vocab.json").read_text()))
    tok = SimpleNamespace(vocab_size=vocab, bos_id=1, eos_id=2, pad_id=0)
    ckpt, _ = convert_hf(path, cfg)
    b = args["batch_size"]
    net = load_model(cfg.model, cfg.hardware, tok, b, ckpt)
    rng = np.random.default_rng(0)
    lo, hi = args["prompt_tokens"]
    prompts = [[1] + rng.integers(3, vocab, int(n) - 1).tolist() for n in rng.integers(lo, hi + 1, args["prompts"])]
    has_cache = "cache" in inspect.signature(greedy_generate).parameters

    def timed(**kw) -> tuple[float, list, dict]:
        greedy_generate(net, prompts, args["max_new_tokens"], -1, 0, args["seq_length"], b, **kw)   # compiles
        stats: dict = {}
        t0 = time.perf_counter()
        outs = greedy_generate(net, prompts, args["max_new_tokens"], -1, 0, args["seq_length"], b, stats=stats, **kw)
        return time.perf_counter() - t0, outs, stats

    result = {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "batch_size": b,
              "max_new_tokens": args["max_new_tokens"], "seq_length": args["seq_length"]}
    seconds, outs, stats = timed(**({"cache": False} if has_cache else {}))
    new = sum(map(len, outs))
    result.update(no_cache_tokens_per_s=new / seconds, no_cache_seconds=seconds, new_tokens=new,
                  no_cache_shapes=stats.get("shapes"))
    if not has_cache:
        result["cache"] = "not available"   # greedy_generate has no `cache` argument (yet)
        return result
    seconds_c, outs_c, stats_c = timed(cache=True)
    result.update(cache="available", cache_tokens_per_s=sum(map(len, outs_c)) / seconds_c, cache_seconds=seconds_c,
                  cache_shapes=stats_c.get("shapes"),
                  speedup=(sum(map(len, outs_c)) / seconds_c) / (new / seconds),
                  # greedy is deterministic: the cached path must give the very same tokens
                  same_tokens=outs_c == outs,
                  first_mismatch_row=next((i for i, (a, c) in enumerate(zip(outs, outs_c)) if a != c), None))
    return result


def peak(args: dict) -> dict:
    """fp32 matmul throughput, C = A @ B with n x n matrices = 2 n^3 FLOPs, best of `repeat` after a
    warm-up: MindSpore (the tool's backend; one MatMul in a graph-mode ms.jit function) and numpy."""
    import mindspore as ms
    from mindspore import ops

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    n, repeat = args["size"], args["repeat"]
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)

    @ms.jit
    def matmul(x, y):
        return ops.matmul(x, y)

    ta, tb = ms.Tensor(a), ms.Tensor(b)

    def ms_run():
        matmul(ta, tb).asnumpy()   # asnumpy waits for the result (copy: n^2 floats, ~1% of the time)

    def np_run():
        a @ b

    out = {"size": n, "repeat": repeat}
    for name, fn in (("mindspore", ms_run), ("numpy", np_run)):
        fn()
        best = min(_timed(fn) for _ in range(repeat))
        out[f"{name}_gflops"] = 2 * n ** 3 / best / 1e9
    return out


def prepare_data(args: dict) -> dict:
    """finetune.data.prepare.prepare() alone on an empty output_root: read + split + Alpaca JSON + tokenize
    + MindRecord, plus loading the tokenizer. `profile`: the functions with the most cumulative time."""
    import cProfile
    import io
    import pstats

    from finetune.data.prepare import prepare
    from finetune.data.prepared import load_meta
    from finetune.data.tokenizer import load_tokenizer

    cfg = config(args["overrides"])
    profiler = cProfile.Profile() if args.get("profile") else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    t_tok = time.perf_counter() - t0
    folder = prepare(cfg, tok)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "tokenizer_seconds": t_tok, "meta": load_meta(folder)}
    if profiler:
        profiler.disable()
        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(25)
        out["profile"] = s.getvalue()
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


WORKERS = {"rows": rows, "eval": eval_mc, "decode": decode, "peak": peak, "prepare": prepare_data}

if __name__ == "__main__":
    name, args_file, out_file = sys.argv[1:4]
    result = WORKERS[name](json.loads(Path(args_file).read_text()))
    Path(out_file).write_text(json.dumps(result, indent=1, default=str))
