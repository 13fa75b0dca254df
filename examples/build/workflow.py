"""A software build: find a Python project's test files, run each with pytest in its own
sandboxed Process holding only the files it needs, and report.

    rulework run examples/build/workflow.py:test
    rulework run examples/build/workflow.py:test --project path/to/project

What a test file needs is found the way Pants does it: by reading imports. A test's sandbox
holds the test, the project modules it imports (transitively, with their packages'
`__init__.py`), the `conftest.py` files above it and the pytest configuration. The Process's
cache key is those files' digests plus the command: a second run with nothing changed is
served entirely from the cache, and editing one module re-runs only the tests that import it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from rulework import (
    CreateDigest,
    Digest,
    DigestContents,
    DigestEntries,
    FallibleProcessResult,
    FileContent,
    FileEntry,
    Get,
    MultiGet,
    PathGlobs,
    Process,
    QueryRule,
    RemovePrefix,
    Snapshot,
    collect_rules,
    rule,
)
from rulework.goals import GoalArgumentError, GoalContext, goal

HERE = Path(__file__).resolve().parent
REPORT_FILE = ".rulework-junit.xml"
CONFIG_FILES = ("pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")


def _pytest_version() -> str:
    try:
        return importlib.metadata.version("pytest")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# The Process sees exactly this environment (nothing is inherited). The interpreter is named
# by absolute path (sys.executable), so PATH only serves what the tests themselves spawn.
# PYTEST_TOOLCHAIN is never read: it puts the Python and pytest versions into the cache key,
# so that upgrading either re-runs the tests.
TEST_ENV = {
    "PATH": os.defpath,
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
    # Plugins installed next to pytest are not the project's: keep runs hermetic.
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    "PYTEST_TOOLCHAIN": f"python {sys.version.split()[0]}, pytest {_pytest_version()}",
}


# ----------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class PythonProject:
    """A project directory, relative to the workspace root; imports resolve from its root."""

    root: str


@dataclass(frozen=True)
class PytestSettings:
    python: str
    timeout_seconds: float


@dataclass(frozen=True)
class ProjectFiles:
    """Every file of the project that a test may need, by path relative to the project."""

    files: tuple[FileEntry, ...] = field(repr=False)

    def by_path(self) -> dict[str, FileEntry]:
        return {entry.path: entry for entry in self.files}


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the project root
    file_digest: Digest = field(repr=False)


@dataclass(frozen=True)
class Imports:
    """The modules a file imports, absolute (relative imports resolved)."""

    modules: tuple[str, ...]


@dataclass(frozen=True)
class PytestFile:
    path: str  # relative to the project root


@dataclass(frozen=True)
class PytestInputs:
    """What goes into a test file's sandbox."""

    files: tuple[str, ...]
    digest: Digest = field(repr=False)


@dataclass(frozen=True)
class PytestResult:
    path: str
    exit_code: int
    passed: int
    failed: int
    errors: int
    skipped: int
    duration_seconds: float
    source: str  # "ran", "local_cache" or "remote_cache"
    inputs: tuple[str, ...]
    output: str  # the end of pytest's output, shown when the file failed

    @property
    def ok(self) -> bool:
        return self.exit_code in (0, 5) and not self.failed and not self.errors


@dataclass(frozen=True)
class PytestReport:
    results: tuple[PytestResult, ...]


# ----------------------------------------------------------------------------------------------
# Rules


@rule
async def project_files(project: PythonProject) -> ProjectFiles:
    snapshot = await Get(
        Snapshot,
        PathGlobs([f"{project.root}/**/*.py", *(f"{project.root}/{c}" for c in CONFIG_FILES)]),
    )
    relative = await Get(Digest, RemovePrefix(snapshot.digest, project.root))
    entries = await Get(DigestEntries, Digest, relative)
    return ProjectFiles(tuple(e for e in entries if isinstance(e, FileEntry)))


@rule
async def parse_imports(source: SourceFile) -> Imports:
    tree_digest = await Get(Digest, CreateDigest([FileEntry(source.path, source.file_digest)]))
    (content,) = await Get(DigestContents, Digest, tree_digest)
    try:
        tree = ast.parse(content.content, filename=source.path)
    except SyntaxError:
        return Imports(())  # pytest will report it, with a better message than ours
    # The package a relative import starts from (for a package's __init__.py: the package).
    package = PurePosixPath(source.path).parent.parts
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                prefix = ".".join(base)
                module = ".".join(p for p in (prefix, node.module or "") if p)
            else:
                module = node.module or ""
            if module:
                found.append(module)
            # `from pkg import mod` may name a submodule: try it too.
            found.extend(f"{module}.{alias.name}" if module else alias.name for alias in node.names)
    return Imports(tuple(sorted(set(found))))


def _module_files(module: str, available: dict[str, FileEntry]) -> list[str]:
    """The project files that importing `module` runs: the module and its packages' __init__."""
    parts = module.split(".")
    files = []
    for depth in range(1, len(parts) + 1):
        stem = "/".join(parts[:depth])
        for candidate in (f"{stem}/__init__.py", f"{stem}.py"):
            if candidate in available:
                files.append(candidate)
                break
    return files


