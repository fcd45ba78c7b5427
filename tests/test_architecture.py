"""The package map of docs/architecture.md against the real code: packages in one order, every module in the map,
no import against the order and no import cycle (imports inside functions and registry strings included), lazy
imports only with their reason, no private names across modules, no module-level caches, one public name one
meaning, no module above 450 lines, the report's entry point without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "helpers"
MAP = REPO / "docs" / "architecture.md"
MAX_LINES = 450
ENTRY_POINTS = {"main"}  # every command-line module has one
REGISTRY_STRING = re.compile(r"^helpers\.([\w.]+):\w+$")  # "helpers.flower.app:run_flower": a lazy import


def modules() -> dict[str, ast.Module]:
    """{dotted name under helpers: parsed module}, package __init__ files left out (they hold a docstring)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


KNOWN = set(modules())  # parsed once for the whole file


def table(header: str) -> list[list[str]]:
    """The rows of the table of docs/architecture.md that starts with `header`, as lists of cells."""
    text = MAP.read_text()
    block = text[text.index(header) :].split("\n\n")[0].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block]


def package_order() -> list[str]:
    """Packages from the lowest to the highest: each may import its own modules and those of lower packages."""
    return [row[0].strip("`") for row in table("| package | owns |")]


def module_map() -> dict[str, str]:
    """{module: what it owns} from the module table."""
    rows = {row[0].strip("`"): row[1] for row in table("| module | owns |")}
    assert rows, "no rows in the module table of docs/architecture.md"
    return rows


def package_of(module: str) -> str | None:
    """A module's package (None: a top-level module of helpers, i.e. `__main__` or an entry point)."""
    return module.split(".")[0] if "." in module else None


def helpers_imports(tree: ast.Module) -> list[tuple[str, list[str], int, bool]]:
    """(imported module, names taken from it, line, inside a function) for every import of a helpers module, and
    for every registry string "helpers.x.y:name" (an import by name when the registry is read: names ["<registry>"])."""
    known = KNOWN
    lazy_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                  for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        inner = getattr(node, "lineno", None) in lazy_lines
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "helpers":
            base = node.module.removeprefix("helpers").lstrip(".")
            for alias in node.names:  # from helpers.core import caches: the module core.caches
                sub = f"{base}.{alias.name}" if base else alias.name
                if sub in known:
                    found.append((sub, [], node.lineno, inner))
                elif base in known:
                    found.append((base, [alias.name], node.lineno, inner))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("helpers."):
                    found.append((alias.name.removeprefix("helpers."), [], node.lineno, inner))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTRY_STRING.match(node.value):
            found.append((REGISTRY_STRING.match(node.value).group(1), ["<registry>"], node.lineno, False))
    return found


def test_every_module_is_in_the_map_and_every_row_is_a_module():
    rows, real = module_map(), set(modules())
    missing = sorted(real - set(rows))
    assert not missing, f"helpers modules missing from the module table of docs/architecture.md: {missing}"
    assert not sorted(set(rows) - real), f"rows for modules that do not exist: {sorted(set(rows) - real)}"
    order = package_order()
    unknown = sorted({package_of(m) for m in real} - set(order) - {None})
    assert not unknown, f"packages missing from the package table of docs/architecture.md: {unknown}"
    assert [p.name for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").is_file()] == sorted(order)


def test_each_package_says_what_it_owns_and_may_import():
    for package in package_order():
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
        assert "Imports:" in doc, f"helpers/{package}/__init__.py: a docstring saying what it owns and may import"


def test_the_top_of_helpers_holds_only_the_command_line_entry_points():
    """`python -m helpers` and `python -m helpers.X` (X: cost, report, bench, gpucheck, credentials) stay commands:
    each is a few lines that call a package's `main`."""
    for name in (m for m in modules() if package_of(m) is None):
        text = (PACKAGE / f"{name}.py").read_text()
        assert len(text.splitlines()) <= 10 and "def main" not in text and "import main" in text, name
    assert len([m for m in modules() if package_of(m) is None]) <= 6


def test_no_module_imports_a_higher_package():
    order, wrong = package_order(), []
    for name, tree in modules().items():
        own = package_of(name)
        for target, _, line, _ in helpers_imports(tree):
            if own is not None and order.index(package_of(target)) > order.index(own):
                wrong.append(f"helpers/{name.replace('.', '/')}.py:{line} ({own}) imports {target}")
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = {name: {t for t, _, _, _ in helpers_imports(tree) if t != name} for name, tree in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]) if nxt in path else f"{node}->{nxt}")
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_lazy_imports_say_why():
    """An import inside a function keeps a heavy or optional dependency lazy (Flower, LaTeX): its line says so."""
    wrong = []
    for name, tree in modules().items():
        lines = (PACKAGE / f"{name.replace('.', '/')}.py").read_text().splitlines()
        for target, _, line, inner in helpers_imports(tree):
            if inner and "# lazy:" not in lines[line - 1]:
                wrong.append(f"helpers/{name.replace('.', '/')}.py:{line} imports {target} inside a function")
    assert not wrong, "imports inside functions without a '# lazy: <why>' comment:\n" + "\n".join(wrong)


