"""Flow matching in the transformer families: with upstream's levers the loss is upstream's
script's, draw for draw (train_controlnet_flux.py, train_controlnet_sd3.py; their loss lines
inlined below, the VAE's output replaced by its posterior); the levers change what they claim."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxControlNetPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from controlnet_recipe.core.config import load_config
from controlnet_recipe.models import tiny
from controlnet_recipe.models.families import FAMILIES, POOLED, TEXT
from controlnet_recipe.objectives.diffusion import Objective
from controlnet_recipe.objectives.flow_matching import flow_sigmas
from controlnet_recipe.training.step import LossInputs, controlnet_loss

from .conftest import ROOT

SCALE, SHIFT, N, H = 1.5, 0.1, 3, 16  # VAE scaling and shift; batch; latent side (a 64 px image)
UPSTREAM = Objective(timesteps="logit_normal", logit_mean=0.0, logit_std=1.0)  # both scripts' defaults


def posterior(mean: torch.Tensor, std: torch.Tensor) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(torch.cat([mean, 2 * std.log()], dim=1))


def get_sigmas(scheduler_copy, timesteps, n_dim):
    """Upstream's lookup of each timestep's sigma in the scheduler's table."""
    sigmas = scheduler_copy.sigmas
    step_indices = [(scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def upstream_flux_loss(controlnet, transformer, scheduler, b, seed, guidance_scale=3.5):
    torch.manual_seed(seed)
    noise_scheduler_copy = copy.deepcopy(scheduler)
    pixel_latents_tmp = posterior(b["latent_mean"], b["latent_std"]).sample()
    pixel_latents_tmp = (pixel_latents_tmp - SHIFT) * SCALE
    pixel_latents = FluxControlNetPipeline._pack_latents(pixel_latents_tmp, N, *pixel_latents_tmp.shape[1:])
    control_latents = posterior(b["control_mean"], b["control_std"]).sample()
    control_latents = (control_latents - SHIFT) * SCALE
    control_image = FluxControlNetPipeline._pack_latents(control_latents, N, *control_latents.shape[1:])
    latent_image_ids = FluxControlNetPipeline._prepare_latent_image_ids(N, H // 2, H // 2, "cpu", torch.float32)
    noise = torch.randn_like(pixel_latents)
    u = compute_density_for_timestep_sampling(
        weighting_scheme="logit_normal", batch_size=N, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    sigmas = get_sigmas(noise_scheduler_copy, timesteps, pixel_latents.ndim)
    noisy_model_input = (1.0 - sigmas) * pixel_latents + sigmas * noise
    guidance_vec = torch.full((N,), guidance_scale) if transformer.config.guidance_embeds else None
    text_ids = torch.zeros(b[TEXT].shape[1], 3)
    common = dict(
        hidden_states=noisy_model_input, timestep=timesteps / 1000, guidance=guidance_vec,
        pooled_projections=b[POOLED], encoder_hidden_states=b[TEXT], txt_ids=text_ids, img_ids=latent_image_ids,
    )  # fmt: skip
    block, single = controlnet(controlnet_cond=control_image, return_dict=False, **common)
    noise_pred = transformer(controlnet_block_samples=block, controlnet_single_block_samples=single, return_dict=False, **common)[
        0
    ]
    return F.mse_loss(noise_pred.float(), (noise - pixel_latents).float(), reduction="mean")


def upstream_sd3_loss(controlnet, transformer, scheduler, b, seed):
    torch.manual_seed(seed)
    noise_scheduler_copy = copy.deepcopy(scheduler)
    model_input = posterior(b["latent_mean"], b["latent_std"]).sample()
    model_input = (model_input - SHIFT) * SCALE
    noise = torch.randn_like(model_input)
    u = compute_density_for_timestep_sampling(
        weighting_scheme="logit_normal", batch_size=N, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    sigmas = get_sigmas(noise_scheduler_copy, timesteps, model_input.ndim)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    controlnet_image = posterior(b["control_mean"], b["control_std"]).sample()
    controlnet_image = (controlnet_image - SHIFT) * SCALE
    control_block_res_samples = controlnet(
        hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=b[TEXT],
        pooled_projections=b[POOLED], controlnet_cond=controlnet_image, return_dict=False,
    )[0]  # fmt: skip
    model_pred = transformer(
        hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=b[TEXT],
        pooled_projections=b[POOLED], block_controlnet_hidden_states=control_block_res_samples, return_dict=False,
    )[0]  # fmt: skip
    model_pred = model_pred * (-sigmas) + noisy_model_input  # --precondition_outputs 1 (the default)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    target = model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


def family_models(name: str, guidance_embeds: bool = False):
    torch.manual_seed(0)
    train = load_config(ROOT / "params.yaml").recipe.train
    if name == "flux":
        denoiser, scheduler = tiny.build_flux_transformer(guidance_embeds), tiny.build_flow_scheduler(dynamic_shifting=True)
    else:
        denoiser, scheduler = tiny.build_sd3_transformer(64), tiny.build_flow_scheduler(dynamic_shifting=False)
    base = type("Base", (), {"denoiser": denoiser, "vae": None})()
    controlnet = FAMILIES[name].make_controlnet(base, train.model_copy(update={"hint_init": "zero"}))
    for p in controlnet.parameters():  # not zero: the residuals and the condition count
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return denoiser.eval(), controlnet.eval(), scheduler


def batch(name: str) -> dict:
    g = torch.Generator().manual_seed(7)
    lat = (N, tiny.LATENT_CHANNELS, H, H)
    pooled = tiny.TEXT_DIM if name == "flux" else tiny.TEXT_DIM + tiny.POOLED_DIM
    return {
        "latent_mean": torch.randn(lat, generator=g),
        "latent_std": torch.rand(lat, generator=g) * 0.1 + 0.01,
        "control_mean": torch.randn(lat, generator=g),
        "control_std": torch.rand(lat, generator=g) * 0.1 + 0.01,
        TEXT: torch.randn(N, 12, tiny.T5_DIM, generator=g),
        POOLED: torch.randn(N, pooled, generator=g),
        "conditioning": torch.rand(N, 3, 64, 64, generator=g),
    }


def ours(name, denoiser, controlnet, scheduler, b, seed, objective=UPSTREAM) -> torch.Tensor:
    inputs = LossInputs(
        controlnet=controlnet, denoiser=denoiser, scheduler=scheduler, empty_prompt={k: b[k][:1] * 0 for k in (TEXT, POOLED)},
        scaling_factor=SCALE, shift_factor=SHIFT, p_empty=0.0, device="cpu", dtype=torch.float32, objective=objective,
        family=FAMILIES[name],
    )  # fmt: skip
    return controlnet_loss(inputs, b, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "guidance_embeds"), [("flux", False), ("flux", True), ("sd3", False)])
def test_upstream_levers_give_upstream_loss(name, guidance_embeds):
    denoiser, controlnet, scheduler = family_models(name, guidance_embeds)
    b, seed = batch(name), 1234
    with torch.no_grad():
        mine = ours(name, denoiser, controlnet, scheduler, b, seed)
        if name == "flux":
            theirs = upstream_flux_loss(controlnet, denoiser, scheduler, b, seed)
        else:
            theirs = upstream_sd3_loss(controlnet, denoiser, scheduler, b, seed)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_other_levers_change_the_loss(name):
    denoiser, controlnet, scheduler = family_models(name)
    b = batch(name)
    with torch.no_grad():
        base = ours(name, denoiser, controlnet, scheduler, b, 5)
        for lever in (
            Objective(timesteps="mode"),
            Objective(timesteps="logit_normal", logit_mean=1.0),
            Objective(timesteps="logit_normal", shift=3.0),
            Objective(timesteps="logit_normal", weighting="cosmap"),
            Objective(timesteps="logit_normal", condition_weight=4.0),
        ):
            assert not torch.isclose(ours(name, denoiser, controlnet, scheduler, b, 5, lever), base), lever


def test_a_ddpm_lever_is_refused_in_one_line():
    denoiser, controlnet, scheduler = family_models("flux")
    with pytest.raises(ValueError, match="train.loss_weighting: 'min_snr' is not a flow-matching weighting"):
        ours("flux", denoiser, controlnet, scheduler, batch("flux"), 0, Objective(weighting="min_snr"))


def test_sigmas_follow_the_density_and_the_shift():
    sched = tiny.build_flow_scheduler(dynamic_shifting=True)  # no shift in the table: sigma = u
    g = torch.Generator().manual_seed(0)
    _, uniform = flow_sigmas(sched, 20_000, Objective(timesteps="uniform"), g)
    _, shifted = flow_sigmas(sched, 20_000, Objective(timesteps="uniform", shift=3.0), g)
    _, mode = flow_sigmas(sched, 20_000, Objective(timesteps="mode", mode_scale=1.29), g)
    _, high = flow_sigmas(sched, 20_000, Objective(timesteps="logit_normal", logit_mean=1.0), g)
    assert abs(float(uniform.mean()) - 0.5) < 0.01
    assert float(shifted.mean()) > 0.65  # a shift of 3 spends most steps at high noise
    assert abs(float(mode.mean()) - 0.5) < 0.02 and float(((mode - 0.5).abs() < 0.25).float().mean()) > 0.55
    assert float(high.mean()) > 0.65
    _, sd3 = flow_sigmas(tiny.build_flow_scheduler(dynamic_shifting=False), 20_000, Objective(timesteps="uniform"), g)
    assert float(sd3.mean()) > 0.65  # SD3's scheduler table is shifted by 3 already (upstream samples from it)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_hint_init_copy_embeds_the_condition_as_the_base_embeds_the_image(name):
    """hint_init copy: the ControlNet's condition embedder starts as the base's own latent embedder
    (the condition is a VAE latent too); zero (upstream) leaves it at zero; SD has no such copy."""
    torch.manual_seed(0)
    train = load_config(ROOT / "params.yaml").recipe.train
    denoiser = tiny.build_flux_transformer() if name == "flux" else tiny.build_sd3_transformer(64)
    base = type("Base", (), {"denoiser": denoiser, "vae": None})()
    made = {h: FAMILIES[name].make_controlnet(base, train.model_copy(update={"hint_init": h})) for h in ("zero", "copy")}
    embedder = {"flux": ("controlnet_x_embedder", "x_embedder"), "sd3": ("pos_embed_input.proj", "pos_embed.proj")}[name]
    ours_, theirs = (dict(m.named_parameters()) for m in (made["copy"], denoiser))
    for k in ("weight", "bias"):
        assert torch.equal(ours_[f"{embedder[0]}.{k}"], theirs[f"{embedder[1]}.{k}"])
        assert dict(made["zero"].named_parameters())[f"{embedder[0]}.{k}"].abs().sum() == 0
    with pytest.raises(ValueError, match="hint_init: copy is for SD3 and Flux"):
        from controlnet_recipe.models.families.sd import controlnet_from_unet

        controlnet_from_unet(tiny.build_unet(64), tiny.build_vae(64).config, "copy")
