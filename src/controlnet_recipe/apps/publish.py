"""Publish the ControlNet the evaluate stage chose (``models/best``; the last training step in
``models/adapter`` if evaluate has not run) to the Hugging Face Hub: its weights and config, a
model card (base model, dataset, params, metrics, the chosen step) and the sample grids and curves.
Never checkpoints, optimizer state or tokens: only the files listed by :func:`stage_files` are uploaded."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from ..adapters import ADAPTER_FILE, adapter_of, holds_model
from ..conditions import condition
from ..core.config import Config
from ..core.errors import BadInput, MissingInput
from ..core.storage import ADAPTER_DIR, BEST_DIR, EVAL_DIR, TRAIN_DIR
from ..models.base_model import BaseRef
from ..models.families import family

RUN_FILES = ("training.json", "chosen.json", ADAPTER_FILE)  # beside the kind's own files (Adapter.files)
IMAGES = {
    "validation.png": TRAIN_DIR / "validation.png",
    "evaluation_grid.png": EVAL_DIR / "grid.png",
    "evaluation_sweep.png": EVAL_DIR / "sweep.png",
    "forgetting_probes.png": EVAL_DIR / "probes.png",
}


def model_dir() -> Path:
    """The evaluated choice if there is one, else the last training step."""
    return BEST_DIR if holds_model(BEST_DIR) else ADAPTER_DIR


def model_card(cfg: Config, base: BaseRef, metrics: dict) -> str:
    r, fam, kind = cfg.recipe, family(base.family), adapter_of(model_dir())
    front = {
        "library_name": "diffusers",
        "base_model": base.name_or_path,
        "tags": [kind.name.replace("_", "-"), fam.hub_tag, "diffusers", "controlnet-recipe", r.conditions.kind],
        "pipeline_tag": "text-to-image",
    }
    made = ", ".join(f"{k} `{v}`" for k, v in condition(r.conditions).report().items() if v is not None)
    images = "\n".join(f"![{name}](./{name})" for name, src in IMAGES.items() if src.is_file())
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {kind.title} ({r.conditions.kind}) for {base.name_or_path}

A {fam.title} {kind.title}, trained with controlnet-recipe (recipe `{cfg.recipe_name}`).
Condition: {made}; captions: `{r.captions.captioner}`.

```python
{kind.card_lines(fam, base.name_or_path, r.evaluate.hub_model_id)}
image = pipe("a prompt", {fam.control_argument}=condition_image).images[0]
```

## Data
```yaml
{yaml.safe_dump(r.data.model_dump(), sort_keys=False).strip()}
```

## Training parameters
```yaml
{yaml.safe_dump({"adapter": r.adapter.model_dump(), **r.train.model_dump()}, sort_keys=False).strip()}
```

## Metrics
```json
{json.dumps(metrics, indent=2)}
```

{images}
"""


def stage_files(cfg: Config, folder: Path) -> list[str]:
    """Copy what is published into ``folder``; return the file names."""
    src_dir = model_dir()
    files = adapter_of(src_dir).files
    missing = [f for f in files if not (src_dir / f).is_file()]
    if missing:
        raise MissingInput(f"{src_dir}: {', '.join(missing)} missing; run the train stage first")
    for f in (*files, *RUN_FILES):
        if (src_dir / f).is_file():
            shutil.copy(src_dir / f, folder / f)
    for name, src in IMAGES.items():
        if src.is_file():
            shutil.copy(src, folder / name)
    metrics = {}
    for key, src in (("training", src_dir / "training.json"), ("evaluation", EVAL_DIR / "metrics.json")):
        if src.is_file():
            metrics[key] = json.loads(src.read_text())
    (folder / "README.md").write_text(model_card(cfg, BaseRef.read(), metrics))
    return sorted(p.name for p in folder.iterdir())


def push_to_hub(cfg: Config, api=None) -> list[str]:
    """Upload to ``evaluate.hub_model_id`` (created if absent); the token comes from the environment
    or ``huggingface-cli login``, never from params. Returns the uploaded file names."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo = cfg.recipe.evaluate.hub_model_id
    if not repo:
        raise BadInput("evaluate.hub_model_id: expected a repo id (user/name) to push to")
    with tempfile.TemporaryDirectory() as tmp:
        files = stage_files(cfg, Path(tmp))
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=tmp, commit_message="Upload ControlNet (controlnet-recipe)")
    print(f"publish: {', '.join(files)} -> https://huggingface.co/{repo}")
    return files


def main(cfg: Config) -> None:
    push_to_hub(cfg)
