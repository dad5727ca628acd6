"""Imports run only downward: a module imports modules of lower layers (or its own package),
never a higher layer, and no stage imports another stage. The layers are docs/pipeline.md's (Layout)."""

from __future__ import annotations

from controlnet_recipe.core import codedeps

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = [
    ["core", "objectives", "apps"],  # the rooms' empty __init__.py files
    ["core.errors", "core.text", "core.codedeps", "core.logs", "core.buckets"],  # no project imports (but each other)
    ["core.config"],  # the typed params
    ["core.storage", "core.images", "objectives.diffusion", "models.fit"],  # folders, images, noise and loss, one fit loop
    ["objectives.flow_matching"],  # the transformer families' objective (diffusion's Objective and Noised)
    ["faces"],  # landmarks, drawing, the synthetic generator
    ["metrics", "models", "sources", "report"],  # the domain's parts
    ["conditions", "adapters"],  # one module per condition kind (making, map type, fidelity); per kind of control
    ["training"],  # the ControlNet engine
    ["evaluation", "planning"],  # scoring, sampling and the sweep; the GPU-memory planner (runs training's step)
    ["apps.publish", "apps.generate", "apps.doctor", "apps.check"],  # applications
    ["stages", "apps.web"],
    ["cli"],
    ["__main__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """The longest listed prefix of ``module`` ("" for the package itself)."""
    parts = module.split(".") if module else []
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in RANK), "")


def _rank(module: str) -> int:
    unit = _unit(module)
    assert unit or module == "", f"{module}: not in a layer; add it to LAYERS and docs/pipeline.md (Layout)"
    return RANK.get(unit, -1)


def _edges() -> list[tuple[str, str]]:
    root = codedeps.PACKAGE_DIR
    out = []
    for f in sorted(root.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        src = codedeps._name(root, f)
        for dst in codedeps._imports(root, root.name, f)[0]:
            if dst and codedeps._module_file(root, dst) is not None:
                out.append((src, dst))
    return out


def test_every_module_has_a_layer():
    for src, dst in _edges():
        _rank(src), _rank(dst)


def violations(edges: list[tuple[str, str]]) -> list[str]:
    wrong = []
    for src, dst in edges:
        same_package = _unit(src) == _unit(dst)
        if src.startswith("stages.") and dst.startswith("stages.") and dst != "stages":
            wrong.append(f"{src} -> {dst} (a stage imports another stage)")
        elif not same_package and _rank(dst) >= _rank(src) and src != "":
            wrong.append(f"{src} -> {dst}")
    return wrong


def test_imports_run_only_downward():
    assert not (wrong := violations(_edges())), "upward or sideways imports:\n" + "\n".join(wrong)


def test_the_check_catches_what_this_project_had():
    """The imports issue 11 found: training and evaluation importing each other, a stage
    importing another stage, storage (shared plumbing) importing the domain."""
    had = [
        ("training.validation", "evaluation.scorer"),
        ("stages.train", "stages.cache"),
        ("core.storage", "models.tiny"),
        ("metrics.clip", "metrics.landmarks"),  # within one package: allowed
    ]
    assert violations(had) == [
        "training.validation -> evaluation.scorer",
        "stages.train -> stages.cache (a stage imports another stage)",
        "core.storage -> models.tiny",
    ]
