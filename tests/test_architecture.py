"""The layout's rules, checked on the source: production never imports the test doubles in ``testing/``, and
module-level imports form no cycle (issue 22; imports inside functions, which keep --help fast, are not edges).
The CLI repeats a few defaults of the jobs so that ``--help``
imports no torch: they must stay equal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "safe_diffusion"

#: A module longer than this says why in its docstring ("Over 500 lines because ..."), as issue 22 asks.
LONG_MODULE = 520


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules `path` imports (top-level statements only, or anywhere), within or outside the package."""
    tree = ast.parse(path.read_text(), str(path))
    module, is_package = _module_name(path), path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, is_package, node))
    return found


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_production_never_imports_testing():
    offenders = []
    for path in _sources():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("testing/"):
            continue
        imported = _imports(path, top_level_only=False)
        if any(m == "safe_diffusion.testing" or m.startswith("safe_diffusion.testing.") for m in imported):
            offenders.append(rel)
    assert not offenders, f"production modules import safe_diffusion.testing: {offenders}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of `graph` meets, as the list of its nodes."""
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_module_level_imports_form_no_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds
    modules = {_module_name(p): p for p in _sources()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, top_level_only=True):
            # "pkg.mod.attr" names the module "pkg.mod" when there is no module "pkg.mod.attr"
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    assert graph["safe_diffusion.jobs.evaluate"] >= {"safe_diffusion.evals.runner", "safe_diffusion.common.devices"}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_cli_defaults_equal_the_jobs():
    from safe_diffusion.cli import eval as eval_cli
    from safe_diffusion.cli import fairness as fairness_cli
    from safe_diffusion.cli import generate as generate_cli
    from safe_diffusion.jobs import evaluate, fairness, generate

    assert generate_cli.MAX_IMAGES == generate.MAX_IMAGES
    assert eval_cli.DEFAULT_JUDGES == evaluate.DEFAULT_JUDGES
    assert fairness_cli.DEFAULT_TEMPLATE == fairness.DEFAULT_TEMPLATE
    assert fairness_cli.DEFAULT_CLIP == fairness.DEFAULT_CLIP


@pytest.mark.parametrize("command", [["generate", "--help"], ["eval", "run", "--help"], ["--help"]])
def test_help_imports_no_torch(command):
    """``safe-diffusion ... --help`` stays fast: the command modules import torch, diffusers and the jobs only
    inside the commands."""
    import subprocess
    import sys

    code = (
        "import sys; from safe_diffusion.cli import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'pandas') if m in sys.modules]\n"
        "print('heavy:' + ','.join(heavy))"
    )
    env = {"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "heavy:", out.stdout.strip().splitlines()[-1]


def test_a_missing_parity_oracle_fails_the_test_instead_of_skipping_it():
    from helpers import oracle

    assert oracle("StableDiffusionPipelineSafe").__name__ == "StableDiffusionPipelineSafe"
    with pytest.raises(pytest.fail.Exception, match=r"parity oracle diffusers\.NoSuchPipeline is missing"):
        oracle("NoSuchPipeline")


def test_long_modules_say_why_in_their_docstring():
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n")
        if lines > LONG_MODULE and "Over 500 lines" not in (ast.get_docstring(ast.parse(source)) or ""):
            unexplained.append(f"{path.relative_to(PACKAGE)} ({lines} lines)")
    assert not unexplained, f"modules over {LONG_MODULE} lines without a reason in their docstring: {unexplained}"


@pytest.mark.parametrize(
    "needle, home",
    [("hashlib", "common/hashing.py"), ("cuda.is_available", "common/devices.py")],
    ids=["sha256", "device resolution"],
)
def test_one_implementation_of_hashing_and_of_device_resolution(needle, home):
    elsewhere = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if needle in path.read_text(encoding="utf-8") and path.relative_to(PACKAGE).as_posix() != home
    ]
    assert not elsewhere, f"{needle} outside {home}: {elsewhere}"
