"""The shape of references/: its modules import each other without a cycle, the config's sections are
read as attributes outside the config modules (references/train_config.py and its config_*.py), train.py stays short."""

import ast
import os

from helpers import REFS

SECTIONS = {"training", "model", "data", "distributed"}
# The config modules: references/train_config.py and the parts it imports (schema, rules, command line).
SCHEMA = {os.path.join(REFS, f"{m}.py") for m in ("train_config", "config_schema", "config_rules", "config_cli")}
MAX_TRAIN_PY_LINES = 300


def _python_files(folder):
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py"))


def _parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def _imported_names(tree):
    """Top-level names of every absolute import, including those inside functions."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def import_graph():
    """{module: sibling modules it imports}. references/lightning/ puts references/ first on sys.path
    ("import train" is the recipe's train.py), then its own folder (module.py)."""
    folders = {"": REFS, "lightning/": os.path.join(REFS, "lightning")}
    modules = {
        prefix: {os.path.splitext(os.path.basename(p))[0]: p for p in _python_files(folder)}
        for prefix, folder in folders.items()
    }
    graph = {}
    for prefix, own in modules.items():
        for name, path in own.items():
            edges = set()
            for imported in _imported_names(_parse(path)):
                if imported in modules[""]:
                    edges.add(imported)
                elif imported in own:
                    edges.add(prefix + imported)
            graph[prefix + name] = sorted(edges)
    return graph


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_no_import_cycle_among_the_recipes_modules():
    graph = import_graph()
    assert {"train", "engine", "train_config", "lightning/train"} <= set(graph)  # the scan sees the recipe
    assert "train_config" in graph["train"]  # and its imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _section_subscripts(tree):
    """(line, section) of every ``x["training"]``-style subscript in the module, on anything."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in SECTIONS:
                yield node.lineno, key.value


def test_section_subscripts_are_found():
    tree = ast.parse('cfg["training"]["lr"]\nt = c.cfg["model"]\ndef f(run):\n    return run["data"], d["other"]\n')
    assert sorted(_section_subscripts(tree)) == [(1, "training"), (2, "model"), (4, "data")]


def test_config_sections_are_subscripted_only_in_the_schema_module():
    found = []
    for folder, _, names in os.walk(REFS):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.endswith(".py") and path not in SCHEMA:
                rel = os.path.relpath(path, os.path.dirname(REFS))
                found += [(rel, line, section) for line, section in _section_subscripts(_parse(path))]
    listing = "\n".join(f"{rel}:{line}: [{section!r}]" for rel, line, section in sorted(found))
    assert not found, f"{len(found)} config section subscripts outside the config modules:\n{listing}"