def _conftests(path: str, available: dict[str, FileEntry]) -> list[str]:
    parents = PurePosixPath(path).parents
    return [
        f"{parent}/conftest.py" if str(parent) != "." else "conftest.py"
        for parent in parents
        if (f"{parent}/conftest.py" if str(parent) != "." else "conftest.py") in available
    ]


@rule
async def pytest_inputs(test: PytestFile, project: ProjectFiles) -> PytestInputs:
    available = project.by_path()
    needed = {test.path, *_conftests(test.path, available)}
    frontier = sorted(needed)
    while frontier:
        parsed = await MultiGet(
            Get(Imports, SourceFile(path, available[path].file_digest)) for path in frontier
        )
        found = {
            file
            for imports in parsed
            for module in imports.modules
            for file in _module_files(module, available)
        }
        frontier = sorted(found - needed)
        needed |= found
    config = [name for name in CONFIG_FILES if name in available]
    entries: list[FileEntry | FileContent] = [available[p] for p in sorted(needed | set(config))]
    if not config:
        # Without a config file of its own, pytest would look above the sandbox for one.
        entries.append(FileContent("pytest.ini", b"[pytest]\n"))
    digest = await Get(Digest, CreateDigest(entries))
    return PytestInputs(tuple(sorted(needed)), digest)


@rule
async def run_pytest(test: PytestFile, settings: PytestSettings) -> PytestResult:
    inputs = await Get(PytestInputs, PytestFile, test)
    result = await Get(
        FallibleProcessResult,
        Process(
            argv=(
                settings.python,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={REPORT_FILE}",
                test.path,
            ),
            description=f"pytest {test.path}",
            input_digest=inputs.digest,
            env=TEST_ENV,
            output_files=(REPORT_FILE,),
            timeout_seconds=settings.timeout_seconds,
        ),
    )
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    report = await Get(DigestContents, Digest, result.output_digest)
    if report:
        suite = ElementTree.fromstring(report[0].content)
        suites = [suite] if suite.tag == "testsuite" else list(suite.iter("testsuite"))
        for element in suites:
            for key in counts:
                counts[key] += int(element.get(key, "0"))
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    return PytestResult(
        path=test.path,
        exit_code=result.exit_code,
        passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        failed=counts["failures"],
        errors=counts["errors"] if report else int(result.exit_code not in (0, 5)),
        skipped=counts["skipped"],
        duration_seconds=result.metadata.duration_seconds,
        source=result.metadata.source,
        inputs=inputs.files,
        output="\n".join(output.splitlines()[-30:]),
    )


@rule
async def run_project_tests(project: PythonProject, settings: PytestSettings) -> PytestReport:
    tests = await Get(
        Snapshot,
        PathGlobs([f"{project.root}/**/test_*.py", f"{project.root}/**/*_test.py"]),
    )
    prefix = f"{project.root}/"
    paths = [path.removeprefix(prefix) for path in tests.files]
    results = await MultiGet(Get(PytestResult, PytestFile(path)) for path in paths)
    return PytestReport(results)


def rules() -> list[object]:
    return [*collect_rules(), QueryRule(PytestReport, (PythonProject, PytestSettings))]


# ----------------------------------------------------------------------------------------------
# The goal


@dataclass(frozen=True)
class PytestArgs:
    """The command-line arguments of `test`.

    Attributes:
        project: the project to test (inside the workspace root).
        python: the interpreter that runs pytest (pytest must be installed there).
        timeout: seconds one test file may run.
        verbose: list the files each test's sandbox held.
    """

    project: Path = HERE / "project"
    python: str = sys.executable
    timeout: float = 300.0
    verbose: bool = False


@goal
async def test(ctx: GoalContext, args: PytestArgs) -> int:
    """Run a Python project's tests, one sandboxed, cached pytest Process per test file."""
    root = ctx.workspace_path(args.project)
    if not (ctx.root / root).is_dir():
        raise GoalArgumentError(f"the project directory {args.project} does not exist")
    report: PytestReport = await ctx.session.get(
        PytestReport, PythonProject(root), PytestSettings(args.python, args.timeout)
    )
    if not report.results:
        ctx.print(f"no test files (test_*.py, *_test.py) under {args.project}")
        return 0
    for result in report.results:
        status = "PASS" if result.ok else "FAIL"
        cached = "" if result.source == "ran" else f", {result.source.replace('_', ' ')}"
        ctx.print(
            f"{status}  {result.path}: {result.passed} passed"
            + (f", {result.failed} failed" if result.failed else "")
            + (f", {result.errors} errors" if result.errors else "")
            + (f", {result.skipped} skipped" if result.skipped else "")
            + f" ({result.duration_seconds:.2f}s{cached})"
        )
        if args.verbose:
            ctx.print(f"      sandbox: {', '.join(result.inputs)}")
        if not result.ok:
            ctx.print("\n".join(f"      | {line}" for line in result.output.splitlines()))
    failed = [r for r in report.results if not r.ok]
    ran = sum(r.source == "ran" for r in report.results)
    ctx.print(
        f"{len(report.results) - len(failed)} of {len(report.results)} test files passed; "
        f"{ran} ran, {len(report.results) - ran} served from cache"
    )
    return 1 if failed else 0
