"""dvc.yaml's code deps are exactly the files each stage runs (followed from its imports), so
editing any of them reruns that stage and only the stages that run it."""

from __future__ import annotations

import textwrap
from pathlib import Path

from controlnet_recipe import codedeps

from .conftest import ROOT


def test_dvc_yaml_lists_exactly_the_code_each_stage_runs():
    assert codedeps.drift(ROOT / "dvc.yaml") == {}, "run `python -m controlnet_recipe.codedeps` to rewrite dvc.yaml's code deps"


def test_the_dag_stays_fine():
    deps = {s: set(codedeps.code_deps(s)) for s in ("data", "conditions", "captions", "train")}
    captioning = codedeps.CODE_PREFIX + "captioning.py"
    assert captioning in deps["captions"] and not ({captioning} & (deps["data"] | deps["conditions"]))
    training = codedeps.CODE_PREFIX + "training/memory.py"
    assert training in deps["train"] and training not in deps["data"]


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
