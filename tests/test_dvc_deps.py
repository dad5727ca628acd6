"""dvc.yaml's code deps are exactly the files each stage runs (followed from its imports), so
editing any of them reruns that stage and only the stages that run it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from controlnet_recipe.core import codedeps

from .conftest import ROOT, dvc, imports_dir


def test_dvc_yaml_lists_exactly_the_code_each_stage_runs():
    assert codedeps.drift(ROOT / "dvc.yaml") == {}, (
        "run `python -m controlnet_recipe.core.codedeps` to rewrite dvc.yaml's code deps"
    )


def test_the_dag_stays_fine():
    deps = {s: set(codedeps.code_deps(s)) for s in ("data", "conditions", "captions", "train")}
    captioning = codedeps.CODE_PREFIX + "models/captioner.py"
    assert captioning in deps["captions"] and not ({captioning} & (deps["data"] | deps["conditions"]))
    training = codedeps.CODE_PREFIX + "training/memory.py"
    assert training in deps["train"] and training not in deps["data"]
    # the registry's members, and so the shard-resume digest, which hashes these same files
    kind = codedeps.PACKAGE_DIR / "conditions" / "face_segmentation.py"
    assert kind in codedeps.stage_files("conditions") and kind not in codedeps.stage_files("captions")
    # the kinds of control: the stages that check, train or sample them, never the base or the data
    control = codedeps.PACKAGE_DIR / "adapters" / "t2i_adapter.py"
    assert all(control in codedeps.stage_files(s) for s in ("cache", "train", "evaluate"))
    assert not any(control in codedeps.stage_files(s) for s in ("data", "conditions", "base", "evaluator"))


def _package(tmp_path: Path, stage_source: str) -> tuple[Path, Path]:
    """A throwaway package `pkg` with one stage `s`, and a dvc.yaml written from its code."""
    root = tmp_path / "src" / "controlnet_recipe"
    files = {
        "__init__.py": "",
        "__main__.py": "from .cli import main\n",
        "cli.py": "import importlib\nfrom .config import load\n",
        "config.py": "",
        "helper.py": "",
        "lazy.py": "",
        "unused.py": "",
        "throwaway.py": "",
        "stages/__init__.py": "",
        "stages/s.py": stage_source,
        "templates/page.html": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    dvc = tmp_path / "dvc.yaml"
    dvc.write_text(
        "stages:\n  s:\n    cmd: python -m controlnet_recipe s\n    deps:\n      - data/in\n    outs:\n      - data/out\n"
    )
    codedeps.write_dvc_yaml(dvc, root)
    return root, dvc


STAGE = """
from ..helper import x

def run():
    from .. import lazy  # a lazy import counts too
    return open("templates/page.html")
"""


def test_deps_follow_imports_and_fail_when_an_import_has_no_dep(tmp_path: Path):
    root, dvc = _package(tmp_path, STAGE)
    listed = [d.split("controlnet_recipe/")[1] for d in codedeps.code_deps("s", root)]
    assert listed == [
        "__init__.py", "__main__.py", "cli.py", "config.py", "helper.py", "lazy.py",
        "stages/__init__.py", "stages/s.py", "templates",
    ]  # fmt: skip
    assert codedeps.drift(dvc, root) == {}
    assert "- data/in" in dvc.read_text()  # the stage's other deps are kept
    # One import added to the stage, without its dep: the check names the file.
    (root / "stages/s.py").write_text(STAGE + "\ndef later():\n    from ..throwaway import y\n")
    assert codedeps.drift(dvc, root) == {"s": {"missing": [codedeps.CODE_PREFIX + "throwaway.py"], "extra": []}}
    # An import removed: its dep left behind is reported as extra until dvc.yaml is rewritten.
    (root / "stages/s.py").write_text(STAGE.replace("from ..helper import x\n", ""))
    assert codedeps.drift(dvc, root) == {"s": {"missing": [], "extra": [codedeps.CODE_PREFIX + "helper.py"]}}
    codedeps.write_dvc_yaml(dvc, root)
    assert codedeps.drift(dvc, root) == {}


def _imported_beyond_deps(project: Path) -> dict[str, list[str]]:
    """Per stage that ran in ``project``, the package files its processes imported (recorded by the
    stages themselves, not read by codedeps) that its dvc.yaml deps do not list."""
    import yaml

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    recorded = sorted(imports_dir(project).glob("*.txt"))
    assert recorded, "no stage recorded its imports"
    out = {}
    for f in recorded:
        deps = set(stages[f.stem]["deps"])
        ran = {codedeps.CODE_PREFIX + line for line in f.read_text().split()}
        if ran - deps:
            out[f.stem] = sorted(ran - deps)
    return out


@pytest.mark.slow
def test_every_module_a_stage_imports_is_its_dep(project: Path):
    assert {f.stem for f in imports_dir(project).glob("*.txt")} >= {"data", "conditions", "base", "train", "evaluate"}
    assert _imported_beyond_deps(project) == {}


@pytest.mark.slow
def test_every_module_a_family_stage_imports_is_its_dep(sdxl_project: Path, transformer_project: Path):
    assert _imported_beyond_deps(sdxl_project) == {}
    assert _imported_beyond_deps(transformer_project) == {}


@pytest.mark.slow
def test_editing_the_demos_condition_module_reruns_the_stages_that_run_it(own_project: Path):
    kind = own_project / "src/controlnet_recipe/conditions/face_segmentation.py"
    kind.write_text(kind.read_text() + "\n# edited\n")
    status = dvc("status", cwd=own_project)
    for stage in ("conditions", "evaluator", "train", "evaluate"):
        assert f"{stage}:" in status, status
    assert "data:" not in status and "captions:" not in status


def test_a_registry_that_loads_by_name_makes_each_member_a_dep(tmp_path: Path):
    root, _ = _package(tmp_path, "from ..kinds import load\n")
    (root / "kinds").mkdir()
    (root / "kinds/__init__.py").write_text(
        'from importlib import import_module\nKINDS = {"a": "a_kind:A", "b": "b_kind:B"}\nNOTE = "not:a_module"\n\n'
        "def load(name):\n    module, cls = KINDS[name].split(':')\n"
        "    return getattr(import_module('.' + module, __name__), cls)\n"
    )
    for m in ("a_kind", "b_kind", "c_unlisted"):
        (root / f"kinds/{m}.py").write_text("")
    listed = [d.split("controlnet_recipe/")[1] for d in codedeps.code_deps("s", root)]
    assert {"kinds/__init__.py", "kinds/a_kind.py", "kinds/b_kind.py"} <= set(listed)
    assert "kinds/c_unlisted.py" not in listed
