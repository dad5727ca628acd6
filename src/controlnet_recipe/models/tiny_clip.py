"""A small CLIP for the embedded default, built from configs and trained contrastively on the
(image, caption) training pairs: it scores prompt adherence, answers the forgetting probes and
gives the FID/KID features where no pretrained CLIP can be downloaded. Saved with
``save_pretrained`` and loaded back through the same ``from_pretrained`` path as a Hub CLIP."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from .fit import fit
from .segmenter import degrade
from .tiny import MAX_TOKENS, build_tokenizer

DIM = 64


def build_clip(words: list[str], resolution: int, folder: Path) -> tuple[CLIPModel, CLIPProcessor]:
    """A random CLIP (ViT with 8 px patches, 2 layers each side) and its processor, saved in ``folder``."""
    tokenizer = build_tokenizer(words, folder)
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=DIM,
            intermediate_size=2 * DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            image_size=resolution,
            patch_size=max(resolution // 8, 1),
            hidden_size=DIM,
            intermediate_size=2 * DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=DIM,
    )
    images = CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    return CLIPModel(config), processor


def train_clip(
    folder: Path, pixels: torch.Tensor, captions: list[str], words: list[str], steps: int, batch_size: int, seed: int
) -> Path:
    """Contrastive training on ([-1, 1] images, captions) with blur/noise augmentation; saves to ``folder``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, processor = build_clip(words, pixels.shape[-1], folder)
    tok = processor.tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(pixels), (batch_size,), generator=g)
        x = (degrade(pixels[idx], g) + 1) / 2
        pixel_values = (x - mean) / std
        return model(
            input_ids=tok.input_ids[idx], attention_mask=tok.attention_mask[idx], pixel_values=pixel_values, return_loss=True
        ).loss

    fit(model, loss_fn, steps=steps, lr=1e-3, warmup=50, weight_decay=0.1, desc="evaluator: CLIP")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
