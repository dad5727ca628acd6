"""Try a trained ControlNet: a photo (or a ready condition image) and a prompt in, images out.

``python -m controlnet_recipe generate --photo face.jpg --prompt "..."`` makes the condition from
the photo exactly as the conditions stage would, by the recipe's condition kind (face landmarks
drawn by the recipe's detector, dlib when the recipe uses ground truth, since a photo has none;
Canny edges; a model's depth or segmentation), brings it to the size training would (the square
at ``data.resolution``; with ``data.buckets`` on, the bucket nearest the input's aspect: resized to
cover it, centre crop, the same code), and generates at that size with the base model and the
ControlNet (``models/best``, the checkpoint the evaluate stage chose, else ``models/adapter``).
:class:`Generator` is the core, shared with the web demo (``web.py``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..adapters import holds_model
from ..core.buckets import Bucket, nearest
from ..core.buckets import name as bucket_name
from ..core.config import Config
from ..core.errors import RecipeError
from ..core.images import images_to_tensor, tensor_to_images
from ..core.storage import ADAPTER_DIR, BASE_DIR, BEST_DIR, write_json

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
    """The evaluate stage's choice (``models/best``), else the last step of training (``models/adapter``)."""
    for path in (BEST_DIR, ADAPTER_DIR):
        if holds_model(path):
            return path
    raise GenerateError(f"no trained model in {BEST_DIR} or {ADAPTER_DIR}; {NO_MODEL}")


def check_model(model: str | Path | None) -> Path:
    """The ControlNet folder to use (diffusers format), with a one-line error when there is none."""
    if model is None:
        return default_model()
    path = Path(model)
    if not holds_model(path):
        raise GenerateError(
            f"{path}: no trained model here (expected what the train stage saves: config.json or a LoRA file); {NO_MODEL}"
        )
    return path


def fit(img: Image.Image, size: int | Bucket) -> Image.Image:
    """The image as training sees it at ``size`` (a square's side, or a bucket's (width, height)):
    resized to cover it, centre crop (the same code)."""
    return tensor_to_images(images_to_tensor([img], size))[0]


def input_size(cfg: Config, size: tuple[int, int], buckets: list[Bucket] | None = None) -> Bucket:
    """The (width, height) an input of ``size`` is brought to, as training would: the square at
    ``data.resolution``, or with buckets (``buckets``: the recipe's, if known) the one nearest its aspect."""
    from ..models.families import recipe_buckets

    buckets = buckets if buckets is not None else recipe_buckets(cfg.recipe)
    res = cfg.recipe.data.resolution
    return nearest(*size, buckets) if buckets else (res, res)


def centre_crop(img: Image.Image, aspect: Bucket = (1, 1), max_side: int = DETECT_MAX_SIDE) -> Image.Image:
    """The largest centre crop of ``aspect``'s shape (what training keeps of an image: the square,
    or a bucket), scaled down to at most ``max_side`` on its longer side."""
    w, h = img.size
    a = aspect[0] / aspect[1]
    cw, ch = min(w, max(1, round(h * a))), min(h, max(1, round(w / a)))
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    s = max_side / max(cw, ch)
    return img.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BICUBIC) if s < 1 else img


def centre_square(img: Image.Image, max_side: int = DETECT_MAX_SIDE) -> Image.Image:
    """The centre square (what training keeps of an image without buckets), scaled down to at most ``max_side``."""
    return centre_crop(img, (1, 1), max_side)


def size_text(size: tuple[int, int], buckets: list[Bucket] | None) -> str:
    """How reports name a generation's size: ``64 px`` (square, buckets off), else ``WxH``."""
    return f"{size[0]} px" if not buckets else bucket_name(size)


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, or a one-line error naming it."""
    from ..core.images import decode_image

    d = decode_image(path)
    if not d.ok:
        why = {"missing_file": "no such file", "empty_file": "empty file", "not_an_image": "not an image"}.get(d.reason, d.reason)
        raise GenerateError(f"{path}: cannot read the image ({why})")
    return d.image


def make_condition(
    cfg: Config,
    photo: Image.Image | None = None,
    condition: Image.Image | None = None,
    name: str = "the photo",
    kind=None,
    buckets: list[Bucket] | None = None,
) -> Image.Image:
    """The condition at the size training would bring the input to (:func:`input_size`): made from
    ``photo`` by the recipe's condition kind (``kind``: one already loaded), as the conditions stage
    makes it, or ``condition`` as given. ``buckets``: the recipe's, if already known."""
    from ..conditions import ConditionError
    from ..conditions import condition as condition_kind

    if (photo is None) == (condition is None):
        raise GenerateError("expected a photo or a condition image (one of them)")
    given = condition if condition is not None else photo
    size = input_size(cfg, given.size, buckets)
    if condition is not None:
        return fit(condition.convert("RGB"), size)
    kind = kind or condition_kind(cfg.recipe.conditions)
    try:
        return fit(kind.from_photo(centre_crop(photo.convert("RGB"), size), name), size)
    except ConditionError as e:
        raise GenerateError(str(e)) from None


