"""The web demo, as the source recipe's Hugging Face Space: upload a face photo (or a condition
image), type a prompt, click Generate, see the condition and the generated faces.

``python -m controlnet_recipe web [--host 127.0.0.1] [--port 7860] [--model DIR]`` serves it with
Gradio. It loads the base model and the ControlNet once (``models/best``, else ``models/adapter``:
what ``make demo`` trains when no ``--model`` is given) and calls the same core as the CLI,
:class:`controlnet_recipe.apps.generate.Generator`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from ..core.buckets import name as bucket_name
from ..core.config import Config
from ..core.storage import ADAPTER_DIR, BEST_DIR
from .generate import GenerateError, Generator, Settings

PHOTO, CONDITION = "a face photo", "a condition image"
SHOW_MIN = 256  # small images (the embedded default is 64 px) are shown scaled up, pixels kept sharp
EXAMPLE_PROMPT = "a face with light skin and brown hair, smiling, blue eyes, on a grey background"


def shown(img: Image.Image) -> Image.Image:
    """``img`` scaled up (nearest) to at least :data:`SHOW_MIN` pixels, for the browser."""
    k = -(-SHOW_MIN // min(img.size))
    return img.resize((img.width * k, img.height * k), Image.NEAREST) if k > 1 else img


def example_photo() -> Path:
    """scikit-image's astronaut photo (no download), as a file Gradio's examples can show."""
    from skimage.data import astronaut

    path = Path(tempfile.gettempdir()) / "controlnet-recipe-web" / "astronaut.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(astronaut()).save(path)
    return path


def respond(gen: Generator, image: Image.Image, kind: str, s: Settings) -> tuple[Image.Image, list, str]:
    """One click: the condition, the gallery's (image, caption) pairs and the status line, at the
    input's own aspect with buckets on (its nearest bucket). Raises :class:`GenerateError`."""
    t0 = time.perf_counter()
    cond = gen.condition(photo=image, name="the uploaded photo") if kind == PHOTO else gen.condition(condition=image)
    images = gen(cond, s)
    status = (
        f"{len(images)} images at {gen.size_text(cond)}, seeds {s.seed} to {s.seed + len(images) - 1}, "
        f"{time.perf_counter() - t0:.1f} s on {gen.device}"
    )
    return shown(cond), [(shown(img), f"seed {s.seed + i}") for i, img in enumerate(images)], status


def sizes_text(gen: Generator) -> str:
    """The sizes the demo generates at, for its header: ``64 px``, or the buckets'."""
    if not gen.buckets:
        return f"{gen.resolution} px"
    return f"the input's aspect ({len(gen.buckets)} buckets, {bucket_name(gen.buckets[0])} to {bucket_name(gen.buckets[-1])})"


def build_app(cfg: Config, gen: Generator):
    """The Gradio Blocks app around a loaded :class:`Generator`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    e = cfg.recipe.evaluate
    what = gen.kind.photo_hint

    def run(image, kind, prompt, negative, num_images, seed, steps, guidance, scale):
        if image is None:
            raise gr.Error("Upload a face photo or a condition image first.")
        if not (prompt or "").strip():
            raise gr.Error("Type a prompt first.")
        s = Settings(
            prompt=prompt.strip(),
            negative_prompt=(negative or "").strip(),
            num_images=int(num_images),
            seed=int(seed),
            steps=int(steps),
            guidance=float(guidance),
            conditioning_scale=float(scale),
        )
        try:
            return respond(gen, image, kind, s)
        except GenerateError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="ControlNet recipe: try the model", analytics_enabled=False) as app:
        gr.Markdown(
            "## Try the trained ControlNet\n"
            f"Upload a face photo: its condition is {what}, drawn as the recipe's conditions stage draws it "
            "(or upload a ready condition image). Type a prompt and click **Generate**.\n\n"
            f"Recipe `{cfg.recipe_name}`, {sizes_text(gen)}, ControlNet `{gen.model}`, on {gen.device}."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Input image", sources=["upload", "clipboard"], elem_id="input-image")
                kind = gr.Radio([PHOTO, CONDITION], value=PHOTO, label="The image is", elem_id="input-kind")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                with gr.Accordion("Settings (defaults: the recipe's evaluate block)", open=False):
                    num_images = gr.Slider(1, 8, value=4, step=1, label="Images")
                    seed = gr.Number(value=e.seed, precision=0, label="Seed (image i uses seed + i)")
                    steps = gr.Slider(1, 100, value=e.num_inference_steps, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 15.0, value=e.guidance_scale, step=0.5, label="Guidance scale")
                    scale = gr.Slider(0.0, 2.0, value=e.conditioning_scale, step=0.05, label="Conditioning scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples([[str(example_photo()), PHOTO, EXAMPLE_PROMPT]], inputs=[image, kind, prompt])
            with gr.Column():
                cond = gr.Image(label="Condition", format="png", interactive=False, elem_id="condition")
                gallery = gr.Gallery(label="Generated", format="png", columns=4, object_fit="contain", elem_id="gallery")
                status = gr.Markdown(elem_id="status")
        inputs = [image, kind, prompt, negative, num_images, seed, steps, guidance, scale]
        button.click(run, inputs=inputs, outputs=[cond, gallery, status])
        prompt.submit(run, inputs=inputs, outputs=[cond, gallery, status])
    return app


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="controlnet-recipe web",
        description="Serve the web demo: a face photo and a prompt in, the condition and generated faces out.",
        epilog="Also --params, --recipe, --gpu, as for every command.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=None, help=f"a trained folder, any kind (default: {BEST_DIR}, else {ADAPTER_DIR})")
    return p


def main(cfg: Config, argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        gen = Generator(cfg, a.model)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"web: ControlNet {gen.model} on {gen.device}; open http://{a.host}:{a.port}")
    build_app(cfg, gen).launch(server_name=a.host, server_port=a.port, ssr_mode=False)
    return 0
