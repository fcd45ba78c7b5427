"""The module map of docs/architecture.md against the real code: every helpers module is in it, no module imports a
higher layer or another module's private name, no module keeps its own cache, and one public name has one meaning."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "helpers"
MAP = REPO / "docs" / "architecture.md"

# Known violations not yet fixed (issue 20 goes on): listed so that whoever fixes one deletes its entry; the
# entry of a violation that is gone fails the test (stale).
PENDING_PRIVATE_IMPORTS: set[tuple[str, str]] = set()  # (home module, name)
PENDING_CACHES: set[str] = set()  # module-level cache names
PENDING_NAMES: dict[str, str] = {}  # name -> its meanings
ENTRY_POINTS = {"main"}  # every command-line module has one


def modules() -> dict[str, ast.Module]:
    """{dotted module name under helpers: its tree} (package __init__ files aside)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "__init__.py":
            found[".".join(path.relative_to(PACKAGE).with_suffix("").parts)] = ast.parse(path.read_text(), str(path))
    return found


KNOWN = set(modules())


def module_map() -> dict[str, int]:
    """{module: layer} from the table of docs/architecture.md whose header is `| module | layer | owns |`."""
    text = MAP.read_text()
    table = text[text.index("| module | layer | owns |") :].split("\n\n")[0]
    rows = re.findall(r"^\| `([\w.]+)` \| (\d+) \|", table, flags=re.M)
    assert rows, "no rows in the module table of docs/architecture.md"
    layers = {}
    for name, layer in rows:
        assert name not in layers, f"{name} has two rows in docs/architecture.md"
        layers[name] = int(layer)
    return layers


def helpers_imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(imported helpers module, names taken from it, line) for every import, those inside functions included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "helpers":
            names = [a.name for a in node.names]
            base = node.module.removeprefix("helpers").lstrip(".")
            if f"{base}.{names[0]}" in KNOWN:  # from helpers.core import caches
                found += [(f"{base}.{name}", [], node.lineno) for name in names]
            else:
                found.append((base, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [
                (a.name.removeprefix("helpers."), [], node.lineno) for a in node.names if a.name.startswith("helpers.")
            ]
    return found


def test_every_module_is_in_the_map_and_every_row_is_a_module():
    layers, real = module_map(), set(modules())
    missing = sorted(real - set(layers))
    assert not missing, f"helpers modules missing from the module table of docs/architecture.md: {missing}"
    assert not sorted(set(layers) - real), f"rows for modules that do not exist: {sorted(set(layers) - real)}"


def test_no_module_imports_a_higher_layer():
    layers, wrong = module_map(), []
    for name, tree in modules().items():
        for target, _, line in helpers_imports(tree):
            if target in layers and name in layers and layers[target] > layers[name]:
                wrong.append(
                    f"helpers/{name}.py:{line} (layer {layers[name]}) imports {target} (layer {layers[target]})"
                )
    assert not wrong, "imports of a higher layer:\n" + "\n".join(wrong)


def test_no_private_names_imported_across_modules():
    found = {
        (target, imported)
        for name, tree in modules().items()
        for target, names, _ in helpers_imports(tree)
        for imported in names
        if imported.startswith("_") and target != name
    }
    assert not sorted(found - PENDING_PRIVATE_IMPORTS), f"private (module, name) imported from another module: {found}"
    assert not sorted(PENDING_PRIVATE_IMPORTS - found), "fixed: remove from PENDING_PRIVATE_IMPORTS"


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
    found = {(name, cache) for name, tree in modules().items() for cache in module_level_caches(tree)}
    wrong = sorted(f"helpers/{m}.py: {c}" for m, c in found if c not in PENDING_CACHES)
    assert not wrong, f"module-level caches (put them in helpers.caches): {wrong}"
    assert PENDING_CACHES <= {c for _, c in found}, "fixed: remove from PENDING_CACHES"


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
    new = {n: m for n, m in twice.items() if n not in PENDING_NAMES}
    assert not new, f"public names defined in several modules (rename one, or import it from its home): {new}"
    assert not sorted(set(PENDING_NAMES) - set(twice)), "fixed: remove from PENDING_NAMES"
