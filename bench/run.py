"""`python -m bench [train|mfu|eval|decode|prepare|memory|all] [--smoke]`: the tool's speed and memory on this
machine, with PyTorch + transformers + PEFT side by side for training, on real MMLU rows.

One function per benchmark; each runs its measured work in subprocesses (the tool's own `finetune`
command, bench/workers.py for the MindSpore-side measurements, bench/peft_train.py for PyTorch) so
that each peak RSS (os.wait4's ru_maxrss of that one process) is its own, and never runs two of
them at once. Results: bench/results/<name>.json (or --out DIR) with the machine, date, command and
versions; a table on the terminal; the latest tables in BENCHMARKS.md (full runs into
bench/results only; --smoke never touches it). Scratch files: bench/work/ (or --work DIR).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"       # real data, read in place (../shared beside the repository)
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / "work"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
CL100K = SHARED / "tokenizers" / "cl100k_base.tiktoken"
INTERNLM_TOKENIZER = SHARED / "tokenizers" / "internlm_v7_sft.model"
STORIES = SHARED / "models" / "stories260K-hf"

# ---------------------------------------------------------------------------------------------
# Settings. FULL: what `make bench` measures. SMOKE: the same code paths on tiny shapes, 2-3 steps,
# a handful of questions (tests/test_bench_smoke.py; seconds, not minutes).

# Both sides: LoRA r8 / alpha 16 / dropout 0.05 on q/k/v/o (conf/lora/default.yaml), AdamW
# (0.9/0.999, eps 1e-8, wd 0.01), cosine with 3% warm-up, clipping 1.0 (conf/optimizer/adamw.yaml),
# one learning rate for every size (it does not change the work per step).
DATA = ["dataset=mmlu", f"dataset.path={SHARED / 'data' / 'mmlu'}", f"model.tokenizer.path={CL100K}",
        "model.pretrain.epochs=0", "seed=0", "optimizer.learning_rate=1e-3", "lora.dropout=0.05"]
# Model shapes. tiny = conf/model/tiny.yaml (hidden 128, 4 layers, 4 heads / 2 kv heads, FFN 384,
# tied embeddings) with the cl100k vocabulary instead of the demo's; 128m = Llama hidden 512,
# 8 layers, 8 heads (8 kv), FFN 1376, untied 100,259-entry cl100k vocabulary (51.3M embedding +
# 51.3M head + 25.3M in the layers = 128M parameters).
MODEL_128M = ["model.name=llama128m", "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8",
              "model.n_kv_heads=8", "model.intermediate_size=1376", "model.tie_word_embeddings=false"]
# batch_size: examples per step; packed (train.packing, the default), the rows that hold that many
# on average: at seq_length 512 an MMLU row holds ~4.3 questions, so 16 are 4 rows, 8 are 2 rows.
# PEFT trains on exactly the examples of each step, padded to the step's longest one. `peft_pads`:
# the paddings PEFT runs with (full = every example padded to seq_length, the naive collator).
SIZES = {
    "tiny": {"model": ["model=tiny"], "batch_size": 16, "steps": 100, "peft_pads": ["longest"]},
    "128m": {"model": MODEL_128M, "batch_size": 8, "steps": 100, "peft_pads": ["longest"]},
}
# Short runs feel their compiles: the all-steps ratio over the first FIRST_STEPS steps of each run.
FIRST_STEPS = 30
FULL = {
    "seq_length": 512,
    "sizes": SIZES,
    "data": [],                                       # all of MMLU's training rows
    "eval": {"limit": 200, "seq_lengths": [256, 2048], "batch_size": 16, "num_shots": 0},
    "decode": {"seq_length": 512, "prompts": 8, "batch_size": 4, "prompt_tokens": [250, 350], "max_new_tokens": 64},
    "peak": {"size": 2048, "repeat": 5},
    "prepare": {"seq_length": 512, "data": []},
    # Jobs of the README's kind at the largest shapes issue #20 names: seq_length 2048, batch 16,
    # 5-shot evaluation with SQuAD retention; every size x tokenizer x data set.
    "memory": {"seq_length": 2048, "batch_size": 16, "max_steps": 20, "num_shots": 5, "limit": 200,
               "squad_limit": 50, "sizes": ["tiny", "128m"], "tokenizers": ["cl100k", "internlm"],
               "datasets": ["mmlu", "cmmlu"], "data": []},
}
SMOKE_MODEL = ["model=tiny", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.n_kv_heads=1",
               "model.intermediate_size=64"]
# world_religions: MMLU's shortest questions, packed into rows of 64 (one training graph).
SMOKE = {
    "seq_length": 64,
    "sizes": {"smoke": {"model": SMOKE_MODEL, "batch_size": 4, "steps": 3, "peft_pads": ["longest", "full"]}},
    "data": ["dataset.subjects=[world_religions]", "dataset.max_train_questions=40"],
    "eval": {"limit": 6, "seq_lengths": [64, 512], "batch_size": 8, "num_shots": 0, "model": SMOKE_MODEL},
    "decode": {"seq_length": 512, "prompts": 2, "batch_size": 2, "prompt_tokens": [100, 120], "max_new_tokens": 3},
    "peak": {"size": 512, "repeat": 2},
    "prepare": {"seq_length": 512, "data": ["dataset.subjects=[world_religions]"], "cli": False},
    "memory": {"seq_length": 256, "batch_size": 4, "max_steps": 2, "num_shots": 1, "limit": 4, "squad_limit": 2,
               "sizes": ["smoke"], "tokenizers": ["cl100k"], "datasets": ["mmlu"],
               "data": ["dataset.subjects=[world_religions]", "dataset.max_train_questions=40"]},
}

# Targets (issue #12, item 5)
# Targets (issue #20): steady-state useful tokens/s vs PEFT (longest-in-batch padding), all steps
# (compiles included) vs PEFT, memory
TARGET_RATIO = {"tiny": None, "128m": 2.0}           # steady state
TARGET_ALL_STEPS_RATIO = {"tiny": None, "128m": 1.5}  # every step of the run
TARGET_FIRST_STEPS_RATIO = {"tiny": 1.3}              # every one of the first FIRST_STEPS steps
TARGET_MEMORY_RATIO = 1.2                      # tool peak RSS <= 1.2 x PEFT's
TARGET_EVAL_RATIO = 1.2                        # time at seq 2048 <= 1.2 x time at 256
TARGET_DECODE_SPEEDUP = 5.0                    # KV cache >= 5x no cache
TARGET_PREPARE_SECONDS, TARGET_PREPARE_GB = 30.0, 2.0


# ---------------------------------------------------------------------------------------------
# Machine, versions, subprocesses

def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    models = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpu": models[0] if models else platform.processor(), "cores": len(models) or os.cpu_count(),
            "ram_gb": round(mem_kb / 1024 ** 2, 1), "os": platform.platform(), "python": platform.python_version()}


def peft_python() -> str:
    """The Python of the PyTorch side: .venv-bench (make bench-venv), or BENCH_PEFT_PYTHON. Never the
    tool's own venv: torch there would be imported by MindFormers and slow every `finetune` start."""
    python = os.environ.get("BENCH_PEFT_PYTHON") or str(REPO / ".venv-bench" / "bin" / "python")
    if not Path(python).is_file():
        raise SystemExit(f"bench: the PyTorch side needs {python} (`make bench-venv` creates it)")
    return python


