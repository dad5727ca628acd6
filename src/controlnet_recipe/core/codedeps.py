"""Which of this package's files a stage runs: its module's imports, followed transitively (lazy
imports inside functions too), read with ``ast`` so nothing is imported. A registry that loads its
members by name (``import_module``) names each as a ``"module:Attr"`` string; every such module counts
as imported, since params choose among them at run time. ``dvc.yaml``'s deps are
checked against it (tests/test_dvc_deps.py), and a stage resumes finished shards only for the same
digest of these files (storage.ShardedOutput), so both follow the code, not a hand-kept list."""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ("__main__", "cli")  # `python -m controlnet_recipe <stage>` runs these, then stages.<stage>


def _module_file(root: Path, dotted: str) -> Path | None:
    """The file of ``dotted`` (relative to the package root, "" for the package itself)."""
    base = root.joinpath(*dotted.split(".")) if dotted else root
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _name(root: Path, f: Path) -> str:
    parts = list(f.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, package: str, f: Path) -> tuple[set[str], set[str]]:
    """(package modules that ``f`` imports, relative to the package; its string literals)."""
    tree = ast.parse(f.read_text(), str(f))
    name = _name(root, f)
    here = name.split(".") if name else []
    if f.name != "__init__.py":
        here = here[:-1]  # a module's relative imports start from its package
    found, literals, registry = set(), set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            literals.add(node.value)
        elif isinstance(node, ast.Call):
            fn = node.func
            registry |= (fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")) == "import_module"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == package or a.name.startswith(package + "."):
                    found.add(a.name[len(package) + 1 :])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] if node.level > 1 else list(here)
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == package or node.module.startswith(package + ".")):
                mod = node.module[len(package) + 1 :]
            else:
                continue
            found.add(mod)
            for a in node.names:  # `from . import x`: x may be a submodule
                sub = f"{mod}.{a.name}" if mod else a.name
                if _module_file(root, sub) is not None:
                    found.add(sub)
    if registry:  # "module:Attr" names a member module of the registry's package
        for lit in literals:
            mod, sep, attr = lit.partition(":")
            if sep and mod.isidentifier() and attr.isidentifier():
                sub = ".".join([*here, mod])
                if _module_file(root, sub) is not None:
                    found.add(sub)
    return found, literals


def _data_dirs(root: Path) -> list[Path]:
    """Folders of package data (no Python in them), outermost only: configs/, report/templates/."""
    dirs = [d for d in root.rglob("*") if d.is_dir() and "__pycache__" not in d.parts and not any(d.rglob("*.py"))]
    return [d for d in dirs if not any(p in dirs for p in d.parents)]


def reachable(modules: list[str], root: Path = PACKAGE_DIR, package: str | None = None) -> list[Path]:
    """Every file of the package that importing ``modules`` (relative names) runs or reads: the
    modules, the ``__init__.py`` of each package on the way, and a data folder when a module names
    it in string literals (its relative path or a file under it, or each of its parts)."""
    package = package or root.name
    seen: set[Path] = set()
    literals: set[str] = set()
    todo = list(modules)
    while todo:
        dotted = todo.pop()
        parts = dotted.split(".") if dotted else []
        for i in range(len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            f = _module_file(root, ".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            found, lits = _imports(root, package, f)
            literals |= lits
            todo.extend(found)

    def named(rel: Path) -> bool:
        p = rel.as_posix()
        return set(rel.parts) <= literals or any(lit == p or lit.startswith(p + "/") for lit in literals)

    data = [d for d in _data_dirs(root) if named(d.relative_to(root))]
    return sorted(seen | set(data))


def stage_files(stage: str, root: Path = PACKAGE_DIR) -> list[Path]:
    """The files that ``python -m <package> <stage>`` runs or reads."""
    return reachable([*ENTRY_MODULES, f"stages.{stage}"], root)


@functools.cache
def stage_code_digest(stage: str) -> str:
    """A digest of a stage's files (paths and contents): finished shards are kept only for the
    code that wrote them (DVC reruns a stage whose code changed; it must not resume)."""
    h = hashlib.sha256()
    for f in stage_files(stage):
        for g in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if g.is_file() and "__pycache__" not in g.parts:
                h.update(g.relative_to(PACKAGE_DIR).as_posix().encode())
                h.update(g.read_bytes())
    return h.hexdigest()[:16]


CODE_PREFIX = "src/controlnet_recipe/"


def code_deps(stage: str, root: Path = PACKAGE_DIR) -> list[str]:
    """A stage's code deps as ``dvc.yaml`` lists them (paths from the project root)."""
    return [CODE_PREFIX + f.relative_to(root).as_posix() for f in stage_files(stage, root)]


def drift(path: Path = Path("dvc.yaml"), root: Path = PACKAGE_DIR) -> dict[str, dict[str, list[str]]]:
    """Per stage of ``path``, the code files it runs but does not list (``missing``) and the ones
    it lists but does not run (``extra``); empty when dvc.yaml is in step with the code."""
    import yaml

    out = {}
    for stage, spec in yaml.safe_load(path.read_text())["stages"].items():
        listed = {d for d in spec.get("deps", []) if d.startswith(CODE_PREFIX)}
        runs = set(code_deps(stage, root))
        missing = sorted(runs - listed)
        extra = sorted(listed - runs)
        if missing or extra:
            out[stage] = {"missing": missing, "extra": extra}
    return out


def write_dvc_yaml(path: Path = Path("dvc.yaml"), root: Path = PACKAGE_DIR) -> list[str]:
    """Rewrite each stage's code deps in ``path`` (the lines under ``deps:`` that start with
    CODE_PREFIX) from the code, leaving its other deps and comments as they are; the stages changed."""
    import yaml

    stages = yaml.safe_load(path.read_text())["stages"]
    out, changed, stage, in_deps = [], [], None, False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage, in_deps = stripped[:-1], False
        elif stripped == "deps:":
            in_deps = True
            out.append(line)
            indent = line[: len(line) - len(line.lstrip())] + "  "
            new = code_deps(stage, root)
            old = [d for d in stages[stage]["deps"] if d.startswith(CODE_PREFIX)]
            if new != old:
                changed.append(stage)
            out += [f"{indent}- {d}" for d in new]
            continue
        elif in_deps and not stripped.startswith("- "):
            in_deps = False
        if in_deps and stripped.startswith(f"- {CODE_PREFIX}"):
            continue
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return changed


if __name__ == "__main__":
    print("dvc.yaml: code deps rewritten for", ", ".join(write_dvc_yaml()) or "no stage (already in step)")
