"""The web demo: a real click-through in headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

from controlnet_recipe import cli

from .conftest import tiny_params
from .test_generate import (  # noqa: F401 (astronaut, in_tiny, landscape, tiny_models: the fixtures)
    LANDSCAPE_BUCKET,
    PROMPT,
    RES,
    astronaut,
    bucket_params,
    in_tiny,
    landscape,
    tiny_models,
)

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download does not work here; Debian's Chromium, with no background traffic.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> Path:
    if not CHROMIUM.is_file():
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} not found and REQUIRE_BROWSER=1: apt-get install chromium")
        pytest.skip("apt-get install chromium")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["project", "sdxl_project"])
def web_app(request, monkeypatch):
    """The demo on the tiny pipeline's models (SD, then SDXL), served from a background thread on a
    free port."""
    from controlnet_recipe.apps.generate import Generator
    from controlnet_recipe.apps.web import build_app
    from controlnet_recipe.core.config import load_config

    monkeypatch.chdir(request.getfixturevalue(request.param))
    cfg = load_config("params.yaml")
    app = build_app(cfg, Generator(cfg))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.mark.slow
@pytest.mark.browser
def test_click_through(web_app: str, astronaut: Path, tmp_path: Path):  # noqa: F811
    exe = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(exe), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(web_app, wait_until="domcontentloaded")
            page.locator("#generate").wait_for(timeout=60_000)
            page.locator("#input-image input[type=file]").set_input_files(str(astronaut))
            page.locator("#input-image img").first.wait_for(timeout=30_000)  # the upload is shown
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate").click()
            gallery = page.locator("#gallery img")
            gallery.nth(3).wait_for(timeout=180_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#gallery img, #condition img')]"
                ".every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            shot = tmp_path / "web.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert gallery.count() == 4  # the default number of images
            widths = gallery.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
            assert widths == [256] * 4  # the 64 px images, shown scaled up
            assert page.locator("#condition img").first.evaluate("i => i.naturalWidth") == 256
            seed = tiny_params()["demo"]["evaluate"]["seed"]
            status = page.locator("#status").inner_text()
            assert f"4 images at {RES} px, seeds {seed} to {seed + 3}" in status
            for i in range(4):
                assert page.get_by_text(f"seed {seed + i}", exact=True).count() >= 1  # the captions
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def test_web_without_a_model(in_tmp: Path, params_file, capsys):
    params = str(params_file(tiny_params()))  # nothing trained in this folder
    assert cli.main(["web", "--params", params, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no trained model" in err and "make demo" in err


def test_web_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["web", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--host" in out and "--port" in out and "--model" in out


def test_missing_chromium_skips_unless_required(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium()
    monkeypatch.setenv("REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        chromium()


@pytest.mark.parametrize("buckets", ["auto", "off"])
def test_a_click_generates_at_the_inputs_aspect_with_buckets(
    in_tiny: Path,  # noqa: F811
    tmp_path: Path,
    landscape: Path,  # noqa: F811
    buckets: str,
):
    """What one click returns (the condition, the gallery, the status), without a browser: a 3:2
    photo gives 3:2 images with buckets on, the square at resolution with them off."""
    from controlnet_recipe.apps.generate import Generator, Settings
    from controlnet_recipe.apps.web import CONDITION, PHOTO, respond, sizes_text
    from controlnet_recipe.core.config import load_config

    cfg = load_config(bucket_params(tmp_path, buckets))
    gen = Generator(cfg)
    size, text = (LANDSCAPE_BUCKET, "80x48") if buckets == "auto" else ((RES, RES), f"{RES} px")
    for kind in (PHOTO, CONDITION):
        cond, gallery, status = respond(gen, Image.open(landscape), kind, Settings.from_recipe(cfg, PROMPT, num_images=2))
        assert len(gallery) == 2 and f"2 images at {text}, seeds" in status
        for img in (cond, *(g for g, _ in gallery)):  # shown scaled up by a whole factor, the aspect kept
            k = img.width // size[0]
            assert k >= 1 and img.size == (size[0] * k, size[1] * k)
    assert sizes_text(gen) == ("the input's aspect (5 buckets, 32x128 to 128x32)" if buckets == "auto" else f"{RES} px")