def versions() -> dict:
    out = {}
    for name in ("mindspore", "mindformers", "numpy", "tiktoken", "torch", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def subprocess_env() -> dict:
    """Children import this checkout's `finetune` and `bench` (not another editable install's)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    env.setdefault("GLOG_v", "3")
    return env


_children: set[int] = set()   # process groups still running (killed if the harness is stopped)
# full runs (main sets "enabled"): wait for an idle machine before each measured process (wait_quiet)
QUIET = {"enabled": False, "busy_below": 0.25, "max_wait_s": 900}


def cpu_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: user+nice+system+irq+softirq+steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet() -> float:
    """The machine's busy share (0..1 of all cores) over one second; in full runs (QUIET enabled) wait,
    up to QUIET max_wait_s, until it is below QUIET busy_below, so that a measurement does not share
    the 2 cores with someone else's work (a test suite, another benchmark)."""
    deadline = time.time() + QUIET["max_wait_s"]
    while True:
        b0, t0 = cpu_busy_seconds(), time.perf_counter()
        time.sleep(1.0)
        busy = (cpu_busy_seconds() - b0) / (time.perf_counter() - t0) / os.cpu_count()
        if not QUIET["enabled"] or busy < QUIET["busy_below"] or time.time() > deadline:
            return busy
        time.sleep(5)


def kill_children() -> None:
    for pid in list(_children):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# No benchmark process may grow past this (the machine: 24 GB for everyone, 2 cores); a `finetune`
# training run that does is stopped and reported as such (tool_train), anything else is an error.
MEMORY_CAP = {"gb": 20.0}   # --memory-cap (one measured process at a time on a 24 GB machine)


def rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 ** 2
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def run_measured(cmd: list[str], log: Path, timeout: float = 3600, may_exceed_cap: bool = False) -> dict:
    """Run cmd to the end (its output into `log`); its wall seconds and peak RSS in GB: os.wait4 gives
    the rusage of that one child (ru_maxrss, KB on Linux), not the maximum over every child so far
    as getrusage(RUSAGE_CHILDREN) would. On timeout or failure its whole process group is killed.
    Also how busy the machine was with other work meanwhile: `others_cpu_share` = (all cores' busy
    CPU seconds - this child's own) / (wall seconds x cores); near 0 = the measurement had the
    machine to itself. Full runs wait for an idle machine first (wait_quiet). A child whose RSS passes
    MEMORY_CAP_GB is killed: may_exceed_cap -> {"killed_at_cap": True, ...}, otherwise an error."""
    busy_before = wait_quiet()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=subprocess_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _children.add(proc.pid)

    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    capped = threading.Event()

    def watch():   # VmRSS twice a second; ru_maxrss alone would only tell afterwards
        while proc.pid in _children:
            if rss_gb(proc.pid) > MEMORY_CAP["gb"]:
                capped.set()
                kill()
                return
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    t0, busy0 = time.perf_counter(), cpu_busy_seconds()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        kill()
        raise
    finally:
        timer.cancel()
        _children.discard(proc.pid)
    seconds = time.perf_counter() - t0
    others = cpu_busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss / 1024 ** 2,
              "others_cpu_share": max(0.0, others / seconds / os.cpu_count()), "busy_before": busy_before,
              "killed_at_cap": capped.is_set()}
    if capped.is_set() and may_exceed_cap:
        return result
    if capped.is_set():
        raise RuntimeError(f"stopped at the {MEMORY_CAP['gb']} GB memory cap: {' '.join(map(str, cmd))} (log {log})")
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n(log {log})\n{tail}")
    return result


def worker(name: str, args: dict, work: Path) -> tuple[dict, dict]:
    """bench/workers.py <name> in its own process: (its result, {seconds, peak_rss_gb})."""
    work.mkdir(parents=True, exist_ok=True)
    args_file, out_file = work / f"{name}.args.json", work / f"{name}.out.json"
    args_file.write_text(json.dumps(args, indent=1))
    measured = run_measured([sys.executable, "-m", "bench.workers", name, args_file, out_file], work / f"{name}.log")
    return json.loads(out_file.read_text()), measured


def finetune(overrides: list[str], run_dir: Path, root: Path, may_exceed_cap: bool = False) -> tuple[dict, dict]:
    """The tool's own command, `python -m finetune ...`: (its summary.json, {seconds, peak_rss_gb, ...})."""
    cmd = [sys.executable, "-m", "finetune", *overrides, f"output_root={root}", f"hydra.run.dir={run_dir}"]
    measured = run_measured(cmd, run_dir.with_suffix(".log"), may_exceed_cap=may_exceed_cap)
    return json.loads((run_dir / "summary.json").read_text()), measured


# ---------------------------------------------------------------------------------------------
# 1. train: the tool vs PEFT on the same rows, same order, same steps

def train(ctx: dict) -> dict:
    """Per size: the tool's `finetune stages=[train]` on MMLU rows prepared once, then PEFT on the
    very same rows (read back from the tool's MindRecord in the tool's batch order) padded to the
    batch's longest row (the reference) and to seq_length. Steps in which the tool compiled a graph
    (a new length bucket: the first batch of each length) are left out of both sides' tokens/s; the
    all-steps figures include them."""
    out = {}
    for size in ctx["sizes"]:
        try:
            out[size] = {**train_size(ctx, size), **ctx["meta"]}
        except Exception as e:   # one size failing must not lose the others' figures
            print(f"bench train {size}: FAILED: {e}", file=sys.stderr, flush=True)
            out[size] = {"error": str(e)[-2000:], **ctx["meta"]}
    return out


def data_overrides(s: dict) -> list[str]:
    return DATA + s["data"] + [f"model.seq_length={s['seq_length']}"]


def train_rows(ctx: dict, sizes: list[str]) -> dict:
    """Prepare the data (cached in work/train/root) and write each size's batches (bench.workers rows)."""
    s, work = ctx["settings"], ctx["work"] / "train"
    args = {"overrides": data_overrides(s) + [f"output_root={work / 'root'}"], "work": str(work),
            "sizes": {size: {"batch_size": s["sizes"][size]["batch_size"], "steps": s["sizes"][size]["steps"],
                             "shuffle": s["sizes"][size].get("shuffle", True),
                             "out_rows": str(work / size / "rows.npz")} for size in sizes}}
    result, _ = worker("rows", args, work)
    return result


