"""The adapter seam: each kind of control trains through the same step, stops in one line on a
family or a setting it does not take, and its result loads in its stock diffusers pipeline from a
client that imports nothing of the project."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from controlnet_recipe.adapters import KINDS, Adapter, adapter, check
from controlnet_recipe.core.config import AdapterCfg, ConfigError
from controlnet_recipe.models import tiny
from controlnet_recipe.models.families import family
from controlnet_recipe.objectives.diffusion import Objective
from controlnet_recipe.training.batches import step_generator
from controlnet_recipe.training.step import LossInputs, controlnet_loss

from .conftest import ROOT, dvc, imports_dir, run
from .test_dvc_deps import _imported_beyond_deps
from .test_resume import assert_kill_and_resume_is_exact


def _cfg(kind: str, **settings) -> AdapterCfg:
    return AdapterCfg(
        kind=kind, **{"num_res_blocks": None, "rank": None, "alpha": None, "lora_layers": None, "size_ratio": None, **settings}
    )


def test_an_unsupported_pair_and_a_bad_setting_stop_in_one_line():
    flux = r"^demo-flux.adapter.kind: t2i_adapter does not run on family flux; it runs on sd, sdxl$"
    with pytest.raises(ConfigError, match=flux):
        check(_cfg("t2i_adapter"), "flux", "demo-flux.adapter")
    setting = r"^adapter.num_res_blocks: controlnet has no num_res_blocks \(it reads none\); expected null$"
    with pytest.raises(ConfigError, match=setting):
        check(_cfg("controlnet", num_res_blocks=3), "sd")
    with pytest.raises(ConfigError, match=r"^adapter.rank: t2i_adapter has no rank \(it reads num_res_blocks\); expected null$"):
        check(_cfg("t2i_adapter", rank=4), "sd")
    with pytest.raises(
        ConfigError,
        match=r"^adapter.kind 'lora': expected one of controlnet, controlnet_lora, t2i_adapter, controlnet_xs, control_lora$",
    ):
        adapter("lora")
    assert check(_cfg("t2i_adapter", num_res_blocks=1), "sdxl").name == "t2i_adapter"


def test_check_refuses_a_pair_before_writing_it(tmp_path: Path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    cmd = [sys.executable, "-m", "controlnet_recipe", "check", "--params", str(params)]
    p = subprocess.run([*cmd, "--recipe", "demo-flux", "--adapter", "t2i_adapter"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "t2i_adapter does not run on family flux" in p.stderr and params.read_text() == before
    out = run([*cmd, "--adapter", "t2i_adapter"], tmp_path)
    assert "adapter t2i_adapter" in out
    assert yaml.safe_load(params.read_text())["demo"]["adapter"]["kind"] == "t2i_adapter"
    assert yaml.safe_load(params.read_text())["depth"]["adapter"]["kind"] == "controlnet"  # its own block only
    run([*cmd, "--adapter", "controlnet_xs"], tmp_path)  # and the tiny UNet it needs, in the same block
    p = yaml.safe_load(params.read_text())
    assert (p["demo"]["adapter"]["kind"], p["demo"]["base"]["tiny"]["layers_per_block"]) == ("controlnet_xs", 2)
    run([*cmd, "--adapter", "controlnet"], tmp_path)
    assert params.read_text() == before  # back to the demo as it was


def _base(unet):
    """What a kind's ``make`` reads of the base: the frozen denoiser and the VAE's config."""
    return type("Base", (), {"denoiser": unet, "vae": type("V", (), {"config": tiny.build_vae(64).config})()})()


def _t():
    return type("T", (), {"hint_init": "random", "controlnet_layers": None, "controlnet_single_layers": None})()


def _step_inputs(kind: str, unet, fam=None):
    fam = fam or family("sd")
    module = adapter(kind).make(fam, _base(unet), _t(), _cfg(kind))
    return module, LossInputs(
        controlnet=module,
        denoiser=unet,
        scheduler=tiny.build_scheduler(),
        empty_prompt={"text_embedding": torch.zeros(1, tiny.MAX_TOKENS, tiny.TEXT_DIM)},
        scaling_factor=0.5,
        p_empty=0.0,
        device=torch.device("cpu"),
        dtype=torch.float32,
        objective=Objective(),
        family=fam,
        adapter=adapter(kind),
    )


def _one_step(kind: str, unet, fam=None, **text):
    """The kind's module after one AdamW step on a random batch; its step inputs."""
    module, x = _step_inputs(kind, unet, fam)
    x.empty_prompt.update(text)
    batch = {
        "latent_mean": torch.randn(2, 4, 16, 16),
        "latent_std": torch.full((2, 4, 16, 16), 0.01),
        "conditioning": torch.rand(2, 3, 64, 64),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        **{k: v.expand(2, *v.shape[1:]).clone() for k, v in x.empty_prompt.items()},
    }
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    controlnet_loss(x, batch, step_generator(0, 0, 0, 0)).backward()
    opt.step()
    return module, x, batch


