"""The design card's folders must not shadow the standard library, from the repository root."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def run_from_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_subprocess_from_repository_root():
    result = run_from_root("-c", "import subprocess, asyncio, selectors; print(selectors.SelectSelector.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SelectSelector"


def test_python_dash_m_works_from_repository_root():
    result = run_from_root("-m", "winnow.pipelines", "run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--set" in result.stdout


def test_python_dash_m_pytest_collects_from_repository_root():
    result = run_from_root("-m", "pytest", "--collect-only", "-q", "tests/test_config.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_winnow_subpackages_come_from_the_card_folders():
    import winnow.pipelines.job as job
    import winnow.selectors.embedding as embedding

    assert "pipelines" in job.__file__ and "selectors" in embedding.__file__
    assert not (ROOT / "selectors" / "__init__.py").exists()


# ---- the tree draws the architecture: which room may import which (docs/NOTES.md, "The house")

PIPELINES = ROOT / "pipelines"
MAX_MODULE_LINES = 450
# Top-level modules of pipelines/ are the commands and the job (cli, job, plan, sae_train) and the config schema.
# A room may import the rooms listed here (and itself); `stages` means the stage list only (stages/__init__.py),
# never a stage module.
ALLOWED = {
    "config": set(),
    "io": {"config"},
    "engine": {"config", "io"},
    "stages": {"config", "io", "engine", "outputs.report_html"},
    "outputs": {"config", "io", "engine", "stages"},
}


def module_name(path) -> str:
    relative = path.relative_to(PIPELINES).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["winnow", "pipelines", *parts])


def winnow_imports() -> dict[str, set[str]]:
    """{module: the winnow modules it imports, lazily or not} for every module of pipelines/ (absolute imports;
    a name imported from a package counts as its submodule when there is one)."""
    import ast

    modules = {module_name(path): path for path in PIPELINES.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import (stage cache keys follow absolute imports only)"
                if node.module and node.module.startswith("winnow."):
                    for alias in node.names:
                        candidate = f"{node.module}.{alias.name}"
                        found.add(candidate if candidate in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("winnow.")}
        graph[name] = found
    return graph


def room(module: str) -> str:
    """The room of a module: io, engine, stages (a stage: stages.NAME), outputs, config, or top (the rest)."""
    parts = module.split(".")[2:]
    if not parts:
        return "top"
    if parts[0] == "stages":
        return "stages" if len(parts) == 1 else f"stages.{parts[1]}"
    if parts[0] in ("io", "engine", "outputs") or parts == ["config"]:
        return parts[0]
    return "top"


def test_every_room_imports_only_the_rooms_below_it():
    problems = []
    for module, imported in sorted(winnow_imports().items()):
        mine = room(module)
        if mine == "top" or mine == "stages":  # the commands and the job use everything; the list its stages
            continue
        allowed = ALLOWED["stages" if mine.startswith("stages.") else mine]
        for target in sorted(imported):
            if target.startswith(("winnow.selectors", "winnow.rephrase")):
                continue  # the pure algorithms sit below every room of pipelines/
            theirs = room(target)
            if theirs == mine:
                continue
            short = target.split(".", 2)[2]
            if theirs.startswith("stages."):
                problems.append(f"{module} imports the stage module {target}")
            elif theirs not in allowed and short not in allowed:
                problems.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert problems == []


def test_no_stage_module_imports_another_stage():
    crossings = [(module, target) for module, imported in winnow_imports().items() for target in imported
                 if room(module).startswith("stages.") and room(target).startswith("stages.")
                 and room(module) != room(target)]
    assert crossings == []


def test_there_is_no_import_circle():
    graph = winnow_imports()
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_no_module_of_pipelines_is_over_the_size_bound():
    over = {str(path.relative_to(ROOT)): lines for path in PIPELINES.rglob("*.py")
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert over == {}


def test_algorithms_never_import_the_pipelines():
    import ast

    offenders = []
    for folder in ("selectors", "rephrase", "proxy"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names
                              if name.startswith("winnow.pipelines")]
    assert offenders == []