def train_size(ctx: dict, size: str) -> dict:
    s, work = ctx["settings"], ctx["work"] / "train"
    spec = s["sizes"][size]
    rows_info = train_rows(ctx, [size])
    prepared, tok = rows_info["prepared"], rows_info["tokenizer"]
    tool = tool_train(ctx, size)
    rows = np.load(work / size / "rows.npz")
    tokens = step_tokens(rows)                       # useful tokens per step
    done = len(tool["step_seconds"])                 # < steps when the tool was stopped at the memory cap
    # the steps both sides are timed on: the tool's steps that compiled no graph (of those it ran)
    timed = timed_steps(rows["compiled"])
    timed[done:] = False

    # PEFT: the model the tool trained, from the tool's resolved config (+ the tokenizer's ids)
    resolved = _yaml(tool["run_dir"] / "config_resolved.yaml")
    model = dict(resolved["model"], vocab_size=resolved["model"]["vocab_size"] or tok["vocab_size"],
                 bos_id=tok["bos_id"], eos_id=tok["eos_id"], pad_id=tok["pad_id"])
    spec_file = work / size / "peft_model.json"
    spec_file.write_text(json.dumps({"model": model, "lora": resolved["lora"], "optimizer": resolved["optimizer"],
                                     "seed": resolved["seed"]}, indent=1))
    peft = {}
    # one process per padding, so that each peak RSS is its own (smoke: both in one process)
    pad_runs = [spec["peft_pads"]] if ctx["smoke"] else [[pad] for pad in spec["peft_pads"]]
    for pads in pad_runs:
        out_file = work / size / f"peft_{'_'.join(pads)}.json"
        measured = run_measured([peft_python(), "-m", "bench.peft_train", "train", "--rows", work / size / "rows.npz",
                                 "--model", spec_file, "--pad", *pads, "--out", out_file],
                                work / size / f"peft_{'_'.join(pads)}.log")
        for pad, result in json.loads(out_file.read_text()).items():
            peft[pad] = {**result, **measured}
    longest, full = peft["longest"], peft.get("full")

    def rate(seconds: np.ndarray, steps: np.ndarray) -> float | None:
        """useful tokens / seconds over the chosen steps"""
        return float(tokens[:len(seconds)][steps[:len(seconds)]].sum() / seconds[steps[:len(seconds)]].sum()) \
            if steps[:len(seconds)].any() else None

    every = np.ones(len(tokens), bool)
    tool_s = tool["step_seconds"]
    peft_s = np.array([p["seconds"] for p in longest["per_step"]])
    full_s = np.array([p["seconds"] for p in full["per_step"]]) if full else None
    tool_rate, peft_rate = rate(tool_s, timed), rate(peft_s, timed)
    full_rate = rate(full_s, timed) if full else None
    ratio = tool_rate / peft_rate if tool_rate and peft_rate else None
    memory_ratio = tool["peak_rss_gb"] / longest["peak_rss_gb"]
    target = TARGET_RATIO.get(size)
    first = np.arange(len(tokens)) < FIRST_STEPS
    tool_all, peft_all = rate(tool_s, every), rate(peft_s, every)
    tool_first, peft_first = rate(tool_s, first), rate(peft_s, first)
    all_ratio = tool_all / peft_all if tool_all and peft_all else None
    first_ratio = tool_first / peft_first if tool_first and peft_first else None

    def met(value, goal):
        return None if goal is None or value is None else value >= goal
    summary = tool["summary"]
    return {
        "tool_tokens_per_s": tool_rate,
        "peft_tokens_per_s": peft_rate,
        "ratio_vs_peft": ratio,
        "tool_peak_rss_gb": tool["peak_rss_gb"],
        "peft_peak_rss_gb": longest["peak_rss_gb"],
        "memory_ratio_vs_peft": memory_ratio,
        # the tool stopped at the memory cap: its figures cover steps 1..tool_steps_done only
        "tool_stopped_at_memory_cap_gb": MEMORY_CAP["gb"] if tool["killed_at_cap"] else None,
        "tool_steps_done": done,
        "peft_full_pad_tokens_per_s": full_rate,
        "peft_full_pad_peak_rss_gb": full["peak_rss_gb"] if full else None,
        "ratio_vs_peft_full_pad": tool_rate / full_rate if tool_rate and full_rate else None,
        # every step, compile steps included: what a run of this many steps feels like
        "tool_tokens_per_s_all_steps": tool_all,
        "peft_tokens_per_s_all_steps": peft_all,
        "ratio_all_steps": all_ratio,
        "target_all_steps_ratio": TARGET_ALL_STEPS_RATIO.get(size),
        "all_steps_met": met(all_ratio, TARGET_ALL_STEPS_RATIO.get(size)),
        "first_steps": int(first.sum()),
        "tool_tokens_per_s_first_steps": tool_first,
        "peft_tokens_per_s_first_steps": peft_first,
        "ratio_first_steps": first_ratio,
        "target_first_steps_ratio": TARGET_FIRST_STEPS_RATIO.get(size),
        "first_steps_met": met(first_ratio, TARGET_FIRST_STEPS_RATIO.get(size)),
        "peft_full_pad_tokens_per_s_all_steps": rate(full_s, every) if full else None,
        # PEFT over all of its steps but the first (its warm-up), whatever the tool did
        "peft_tokens_per_s_after_first_step": rate(peft_s, np.arange(len(tokens)) > 0),
        "tool_reported_tokens_per_s": summary.get("train_tokens_per_s"),   # summary.json's own figure
        "tool_train_stage_seconds": summary.get("train_seconds"),
        "tool_process_seconds": tool["seconds"],
        "tool_compile_steps": int(rows["compiled"][:done].sum()),
        "tool_compile_step_seconds": float(tool_s[rows["compiled"][:done]].sum()),
        "steps": int(len(tokens)), "timed_steps": int(timed.sum()),
        "batch_size": spec["batch_size"], "seq_length": s["seq_length"], "shuffle": spec.get("shuffle", True),
        "useful_tokens": int(tokens.sum()),
        "tool_pad_fraction": summary.get("train_pad_fraction"),
        "tool_shapes": summary.get("train_shapes"),
        "packing": bool(rows["packing"]),
        "tool_examples_per_step": float(np.diff(rows["offsets"]).mean()),
        "tool_rows_per_step": int(rows["rows_per_step"]),
        "step_row_lengths": rows["row_length"].tolist(),
        "peft_pad_fraction": 1 - tokens.sum() / sum(p["processed"] for p in longest["per_step"]),
        "peft_full_pad_fraction": 1 - tokens.sum() / sum(p["processed"] for p in full["per_step"]) if full else None,
        "tool_losses": tool["losses"],
        "peft_losses": [p["loss"] for p in longest["per_step"]],
        "total_params": summary.get("total_params"),
        "trainable_params": {"tool": summary.get("trainable_params"), "peft": longest["trainable_params"]},
        "torch_threads": longest["torch_threads"],
        "target_ratio": target, "ratio_met": met(ratio, target),
        # stopped at the cap: its real peak is higher still, so the ratio is a lower bound
        "target_memory_ratio": TARGET_MEMORY_RATIO,
        "memory_met": (memory_ratio <= TARGET_MEMORY_RATIO) if not tool["killed_at_cap"]
        else (False if memory_ratio > TARGET_MEMORY_RATIO else None),
        "prepared_data": prepared, "rows_total": rows_info["sizes"][size]["rows_total"],
        "examples_total": rows_info["sizes"][size]["examples_total"],
        "tool_command": tool["command"],
        "model": {k: model[k] for k in ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size",
                                        "vocab_size", "tie_word_embeddings")},
        "answers_per_row": int(rows["answers_per_row"]),
        # share of the cores other processes used while each side ran (0: it had the machine alone)
        "others_cpu_share": {"tool": tool["others_cpu_share"], "peft": longest["others_cpu_share"],
                             "peft_full_pad": full["others_cpu_share"] if full else None},
        "peft_versions": longest["versions"],
    }


