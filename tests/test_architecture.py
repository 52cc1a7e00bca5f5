"""The module map holds: no import cycles (counting imports inside functions), stages import
library modules only, every module imports on its own in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path


from conftest import REPO

PACKAGE = REPO / "finetune"
STAGE_MODULES = {"finetune.plan", "finetune.prepare", "finetune.train", "finetune.evaluate", "finetune.merge",
                 "finetune.predict", "finetune.export"}


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
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    g.pop("finetune", None)   # the package __init__ imports nothing of its own
    state, cycles = {}, []

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


def test_stages_import_library_modules_only():
    g = graph()
    assert STAGE_MODULES <= set(g)
    crossing = {stage: sorted(g[stage] & STAGE_MODULES) for stage in STAGE_MODULES if g[stage] & STAGE_MODULES}
    assert crossing == {}, crossing
    # and only the entrypoint knows them all
    importers = {m for m, deps in g.items() if deps & STAGE_MODULES and m not in STAGE_MODULES}
    assert importers <= {"finetune.app", "finetune.base"}, importers   # base runs train's loop to pretrain


def test_every_module_imports_alone():
    names = [n for n in modules() if n != "finetune.__main__"]
    script = ("import subprocess, sys\n"
              "bad = []\n"
              f"for name in {names!r}:\n"
              "    p = subprocess.run([sys.executable, '-c', 'import ' + name], capture_output=True, text=True)\n"
              "    if p.returncode: bad.append((name, p.stderr.strip().splitlines()[-1:]))\n"
              "print(bad)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]


def test_stage_table_is_the_stage_order():
    from finetune import app
    from finetune.schema import STAGES

    assert tuple(app.STAGES) == STAGES
    for name, fn in app.STAGES.items():
        assert fn.__module__ in STAGE_MODULES, (name, fn.__module__)
