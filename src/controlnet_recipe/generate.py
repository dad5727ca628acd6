"""Try a trained ControlNet: a face photo (or a ready condition image) and a prompt in, images out.

``python -m controlnet_recipe generate --photo face.jpg --prompt "..."`` draws the condition from
the photo exactly as the conditions stage would (the recipe's detector, dlib when the recipe uses
ground-truth landmarks, since a photo has none; Canny edges for a ``canny`` recipe), brings it to
the recipe's resolution as training does (shorter side resized, centre crop), and generates with
the base model and the ControlNet (``models/best``, the checkpoint the evaluate stage chose, else
``models/controlnet``). :class:`Generator` is the core, shared with the web demo (``web.py``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from .config import Config
from .errors import RecipeError
from .images import images_to_tensor, tensor_to_images
from .storage import BASE_DIR, BEST_DIR, CONTROLNET_DIR, write_json

OUT_DIR = Path("outputs/generate")
DETECT_MAX_SIDE = 1024  # a photo is centre-cropped, then detected at up to this many pixels
BATCH = 4  # images per pipeline call
NO_MODEL = "run `make demo` (the embedded default) or `make train` first"


class GenerateError(RecipeError, RuntimeError):
    """A problem with the inputs or the model; the message is one line."""


@dataclass(frozen=True)
class Settings:
    """How to sample; the defaults of the CLI and the web demo are the recipe's ``evaluate`` block."""

    prompt: str
    negative_prompt: str = ""
    num_images: int = 4
    seed: int = 0  # image i uses seed + i, as the evaluate stage does
    steps: int = 20
    guidance: float = 3.0
    conditioning_scale: float = 1.0

    @classmethod
    def from_recipe(cls, cfg: Config, prompt: str, **kw) -> Settings:
        e = cfg.recipe.evaluate
        defaults = dict(
            seed=e.seed, steps=e.num_inference_steps, guidance=e.guidance_scale, conditioning_scale=e.conditioning_scale
        )
        return cls(prompt=prompt, **{**defaults, **{k: v for k, v in kw.items() if v is not None}})


def default_model() -> Path:
    """The evaluate stage's choice (``models/best``), else the last step of training (``models/controlnet``)."""
    for path in (BEST_DIR, CONTROLNET_DIR):
        if (path / "config.json").is_file():
            return path
    raise GenerateError(f"no trained ControlNet in {BEST_DIR} or {CONTROLNET_DIR}; {NO_MODEL}")


def check_model(model: str | Path | None) -> Path:
    """The ControlNet folder to use (diffusers format), with a one-line error when there is none."""
    if model is None:
        return default_model()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise GenerateError(f"{path}: no ControlNet here (expected a diffusers folder with config.json); {NO_MODEL}")
    return path


def fit(img: Image.Image, resolution: int) -> Image.Image:
    """The image as training sees it: shorter side resized to ``resolution``, centre crop (the same code)."""
    return tensor_to_images(images_to_tensor([img], resolution))[0]


def centre_square(img: Image.Image, max_side: int = DETECT_MAX_SIDE) -> Image.Image:
    """The centre square (what training keeps of an image), scaled down to at most ``max_side``."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((max_side, max_side), Image.BICUBIC) if s > max_side else img


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, or a one-line error naming it."""
    from .images import decode_image

    d = decode_image(path)
    if not d.ok:
        why = {"missing_file": "no such file", "empty_file": "empty file", "not_an_image": "not an image"}.get(d.reason, d.reason)
        raise GenerateError(f"{path}: cannot read the image ({why})")
    return d.image


def detector_name(cfg: Config) -> str:
    """The recipe's landmark detector; dlib where the recipe uses ground truth (a photo has none)."""
    d = cfg.recipe.conditions.detector
    return "dlib" if d == "ground_truth" else d


def condition_from_photo(cfg: Config, photo: Image.Image, name: str = "the photo", detector=None) -> Image.Image:
    """The condition the recipe's conditions stage would draw for ``photo``, at the recipe's resolution."""
    from .faces.draw import draw_segmentation

    c, res = cfg.recipe.conditions, cfg.recipe.data.resolution
    photo = centre_square(photo.convert("RGB"))
    if c.kind == "canny":
        from .conditions.canny import canny

        return fit(canny(photo, c.canny_low, c.canny_high), res)
    if c.kind == "given":
        raise GenerateError("this recipe's conditions come from its data source (conditions.kind: given); pass a condition image")
    if detector is None:
        from .faces.landmarks import get_detector

        detector = get_detector(detector_name(cfg))
    import numpy as np

    try:
        faces = detector.detect(np.asarray(photo))
    except RuntimeError as e:  # detector not installed, SPIGA without CUDA: already one line
        raise GenerateError(str(e)) from None
    if not faces:
        raise GenerateError(f"no face found in {name} (detector: {detector.name})")
    return fit(draw_segmentation(faces, photo.size), res)


def make_condition(
    cfg: Config, photo: Image.Image | None = None, condition: Image.Image | None = None, name: str = "the photo", detector=None
) -> Image.Image:
    """The condition at the recipe's resolution: drawn from ``photo``, or ``condition`` as given."""
    if (photo is None) == (condition is None):
        raise GenerateError("expected a face photo or a condition image (one of them)")
    if condition is not None:
        return fit(condition.convert("RGB"), cfg.recipe.data.resolution)
    return condition_from_photo(cfg, photo, name, detector)