class Generator:
    """The base model and a ControlNet, loaded once: ``condition`` (photo or condition image) and
    :class:`Settings` in, images out. The CLI and the web demo both call :meth:`__call__`."""

    def __init__(self, cfg: Config, model: str | Path | None = None):
        from ..models.families import recipe_buckets

        self.cfg = cfg
        self.resolution = cfg.recipe.data.resolution
        self.buckets = recipe_buckets(cfg.recipe)  # None: square at resolution
        self.model = check_model(model)  # before the slow imports

        from ..adapters import adapter_of
        from ..models.base_model import BaseRef, inference_device, load_base, make_pipeline

        try:
            base = load_base(BaseRef.read())
        except FileNotFoundError:
            raise GenerateError(f"no base model in {BASE_DIR}; {NO_MODEL}") from None
        self.device, dtype = inference_device()
        self.adapter = adapter_of(self.model)  # the kind of control the folder holds
        controlnet = self.adapter.load(self.model, torch_dtype=dtype)
        self.base, self.pipe = base, make_pipeline(base, controlnet, self.adapter, device=self.device, dtype=dtype)
        from ..conditions import condition as condition_kind

        self.kind = condition_kind(cfg.recipe.conditions)  # its detector or model loads once, on first use

    def condition(self, photo: Image.Image | None = None, condition: Image.Image | None = None, name: str = "the photo"):
        """:func:`make_condition` with this generator's recipe."""
        return make_condition(self.cfg, photo, condition, name, self.kind, self.buckets)

    def size(self, condition: Image.Image) -> Bucket:
        """The (width, height) to generate at: the square at resolution (buckets off), else the
        condition's own (a bucket's, as :meth:`condition` makes it)."""
        return condition.size if self.buckets else (self.resolution, self.resolution)

    def size_text(self, condition: Image.Image) -> str:
        """:meth:`size` as reports name it: ``64 px``, or ``WxH`` with buckets."""
        return size_text(self.size(condition), self.buckets)

    def __call__(self, condition: Image.Image, s: Settings) -> list[Image.Image]:
        """``s.num_images`` images; image i always uses seed ``s.seed + i``, whatever the batching."""
        from ..models.base_model import sampling_kwargs, seeded

        if s.num_images < 1:
            raise GenerateError(f"expected at least one image, got {s.num_images}")
        if self.buckets and condition.size not in self.buckets:
            condition = self.condition(condition=condition)  # to its nearest bucket, as training would
        width, height = self.size(condition)
        images = []
        for lo in range(0, s.num_images, BATCH):
            n = min(BATCH, s.num_images - lo)
            kw = sampling_kwargs(self.base, n, s.guidance, [condition] * n, s.conditioning_scale, self.adapter)
            if s.negative_prompt:
                kw["negative_prompt"] = [s.negative_prompt] * n
            images += self.pipe(
                prompt=[s.prompt] * n,
                num_inference_steps=s.steps,
                generator=seeded([s.seed + lo + i for i in range(n)]),
                height=height,
                width=width,
                **kw,
            ).images
        return images


def grid_cell(size: int | tuple[int, int]) -> int:
    """The grid's cell side for images of ``size`` (a side, or (width, height): its longer side)."""
    side = max(size) if isinstance(size, tuple) else size
    return max(128, min(side, 512))


def save_outputs(
    out: Path, condition: Image.Image, images: list[Image.Image], s: Settings, photo: Image.Image | None = None, **info
) -> dict:
    """``image-NN.png``, ``condition.png``, ``grid.png`` (photo, condition, images side by side, each
    with its aspect kept) and ``generation.json`` (the settings) into ``out``; returns what was written."""
    from ..report.grid import save_grid

    out.mkdir(parents=True, exist_ok=True)
    files = {"condition": out / "condition.png", "grid": out / "grid.png", "images": []}
    condition.save(files["condition"])
    for i, img in enumerate(images):
        path = out / f"image-{i:02d}.png"
        img.save(path)
        files["images"].append(path)
    row = ([fit(photo, condition.size)] if photo is not None else []) + [condition, *images]
    titles = (["photo"] if photo is not None else []) + ["condition"] + [f"seed {s.seed + i}" for i in range(len(images))]
    save_grid([row], files["grid"], col_titles=titles, cell=grid_cell(condition.size))
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
    sized = {"bucket": bucket_name(gen.size(cond))} if gen.buckets else {}
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
        **sized,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="controlnet-recipe generate",
        description="Generate images from a photo (its condition made as the recipe makes it) or a condition image.",
        epilog="Also --params, --recipe, --gpu, as for every command. Sampling defaults: the recipe's evaluate block.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--photo", help="a photo: the recipe's condition is made from it (face landmarks drawn, edges, depth, ...)")
    src.add_argument("--condition", help="a ready condition image")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=None, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="inference steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--conditioning-scale", type=float, default=None, help="ControlNet conditioning scale")
    p.add_argument("--model", default=None, help=f"a trained folder, any kind (default: {BEST_DIR}, else {ADAPTER_DIR})")
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
