"""The repository's layout (issue 13): the algorithm never imports the experiments, scripts never import each
other, every benchmark names its command, and nothing points outside the repository (the task data included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradmem", "pipelines", "jobs", "benchmarks")


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports; relative ones are not used here)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", ["gradmem", "pipelines", "jobs"])
def test_only_tests_import_the_benchmarks(folder):
    offenders = [str(p.relative_to(ROOT)) for p in modules(folder) if "benchmarks" in imported(p)]
    assert not offenders, f"{offenders} import benchmarks/ (the experiments sit on top; nothing depends on them)"


def test_no_script_imports_another_by_module_name():
    """Job scripts share only jobs/_common.py; benchmarks import each other as a package (benchmarks.x)."""
    scripts = {p.stem for p in (ROOT / "jobs").glob("*.py")} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    for path in modules("jobs") + modules("benchmarks"):
        bare = imported(path) & (scripts - {"_common"})
        assert not bare, f"{path.relative_to(ROOT)} imports the script(s) {sorted(bare)} by module name"


def test_gradmem_holds_no_experiments():
    assert not {"capacity.py", "compare.py", "reports.py", "sweep.py"} & {p.name for p in modules("gradmem")}


@pytest.mark.parametrize("path", [p for p in modules("benchmarks") if "__main__" in p.read_text()],
                         ids=lambda p: p.stem)
def test_every_runnable_benchmark_gives_its_command(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert f"python -m benchmarks.{path.stem}" in doc, f"{path.name}: the docstring must give the command"


def test_nothing_points_outside_the_repository():
    outside = ("/wo" + "rk/", "../sha" + "red")  # split so that this file does not match itself
    files = [p for folder in (*PACKAGES, "tests", "cluster") for p in (ROOT / folder).rglob("*")
             if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".md") and p != Path(__file__).resolve()]
    files += [ROOT / "Makefile", ROOT / "README.md", ROOT / "pyproject.toml"]
    hits = [f"{p.relative_to(ROOT)}: {s}" for p in files for s in outside if s in p.read_text()]
    assert not hits, hits


@pytest.mark.parametrize("task", [{"name": "babi", "tasks": ["qa1"]}, {"name": "squad"}], ids=["babi", "squad"])
def test_task_data_come_from_task_path_or_gradmem_data(task, monkeypatch):
    """No guessed data directory: without task.path and GRADMEM_DATA the error names both."""
    from gradmem.train import TrainConfig, build_task

    monkeypatch.delenv("GRADMEM_DATA", raising=False)
    cfg = TrainConfig.from_dict({"task": task})
    with pytest.raises(FileNotFoundError, match=r"task\.path.*GRADMEM_DATA"):
        build_task(cfg.task, "train")


def test_the_suite_runs_each_module_and_each_ray_group_as_one_unit_of_work():
    """`make test` splits the suite between two workers by unit of work (tests/conftest.py): a module's fixtures
    are then set up once, and the Ray modules share two units, one cluster each. Every module that starts a Ray
    cluster is in a group, and the Makefile asks for this scheduler with xdist's order kept."""
    from conftest import LONG_MODULES, RAY_GROUPS, work_unit

    assert work_unit("tests/test_write.py::test_x[llama]") == work_unit("tests/test_write.py::test_y") == "tests/test_write.py"
    grouped = {name: group for group, names in RAY_GROUPS.items() for name in names}
    for name, group in grouped.items():
        assert (ROOT / "tests" / f"{name}.py").is_file(), name
        assert work_unit(f"tests/{name}.py::test_x[a]") == group
    using_ray = {p.stem for p in (ROOT / "tests").glob("test_*.py")
                 if re.search(r"def \w+\([^)]*\bray_cluster\b", p.read_text())}
    assert using_ray <= set(grouped), using_ray - set(grouped)
    assert all((ROOT / "tests" / f"{name}.py").is_file() and name not in grouped for name in LONG_MODULES)
    command = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "-m pytest" in line and "-n 2" in line)
    assert "--dist loadscope" in command and "--no-loadscope-reorder" in command, command
