"""The convergence levers: upstream's values give upstream's loss, draw for draw; the others change
what they claim to change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from controlnet_recipe.models import tiny
from controlnet_recipe.objectives.diffusion import Objective, condition_weights, diffusion_loss, loss_weights, sample_timesteps
from controlnet_recipe.training.memory import NEW_LAYERS, param_groups
from controlnet_recipe.training.step import LossInputs, controlnet_from_unet, controlnet_loss

RES = 32


def upstream_loss(controlnet, unet, scheduler, latent_mean, latent_std, text, hint, scaling_factor, seed):
    """The loss lines of diffusers' examples/controlnet/train_controlnet.py, with the global RNG
    seeded as ``set_seed`` does (the VAE's output replaced by its posterior)."""
    torch.manual_seed(seed)
    dist = DiagonalGaussianDistribution(torch.cat([latent_mean, 2 * latent_std.log()], dim=1))
    latents = dist.sample() * scaling_factor
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=text,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean"), timesteps, noise


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = tiny.build_unet(RES).eval()
    controlnet = controlnet_from_unet(unet, tiny.build_vae(RES).config)
    torch.nn.init.normal_(controlnet.controlnet_mid_block.weight, std=0.02)  # not zero: the residuals count
    return unet, controlnet


def batch(n: int = 3):
    g = torch.Generator().manual_seed(7)
    lat = (n, 4, RES // 4, RES // 4)
    return {
        "latent_mean": torch.randn(lat, generator=g),
        "latent_std": torch.rand(lat, generator=g) * 0.1 + 0.01,
        "text_embedding": torch.randn(n, tiny.MAX_TOKENS, tiny.TEXT_DIM, generator=g),
        "conditioning": torch.rand(n, 3, RES, RES, generator=g),
    }


def loss_inputs(controlnet, unet, scheduler, batch: dict) -> dict:
    """LossInputs' fields other than the objective (no caption dropout), and the batch."""
    return dict(
        controlnet=controlnet,
        denoiser=unet,
        scheduler=scheduler,
        batch=batch,
        empty_prompt={"text_embedding": torch.zeros(1, tiny.MAX_TOKENS, tiny.TEXT_DIM)},
        scaling_factor=0.18215,
        p_empty=0.0,
        device="cpu",
        dtype=torch.float32,
    )


def loss(common: dict, seed: int, objective: Objective) -> torch.Tensor:
    fields = {k: v for k, v in common.items() if k != "batch"}
    return controlnet_loss(LossInputs(**fields, objective=objective), common["batch"], torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_upstream_values_give_upstream_loss(models, prediction_type):
    unet, controlnet = models
    scheduler = tiny.build_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    b, seed = batch(), 1234
    with torch.no_grad():
        inputs = loss_inputs(controlnet, unet, scheduler, b)
        ours = loss(inputs, seed, Objective())
        theirs, t_up, _ = upstream_loss(
            controlnet, unet, scheduler, b["latent_mean"], b["latent_std"], b["text_embedding"], b["conditioning"], 0.18215, seed
        )
    # Same timesteps as our path draws (latent sample, then noise, then timesteps, as upstream).
    g = torch.Generator().manual_seed(seed)
    torch.randn(b["latent_mean"].shape, generator=g), torch.randn(b["latent_mean"].shape, generator=g)
    assert torch.equal(sample_timesteps(3, scheduler.config.num_train_timesteps, Objective(), g), t_up)
    assert loss_weights(scheduler, t_up, Objective()) is None  # no weighting
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_other_objective_changes_the_loss(models):
    unet, controlnet = models
    scheduler = tiny.build_scheduler()
    common = loss_inputs(controlnet, unet, scheduler, batch())
    with torch.no_grad():
        a = loss(common, 1, Objective())
        b = loss(common, 1, Objective(weighting="min_snr"))
    assert not torch.equal(a, b)


def test_timestep_distributions():
    T, n = 1000, 20000
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(n, T, Objective(), g).float()
    cubic = sample_timesteps(n, T, Objective(timesteps="cubic"), g).float()
    logit = sample_timesteps(n, T, Objective(timesteps="logit_normal", logit_mean=1.0), g).float()
    for t in (uniform, cubic, logit):
        assert t.min() >= 0 and t.max() <= T - 1
    assert abs(uniform.mean().item() - T / 2) < 15
    # cubic: P(t > T/2) = P(u^3 < 1/2) = 0.794 (mostly high-noise steps)
    assert abs((cubic > T / 2).float().mean().item() - 0.5 ** (1 / 3)) < 0.02
    assert logit.median().item() > 0.7 * T  # sigmoid(1) = 0.73


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    scheduler = tiny.build_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    t = torch.tensor([0, 100, 500, 999])
    w = loss_weights(scheduler, t, Objective(weighting="min_snr", snr_gamma=5.0))
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    expected = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(w, expected.float())
    assert (w <= 1 + 1e-6).all()


def test_new_layers_get_the_multiplier(models):
    _, controlnet = models
    groups = param_groups(controlnet, 1e-4, 10.0)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    named = {id(p): n for n, p in controlnet.named_parameters()}
    assert all(named[id(p)].startswith(NEW_LAYERS) for p in groups[1]["params"])
    assert not any(named[id(p)].startswith(NEW_LAYERS) for p in groups[0]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(controlnet.parameters()))
    assert len(param_groups(controlnet, 1e-4, 1.0)) == 1  # upstream: one group


@pytest.mark.parametrize("hint_init", ["zero", "random"])
def test_hint_init_reaches_the_copied_encoder_but_not_the_base(hint_init):
    """hint_init random: the condition changes the ControlNet's features from step 0; zero
    (upstream): it does not. Either way the zero convolutions keep the residuals at zero."""
    torch.manual_seed(0)
    unet = tiny.build_unet(RES).eval()
    controlnet = controlnet_from_unet(unet, tiny.build_vae(RES).config, hint_init).eval()
    b = batch(2)
    x, t, text = b["latent_mean"], torch.tensor([500, 500]), b["text_embedding"]
    feats = []
    hook = controlnet.mid_block.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        for cond in (b["conditioning"], 1 - b["conditioning"]):
            down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
            assert all(d.abs().max() == 0 for d in down) and mid.abs().max() == 0
    hook.remove()
    assert torch.equal(feats[0], feats[1]) == (hint_init == "zero")


def test_condition_weight_weighs_the_drawn_latent_pixels():
    cond = torch.zeros(2, 3, 16, 16)
    cond[0, 1, :8, :8] = 1.0  # sample 0 draws its top-left quarter; sample 1 draws nothing
    assert condition_weights(cond, (4, 4), 1.0) is None  # upstream: plain MSE
    w = condition_weights(cond, (4, 4), 3.0)
    assert w.shape == (2, 1, 4, 4)
    assert torch.equal(w[0, 0, :2, :2], torch.full((2, 2), 3.0)) and torch.equal(w[0, 0, 2:, 2:], torch.ones(2, 2))
    assert torch.equal(w[1], torch.ones(1, 4, 4))
    # A weighted mean per sample: an error of 1 at one drawn latent pixel (4 channels) of sample 0
    # counts 3 / 1.5 (its weight over the sample's mean weight) times what it counts unweighted.
    pred, target = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    pred[0, :, 0, 0] = 1.0
    assert diffusion_loss(pred, target, None, None).item() == pytest.approx(4 / 128)
    assert diffusion_loss(pred, target, None, w).item() == pytest.approx(0.5 * (4 * 3 / 64) / 1.5)


def test_condition_weight_changes_the_loss(models):
    unet, controlnet = models
    b = batch()
    b["conditioning"][:, :, RES // 2 :] = 0  # a condition that draws only in its top half
    common = loss_inputs(controlnet, unet, tiny.build_scheduler(), b)
    with torch.no_grad():
        a = loss(common, 1, Objective())
        b = loss(common, 1, Objective(condition_weight=3.0))
    assert not torch.equal(a, b)
