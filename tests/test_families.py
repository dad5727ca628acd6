"""Model families: detected from model_index.json (local or on the hub), text features equal to what
the family's own diffusers pipeline computes, SDXL's time ids, the VAE override, the tiers' check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from controlnet_recipe.core.config import ConfigError, check_tier, detect_tier, load_config
from controlnet_recipe.core.errors import BadInput
from controlnet_recipe.models import tiny
from controlnet_recipe.models.families import FAMILIES, POOLED, TEXT, BaseComponents, detect_family
from controlnet_recipe.models.families.sd import load_vae
from controlnet_recipe.models.families.sdxl import image_time_ids

from .conftest import ROOT, WORDS

PROMPTS = ["a photography of face", "a woman with red hair smiling"]


def _index(folder: Path, class_name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "unet": ["diffusers", "X"]}))
    return folder


@pytest.mark.parametrize(
    ("cls", "family"),
    [
        ("StableDiffusionPipeline", "sd"),
        ("StableDiffusionXLPipeline", "sdxl"),
        ("StableDiffusionXLControlNetPipeline", "sdxl"),
        ("StableDiffusion3Pipeline", "sd3"),
        ("FluxPipeline", "flux"),  # any folder FluxPipeline.save_pretrained wrote
    ],
)
def test_family_from_a_local_model_index(tmp_path: Path, cls: str, family: str):
    assert detect_family(str(_index(tmp_path / "m", cls))) == family


def test_unknown_family_is_one_line(tmp_path: Path):
    with pytest.raises(BadInput) as e:
        detect_family(str(_index(tmp_path / "m", "HiDreamImagePipeline")))
    msg = str(e.value)
    assert "\n" not in msg and "model_index.json: _class_name" in msg and "'HiDreamImagePipeline'" in msg and "flux" in msg


def test_family_from_the_hub_reads_only_model_index(tmp_path: Path, monkeypatch):
    calls = []
    index = _index(tmp_path / "hub", "StableDiffusionXLPipeline") / "model_index.json"

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(index)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert detect_family("stabilityai/stable-diffusion-xl-base-1.0", "abc123") == "sdxl"
    assert calls == [("stabilityai/stable-diffusion-xl-base-1.0", "model_index.json", "abc123")]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> BaseComponents:
    tok = tiny.build_tokenizer(WORDS, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    return BaseComponents(
        family="sdxl",
        tokenizer=tok,
        text_encoder=tiny.build_text_encoder(len(tok)).eval(),
        tokenizer_2=tok,
        text_encoder_2=tiny.build_text_encoder_2(len(tok)).eval(),
        vae=tiny.build_vae(64),
        denoiser=tiny.build_unet(64, sdxl=True),
        noise_scheduler=tiny.build_scheduler(),
        options={"force_zeros_for_empty_prompt": False},
    )


def test_sdxl_text_features_are_the_pipelines(parts: BaseComponents):
    ours = FAMILIES["sdxl"].encode(parts, PROMPTS)
    pipe = FAMILIES["sdxl"].pipeline(parts)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert set(ours) == set(FAMILIES["sdxl"].text_features)
    assert ours[TEXT].shape == (2, tiny.MAX_TOKENS, tiny.TEXT_DIM + tiny.TEXT_DIM_2)
    assert torch.equal(ours[TEXT], embeds) and torch.equal(ours[POOLED], pooled)


def test_sd_text_features_are_the_pipelines(parts: BaseComponents):
    sd = BaseComponents("sd", parts.tokenizer, parts.text_encoder, parts.vae, tiny.build_unet(64), parts.noise_scheduler)
    ours = FAMILIES["sd"].encode(sd, PROMPTS)
    embeds, _ = FAMILIES["sd"].pipeline(sd).encode_prompt(PROMPTS, "cpu", 1, False)
    assert set(ours) == set(FAMILIES["sd"].text_features) and torch.equal(ours[TEXT], embeds)


def test_caption_features_encode_each_caption_once(parts: BaseComponents):
    captions = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    feats, empty = FAMILIES["sdxl"].caption_features(parts, captions)
    direct = FAMILIES["sdxl"].encode(parts, captions + [""])
    for k in (TEXT, POOLED):
        torch.testing.assert_close(feats[k], direct[k][:3])
        torch.testing.assert_close(empty[k], direct[k][3:])


def test_time_ids_follow_the_centre_crop():
    assert image_time_ids((64, 64), 64) == [64, 64, 0, 0, 64, 64]
    # 100 x 80 (w x h) -> resized to 80 x 64, cropped 8 px from the left: (h, w), (top, left), target
    assert image_time_ids((100, 80), 64) == [80, 100, 0, 8, 64, 64]
    assert image_time_ids((80, 100), 64) == [100, 80, 8, 0, 64, 64]


def test_vae_override_loads_from_its_own_folder(tmp_path: Path):
    vae = tiny.build_vae(32)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae-fix")
    loaded = load_vae("does/not-exist", None, str(tmp_path / "vae-fix"))
    assert loaded.config.scaling_factor == 0.5


def test_sd_tiers_stop_an_sdxl_run_before_any_model_loads():
    tiers = load_config(ROOT / "params.yaml").tiers
    with pytest.raises(ConfigError) as e:
        check_tier("16gb", "sdxl", tiers)
    wanted = "params.yaml: gpu: tier '16gb' is sized for family sd; a base of family sdxl needs one of "
    wanted += "sdxl-24gb, sdxl-40gb, sdxl-80gb"
    assert str(e.value) == wanted
    check_tier("sdxl-24gb", "sdxl", tiers), check_tier("cpu", "sdxl", tiers), check_tier("16gb", "sd", tiers)
    cfg = load_config(ROOT / "params.yaml", {"recipe": "sdxl", "gpu": "sdxl-24gb"})
    assert (cfg.recipe.data.resolution, cfg.recipe.train.learning_rate, cfg.recipe.base.family) == (1024, 1e-5, "sdxl")
    assert cfg.recipe.base.vae == "madebyollin/sdxl-vae-fp16-fix" and cfg.tier.use_8bit_adam
    with pytest.raises(ConfigError, match="params.yaml: gpu: tier '8gb' is sized for family sd"):
        load_config(ROOT / "params.yaml", {"recipe": "sdxl", "gpu": "8gb"})


def test_auto_picks_the_families_tiers(monkeypatch):
    tiers = load_config(ROOT / "params.yaml").tiers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gb, sd, sdxl in ((16, "16gb", None), (24, "24gb", "sdxl-24gb"), (48, "40gb", "sdxl-40gb"), (80, "80gb", "sdxl-80gb")):
        props = type("P", (), {"total_memory": gb * 1024**3})
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, p=props: p)
        assert detect_tier("sd", tiers) == sd
        if sdxl is None:
            with pytest.raises(ConfigError, match="a base of family sdxl needs at least 24 GB"):
                detect_tier("sdxl", tiers)
        else:
            assert detect_tier("sdxl", tiers) == sdxl


@pytest.mark.parametrize(
    "switches",
    [{}, {"gradient_checkpointing": True, "channels_last": True}, {"mixed_precision": "bf16", "set_grads_to_none": False}],
)
def test_sdxl_loss_trains_under_the_tier_switches(parts: BaseComponents, switches: dict):
    from controlnet_recipe.core.config import Tier
    from controlnet_recipe.objectives.diffusion import Objective
    from controlnet_recipe.training.memory import apply_model_settings
    from controlnet_recipe.training.step import LossInputs, controlnet_from_unet, controlnet_loss

    tier = Tier(
        **{
            "family": "sdxl", "memory_gb": None,
            "batch_size": 2, "gradient_checkpointing": False, "use_8bit_adam": False, "set_grads_to_none": True,
            "mixed_precision": "no", "attention": "sdpa", "deepspeed": None, "channels_last": False, "compile": False,
            "frozen_fp8": False,
            **switches,
        }
    )  # fmt: skip
    dtype = {"bf16": torch.bfloat16}.get(tier.mixed_precision, torch.float32)
    unet = tiny.build_unet(64, sdxl=True).requires_grad_(False).to(dtype=dtype)
    controlnet = controlnet_from_unet(unet, parts.vae.config, "random")
    apply_model_settings(unet, controlnet, tier)
    controlnet.train()
    feats = FAMILIES["sdxl"].encode(parts, PROMPTS)
    g = torch.Generator().manual_seed(0)
    batch = {
        "latent_mean": torch.randn(2, 4, 16, 16, generator=g),
        "latent_std": torch.full((2, 4, 16, 16), 0.01),
        **feats,
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        "conditioning": torch.rand(2, 3, 64, 64, generator=g),
    }
    empty = {k: v[:1] * 0 for k, v in feats.items()}
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        inputs = LossInputs(
            controlnet=controlnet, denoiser=unet, scheduler=parts.noise_scheduler, empty_prompt=empty, scaling_factor=1.0,
            p_empty=0.5, device="cpu", dtype=dtype, objective=Objective(), family=FAMILIES["sdxl"],
            channels_last=tier.channels_last,
        )  # fmt: skip
        loss = controlnet_loss(inputs, batch, g)
    loss.backward()
    grads = [p.grad for p in controlnet.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert controlnet.add_embedding.linear_1.weight.grad is not None  # the pooled embedding and time ids reach it