class Generator:
    """The base model and a ControlNet, loaded once: ``condition`` (photo or condition image) and
    :class:`Settings` in, images out. The CLI and the web demo both call :meth:`__call__`."""

    def __init__(self, cfg: Config, model: str | Path | None = None):
        self.cfg = cfg
        self.resolution = cfg.recipe.data.resolution
        self.model = check_model(model)  # before the slow imports

        from diffusers import ControlNetModel

        from .models.base_model import BaseRef, inference_device, load_base, make_pipeline

        try:
            base = load_base(BaseRef.read())
        except FileNotFoundError:
            raise GenerateError(f"no base model in {BASE_DIR}; {NO_MODEL}") from None
        self.device, dtype = inference_device()
        controlnet = ControlNetModel.from_pretrained(self.model, torch_dtype=dtype)
        self.pipe = make_pipeline(base, controlnet, device=self.device, dtype=dtype)
        self._detector = None

    def condition(self, photo: Image.Image | None = None, condition: Image.Image | None = None, name: str = "the photo"):
        """:func:`make_condition` with this generator's recipe (the detector loads once)."""
        if self._detector is None and photo is not None and self.cfg.recipe.conditions.kind == "face_segmentation":
            from .faces.landmarks import get_detector

            self._detector = get_detector(detector_name(self.cfg))
        return make_condition(self.cfg, photo, condition, name, self._detector)

    def __call__(self, condition: Image.Image, s: Settings) -> list[Image.Image]:
        """``s.num_images`` images; image i always uses seed ``s.seed + i``, whatever the batching."""
        from .models.base_model import seeded

        if s.num_images < 1:
            raise GenerateError(f"expected at least one image, got {s.num_images}")
        images = []
        for lo in range(0, s.num_images, BATCH):
            n = min(BATCH, s.num_images - lo)
            images += self.pipe(
                prompt=[s.prompt] * n,
                negative_prompt=[s.negative_prompt] * n if s.negative_prompt else None,
                image=[condition] * n,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                controlnet_conditioning_scale=s.conditioning_scale,
                generator=seeded([s.seed + lo + i for i in range(n)]),
                height=self.resolution,
                width=self.resolution,
            ).images
        return images


def grid_cell(resolution: int) -> int:
    return max(128, min(resolution, 512))


def save_outputs(
    out: Path, condition: Image.Image, images: list[Image.Image], s: Settings, photo: Image.Image | None = None, **info
) -> dict:
    """``image-NN.png``, ``condition.png``, ``grid.png`` (photo, condition, images side by side) and
    ``generation.json`` (the settings) into ``out``; returns what was written."""
    from .report.grid import save_grid

    out.mkdir(parents=True, exist_ok=True)
    files = {"condition": out / "condition.png", "grid": out / "grid.png", "images": []}
    condition.save(files["condition"])
    for i, img in enumerate(images):
        path = out / f"image-{i:02d}.png"
        img.save(path)
        files["images"].append(path)
    row = ([fit(photo, condition.width)] if photo is not None else []) + [condition, *images]
    titles = (["photo"] if photo is not None else []) + ["condition"] + [f"seed {s.seed + i}" for i in range(len(images))]
    save_grid([row], files["grid"], col_titles=titles, cell=grid_cell(condition.width))
    write_json(out / "generation.json", {**asdict(s), **{k: str(v) if isinstance(v, Path) else v for k, v in info.items()}})
    return files


def run(
    cfg: Config,
    settings: Settings,
    photo: str | Path | None = None,
    condition: str | Path | None = None,
    model: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """The CLI's work: read the input, load the model, generate, save. Raises :class:`GenerateError`."""
    if (photo is None) == (condition is None):
        raise GenerateError("expected --photo PATH or --condition PATH (one of them)")
    source = Path(photo or condition)
    img = read_image(source)
    model_dir = check_model(model)  # the one-line errors before anything slow
    cond = make_condition(cfg, photo=img, name=str(source)) if photo else make_condition(cfg, condition=img)
    gen = Generator(cfg, model_dir)
    images = gen(cond, settings)
    out = Path(out) if out else OUT_DIR / time.strftime("%Y%m%d-%H%M%S")
    return save_outputs(
        out,
        cond,
        images,
        settings,
        img if photo else None,
        model=model_dir,
        input=source,
        recipe=cfg.recipe_name,
        device=gen.device,
        resolution=gen.resolution,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="controlnet-recipe generate",
        description="Generate faces from a photo (its landmarks drawn as the recipe's condition) or a condition image.",
        epilog="Also --params, --recipe, --gpu, as for every command. Sampling defaults: the recipe's evaluate block.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--photo", help="a face photo: its landmarks are detected and drawn as the condition")
    src.add_argument("--condition", help="a ready condition image")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=None, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="inference steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--conditioning-scale", type=float, default=None, help="ControlNet conditioning scale")
    p.add_argument("--model", default=None, help=f"a ControlNet folder (default: {BEST_DIR}, else {CONTROLNET_DIR})")
    p.add_argument("--out", default=None, help=f"output folder (default: {OUT_DIR}/<timestamp>)")
    return p


def main(cfg: Config, argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    settings = Settings.from_recipe(
        cfg,
        a.prompt,
        negative_prompt=a.negative_prompt,
        num_images=a.num_images,
        seed=a.seed,
        steps=a.steps,
        guidance=a.guidance,
        conditioning_scale=a.conditioning_scale,
    )
    files = run(cfg, settings, photo=a.photo, condition=a.condition, model=a.model, out=a.out)  # GenerateError: cli prints it
    out = files["grid"].parent
    print(f"generate: {len(files['images'])} images -> {out}/image-*.png, condition: {files['condition']}, grid: {files['grid']}")
    return 0
