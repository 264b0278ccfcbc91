"""The package is split by stage and its imports go one way, down the pipeline: no cycles (imports inside functions
included), no stage importing a later one, and the exported model's code importing nothing of the
package outside it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    ("foundations", {"errors", "hf"}),
    ("runtime", {"runtime"}),
    ("data", {"data"}),
    ("model", {"model"}),
    ("distillation", {"distill"}),
    ("export", {"export"}),
    ("evaluation", {"eval"}),
    ("recipe and command line", {"distill.train", "cli", "__init__", "__main__"}),
]
"""The stages in pipeline order, each a sub-package of ``spellm_ds`` (``hf`` is the transformers
model shipped with every export); the recipe, which composes distillation and export, and the
command-line helpers come last."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its code, except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree)
               if isinstance(branch, ast.If) and getattr(branch.test, "id", None) == "TYPE_CHECKING"
               for node in ast.walk(branch)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module] if node.module else
                            package[: len(package) - node.level + 1]) if node.level else node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in known and module != name}


def package_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in (ROOT / "spellm_ds").rglob("*.py")}
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def stage_of(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    for name in (".".join(parts[:2]), parts[0]):  # a module listed by itself, else its sub-package
        for index, (_, members) in enumerate(STAGES):
            if name in members:
                return index
    raise AssertionError(f"{module} belongs to no stage")


def test_the_package_is_split_by_stage():
    """Every module lives in its stage's sub-package: the tree shows the pipeline."""
    loose = {path.stem for path in (ROOT / "spellm_ds").glob("*.py")}
    assert loose == {"__init__", "__main__", "cli", "errors"}, loose


def test_every_module_has_a_stage():
    for module in package_graph():
        stage_of(module)


def test_no_import_cycles():
    graph = package_graph()
    finished, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in finished:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        finished.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_stage_imports_a_later_one():
    later = [(module, imported) for module, imported_set in package_graph().items() for imported in imported_set
             if stage_of(imported) > stage_of(module)]
    assert not later, [f"{m} ({STAGES[stage_of(m)][0]}) imports {i} ({STAGES[stage_of(i)][0]})" for m, i in later]


def test_the_exported_model_code_needs_nothing_else_of_the_package():
    graph = package_graph()
    for module in (m for m in graph if m.startswith("spellm_ds.hf")):
        assert all(imported.startswith("spellm_ds.hf") for imported in graph[module]), (module, graph[module])


def test_experiment_records_are_short_and_their_links_resolve():
    """Each run's README stays a page (details go beside it), and every relative link in the
    records points at a file that exists."""
    import re

    records = sorted((ROOT / "experiments").rglob("*.md"))
    assert records
    for page in records:
        text = page.read_text()
        if page.name == "README.md":
            assert len(text.splitlines()) <= 150, f"{page} has {len(text.splitlines())} lines"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page}: broken link {target}"


def test_the_recorded_scripts_import_what_exists():
    """The scripts kept with the records (and scripts/) still run against the package as it is:
    every name they import from it exists."""
    import importlib.util

    missing = []
    for path in sorted((ROOT / "experiments").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in ("spellm_ds", "analysis", "bench")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert not missing, missing