def step_tokens(rows) -> np.ndarray:
    """Useful tokens per step of a rows.npz (bench.workers rows): each example's tokens the model
    reads (its non-pad tokens but the last), summed over the step's examples. The tool counts the
    same (train.run_steps: real positions of the packed rows)."""
    per_example = (rows["ids"][:, :-1] != int(rows["pad_id"])).sum(axis=1)
    return np.add.reduceat(per_example, rows["offsets"][:-1]) if len(per_example) else per_example


def step_examples(rows, step: int) -> slice:
    return slice(int(rows["offsets"][step]), int(rows["offsets"][step + 1]))


def timed_steps(compiled: np.ndarray) -> np.ndarray:
    """The steps in which the tool did not compile a graph (all steps if it compiled in every one)."""
    return ~compiled if not compiled.all() else np.ones(len(compiled), bool)


def tool_train(ctx: dict, size: str) -> dict:
    """`python -m finetune stages=[train]` for one size (data already prepared in the same output_root):
    its summary, peak RSS and each step's seconds (train_log.csv, written after every step:
    tokens_per_s = step tokens / step seconds). Stopped at MEMORY_CAP_GB, it reports the steps done."""
    s, work = ctx["settings"], ctx["work"] / "train"
    spec = s["sizes"][size]
    run_dir = work / size / "tool"
    overrides = data_overrides(s) + spec["model"] + [
        "stages=[train]", f"train.batch_size={spec['batch_size']}", f"train.max_steps={spec['steps']}",
        f"train.shuffle={str(spec.get('shuffle', True)).lower()}", "train.save.num_checkpoints=0",
        f"tracking.experiment=bench-{size}"]
    summary, measured = finetune(overrides, run_dir, work / "root", may_exceed_cap=True)
    rows = np.load(work / size / "rows.npz")
    tokens = step_tokens(rows)
    log_file = run_dir / "train_log.csv"
    logged = list(csv.DictReader(open(log_file))) if log_file.is_file() else []
    per_step_rate = np.array([float(r["tokens_per_s"]) for r in logged])
    return {"summary": summary, "run_dir": run_dir, "step_seconds": tokens[:len(logged)] / per_step_rate,
            "losses": [float(r["loss"]) for r in logged], "command": "python -m finetune " + " ".join(overrides),
            **measured}


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------
# 2. MFU: the tool's training FLOPs against this machine's fp32 matmul peak

