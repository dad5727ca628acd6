"""What the transformer families (SD3, Flux) share: flow matching as the objective, the condition
as VAE latents (cached like the image's, sampled each step), T5 among the text encoders, text
encoding by the pipeline's own ``encode_prompt``, and the ``control_image`` pipeline argument."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .family import CONTROL, POOLED, TEXT, BaseComponents, Family, LatentSpace

if TYPE_CHECKING:
    import torch

    from ...objectives.diffusion import Noised, Objective


class FlowFamily(Family):
    denoiser_name = "transformer"
    control_latents = True
    shifts_latents = True
    control_argument = "control_image"
    unused_parameters = True

    text_encoder_classes: tuple[str, ...]  # transformers' classes of text_encoder, text_encoder_2[, text_encoder_3]
    transformer_class: str  # diffusers' class of the denoiser

    def load(self, name_or_path, revision, vae=None, max_sequence_length=None) -> BaseComponents:
        """Each component from its subfolder, as the family's pipeline folder lays them out."""
        import diffusers
        import transformers

        from .sd import load_vae

        parts = {}
        for suffix, cls in zip(("", "_2", "_3"), self.text_encoder_classes):
            tok, model = tokenizer_and_model(name_or_path, f"text_encoder{suffix}", revision, getattr(transformers, cls))
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tok, model
        kw = {"revision": revision}
        return BaseComponents(
            family=self.name,
            vae=load_vae(name_or_path, revision, vae),
            denoiser=getattr(diffusers, self.transformer_class).from_pretrained(name_or_path, subfolder="transformer", **kw),
            noise_scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw),
            max_sequence_length=self.sequence_length(max_sequence_length),
            **parts,
        )

    def sequence_length(self, requested: int | None) -> int:
        return requested or self.default_max_sequence_length

    def tiny_objective(self, snr_gamma: float | None) -> Objective:
        """Flow matching with logit-normal timesteps, as SD3 and Flux were trained (no SNR weighting)."""
        from ...objectives.diffusion import Objective

        return Objective(timesteps="logit_normal")

    def noise(self, scheduler, x0, generator, objective: Objective) -> Noised:
        from ...objectives.flow_matching import flow_inputs

        return flow_inputs(scheduler, x0, generator, objective)

    def output(self, pred, noised: Noised, objective: Objective):
        from ...objectives.flow_matching import flow_output

        return flow_output(pred, noised, objective)

    def control_input(self, batch: dict, latents: LatentSpace, generator, device) -> torch.Tensor:
        """A sample of the condition's posterior, shifted and scaled as the pipeline does it."""
        from ...objectives.diffusion import sample_latents

        mean, std = batch[f"{CONTROL}_mean"], batch[f"{CONTROL}_std"]
        return sample_latents(mean, std, latents.scaling_factor, generator, latents.shift_factor).to(device)

    def sampling_kwargs(self, base: BaseComponents, n: int, guidance_scale: float, conditions=None, scale: float = 1.0) -> dict:
        kw = {"guidance_scale": guidance_scale, "max_sequence_length": base.max_sequence_length}
        if conditions is not None:
            kw.update({self.control_argument: conditions, "controlnet_conditioning_scale": scale})
        return kw

    encodes_prompts_on_device = False
    # train_controlnet_sd3.py / _flux.py: logit-normal (0, 1) timesteps on the scheduler's table, no weighting
    upstream_objective = {
        "timestep_sampling": "logit_normal",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "flow_shift": None,
        "loss_weighting": "none",
    }

    def validation_inputs(self, base, prompt, n, guidance_scale, conditions, device, dtype) -> dict:
        """The prompt's and the empty prompt's embeddings, encoded where the text encoders are (the
        CPU while training): validation never puts T5 on the GPU."""
        both = self.encode(base, [prompt, ""])  # the prompt and the empty prompt, one encoder pass
        feats, empty = {k: v[:1] for k, v in both.items()}, {k: v[1:] for k, v in both.items()}
        kw = self.sampling_kwargs(base, n, guidance_scale, conditions)
        kw.pop("negative_prompt", None)  # given as embeddings below

        def rep(t):
            return t.to(device, dtype).expand(n, *t.shape[1:])

        return {
            **kw,
            "prompt_embeds": rep(feats[TEXT]),
            "pooled_prompt_embeds": rep(feats[POOLED]),
            "negative_prompt_embeds": rep(empty[TEXT]),
            "negative_pooled_prompt_embeds": rep(empty[POOLED]),
        }

    def scheduler_for_sampling(self, base: BaseComponents, scheduler=None):
        """A fresh copy of the base's flow-matching scheduler (training reads the base's own table)."""
        return scheduler or type(base.noise_scheduler).from_config(base.noise_scheduler.config)

    def pipeline_parts(self, base: BaseComponents, scheduler=None) -> dict:
        """The base's components as the family's pipelines take them: its text encoders and
        tokenizers (two for Flux, three for SD3), the VAE, the transformer, a fresh scheduler."""
        parts = dict(scheduler=self.scheduler_for_sampling(base, scheduler), vae=base.vae, transformer=base.denoiser)
        for suffix in ("", "_2", "_3"):
            if getattr(base, f"text_encoder{suffix}") is not None:
                parts[f"text_encoder{suffix}"] = getattr(base, f"text_encoder{suffix}")
                parts[f"tokenizer{suffix}"] = getattr(base, f"tokenizer{suffix}")
        return parts

    def caption_batch(self, base: BaseComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        """``encode`` through the family's pipeline, on the text encoders' device."""
        import torch

        pipe = self.pipeline(base)
        device = next(base.text_encoder.parameters()).device
        with torch.no_grad():
            return self.encode_with(pipe, captions, device, self.sequence_length(base.max_sequence_length))

    def encode(self, base: BaseComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.float().cpu() for k, v in self.caption_batch(base, captions).items()}

    def encode_with(self, pipe, captions: list[str], device, max_sequence_length: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def tokenizer_and_model(name_or_path: str, subfolder: str, revision: str | None, model_class):
    from transformers import AutoTokenizer

    kw = {"subfolder": subfolder, "revision": revision}
    folder = subfolder.replace("text_encoder", "tokenizer")
    return AutoTokenizer.from_pretrained(name_or_path, subfolder=folder, revision=revision), model_class.from_pretrained(
        name_or_path, **kw
    )