def _sd_like_unet():
    """A tiny UNet laid out as SD 1.x/2.x (cross-attention in the first block, none in the last)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=tiny.TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


@pytest.mark.parametrize("unet_layout", ["tiny (SDXL's layout)", "SD's layout"])
def test_the_t2i_adapter_fits_the_unet_and_only_it_learns(unet_layout: str):
    torch.manual_seed(0)
    unet = tiny.build_unet(64) if unet_layout.startswith("tiny") else _sd_like_unet()
    unet.requires_grad_(False)
    module, inputs = _step_inputs("t2i_adapter", unet)
    expected = "full_adapter_xl" if unet_layout.startswith("tiny") else "full_adapter"
    assert module.config.adapter_type == expected
    lat = 16
    batch = {
        "latent_mean": torch.randn(2, 4, lat, lat),
        "latent_std": torch.full((2, 4, lat, lat), 0.01),
        "text_embedding": torch.randn(2, tiny.MAX_TOKENS, tiny.TEXT_DIM),
        "conditioning": torch.rand(2, 3, 64, 64),
    }
    loss = controlnet_loss(inputs, batch, step_generator(0, 0, 0, 0))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in unet.parameters())
    small = sum(p.numel() for p in module.parameters())
    big = sum(p.numel() for p in adapter("controlnet").make(inputs.family, _base(unet), _t(), _cfg("controlnet")).parameters())
    assert small < big / 2  # nothing of the base is copied


def test_the_controlnet_lora_trains_its_lora_and_new_layers_and_saves_merged(tmp_path: Path):
    torch.manual_seed(0)
    unet = tiny.build_unet(64).requires_grad_(False)
    kind = adapter("controlnet_lora")
    settings = _cfg("controlnet_lora", rank=4, alpha=8.0)
    model = kind.make(family("sd"), _base(unet), _t(), settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(family("sd").new_layers) for n in trainable)
    assert any(".conv1.lora_A" in n for n in trainable) and any(".to_q.lora_A" in n for n in trainable)
    full = adapter("controlnet").make(family("sd"), _base(unet), _t(), _cfg("controlnet"))
    lora_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora_params < sum(p.numel() for p in full.parameters()) / 2
    for n, p in model.named_parameters():  # a trained LoRA: B no longer zero
        if ".lora_B" in n:
            p.data.normal_(0, 0.05)
    kind.save(model, tmp_path, settings.model_dump())
    plain = kind.load(tmp_path)
    assert type(plain).__name__ == "ControlNetModel" and not any("lora" in k for k in plain.state_dict())
    x, t, e, c = (
        torch.randn(2, 4, 16, 16),
        torch.tensor([3, 500]),
        torch.randn(2, tiny.MAX_TOKENS, tiny.TEXT_DIM),
        torch.rand(2, 3, 64, 64),
    )
    with torch.no_grad():
        want = model(x, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
        got = plain(x, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
    for w, g in zip([*want[0], want[1]], [*got[0], got[1]]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    state = kind.from_state(tmp_path, model.state_dict(), settings.model_dump())  # a checkpoint's weights, merged
    assert all(torch.equal(state.state_dict()[k], v) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_controlnet_xs_trains_its_control_parts_and_saves_the_adapter_the_stock_fusion_rebuilds(sdxl: bool):
    """Only the control network learns; the adapter saved from the trained fused model, fused
    with the base's UNet again as the stock pipeline does, predicts what the trained model does."""
    from diffusers import ControlNetXSAdapter, UNetControlNetXSModel

    torch.manual_seed(0)
    unet = tiny.build_unet(64, sdxl=sdxl, layers_per_block=2).eval().requires_grad_(False)
    text = {}
    if sdxl:
        text = {"pooled_embedding": torch.zeros(1, tiny.POOLED_DIM), "text_embedding": torch.zeros(1, tiny.MAX_TOKENS, 96)}
    fam = family("sdxl" if sdxl else "sd")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    module, x, batch = _one_step("controlnet_xs", unet, fam, **text)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and not any(n.startswith(("base_", "up_blocks.0.resnets", "mid_block.base_midblock")) for n in trained)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # the base untouched
    saved = adapter("controlnet_xs").from_state(None, module.state_dict(), {}, like=module)
    assert isinstance(saved, ControlNetXSAdapter)
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in module.parameters() if p.requires_grad)
    refused = UNetControlNetXSModel.from_unet(unet, saved).eval()
    kind, g = adapter("controlnet_xs"), torch.Generator().manual_seed(1)
    noised, control = fam.noise_and_control(
        x.scheduler, torch.randn(2, 4, 16, 16), batch, x.latents, g, fam.objective(Objective()), "cpu"
    )
    with torch.no_grad():
        want = kind.residuals(fam, module.eval(), noised, batch, batch, control, "cpu")
        got = kind.residuals(fam, refused, noised, batch, batch, control, "cpu")
    assert want.abs().max() > 0 and torch.allclose(got, want, atol=1e-6)


