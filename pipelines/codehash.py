"""Code fingerprints: the uniloom modules a piece of code runs, found by reading sources.

`Sources.closure` follows the import statements of uniloom modules with `ast` (at module
level and inside functions: most imports here are deferred), transitively; nothing is
imported. A module brings the package `__init__`s above it and the package files it opens
by constant name (`resources.files("uniloom.pipelines") / "assets" / "photos.yaml"`).
`Sources.function` fingerprints what one function runs (a workflow stage's `run`): its
module without the top-level functions it does not reach, and the closure of what that
part imports, so each stage of pipelines/workflow_stages.py has a fingerprint of its own.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

PACKAGES = ("uniloom.pipelines", "uniloom.models", "uniloom.kernels")


def package_roots() -> dict[str, Path]:
    """The folder of each uniloom package (found without running its code)."""
    roots = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name} not found")
        roots[name] = Path(next(iter(spec.submodule_search_locations)))
    return roots


def _statements(nodes: Iterable[ast.AST]):
    """The statements under `nodes`, at any depth (imports are statements: no need to
    visit expressions)."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler)))


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


class Sources:
    """uniloom module name -> source file under `roots` (default: the installed packages)."""

    def __init__(self, roots: dict[str, Path] | None = None):
        self.roots = roots or package_roots()
        self._paths: dict[str, Path | None] = {}
        self._module: dict[str, tuple[set[str], set[Path]]] = {}  # its imports, its files

    def path(self, module: str) -> Path | None:
        if module not in self._paths:
            self._paths[module] = None
            for package, root in self.roots.items():
                if module == package or module.startswith(package + "."):
                    base = root.joinpath(*module[len(package) + 1 :].split("."))
                    found = [c for c in (base.with_suffix(".py"), base / "__init__.py") if c.is_file()]
                    self._paths[module] = found[0] if found else None
        return self._paths[module]

    def _scan(self, module: str) -> tuple[set[str], set[Path]]:
        if module not in self._module:
            path = self.path(module)
            text = path.read_text()
            tree = ast.parse(text, str(path))
            files = self.files([tree]) if "files(" in text else set()
            self._module[module] = (self.imports([tree], self._package(module)), files)
        return self._module[module]

    def imports(self, nodes: Iterable[ast.AST], package: str | None) -> set[str]:
        """uniloom modules named by the import statements under `nodes`; `package`
        resolves relative imports (None: code outside the packages)."""
        found = set()
        for node in _statements(nodes):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    if package is None:
                        continue
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
            else:
                continue
            found.update(n for n in names if self.path(n) is not None)
        return found

    def files(self, nodes: Iterable[ast.AST]) -> set[Path]:
        """Package files named as `resources.files("<package>") / "<constant>" / ...`."""
        found = set()
        for node in (n for top in nodes for n in ast.walk(top)):
            parts: list[str] = []
            while (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Div)
                and isinstance(node.right, ast.Constant)
                and isinstance(node.right.value, str)
            ):
                parts.insert(0, node.right.value)
                node = node.left
            if (
                parts
                and isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "files"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and (init := self.path(str(node.args[0].value))) is not None
                and (path := init.parent.joinpath(*parts)).is_file()
            ):
                found.add(path)
        return found

    def _package(self, module: str) -> str:
        return module if self.path(module).name == "__init__.py" else module.rpartition(".")[0]

    def closure(self, modules: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
        """`modules`, the uniloom modules they import, transitively, and the packages
        above them; modules in `exclude` are left out and not followed."""
        skip, seen, todo = set(exclude), set(), list(modules)
        while todo:
            module = todo.pop()
            if module in seen or module in skip:
                continue
            if self.path(module) is None:
                raise ValueError(f"{module}: not a uniloom module")
            seen.add(module)
            todo.extend(self._scan(module)[0])
            todo.extend(_parents(module))
        return sorted(seen)

    def digest(self, modules: Iterable[str], own: Iterable[str] = (), files: Iterable[Path] = ()) -> str:
        """Hash of the modules' sources, the package files they open, `own` text and `files`."""
        h = hashlib.sha256()
        files = set(files)
        for text in own:
            h.update(text.encode() + b"\0")
        for module in sorted(modules):
            path = self.path(module)
            h.update(f"{module}\0".encode() + path.read_bytes() + b"\0")
            files |= self._scan(module)[1]
        for path in sorted(files):
            h.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
        return h.hexdigest()[:16]

    def function(self, fn: Callable, exclude: Iterable[str] = ()) -> tuple[str, list[str]]:
        """(fingerprint, modules) of the code `fn` runs: the top-level statements of its
        module that `fn` reaches by name (functions, classes, constants, imports; statements
        that bind no name always count, a bare docstring never), and the closure of what
        they import (its own module aside). A function that is not top-level, or outside
        the packages (a test's), takes its whole file."""
        module = fn.__module__
        inside = self.path(module)
        path = inside or Path(inspect.getsourcefile(fn))
        text = path.read_text()
        tree = ast.parse(text, str(path))
        kept: list[ast.stmt] = tree.body
        binders: dict[str, list[ast.stmt]] = {}
        for node in tree.body:
            for name in _binds(node):
                binders.setdefault(name, []).append(node)
        own_def = [n for n in binders.get(fn.__qualname__, []) if isinstance(n, ast.FunctionDef)]
        if inside and own_def:
            always = [n for n in tree.body if not _binds(n) and not _constant(n)]
            reached, todo = set(), [*own_def, *always]
            while todo:
                node = todo.pop()
                if node not in reached:
                    reached.add(node)
                    todo.extend(
                        b for n in ast.walk(node) if isinstance(n, ast.Name) for b in binders.get(n.id, [])
                    )
            kept = [n for n in tree.body if n in reached]
        entries = self.imports(kept, self._package(module) if inside else None)
        if inside:
            entries.update(_parents(module))
        modules = self.closure(entries, {module, *exclude})
        lines = text.splitlines(keepends=True)
        own = [module]
        for node in kept:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            own.append("".join(lines[first - 1 : node.end_lineno]))
        return self.digest(modules, own, self.files(kept) if "files(" in text else ()), modules


def _binds(node: ast.stmt) -> set[str]:
    """Names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _constant(node: ast.stmt) -> bool:
    """A bare constant (a docstring): it runs nothing."""
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
