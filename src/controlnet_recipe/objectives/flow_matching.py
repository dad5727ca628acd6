"""Flow matching, the objective of the transformer families (SD3, Flux): x_t = (1 - sigma) x0 +
sigma noise, the model predicts the velocity noise - x0. Timestep densities and loss weightings
are diffusers' own (``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3``),
as upstream's train_controlnet_sd3.py and train_controlnet_flux.py call them."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .diffusion import UPSTREAM, Noised, Objective


def flow_sigmas(scheduler, n: int, objective: Objective, generator: torch.Generator | None = None):
    """(timesteps, sigmas), each (n,). u is drawn from the density and indexes the scheduler's
    table, which runs from sigma 1 down, as upstream's scripts do (``objective.shift`` None: the
    table's own sigmas, already shifted where its config says so: SD3's shift 3; Flux shifts at
    sampling only); with a shift s, sigma = 1 - u shifted to s sigma / (1 + (s - 1) sigma).

    ``logit_mean`` means what it means for the UNet families: positive favours high-noise steps.
    Upstream's flow scripts index the descending table with u, so their ``--logit_mean`` has the
    other sign; at their default, 0, the draws are theirs exactly."""
    if objective.timesteps == "cubic":  # T2I-Adapter's: mostly high-noise steps (u near 0)
        u = torch.rand(n, generator=generator) ** 3
    else:
        scheme = objective.timesteps if objective.timesteps in ("logit_normal", "mode") else "uniform"
        u = compute_density_for_timestep_sampling(
            scheme, n, -objective.logit_mean, objective.logit_std, objective.mode_scale, generator=generator
        )
    steps = scheduler.config.num_train_timesteps
    if objective.shift is None:
        table = training_table(scheduler)
        idx = (u * steps).long()
        return table.timesteps[idx], table.sigmas[idx]
    s, sigmas = objective.shift, 1 - u
    sigmas = s * sigmas / (1 + (s - 1) * sigmas)
    return sigmas * steps, sigmas


def training_table(scheduler):
    """The scheduler's timesteps and sigmas as at init (upstream's ``noise_scheduler_copy``),
    made once per scheduler: sampling's ``set_timesteps`` never moves them."""
    table = getattr(scheduler, "_training_table", None)
    if table is None:
        table = type(scheduler).from_config(scheduler.config)
        scheduler._training_table = table
    return table


def flow_inputs(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None, objective: Objective = UPSTREAM):
    """:class:`Noised` for one flow-matching step, drawn in upstream's order: the noise, then the
    timesteps. ``objective.precondition`` (SD3 upstream's default): the model's output becomes
    an estimate of x0 (output x (-sigma) + x_t, :func:`flow_output`) and the target is x0."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    timesteps, sigmas = flow_sigmas(scheduler, x0.shape[0], objective, generator)
    sigmas = sigmas.to(x0.device, x0.dtype)
    s = sigmas.view(-1, *[1] * (x0.ndim - 1))
    noisy = (1 - s) * x0 + s * noise
    target = x0 if objective.precondition else noise - x0
    weights = None
    if objective.weighting in ("sigma_sqrt", "cosmap"):
        weights = compute_loss_weighting_for_sd3(objective.weighting, sigmas)
    elif objective.weighting != "none":
        raise ValueError(
            f"train.loss_weighting: {objective.weighting!r} is not a flow-matching weighting; expected none | sigma_sqrt | cosmap"
        )
    return Noised(noisy, timesteps.to(x0.device), target, weights, sigmas)


def flow_output(pred: torch.Tensor, noised: Noised, objective: Objective) -> torch.Tensor:
    """What the loss compares with the target: the model's velocity, or its x0 estimate."""
    if not objective.precondition:
        return pred
    s = noised.sigmas.view(-1, *[1] * (pred.ndim - 1)).to(pred)
    return pred * (-s) + noised.noisy.to(pred)
