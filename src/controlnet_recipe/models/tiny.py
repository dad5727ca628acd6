"""Tiny base components built from configs in code: nothing is downloaded.

The pieces have the same classes as the real ones (AutoencoderKL, CLIPTextModel, CLIPTokenizer,
UNet2DConditionModel; T5EncoderModel, SD3Transformer2DModel, FluxTransformer2DModel and
FlowMatchEulerDiscreteScheduler for the transformer families), are saved with ``save_pretrained``
and loaded back with ``from_pretrained``, so every later stage runs the same code on them as on
the real bases. The T5 encoders share the tiny CLIP tokenizer (the pipelines only tokenize).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

MAX_TOKENS = 32
TEXT_DIM = 64
# The tiny SDXL: a second text encoder with a projection (its pooled embedding), six time ids.
TEXT_DIM_2, POOLED_DIM, TIME_EMBED_DIM = 32, 32, 8
# The tiny SD3 and Flux: a T5 as wide as both CLIPs together (SD3 pads the CLIPs' features to T5's
# width), transformers of 64 channels (4 heads of 16).
T5_DIM, HEADS, HEAD_DIM = TEXT_DIM + TEXT_DIM_2, 4, 16
LATENT_CHANNELS = 4
# Two VAE downsamplings: a 64 px image becomes a 16x16 latent. The ControlNet's hint encoder
# matches the VAE's downsampling (training/step.py reads it from the VAE's config).
VAE_CHANNELS = (16, 32, 64)
SIZE_MULTIPLE = 16  # image sides: the VAE's 4x, then the UNet's 4x (the tiny transformers' 2x2 patches need less)
INITIAL_LOGVAR = -6.0  # the VAE posterior's log-variance at init (see build_vae)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word one token: the most frequent adjacent pair is merged first,
    ties broken by the pair itself, until no word has two symbols left. Plain Python and sorted
    input, so the same words always give the same merges (the tokenizers library's trainer breaks
    ties by hash order, which differs from one process to the next)."""
    corpus = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        counts = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:]))
        if not counts:
            return merges
        a, b = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append((a, b))
        for k, symbols in enumerate(corpus):
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            corpus[k] = merged


def build_tokenizer(words: list[str], folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges (:func:`learn_merges`) keep each of ``words`` one token;
    other text falls back to bytes, never to the unknown token. Saved to ``folder`` and loaded
    back from there."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    words = sorted({"".join(t for t, _ in to_bytes.pre_tokenize_str(w.lower())) for w in words if w})
    merges = learn_merges(words)
    vocab = alphabet + [c + "</w>" for c in alphabet]
    known = set(vocab)
    vocab += [t for t in dict.fromkeys(a + b for a, b in merges) if t not in known]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=MAX_TOKENS)
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _text_config(vocab_size: int, dim: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=dim * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_text_encoder(vocab_size: int, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """The tiny CLIP-L; ``projection``: with its projection (SD3's first encoder)."""
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(_text_config(vocab_size, TEXT_DIM, TEXT_DIM))


def build_t5(vocab_size: int) -> T5EncoderModel:
    """The tiny T5 encoder (SD3's third text encoder, Flux's second)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=T5_DIM,
            d_kv=HEAD_DIM,
            d_ff=2 * T5_DIM,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=MAX_TOKENS,
            dropout_rate=0.0,
            pad_token_id=vocab_size - 1,
            eos_token_id=vocab_size - 1,
            decoder_start_token_id=0,
        )
    )


def build_flux_transformer(guidance_embeds: bool = False) -> FluxTransformer2DModel:
    """The tiny FLUX.1: 4 double-stream and 2 single-stream blocks over 2x2-packed latents, T5's
    features as context, CLIP's pooled embedding; no guidance embedding (sampling uses true CFG)
    unless ``guidance_embeds`` (FLUX.1-dev's)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=4,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def build_sd3_transformer(resolution: int) -> SD3Transformer2DModel:
    """The tiny SD3: 4 joint blocks over 2x2 patches, CLIP-L + CLIP-G + T5 context, both CLIPs'
    pooled projections."""
    latent = resolution // 2 ** (len(VAE_CHANNELS) - 1)
    return SD3Transformer2DModel(
        sample_size=latent,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=4,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=TEXT_DIM + POOLED_DIM,
        pos_embed_max_size=latent,
    )


def build_flow_scheduler(dynamic_shifting: bool) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching schedule: Flux's (shifted by image size at sampling), or SD3's (shift 3)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if dynamic_shifting else 3.0,
        use_dynamic_shifting=dynamic_shifting,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_text_encoder_2(vocab_size: int) -> CLIPTextModelWithProjection:
    """The tiny SDXL's second encoder: like OpenCLIP bigG's, its projection is the pooled embedding."""
    return CLIPTextModelWithProjection(_text_config(vocab_size, TEXT_DIM_2, POOLED_DIM))


def build_vae(resolution: int) -> AutoencoderKL:
    """A three-level AutoencoderKL whose posterior starts narrow (std e^-3, about 0.05): from the
    default unit std, the sampled latent is mostly noise early on and the decoder learns a blur
    (held-out reconstructions scored mIoU 0.21 / NME 0.21 against 0.32 / 0.11 with the narrow start)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=resolution,
    )
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] = INITIAL_LOGVAR
    return vae


def build_unet(resolution: int, sdxl: bool = False, layers_per_block: int = 1) -> UNet2DConditionModel:
    """The tiny UNet; ``sdxl``: SDXL's conditioning (both encoders' features in cross-attention,
    the pooled embedding and six time ids through the timestep embedding, as ``text_time``);
    ``layers_per_block``: 1 (the demo's), or 2 as SD's and SDXL's (ControlNet-XS needs it)."""
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        )
    return UNet2DConditionModel(
        sample_size=resolution // 2 ** (len(VAE_CHANNELS) - 1),
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=layers_per_block,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM + TEXT_DIM_2 if sdxl else TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
        **extra,
    )


def build_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
