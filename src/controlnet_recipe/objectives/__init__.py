"""The training objectives: diffusion (epsilon and v-prediction, min-SNR) and flow matching (SD3, Flux)."""
