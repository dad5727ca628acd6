"""Tiny Stable Diffusion components: saved and loaded back through from_pretrained."""

from __future__ import annotations

import subprocess
import sys

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from controlnet_recipe.faces.synthetic import CAPTION_WORDS
from controlnet_recipe.models import tiny
from controlnet_recipe.training.step import controlnet_from_unet


def test_tokenizer_keeps_caption_words_whole(tmp_path):
    tok = tiny.build_tokenizer(CAPTION_WORDS, tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "a face with dark skin and blond hair, smiling, on a purple background"
    ids = again(text).input_ids
    assert ids == tok(text).input_ids
    assert again.model_max_length == tiny.MAX_TOKENS
    words = text.replace(",", " , ").split()
    assert len(ids) == len(words) + 2  # one token per word or comma, plus start and end
    # Unknown words still tokenize (byte-level fallback), nothing maps to the unknown token.
    odd = again("zyzzyva Ünïcode").input_ids
    assert again.unk_token_id not in odd[1:-1]


def test_components_round_trip_and_shapes(tmp_path):
    tok = tiny.build_tokenizer(CAPTION_WORDS, tmp_path / "tok")
    te, vae, unet = tiny.build_text_encoder(len(tok)), tiny.build_vae(64), tiny.build_unet(64)
    for name, m in (("te", te), ("vae", vae), ("unet", unet)):
        m.save_pretrained(tmp_path / name)
    te = CLIPTextModel.from_pretrained(tmp_path / "te")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    ids = tok(["a face"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    emb = te(ids)[0]
    assert emb.shape == (1, tiny.MAX_TOKENS, tiny.TEXT_DIM)
    lat = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert lat.shape == (1, tiny.LATENT_CHANNELS, 16, 16)
    assert unet(lat, torch.tensor([10]), emb).sample.shape == lat.shape


def test_controlnet_hint_encoder_matches_vae(tmp_path):
    vae, unet = tiny.build_vae(64), tiny.build_unet(64)
    cn = controlnet_from_unet(unet, vae.config)
    cn.save_pretrained(tmp_path / "cn")
    cn = ControlNetModel.from_pretrained(tmp_path / "cn")
    lat = torch.randn(2, 4, 16, 16)
    emb = torch.randn(2, tiny.MAX_TOKENS, tiny.TEXT_DIM)
    down, mid = cn(lat, torch.tensor([5, 500]), emb, controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
    out = unet(lat, torch.tensor([5, 500]), emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    # Zero convolutions: a fresh ControlNet leaves the base's prediction unchanged.
    assert torch.allclose(out, unet(lat, torch.tensor([5, 500]), emb).sample, atol=1e-6)


def test_tokenizer_files_are_the_same_in_every_process(tmp_path):
    """The tokenizers library's BPE trainer broke ties by hash order, so the tiny base's tokenizer
    (and with it the UNet's weights) changed from run to run; learn_merges does not."""
    script = (
        "import sys; from pathlib import Path; from controlnet_recipe.models import tiny; "
        "from controlnet_recipe.faces.synthetic import CAPTION_WORDS; "
        "tiny.build_tokenizer(CAPTION_WORDS + ['zebra', 'café'], Path(sys.argv[1]))"
    )
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True, capture_output=True)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    # Most frequent pair first, ties by the pair itself: every word ends as one token.
    assert tiny.learn_merges(["ab", "abc"]) == [("a", "b"), ("a", "b</w>"), ("ab", "c</w>")]


def test_direct_attention_calls_compute_the_same_step():
    """Skipping Attention.forward's per-call signature inspection changes no output or gradient."""
    import copy

    from controlnet_recipe.training.memory import direct_attention_calls

    torch.manual_seed(0)
    unet, vae = tiny.build_unet(64), tiny.build_vae(64)
    controlnet = controlnet_from_unet(unet, vae.config, "random")
    unet2, controlnet2 = copy.deepcopy(unet), copy.deepcopy(controlnet)
    assert direct_attention_calls(unet2, controlnet2) > 0
    side = 8 * 2 ** (len(vae.config.block_out_channels) - 1)
    x, ts = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text, hint = torch.randn(2, tiny.MAX_TOKENS, tiny.TEXT_DIM), torch.rand(2, 3, side, side)
    results = []
    for u, c in ((unet, controlnet), (unet2, controlnet2)):
        down, mid = c(x, ts, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        pred = u(x, ts, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        pred.sample.square().mean().backward()
        results.append([pred.sample.detach(), *(p.grad for p in c.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    copy.deepcopy(controlnet2)  # the convergence benchmark's probes copy the model