def test_controlnet_xs_on_a_unet_of_one_resnet_per_block_stops_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^adapter.kind: controlnet_xs needs a UNet of 2 resnets per block .*layers_per_block: 2\)$"
    ):
        adapter("controlnet_xs").make(family("sd"), _base(tiny.build_unet(64)), _t(), _cfg("controlnet_xs"))


def test_every_tier_switch_applies_to_a_t2i_adapter():
    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.training.memory import apply_model_settings, direct_attention_calls

    tiers = load_config(ROOT / "params.yaml").tiers
    unet = tiny.build_unet(64).requires_grad_(False)
    module = adapter("t2i_adapter").make(family("sd"), _base(unet), _t(), _cfg("t2i_adapter"))
    apply_model_settings(unet, module, tiers["8gb"].model_copy(update={"channels_last": True}))  # checkpointing on
    direct_attention_calls(unet, module)
    assert unet.is_gradient_checkpointing


def test_every_kind_writes_the_lines_that_load_it_for_the_model_card():
    assert adapter("controlnet").card_lines(family("sdxl"), "base", "me/cn") == (
        "from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline\n"
        'controlnet = ControlNetModel.from_pretrained("me/cn")\n'
        'pipe = StableDiffusionXLControlNetPipeline.from_pretrained("base", controlnet=controlnet)'
    )
    assert adapter("controlnet_lora").card_lines(family("flux"), "b", "m") == adapter("controlnet").card_lines(
        family("flux"), "b", "m"
    )  # merged: a plain ControlNet
    lines = adapter("t2i_adapter").card_lines(family("sd"), "base", "me/t2i")
    assert 'adapter = T2IAdapter.from_pretrained("me/t2i")' in lines and "StableDiffusionAdapterPipeline" in lines
    assert 'from_pretrained("base", adapter=adapter)' in lines
    lines = adapter("controlnet_xs").card_lines(family("sdxl"), "base", "me/xs")
    assert 'controlnet = ControlNetXSAdapter.from_pretrained("me/xs")' in lines
    assert "StableDiffusionXLControlNetXSPipeline" in lines
    lines = adapter("control_lora").card_lines(family("flux"), "base", "me/canny-lora")
    assert 'FluxControlPipeline.from_pretrained("base")' in lines and 'pipe.load_lora_weights("me/canny-lora")' in lines


