"""The module map of docs/architecture.md, checked: who may import whom, no import cycles, module sizes, and one
model loader.

Imports are read from the source (``ast``), at every level (a function-level import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("psoft_export", "converters")
# The commands. A command module may import library modules, never another command (cli imports them all).
VERBS = {"psoft_export.decompose", "psoft_export.train", "psoft_export.merge", "psoft_export.verify"}
ENTRY = {"psoft_export.cli", "psoft_export.__main__"}
# Known knots still to untie: each an edge that breaks a rule above; the test fails when a new one appears, and
# when one listed here is gone (so the list only shrinks). Empty since merge/verify/train were untied (issue #15).
KNOWN: set = set()
MAX_LINES = 400
# Longer modules, and why (docs/architecture.md repeats this).
LONG = {
    "converters/gguf.py": "the GGUF writer: hparams, tokenizer, tensor plan and LoRA adapters of one format",
    "converters/onnx.py": "optimum export plus the adapter-split graph surgery and ORT adapters of one format",
    "psoft_export/adapter_io.py": "both adapter formats (ours and PEFT's) both ways, with the PEFT basis change",
    "psoft_export/train.py": "the loop, checkpoints and resume of one command, kept readable top to bottom",
    "psoft_export/cli.py": "the options of four commands, declarative click decorators one per line",
}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (resolved to the deepest module that exists)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    out = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name and not target.endswith(".errors") and target not in PACKAGES:
            out.add(target)
    return out


GRAPH = {name: imports_of(name, path, modules()) for name, path in modules().items()}


def _violations() -> set[tuple[str, str]]:
    bad = set()
    for name, targets in GRAPH.items():
        for target in targets:
            if name in VERBS and target in VERBS and name != "psoft_export.decompose":
                bad.add((name, target))
            if name not in VERBS | ENTRY and target in VERBS:  # a library module that imports a command
                bad.add((name, target))
    return bad


def test_commands_do_not_import_commands():
    new = _violations() - KNOWN
    assert not new, f"new imports between commands (or from the library into a command): {sorted(new)}"
    gone = KNOWN - _violations() - _cycle_edges()
    assert not gone, f"fixed, so remove from KNOWN: {sorted(gone)}"


def _cycle_edges() -> set[tuple[str, str]]:
    """Edges inside a strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    for v in GRAPH:
        if v not in index:
            visit(v)
    return {(a, b) for comp in comps if len(comp) > 1 for a in comp for b in GRAPH[a] if b in comp}


def test_no_import_cycles():
    cycles = _cycle_edges() - KNOWN
    assert not cycles, f"import cycle(s): {sorted(cycles)}"


@pytest.mark.parametrize(
    "path", sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_module_size(path):
    rel = str(path.relative_to(ROOT))
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES or rel in LONG, f"{rel} has {lines} lines (> {MAX_LINES}): split it, or say why in LONG"


def test_the_rules_catch_a_cycle_and_a_verb_import():
    """The checks are not vacuous: a planted cycle and a planted command-to-command import are found."""
    GRAPH.setdefault("psoft_export.subspace", set()).add("psoft_export.checkpoint")
    GRAPH.setdefault("psoft_export.checkpoint", set()).add("psoft_export.subspace")
    GRAPH["psoft_export.train"].add("psoft_export.merge")
    try:
        assert ("psoft_export.subspace", "psoft_export.checkpoint") in _cycle_edges()
        assert ("psoft_export.train", "psoft_export.merge") in _violations()
    finally:
        GRAPH["psoft_export.subspace"].discard("psoft_export.checkpoint")
        GRAPH["psoft_export.checkpoint"].discard("psoft_export.subspace")
        GRAPH["psoft_export.train"].discard("psoft_export.merge")


# The one model loader (docs/architecture.md): no other module calls a model class's ``from_pretrained``. Receivers
# whose name says config or tokenizer (AutoConfig, GenerationConfig, AutoTokenizer) are not model classes.
LOADER = "psoft_export/models.py"
NOT_MODELS = ("Config", "Tokenizer")


def model_loads(path: Path) -> list[str]:
    """``receiver.from_pretrained`` calls in ``path`` whose receiver is not a config or tokenizer class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            receiver = ast.unparse(node.func.value)
            if not any(word in receiver for word in NOT_MODELS):
                where = path.relative_to(ROOT) if ROOT in path.parents else path.name
                found.append(f"{where}:{node.lineno} {receiver}.from_pretrained")
    return found


def test_only_models_py_loads_models():
    paths = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if str(p.relative_to(ROOT)) != LOADER]
    found = [call for path in paths for call in model_loads(path)]
    assert not found, f"models loaded outside {LOADER} (load them through it): {found}"
    assert model_loads(ROOT / LOADER), f"{LOADER} loads no model: the check above reads nothing"


def test_the_loader_check_catches_a_model_load(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import transformers\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, AutoConfig\n"
        "model = AutoModelForCausalLM.from_pretrained('m')\n"
        "bert = transformers.BertModel.from_pretrained('m')\n"
        "tok, config = AutoTokenizer.from_pretrained('m'), AutoConfig.from_pretrained('m')\n"
    )
    assert model_loads(planted) == [
        "planted.py:3 AutoModelForCausalLM.from_pretrained",
        "planted.py:4 transformers.BertModel.from_pretrained",
    ]
