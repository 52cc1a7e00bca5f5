"""The folders are the architecture: imports run one way through the subpackages (counting imports
inside functions), no cycles, stages never import stages, the import graph stays shallow, every
module imports on its own in a fresh interpreter."""
import ast
import functools
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_process

PACKAGE = REPO / "finetune"
# Lower first: a module may import its own subpackage and any subpackage before it, nothing after.
LAYERS = ("errors", "files", "rundir", "config", "data", "model", "runtime", "evaluation", "training", "tracking", "stages", "app")
STAGES = {"plan", "prepare", "train", "evaluate", "merge", "predict", "export"}
# Entry scripts: they start the app, nothing imports them.
ENTRY = {"finetune.__main__", "finetune.runtime.msrun_worker.worker", "finetune.evaluation.__main__",
         "finetune.tracking.__main__"}
MAX_DEPTH = 9   # edges on the longest import chain (app -> stage -> ... -> errors), faces seen through


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """finetune modules that `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from finetune.data import prompts` imports the module finetune.data.prompts (and runs the
            # package's __init__ first, which only re-exports its own modules); a name imports `base`
            faced = FACES.get(base, set())
            subs = [f"{base}.{a.name}" for a in node.names if a.name not in faced and f"{base}.{a.name}" in known]
            targets = subs + ([base] if len(subs) < len(node.names) else [])
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def face_names(init: Path) -> set[str]:
    """Names a package's __init__ binds (its face)."""
    out = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            out |= {a.asname or a.name for a in node.names}
    return out


FACES = {f"finetune.{p.parent.name}": face_names(p) for p in PACKAGE.glob("*/__init__.py")}


@functools.cache
def graph() -> dict[str, frozenset[str]]:
    mods = modules()
    g = {name: frozenset(imports(name, path, set(mods))) for name, path in mods.items()}
    g.pop("finetune", None)   # the package __init__ imports nothing of its own
    return {m: frozenset(d - {"finetune"}) for m, d in g.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_module_sits_in_a_layer():
    assert {m for m in graph() if m.split(".")[1] not in LAYERS and m not in ENTRY} == set()
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS) - {"errors", "files", "rundir", "app"}
    assert {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"} == STAGES


def test_imports_run_one_way():
    upward = sorted((m, d) for m, deps in graph().items() if m not in ENTRY for d in deps if layer(d) > layer(m))
    assert upward == [], upward


def test_data_imports_no_model_code():
    g = graph()
    assert sorted((m, d) for m, deps in g.items() if m.startswith("finetune.data.") for d in deps
                  if layer(d) > layer("finetune.config.schema") and not d.startswith("finetune.data")) == []


def test_stages_never_import_stages_and_only_the_app_imports_them():
    g = graph()
    crossing = sorted((m, d) for m, deps in g.items() for d in deps
                      if d.startswith("finetune.stages.") and m != "finetune.app")
    assert crossing == [], crossing


def test_stages_and_the_app_import_only_faces():
    """A stage (and the entrypoint) imports a subpackage's face (finetune.model), never its modules
    (finetune.model.llama): what a package offers is what its __init__ names."""
    g = graph()
    users = {m for m in g if m.startswith("finetune.stages.") or m == "finetune.app"}
    inner = sorted((m, d) for m in users for d in g[m] if len(d.split(".")) > 2 and not d.startswith("finetune.stages."))
    assert inner == [], inner


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "active"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == [], cycles


def test_import_graph_is_shallow():
    g = graph()

    def through_faces(m):   # a face only re-exports: an import of it is an import of its modules
        return {x for d in g[m] for x in (through_faces(d) if d in FACES else {d})}

    @functools.cache
    def chain(m):   # the longest import chain from m, as a list of modules
        return max(([m] + chain(d) for d in through_faces(m)), key=len, default=[m])

    longest = max((chain(m) for m in g if m not in FACES and m not in ENTRY), key=len)
    assert len(longest) - 1 <= MAX_DEPTH, " -> ".join(longest)


def test_the_rules_catch_a_violation(tmp_path):
    """The rules fail when broken: a data module importing model code is upward, a cycle is found."""
    g = dict(graph())
    g["finetune.data.records"] = g["finetune.data.records"] | {"finetune.model.llama"}
    assert layer("finetune.model.llama") > layer("finetune.data.records")
    reach, todo = set(), ["finetune.model.llama"]
    while todo:   # model.llama reaches data.records again: a cycle
        m = todo.pop()
        for d in g[m] - reach:
            reach.add(d)
            todo.append(d)
    assert "finetune.data.records" in reach


@pytest.mark.process
def test_every_module_imports_alone():
    names = [n for n in modules() if not n.endswith("__main__")]
    script = ("import subprocess, sys\n"
              "bad = []\n"
              f"for name in {names!r}:\n"
              "    p = subprocess.run([sys.executable, '-c', 'import ' + name], capture_output=True, text=True)\n"
              "    if p.returncode: bad.append((name, p.stderr.strip().splitlines()[-1:]))\n"
              "print(bad)\n")
    p = run_process([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]


def test_stage_table_is_the_stage_order():
    from finetune import app
    from finetune.config.schema import STAGES as ORDER

    assert tuple(app.STAGES) == ORDER
    for name, fn in app.STAGES.items():
        assert fn.__module__ == f"finetune.stages.{name}", (name, fn.__module__)


def test_the_mlflow_tracker_is_a_run_tracker():
    """RunContext.tracker is typed by a Protocol; the MLflow Tracker (a no-op without a store) meets it."""
    from finetune.runtime.context import Tracker as RunTracker
    from finetune.tracking.tracker import Tracker

    assert isinstance(Tracker(), RunTracker)
    assert not isinstance(object(), RunTracker)
