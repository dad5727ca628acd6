"""CLIP, for prompt adherence (CLIP score), zero-shot probes and FID/KID features.

The model is any transformers ``CLIPModel`` loaded through ``from_pretrained``: a pretrained one
from the Hub (pinned by revision, its weights checked against a sha256 and kept in the HF cache),
or the small CLIP that the evaluator stage trains for the embedded default.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import BadInput, MissingInput

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_file(name_or_path: str, revision: str | None) -> Path:
    """The weights file of a local folder, or of a Hub model (downloaded once into the HF cache)."""
    folder = Path(name_or_path)
    if folder.is_dir():
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
        raise MissingInput(f"{folder}: no CLIP weights ({' or '.join(WEIGHT_FILES)})")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name_or_path, WEIGHT_FILES[0], revision=revision))


def verify_weights(name_or_path: str, revision: str | None, sha256: str | None) -> str:
    """The weights' sha256; a one-line error if it is not the pinned one."""
    path = weights_file(name_or_path, revision)
    found = sha256_file(path)
    if sha256 and found != sha256.lower():
        raise BadInput(f"{path}: sha256 {found}, expected {sha256} (evaluator.clip_sha256)")
    return found


@dataclass
class Clip:
    model: object  # transformers.CLIPModel
    processor: object  # transformers.CLIPProcessor
    sha256: str

    @classmethod
    def load(cls, name_or_path: str, revision: str | None = None, sha256: str | None = None) -> Clip:
        from transformers import CLIPModel, CLIPProcessor

        found = verify_weights(name_or_path, revision, sha256)
        model = CLIPModel.from_pretrained(name_or_path, revision=revision).eval()
        processor = CLIPProcessor.from_pretrained(name_or_path, revision=revision)
        if torch.cuda.is_available():
            model = model.cuda()
        return cls(model, processor, found)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> the model's input: resized (bicubic, antialiased) to its size and
        normalised with its processor's mean and std."""
        ip = self.processor.image_processor
        crop = ip.crop_size
        size = int(crop if isinstance(crop, int) else crop["height"] if isinstance(crop, dict) else crop.height)
        x = images.float().div(255)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, D) projected image embeddings of uint8 images (not normalised)."""
        out = []
        for i in range(0, len(images), batch_size):
            pv = self.pixel_values(images[i : i + batch_size]).to(self.device)
            emb = self.model.get_image_features(pixel_values=pv)
            out.append((emb if torch.is_tensor(emb) else emb.pooler_output).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.processor.tokenizer(
                texts[i : i + batch_size],
                padding="max_length",
                truncation=True,
                return_tensors="pt",
                max_length=self.model.config.text_config.max_position_embeddings,
            ).to(self.device)
            emb = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
            out.append((emb if torch.is_tensor(emb) else emb.pooler_output).float().cpu())
        return torch.cat(out)

    def clip_score(self, images: torch.Tensor, texts: list[str]) -> np.ndarray:
        """Per image: 100 * max(cos(image, its text), 0), the CLIP score of Hessel et al. (2021)
        as torchmetrics computes it."""
        img = F.normalize(self.image_features(images), dim=-1)
        txt = F.normalize(self.text_features(texts), dim=-1)
        return (100 * (img * txt).sum(-1).clamp(min=0)).numpy()

    def zero_shot(self, images: torch.Tensor, labels: list[str]) -> np.ndarray:
        """Index of the most similar label for each image."""
        img = F.normalize(self.image_features(images), dim=-1)
        txt = F.normalize(self.text_features(labels), dim=-1)
        return (img @ txt.T).argmax(-1).numpy()

    def feature_module(self) -> torch.nn.Module:
        """The image encoder as a torchmetrics feature extractor (uint8 images in, features out)."""
        return _Features(self)


class _Features(torch.nn.Module):
    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.model.config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(images.cpu()).to(images.device)


def to_uint8(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) uint8 tensor of PIL images."""
    arr = [np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous()