def test_no_private_names_imported_across_modules():
    found = {
        (target, imported)
        for name, tree in modules().items()
        for target, names, _, _ in helpers_imports(tree)
        for imported in names
        if imported.startswith("_") and target != name
    }
    assert not found, f"private (module, name) imported from another module: {sorted(found)}"


def module_level_caches(tree: ast.Module) -> list[str]:
    """Names of functools caches and of module-level containers created empty (only ever filled at run time)."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                if ast.unparse(target).split(".")[-1] in ("cache", "lru_cache", "cached_property"):
                    found.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = ast.unparse(node.value)
            if value in ("{}", "[]", "dict()", "set()", "list()") or re.fullmatch(
                r"(\w+\.)?(OrderedDict|defaultdict)\(.*\)", value
            ):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [t.id for t in targets if isinstance(t, ast.Name)]
    return found


def test_no_module_keeps_its_own_cache():
    found = sorted(f"{m}: {c}" for m, tree in modules().items() for c in module_level_caches(tree))
    assert not found, f"module-level caches (put them in helpers.core.caches): {found}"


def test_the_cache_check_sees_what_it_must():
    tree = ast.parse("import functools\n@functools.lru_cache(maxsize=2)\ndef f(): pass\n_M: dict = {}\nX = (1, 2)\n")
    assert module_level_caches(tree) == ["f", "_M"]


def public_definitions() -> dict[str, list[str]]:
    defined = defaultdict(list)
    for name, tree in modules().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            else:
                continue
            defined.update({t: defined[t] + [name] for t in targets if not t.startswith("_")})
    return defined


def test_one_public_name_has_one_meaning():
    twice = {n: m for n, m in public_definitions().items() if len(m) > 1 and n not in ENTRY_POINTS}
    assert not twice, f"public names defined in several modules (rename one, or import it from its home): {twice}"


def test_no_module_is_longer_than_450_lines():
    long = {m: n for m in modules() if (n := len((PACKAGE / f"{m.replace('.', '/')}.py").read_text().splitlines()))
            > MAX_LINES}  # fmt: skip
    assert not long, f"modules above {MAX_LINES} lines (split them by concern): {long}"


def test_no_code_is_run_from_text():
    found = [m for m, tree in modules().items() for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("exec", "eval")]  # fmt: skip
    assert not found, f"exec/eval in {found}: plans and parameters are functions and literals, never code run as text"


def test_the_reports_entry_point_imports_no_torch_and_no_runner():
    code = (
        "import sys, helpers.reporting.report\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'helpers.training', "
        "'helpers.federated', 'helpers.editing', 'helpers.flower', 'helpers.ops')))\n"
        "print(bad)\nsys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"importing helpers.reporting.report loads {done.stdout.strip()} {done.stderr[-500:]}"


def test_environment_variables_are_read_in_one_place():
    """Every FLME_* variable is read by helpers.core.settings (which documents each); no other module reads one."""
    from helpers.core.settings import SETTINGS

    named, wrong = set(), []
    for name, tree in modules().items():
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        named |= {v for s in strings for v in re.findall(r"\bFLME_[A-Z_]+\b", s)}
        if name == "core.settings":
            continue
        constants = [n for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)]
        aliases = {t.id for n in constants if str(n.value.value).startswith("FLME_") for t in n.targets}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv") and node.args:
                key = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                key = node.slice
            else:
                key = None
            if key is not None and ("FLME_" in ast.unparse(key) or ast.unparse(key) in aliases):
                wrong.append(f"helpers/{name.replace('.', '/')}.py:{node.lineno}: {ast.unparse(node)}")
    assert not wrong, "FLME_* read outside helpers.core.settings:\n" + "\n".join(wrong)
    assert named <= set(SETTINGS), f"undocumented settings: {named - set(SETTINGS)}"
