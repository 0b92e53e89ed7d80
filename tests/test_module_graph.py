"""The package's import graph runs one way: every import of an mtp module, at the top of a file or inside a
function, points to the same layer or a lower one, and no modules import each other in a circle."""

import ast
from pathlib import Path

import mtp

ROOT = Path(mtp.__file__).resolve().parent

# Lowest first. A module belongs to the longest prefix listed; modules of one layer may import each other
# (without cycles), never a later layer's.
LAYERS = [
    ["mtp", "mtp.errors"],                      # the lazy public API, the one error type
    ["mtp.io", "mtp.machine"],                  # files written atomically, untrusted files read; the CPU
    ["mtp.trees"],                              # tree specs as users write them
    ["mtp.config"],                             # every command's flags, checked at the door; shared constants
    ["mtp.hf_compat", "mtp.backbones", "mtp.data", "mtp.prompts", "mtp.general_prompts", "mtp.derived_prompts",
     "mtp.heads_format"],                       # models, text and the heads' file format
    ["mtp.model"],                              # heads on a backbone
    ["mtp.engines"],                            # real serving engines (llama.cpp, vLLM) run as processes
    ["mtp.analysis"],                           # how far ahead a model sees
    ["mtp.training", "mtp.decode"],             # training heads; decoding with them
    ["mtp.export", "mtp.serve", "mtp.convert"],  # heads out to engines; our server; checkpoints in
    ["mtp.bench"],                              # benchmarks over all of the above
    ["mtp.cli", "mtp.__main__"],                # the command line
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    best = max(((len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
                if name == prefix or name.startswith(prefix + ".")), default=None)
    assert best is not None, f"{name} is in no layer of tests/test_module_graph.py: place it"
    return best[1]


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            out |= {t for t in targets if t in modules and t != name}
        edges[name] = out
    return edges


def test_every_import_points_down_or_sideways():
    edges = imports()
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "imports of a higher layer: " + "; ".join(sorted(upward))


def test_no_import_cycles():
    edges = imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_graph_test_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The two checks can fail: a config importing decode, and two modules importing each other."""
    edges = {"mtp.config": {"mtp.decode.tree"}, "mtp.decode.tree": set()}
    assert [f"{a} -> {b}" for a, ts in edges.items() for b in ts if layer_of(b) > layer_of(a)]
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "imports",
                        lambda: {"mtp.model.heads": {"mtp.model.eagle3"}, "mtp.model.eagle3": {"mtp.model.heads"}})
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "mtp.model.eagle3 -> mtp.model.heads" in str(e) or "mtp.model.heads -> mtp.model.eagle3" in str(e)
    else:
        raise AssertionError("a cycle went unseen")


def test_every_command_lives_with_its_stage():
    """One convention for the command table: each run function, formatter and plotter is a function of the module
    of the stage it drives (never a module of commands apart), and it imports."""
    import importlib

    from mtp.cli import COMMANDS

    for name, cmd in COMMANDS.items():
        for ref in filter(None, (cmd.run, cmd.show, cmd.plot)):
            module, _, function = ref.partition(":")
            assert module.count(".") >= 1 and module not in ("mtp.cli", "mtp.commands"), (name, ref)
            assert callable(getattr(importlib.import_module(module), function)), (name, ref)
