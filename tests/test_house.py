"""The layout of the repository: the core at the top, tools/ beside it, no import circle, a core that reads in one
sitting, and a README file map that names every file."""
import ast
import re

from conftest import ROOT

CORE = ("model.py", "recompute.py", "train.py")
CORE_LINES = 1190  # model.py + recompute.py + train.py (four archs, one with experts; Algorithm 1): nanoGPT's are 666


def modules():
    """{module name: path} of every script and module: the top level's and tools/'s ("tools.bench")."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found.update({f"tools.{p.stem}": p for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__"})
    return found


def imports(path, names):
    """The repository modules that path imports anywhere in it (inside functions too: a hidden import is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {node.module} & names
            out |= {f"{node.module}.{a.name}" for a in node.names} & names  # from tools import plot
    return out


def cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def import_graph():
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"train", "model", "recompute", "checkpoint", "parallel", "plan", "tools.bench"} <= set(graph)
    assert graph["train"] >= {"model", "checkpoint", "parallel", "plan", "prepare_data"}  # the walk sees imports
    assert cycle(graph) is None, f"import circle: {' -> '.join(cycle(graph))}"


def test_nothing_imports_train_and_the_core_never_imports_a_tool():
    """train.py is only ever run, so `python train.py` never loads it a second time as the module `train`; the
    core and the modules training needs stand without tools/."""
    graph = import_graph()
    assert not [m for m, deps in graph.items() if "train" in deps]
    assert not [(m, d) for m, deps in graph.items() if not m.startswith("tools.") for d in deps if d.startswith("tools.")]


def test_the_core_reads_in_one_sitting():
    lines = {f: len((ROOT / f).read_text().splitlines()) for f in CORE}
    assert sum(lines.values()) <= CORE_LINES, f"{lines}: {sum(lines.values())} lines, over {CORE_LINES}"


def test_the_readme_file_map_names_every_file():
    readme = (ROOT / "README.md").read_text()
    mapped = set(re.findall(r"`((?:tools/)?\w+\.py)`", readme))
    files = {p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *(ROOT / "tools").glob("*.py")]}
    assert files - {"tools/__init__.py"} <= mapped, f"not in the README: {sorted(files - mapped - {'tools/__init__.py'})}"


def test_the_readme_imports_column_is_the_import_graph():
    """The file map's "imports (of ours)" column is what the walk finds, configurator aside (every module but
    model.py imports it; the README says so once)."""
    rows = re.findall(r"^\| `((?:tools/)?\w+)\.py` \|([^|]*)\|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 15
    graph = import_graph()
    for name, column in rows:
        said = {d.strip().replace("/", ".") for d in column.split(",") if d.strip()}
        module = name.replace("/", ".")
        assert said == graph[module] - {"configurator"}, f"README row {name}.py says {sorted(said)}"
    assert sorted(m for m, deps in graph.items() if "configurator" not in deps and m != "configurator") == ["model", "moe"]