def step_flops(model: dict, lora_rank: int, lengths: np.ndarray, answers: int, padded: np.ndarray | None) -> float:
    """FLOPs of one LoRA training step (frozen base) on rows of `lengths` tokens.

    Per token, with H hidden, F FFN, hd = H / heads, kv = n_kv_heads x hd, r = LoRA rank:
      N = layers x (H*H [q] + 2*H*kv [k, v] + H*H [o] + 3*H*F [gate, up, down])  base matmul weights
      forward 2N; backward only input gradients (the base is frozen, no weight gradients) 2N -> 4N
      LoRA on q/k/v/o: A (in x r) and B (r x out): forward 2r(in+out), backward input gradients
      2r(in+out) and weight gradients 2r(in+out) -> 6 r sum(in+out) per layer
    Attention per layer and row of length L (no flash attention: the full L x L square is computed,
    causal mask or not): forward QK^T 2 L^2 H + AV 2 L^2 H = 4 L^2 H; backward twice that -> 12 L^2 H.
    LM head (H x V, frozen): the tool computes it on the labelled positions only (answer + EOS:
    `answers` per row): forward 2HV + backward input gradient 2HV = 4HV per labelled position.
    Embedding lookups, norms, softmax, SiLU, the loss and the optimizer are not counted (< 1%).
    lengths: the examples' useful tokens. padded None: each example at its own length (model FLOPs,
    the useful work); else the lengths of the rows the tool really runs (a batch cut to its length
    bucket, or packed rows of seq_length, whose attention squares span the whole row)."""
    h, f, layers = model["hidden_size"], model["intermediate_size"], model["num_layers"]
    kv = (model["n_kv_heads"] or model["num_heads"]) * (h // model["num_heads"])
    n_base = layers * (2 * h * h + 2 * h * kv + 3 * h * f)
    n_lora_io = layers * ((h + h) + (h + kv) + (h + kv) + (h + h))
    per_token = 4 * n_base + 6 * lora_rank * n_lora_io
    lens = lengths if padded is None else np.asarray(padded)
    attention = layers * 12 * h * (lens.astype(np.float64) ** 2).sum()
    head = 4 * h * model["vocab_size"] * answers * len(lengths)
    return float(per_token * lens.sum() + attention + head)


def mfu(ctx: dict) -> dict:
    """MFU = model FLOPs per second of the tool's timed training steps / the best fp32 matmul GFLOP/s
    measured here in this run (MindSpore graph-mode MatMul, numpy, torch: the highest is the peak).
    HFU counts what the tool really computes (rows padded to their bucket). Uses the train bench's
    runs of this invocation (python -m bench all); alone, it runs the tool's 128m training first."""
    s, work = ctx["settings"], ctx["work"] / "train"
    peak_ms, _ = worker("peak", s["peak"], ctx["work"] / "peak")
    torch_file = ctx["work"] / "peak" / "torch.json"
    run_measured([peft_python(), "-m", "bench.peft_train", "peak", "--size", s["peak"]["size"], "--repeat",
                  s["peak"]["repeat"], "--out", torch_file], ctx["work"] / "peak" / "torch.log")
    peak_torch = json.loads(torch_file.read_text())
    peaks = {"mindspore": peak_ms["mindspore_gflops"], "numpy": peak_ms["numpy_gflops"],
             "torch": peak_torch["torch_gflops"]}
    peak = max(peaks.values())
    out = {"peak_gflops": peak, "peak_source": max(peaks, key=peaks.get), "matmul_gflops": peaks,
           "matmul_size": s["peak"]["size"], "sizes": {}}
    sizes = [z for z in ctx["sizes"] if (work / z / "tool" / "train_log.csv").is_file() and ctx.get("ran_train")]
    if not sizes:   # alone: the largest size's tool training
        size = list(s["sizes"])[-1]
        train_rows(ctx, [size])
        tool_train(ctx, size)
        sizes = [size]
    for size in sizes:
        if not (work / size / "tool" / "config_resolved.yaml").is_file():
            continue
        rows = np.load(work / size / "rows.npz")
        pad_id, k = int(rows["pad_id"]), int(rows["answers_per_row"])
        resolved = _yaml(work / size / "tool" / "config_resolved.yaml")
        vocab = json.loads((work / "rows.out.json").read_text())["tokenizer"]["vocab_size"]
        model = dict(resolved["model"], vocab_size=resolved["model"]["vocab_size"] or vocab)
        with open(work / size / "tool" / "train_log.csv") as f:
            rate = np.array([float(r["tokens_per_s"]) for r in csv.DictReader(f)])
        timed = timed_steps(rows["compiled"])                  # as the train bench times
        timed[len(rate):] = False                              # a run stopped at the memory cap
        model_flops, hw_flops, seconds = 0.0, 0.0, 0.0
        b = int(rows["rows_per_step"])
        for step in np.nonzero(timed)[0]:
            lengths = (rows["ids"][step_examples(rows, step)][:, :-1] != pad_id).sum(axis=1)   # useful tokens per example
            seconds += lengths.sum() / rate[step]
            model_flops += step_flops(model, resolved["lora"]["rank"], lengths, k, None)
            hw_flops += step_flops(model, resolved["lora"]["rank"], lengths, k,
                                   np.full(b, int(rows["row_length"][step])))
        if seconds == 0:
            continue
        entry = {"tool_model_gflops_per_s": model_flops / seconds / 1e9, "tool_mfu": model_flops / seconds / 1e9 / peak,
                 "tool_hfu": hw_flops / seconds / 1e9 / peak, "timed_seconds": seconds, "timed_steps": int(timed.sum()),
                 "model_gflop_per_useful_token": model_flops / step_tokens(rows)[timed].sum() / 1e9}
        peft_file = next(iter(sorted((work / size).glob("peft_longest*.json"))), None)
        if peft_file is not None and ctx.get("ran_train"):
            # PEFT's useful work is the same model FLOPs (same rows); its own computation is larger
            # (LM head on every position), which is not counted here.
            steps = json.loads(peft_file.read_text())["longest"]["per_step"]
            peft_seconds = sum(p["seconds"] for i, p in enumerate(steps) if timed[i])
            entry["peft_mfu"] = model_flops / peft_seconds / 1e9 / peak
        out["sizes"][size] = entry
    # the headline: the last (largest) size with >= 10 timed steps (a run stopped at the memory cap has few)
    complete = [z for z, e in out["sizes"].items() if e["timed_steps"] >= 10] or list(out["sizes"])
    out["mfu_size"], out["mfu"] = complete[-1], out["sizes"][complete[-1]]["tool_mfu"]
    return {**out, **ctx["meta"]}


# ---------------------------------------------------------------------------------------------
# 3. multiple-choice evaluation at seq_length 256 and 2048

def eval_mc(ctx: dict) -> dict:
    s, work = ctx["settings"], ctx["work"] / "eval"
    e = s["eval"]
    args = {"overrides": DATA + s["data"] + e.get("model", ["model=tiny"]) + [f"output_root={ctx['work'] / 'train' / 'root'}"],
            "prepare_seq_length": s["seq_length"], "work": str(work), "limit": e["limit"],
            "seq_lengths": e["seq_lengths"], "batch_size": e["batch_size"], "num_shots": e["num_shots"]}
    result, measured = worker("eval", args, work)
    per = result["per_seq_length"]
    short, long = (str(x) for x in (min(e["seq_lengths"]), max(e["seq_lengths"])))
    ratio = per[long]["seconds"] / per[short]["seconds"]
    return {"examples_per_s": {k: v["examples_per_s"] for k, v in per.items()},
            "time_ratio_long_vs_short": ratio, "target_time_ratio": TARGET_EVAL_RATIO,
            "met": ratio <= TARGET_EVAL_RATIO,
            "first_pass_time_ratio": per[long]["first_pass_seconds"] / per[short]["first_pass_seconds"],
            **result, "peak_rss_gb": measured["peak_rss_gb"], "process_seconds": measured["seconds"],
            "others_cpu_share": measured["others_cpu_share"], **ctx["meta"]}


# ---------------------------------------------------------------------------------------------
# 4. greedy decode with and without the KV cache

def decode(ctx: dict) -> dict:
    s = ctx["settings"]
    args = {**s["decode"], "model": str(STORIES), "work": str(ctx["work"] / "decode")}
    result, measured = worker("decode", args, ctx["work"] / "decode")
    speedup = result.get("speedup")
    # greedy steps timed: one forward per new token per batch of prompts (eos_id -1: no row stops early)
    result["forward_steps"] = -(-result["prompts"] // result["batch_size"]) * result["max_new_tokens"]
    return {**result, "target_speedup": TARGET_DECODE_SPEEDUP,
            "met": None if speedup is None else speedup >= TARGET_DECODE_SPEEDUP,
            "peak_rss_gb": measured["peak_rss_gb"], "others_cpu_share": measured["others_cpu_share"], **ctx["meta"]}


# ---------------------------------------------------------------------------------------------
# 5. data preparation: all of MMLU, all of CMMLU

def prepare(ctx: dict) -> dict:
    """Per data set, from an empty output_root each time: (a) finetune.data.prepare.prepare() alone in a
    process of its own (the data preparation: read, split, tokenize, MindRecord), and (b) the
    command `finetune stages=[prepare]` (adds start-up, the MLflow store and the random-init base
    checkpoint it builds for model=tiny). The targets are judged on (a) summed over both sets."""
    s, work = ctx["settings"], ctx["work"] / "prepare"
    p = s["prepare"]
    sets = {"mmlu": ["dataset=mmlu", f"dataset.path={SHARED / 'data' / 'mmlu'}", *p["data"]],
            "cmmlu": ["dataset=cmmlu", f"dataset.path={SHARED / 'data' / 'cmmlu'}", *p.get("cmmlu_data", p["data"])]}
    out = {}
    for name, ds in sets.items():
        common = ds + [f"model.tokenizer.path={CL100K}", f"model.seq_length={p['seq_length']}",
                       "model.pretrain.epochs=0"]
        root = work / name / "direct"
        _clean(root)
        result, measured = worker("prepare", {"overrides": common + [f"output_root={root}"],
                                              "profile": ctx.get("profile", False)}, work / name)
        summary, cli = {}, {"seconds": None, "peak_rss_gb": None}
        if p.get("cli", True):
            cli_root = work / name / "cli"
            _clean(cli_root)
            summary, cli = finetune(common + ["stages=[prepare]"], cli_root / "run", cli_root)
        meta = result["meta"]
        out[name] = {"seconds": result["seconds"], "peak_rss_gb": measured["peak_rss_gb"],
                     "process_seconds": measured["seconds"], "tokenizer_seconds": result["tokenizer_seconds"],
                     "cli_seconds": cli["seconds"], "cli_peak_rss_gb": cli["peak_rss_gb"],
                     "cli_artifacts_seconds": summary.get("seconds"),
                     "others_cpu_share": measured["others_cpu_share"],
                     "questions": sum(meta["dataset_rows"].values()), "train_examples": meta["train_examples"],
                     "train_too_long": meta["train_too_long"], "eval_questions": meta["eval_questions"],
                     **({"profile": result["profile"]} if "profile" in result else {})}
    total = sum(v["seconds"] for v in out.values())
    peak = max(v["peak_rss_gb"] for v in out.values())
    return {**out, "total_seconds": total, "total_cli_seconds": sum(v["cli_seconds"] or 0 for v in out.values()),
            "peak_rss_gb": peak, "seq_length": p["seq_length"], "tokenizer": "cl100k_base",
            "target_seconds": TARGET_PREPARE_SECONDS, "target_gb": TARGET_PREPARE_GB,
            "seconds_met": total < TARGET_PREPARE_SECONDS, "memory_met": peak < TARGET_PREPARE_GB, **ctx["meta"]}


# ---------------------------------------------------------------------------------------------
# 6. memory: whole jobs at the largest shapes, every size x tokenizer x data set

TOKENIZERS = {"cl100k": ["model.tokenizer.kind=tiktoken", f"model.tokenizer.path={CL100K}"],
              "internlm": ["model.tokenizer.kind=sentencepiece", f"model.tokenizer.path={INTERNLM_TOKENIZER}"]}
MEMORY_MODELS = {"tiny": ["model=tiny"], "128m": MODEL_128M, "smoke": SMOKE_MODEL}


def memory(ctx: dict) -> dict:
    """Per size x tokenizer x data set: `finetune stages=[prepare,train,evaluate]` at seq_length 2048,
    batch 16, 20 steps, 5-shot evaluation of 200 questions and SQuAD retention on 50 dev questions:
    does it finish within the memory cap (--memory-cap, 20 GB of the 24 GB machine by default), and
    each stage's peak RSS (summary.json's <stage>_peak_rss_gb). A job stopped at the cap or failing
    is recorded, and the next one runs."""
    s, work = ctx["settings"], ctx["work"] / "memory"
    m = s["memory"]
    sizes = [size for size in m["sizes"] if size in ctx.get("sizes", m["sizes"])]
    # --jobs NAME,...: only those rows run again; the others keep their figures from --out's memory.json
    previous = ctx["out"] / "memory.json"
    out = json.loads(previous.read_text()).get("rows", {}) if ctx.get("jobs") and previous.is_file() else {}
    for size in sizes:
        for tokenizer in m["tokenizers"]:
            for dataset in m["datasets"]:
                name = f"{size}-{tokenizer}-{dataset}"
                if ctx.get("jobs") and name not in ctx["jobs"]:
                    continue
                root = work / name
                _clean(root)
                overrides = [f"dataset={dataset}", f"dataset.path={SHARED / 'data' / dataset}", *m["data"],
                             *MEMORY_MODELS[size], *TOKENIZERS[tokenizer], "model.pretrain.epochs=0", "seed=0",
                             f"model.seq_length={m['seq_length']}", f"train.batch_size={m['batch_size']}",
                             f"train.max_steps={m['max_steps']}", f"eval.num_shots={m['num_shots']}",
                             f"eval.limit={m['limit']}", f"eval.squad.path={SHARED / 'data' / 'squad' / 'dev-v1.1.json'}",
                             f"eval.squad.limit={m['squad_limit']}", "stages=[prepare,train,evaluate]",
                             "tracking.system_metrics=false"]
                print(f"bench memory {name} ...", flush=True)
                try:
                    summary, measured = finetune(overrides, root / "run", root, may_exceed_cap=True)
                except Exception as e:   # a failed job is a row of the table, not the end of the benchmark
                    # the head says how it ended ("exit -9: ..." is the kernel's OOM killer), the tail its log
                    out[name] = {"status": "FAILED", "error": f"{str(e)[:200]} ... {str(e)[-1200:]}"}
                    continue
                stages = ("prepare", "train", "evaluate")
                out[name] = {
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "status": "stopped at the memory cap" if measured["killed_at_cap"] else summary.get("status"),
                    # GB of 1e9 bytes, as summary.json's stage peaks (run_measured gives GiB)
                    "seconds": measured["seconds"], "peak_rss_gb": measured["peak_rss_gb"] * 2 ** 30 / 1e9,
                    "others_cpu_share": measured["others_cpu_share"],
                    **{f"{st}_peak_rss_gb": summary.get(f"{st}_peak_rss_gb") for st in stages},
                    **{f"{st}_seconds": summary.get(f"{st}_seconds") for st in stages},
                    **{k: summary.get(k) for k in ("train_rows_per_step", "train_micro_steps", "train_examples_per_row",
                                                   "train_shapes", "mc_accuracy", "squad_f1", "eval_shapes")}}
    return {"rows": out, "settings": m, "memory_cap_gb": MEMORY_CAP["gb"],
            "met": bool(out) and all(r["status"] == "FINISHED" for r in out.values()), **ctx["meta"]}


def _clean(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Tables, BENCHMARKS.md, main

BENCHES = {"train": train, "mfu": mfu, "eval": eval_mc, "decode": decode, "prepare": prepare, "memory": memory}


def _f(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "met" if x else "NOT met"
    if isinstance(x, (int, float)):
        return f"{x:,.{digits}f}"
    return str(x)


def _x(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def tables(results: dict) -> str:
    """Markdown tables of whatever results are present."""
    lines = [f"{name}: FAILED: {r['error'].splitlines()[0][:300]}\n" for name, r in results.items() if "error" in r]
    results = {name: r for name, r in results.items() if "error" not in r}
    if "train" in results:
        lines += ["### Training (LoRA r8 on q/k/v/o, shuffled MMLU, useful = non-pad tokens/s)", "",
                  "Steady state leaves out the steps in which the tool compiled a graph (both sides); all steps and "
                  f"the first {FIRST_STEPS} steps include them. Both sides train on the same examples in every step: "
                  "the tool packed into rows of `seq`, PEFT as one batch padded to its longest example.", "",
                  "| size | rows x seq (examples/step) | steps (timed) | tool tok/s | PEFT tok/s | ratio | target "
                  f"| all steps: tool / PEFT tok/s | ratio | target | first {FIRST_STEPS} steps ratio | target "
                  "| tool RSS GB | PEFT RSS GB | memory ratio | target <= 1.2 | tool pad / shapes "
                  "| others' CPU share (tool / PEFT) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
                  "| --- | --- |"]
        for size, r in results["train"].items():
            if "error" in r:
                lines.append(f"| {size} | failed: {r['error'].splitlines()[0][:200]} |")
                continue
            stopped = f", tool stopped at {r['tool_stopped_at_memory_cap_gb']} GB after {r['tool_steps_done']}" \
                if r.get("tool_stopped_at_memory_cap_gb") else ""

            def goal(value, met):
                return "-" if value is None else f">= {value}x {_f(met)}"

            lines.append(
                f"| {size} | {r.get('tool_rows_per_step', r['batch_size'])} x {r['seq_length']} "
                f"({_f(r.get('tool_examples_per_step'), 1)}) "
                f"| {r['steps']} ({r['timed_steps']} timed{stopped}) "
                f"| {_f(r['tool_tokens_per_s'], 0)} | {_f(r['peft_tokens_per_s'], 0)} | {_x(r['ratio_vs_peft'])} "
                f"| {goal(r['target_ratio'], r['ratio_met'])} "
                f"| {_f(r['tool_tokens_per_s_all_steps'], 0)} / {_f(r['peft_tokens_per_s_all_steps'], 0)} "
                f"| {_x(r.get('ratio_all_steps'))} | {goal(r.get('target_all_steps_ratio'), r.get('all_steps_met'))} "
                f"| {_x(r.get('ratio_first_steps'))} "
                f"| {goal(r.get('target_first_steps_ratio'), r.get('first_steps_met'))} "
                f"| {_f(r['tool_peak_rss_gb'], 2)} | {_f(r['peft_peak_rss_gb'], 2)} "
                f"| {'>= ' if stopped else ''}{_x(r['memory_ratio_vs_peft'])} | {_f(r['memory_met'])} "
                f"| {_f(r['tool_pad_fraction'], 3)} / {r['tool_shapes']} "
                f"| {r['others_cpu_share']['tool']:.2f} / {r['others_cpu_share']['peft']:.2f} |")
        full = {size: r for size, r in results["train"].items() if r.get("peft_full_pad_tokens_per_s")}
        if full:
            lines += ["", "PEFT with every example padded to seq_length (the naive collator): " + "; ".join(
                f"{size} {_f(r['peft_full_pad_tokens_per_s'], 0)} tok/s, {_f(r['peft_full_pad_peak_rss_gb'], 2)} GB "
                f"(tool {_x(r['ratio_vs_peft_full_pad'])})" for size, r in full.items()) + "."]
        lines.append("")
    if "mfu" in results:
        m = results["mfu"]
        lines += ["### MFU (tool training, model FLOPs / fp32 matmul peak measured in the same run)", "",
                  f"fp32 matmul {m['matmul_size']}x{m['matmul_size']}: " + ", ".join(
                      f"{k} {v:,.0f} GFLOP/s" for k, v in m["matmul_gflops"].items())
                  + f"; peak = {m['peak_source']} {m['peak_gflops']:,.0f} GFLOP/s", "",
                  "| size | tool model GFLOP/s | tool MFU | tool HFU (padding and whole-row attention counted) "
                  "| PEFT MFU (same model FLOPs) |",
                  "| --- | --- | --- | --- | --- |"]
        for size, r in m["sizes"].items():
            peft_mfu = f"{100 * r['peft_mfu']:.1f}%" if "peft_mfu" in r else "-"
            lines.append(f"| {size} | {_f(r['tool_model_gflops_per_s'])} | {100 * r['tool_mfu']:.1f}% "
                         f"| {100 * r['tool_hfu']:.1f}% | {peft_mfu} |")
        lines.append("")
    if "eval" in results:
        e = results["eval"]
        lines += [f"### Multiple-choice evaluation ({e['questions']} MMLU questions, {e['num_shots']}-shot, "
                  f"batch {e['batch_size']}, tiny model)", "",
                  "| seq_length | examples/s (warm) | seconds | first pass examples/s (compiles) | pad fraction "
                  "| shapes | truncated prompts |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for seq, r in e["per_seq_length"].items():
            lines.append(f"| {seq} | {_f(r['examples_per_s'])} | {_f(r['seconds'], 2)} "
                         f"| {_f(r['first_pass_examples_per_s'])} | {_f(r['pad_fraction'], 3)} | {r['shapes']} "
                         f"| {r['truncated_prompts']} |")
        lines += ["", f"Time at the longest / shortest seq_length: {e['time_ratio_long_vs_short']:.2f}x "
                  f"(target <= {e['target_time_ratio']}x: {_f(e['met'])}); first pass "
                  f"{e['first_pass_time_ratio']:.2f}x. Logits equal across lengths to "
                  f"{e['max_abs_logit_diff_across_lengths']:.1e}. Peak RSS {e['peak_rss_gb']:.2f} GB; others' CPU "
                  f"share {e['others_cpu_share']:.2f}.", ""]
    if "decode" in results:
        d = results["decode"]
        lines += [f"### Greedy decode (stories260K, seq_length {d['seq_length']}, {d['prompts']} prompts of "
                  f"{min(d['prompt_tokens'])}-{max(d['prompt_tokens'])} tokens, batch {d['batch_size']}, "
                  f"{d['max_new_tokens']} new tokens each)", "",
                  "| path | tokens/s | seconds |", "| --- | --- | --- |",
                  f"| no cache | {_f(d['no_cache_tokens_per_s'])} | {_f(d['no_cache_seconds'], 2)} "
                  f"({1000 * d['no_cache_seconds'] / d['forward_steps']:.0f} ms per batch step) |"]
        if d.get("cache") == "available":
            lines += [f"| KV cache | {_f(d['cache_tokens_per_s'])} | {_f(d['cache_seconds'], 2)} |", "",
                      f"Speed-up {d['speedup']:.2f}x (target >= {d['target_speedup']}x: {_f(d['met'])}); "
                      f"same tokens as without the cache: {d['same_tokens']}.", ""]
        else:
            lines += ["", "KV cache: not available (finetune.model.generate.greedy_generate has no `cache` argument yet); "
                      "target >= 5x not measured.", ""]
    if "prepare" in results:
        p = results["prepare"]
        lines += [f"### Data preparation (cl100k, seq_length {p['seq_length']}, empty output_root each)", "",
                  "| data set | questions | prepare() seconds | peak RSS GB | `finetune stages=[prepare]` seconds "
                  "| its peak RSS GB |", "| --- | --- | --- | --- | --- | --- |"]
        for name in ("mmlu", "cmmlu"):
            r = p[name]
            lines.append(f"| {name} | {r['questions']:,} | {_f(r['seconds'])} | {_f(r['peak_rss_gb'], 2)} "
                         f"| {_f(r['cli_seconds'])} | {_f(r['cli_peak_rss_gb'], 2)} |")
        lines += [f"| total | | {_f(p['total_seconds'])} | {_f(p['peak_rss_gb'], 2)} | {_f(p['total_cli_seconds'])} | |",
                  "", f"Targets: < {p['target_seconds']:.0f} s total: {_f(p['seconds_met'])}; "
                  f"< {p['target_gb']:.0f} GB: {_f(p['memory_met'])}.", ""]
    if "memory" in results and "rows" in results["memory"]:
        mem = results["memory"]
        m = mem["settings"]
        lines += [f"### Whole jobs at the largest shapes (seq_length {m['seq_length']}, batch {m['batch_size']}, "
                  f"{m['max_steps']} steps, {m['num_shots']}-shot MC on {m['limit']} questions, SQuAD on "
                  f"{m['squad_limit']}; stages prepare, train, evaluate)", "",
                  "| job (size-tokenizer-data) | status | minutes | peak RSS GB | prepare / train / evaluate peak GB "
                  "| rows per step / micro-steps | examples per row |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in mem["rows"].items():
            if "error" in r:
                how = r["error"].split(":", 1)[0]   # "exit -9" when the run's head is kept
                lines.append(f"| {name} | FAILED{f' ({how})' if how.startswith('exit') else ''} | | | | | |")
                continue
            peaks = " / ".join(_f(r.get(f"{st}_peak_rss_gb"), 1) for st in ("prepare", "train", "evaluate"))
            lines.append(f"| {name} | {r['status']} | {_f(r['seconds'] / 60)} | {_f(r['peak_rss_gb'], 1)} | {peaks} "
                         f"| {_f(r.get('train_rows_per_step'), 0)} / {_f(r.get('train_micro_steps'), 0)} "
                         f"| {_f(r.get('train_examples_per_row'), 1)} |")
        lines += ["", f"Every job finishes under the {mem['memory_cap_gb']:.0f} GB cap (24 GB machine): "
                  f"{_f(mem['met'])}.", ""]
    return "\n".join(lines)


START, END = "<!-- bench:tables:start -->", "<!-- bench:tables:end -->"


def update_benchmarks_md(results_dir: Path, command: str) -> None:
    """Rewrite the generated part of BENCHMARKS.md (between the markers) from bench/results/*.json;
    the hand-written analysis around it stays."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    metas = [r for r in results.values() if "machine" in r] + \
            [v for r in results.values() for v in r.values() if isinstance(v, dict) and "machine" in v]
    m = metas[0]["machine"] if metas else machine()
    dates = sorted({x["date"][:10] for x in metas})
    block = "\n".join([START, "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM ({m['os']}, "
                       f"Python {m['python']}). Measured {', '.join(dates)}; last command: `{command}`.", "",
                       tables(results), END])
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    BENCHMARKS_MD.write_text(head + block + rest.split(END, 1)[1])


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_lanes(names: list[str], lane, smoke: bool) -> None:
    if smoke and len(names) > 2:
        # Smoke runs check the harness, not speed: two lanes at once (2 cores; most of a smoke run
        # is single-threaded process start-up), so that all five finish in well under a minute.
        from concurrent.futures import ThreadPoolExecutor

        first = [n for n in names if n in ("train", "mfu")]
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(lane, first), pool.submit(lane, [n for n in names if n not in first])]:
                future.result()
    else:   # measurements: strictly one at a time
        lane(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHES, "all"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2-3 steps, a handful of questions")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where <name>.json go (default bench/results)")
    parser.add_argument("--work", type=Path, default=WORK, help="scratch folder (default bench/work)")
    parser.add_argument("--sizes", default=None, help="train/mfu: comma-separated sizes (default: all)")
    parser.add_argument("--profile", action="store_true", help="prepare: cProfile of prepare() into its JSON")
    parser.add_argument("--jobs", default=None,
                        help="memory: comma-separated rows (e.g. 128m-cl100k-cmmlu) to run again; the others are kept")
    parser.add_argument("--memory-cap", type=float, default=MEMORY_CAP["gb"],
                        help=f"GB: a process passing it is stopped (default {MEMORY_CAP['gb']})")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"bench: {SHARED} not found (real data and models live there)", file=sys.stderr)
        return 2
    # SIGTERM (a test's timeout, `kill`) ends the harness like Ctrl-C: its subprocesses are killed too
    signal.signal(signal.SIGTERM, _interrupt)
    settings = SMOKE if args.smoke else FULL
    QUIET["enabled"] = not args.smoke
    MEMORY_CAP["gb"] = args.memory_cap
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    names = list(BENCHES) if args.which == "all" else [args.which]
    ctx = {"settings": settings, "work": args.work.resolve(), "smoke": args.smoke, "profile": args.profile,
           "out": args.out, "jobs": args.jobs.split(",") if args.jobs else None,
           "sizes": args.sizes.split(",") if args.sizes else list(settings["sizes"])}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}

    def lane(names: list[str]) -> None:
        """Run these benchmarks one after the other (mfu after train reuses train's runs)."""
        lane_ctx = dict(ctx)
        for name in names:
            lane_ctx["meta"] = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "command": command, "versions": versions(), "smoke": args.smoke,
                                "load_average_at_start": os.getloadavg()}
            print(f"bench {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                results[name] = BENCHES[name](lane_ctx)
            except Exception as e:   # report it, go on with the next benchmark
                import traceback

                traceback.print_exc()
                results[name] = {"error": str(e)[-2000:], **lane_ctx["meta"]}
            lane_ctx["ran_train"] = lane_ctx.get("ran_train") or name == "train"
            (args.out / f"{name}.json").write_text(json.dumps(results[name], indent=1, default=str))
            print(f"bench {name}: {time.perf_counter() - t0:.0f} s -> {args.out / (name + '.json')}", flush=True)

    try:
        run_lanes(names, lane, args.smoke)
    finally:
        kill_children()
    print(tables(results))
    if not args.smoke and args.out.resolve() == RESULTS.resolve():
        update_benchmarks_md(args.out, command)
        print(f"updated {BENCHMARKS_MD}")
    return 0
