"""The ControlNet (the recipe's default, upstream's ``train_controlnet*.py``): a trainable copy of
the base's encoder (SD, SDXL) or of some of its blocks (SD3, Flux), whose outputs the zero
convolutions add to the frozen denoiser's. The family builds it and joins it, as it always has."""

from __future__ import annotations

from .adapter import Adapter


class ControlNet(Adapter):
    name = "controlnet"
    title = "ControlNet"
    copies_blocks = True
    families = ("sd", "sdxl", "sd3", "flux")
    classes = ("ControlNetModel", "SD3ControlNetModel", "FluxControlNetModel")

    def make(self, fam, base, t, a):
        return fam.make_controlnet(base, t)

    def new_layers(self, fam):
        return fam.new_layers

    def residuals(self, fam, module, noised, text, batch, control, device):
        return fam.residuals(module, noised, text, batch, control, device)

    def predict(self, fam, denoiser, noised, text, batch, residuals, dtype, device):
        return fam.predict(denoiser, noised, text, batch, residuals, dtype, device)

    def pipeline_class(self, fam):
        return fam.controlnet_pipeline_class

    def saved_class(self, fam):
        return fam.controlnet_class
