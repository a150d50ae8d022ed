"""A stage's code version: the hash of every source file its package imports within tasks/ and models/.

Editing any module a stage's output depends on, directly or through other modules, must give the
stage a new cache key; a hand-kept list of modules falls behind its imports (it did: `evaluate`
missed three). So the closure is read from the source itself: every `import` statement anywhere
in a module (also inside functions), followed through the project's own packages. Importing a
module also runs its packages' `__init__.py`, so those count too.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

from tasks.hashing import hash_value, sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent
# The project's packages whose files are part of code versions; everything else (torch,
# pyarrow, ...) is a dependency, pinned by constraints.txt rather than hashed.
PROJECT_PACKAGES = ("tasks", "models")
# Not followed: a config module affects a stage's output only through the values of the stage's
# section, and those are in the cache key already (its digest covers every field, defaults
# included). Following it would tie every stage to models/tokenizer_config.py, whose dataclass
# the config validates, so editing the tokenizer's config would re-ingest the data. The stages
# that build a tokenizer reach that module through models/tokenizer.py.
CONFIG_MODULES = frozenset({"tasks.config"})
# Bump to invalidate every cached stage output at once (e.g. after a change of store layout).
STORE_FORMAT_VERSION = "1"


def module_path(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of a project module (`pkg/__init__.py` for a package); None if absent."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_project(module: str, packages: tuple[str, ...] = PROJECT_PACKAGES) -> bool:
    return module.split(".")[0] in packages


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(module: str, root: Path = REPO_ROOT, packages: tuple[str, ...] = PROJECT_PACKAGES) -> set[str]:
    """Modules of `packages` named by the import statements of `module` (absolute and relative),
    wherever the statement is (module level or inside a function)."""
    path = module_path(module, root)
    if path is None:
        return set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import name` may name a submodule.
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {name for name in found if _is_project(name, packages) and module_path(name, root) is not None}


def import_closure(roots: list[str], root: Path = REPO_ROOT) -> set[str]:
    """Every project module reachable from `roots` through imports, with their parent packages."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        module = pending.pop()
        if module in seen or module in CONFIG_MODULES or module_path(module, root) is None:
            continue
        seen.add(module)
        pending.extend(_parents(module))
        pending.extend(imported_modules(module, root))
    return seen


def package_modules(package: str, root: Path = REPO_ROOT) -> list[str]:
    """The package and every module in it (all of a stage's own package counts as its code)."""
    path = module_path(package, root)
    if path is None:
        raise ValueError(f"stage package {package!r} not found under {root}")
    if path.name != "__init__.py":
        return [package]
    folder = path.parent
    return sorted(
        ".".join((package, *file.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
        for file in folder.rglob("*.py")
    )


@lru_cache(maxsize=None)
def code_version(package: str, extra_files: tuple[str, ...] = (), root: Path = REPO_ROOT) -> str:
    """Hash of the source of `package`'s import closure within tasks/ and models/, plus extra files."""
    modules = sorted(import_closure(package_modules(package, root), root))
    digests = [STORE_FORMAT_VERSION]
    for module in modules:
        digests.append(f"{module}:{sha256_file(module_path(module, root))}")
    for relative in extra_files:
        path = root / relative
        if not path.is_file():
            raise ValueError(f"stage code file {relative!r} (in extra_files) does not exist under {root}")
        digests.append(f"{relative}:{sha256_file(path)}")
    return hash_value(digests)[:16]