def test_every_kind_names_its_families_classes_and_pipelines():
    for kind in KINDS:
        a = adapter(kind)
        assert a.families and a.files and a.title
        assert a.classes or type(a).load is not Adapter.load  # a diffusers class, or its own loader
        for name in a.families:
            import diffusers

            assert hasattr(diffusers, a.pipeline_class(family(name))), (kind, name)


CLIENT = """
import sys, json
import torch
from PIL import Image
from diffusers import {cls}, {pipe}

module = {cls}.from_pretrained(sys.argv[2])
pipe = {pipe}.from_pretrained(sys.argv[1], {arg}=module, safety_checker=None, requires_safety_checker=False)
image = pipe("a face", image=Image.new("RGB", (64, 64), "white"), num_inference_steps=2, height=64, width=64,
             generator=torch.Generator().manual_seed(0)).images[0]
assert not any(m.startswith("controlnet_recipe") for m in sys.modules), "the client imported the project"
print(json.dumps({{"size": image.size}}))
"""


STOCK = {  # kind -> (the class it saves as, the stock pipeline that runs it, that pipeline's argument)
    "t2i_adapter": ("T2IAdapter", "StableDiffusionAdapterPipeline", "adapter"),
    "controlnet_lora": ("ControlNetModel", "StableDiffusionControlNetPipeline", "controlnet"),  # merged
    "controlnet_xs": ("ControlNetXSAdapter", "StableDiffusionControlNetXSPipeline", "controlnet"),
}
OWN_BASE = {k for k in STOCK if adapter(k).tiny_layers_per_block != 1}  # kinds that need another tiny base


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(STOCK))
def test_a_kind_trains_through_dvc_repro_and_loads_in_its_stock_pipeline(project: Path, tmp_path: Path, kind: str):
    work = tmp_path / "work"
    shutil.copytree(project, work, symlinks=True)
    p = yaml.safe_load((work / "params.yaml").read_text())  # as make demo ADAPTER= sets them (its params are written by yaml)
    p["demo"]["adapter"]["kind"] = kind
    p["demo"]["base"]["tiny"]["layers_per_block"] = adapter(kind).tiny_layers_per_block
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = dvc("repro", cwd=work, CONTROLNET_RECIPE_RECORD_IMPORTS=str(imports_dir(work)))
    assert _imported_beyond_deps(work) == {}  # the run imported nothing dvc.yaml does not list
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert ("Running stage 'base'" in out) == (kind in OWN_BASE)  # the tiny base again only where the kind needs another
    cls, pipe, arg = STOCK[kind]
    best = work / "models/best"
    assert json.loads((best / "config.json").read_text())["_class_name"] == cls
    assert json.loads((best / "adapter.json").read_text())["kind"] == kind
    metrics = json.loads((work / "eval/metrics.json").read_text())
    assert metrics["fidelity"] == metrics["fidelity"]  # scored (not NaN) by the same evaluator
    client = tmp_path / "client.py"
    client.write_text(CLIENT.format(cls=cls, pipe=pipe, arg=arg))
    got = subprocess.run(
        [sys.executable, str(client), str(work / "models/base/pipeline"), str(best)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0, got.stderr[-2000:]
    assert json.loads(got.stdout.strip().splitlines()[-1]) == {"size": [64, 64]}
    if kind in OWN_BASE:  # its kill-and-resume on the base it needs, built here
        assert_kill_and_resume_is_exact(work, tmp_path / "resume", "demo")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(set(STOCK) - OWN_BASE))
def test_a_kinds_kill_and_resume_is_bitwise_exact(project: Path, tmp_path: Path, kind: str):
    assert_kill_and_resume_is_exact(project, tmp_path, "demo", adapter_kind=kind)
