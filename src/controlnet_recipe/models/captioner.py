"""BLIP image captioning for datasets that come without captions (the source recipe used BLIP-large)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..core.images import to_rgb

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"


class BlipCaptioner:
    """Greedy BLIP captions, batched. ``model`` is a hub id or a local folder (both go through ``from_pretrained``).

    With ``prompt`` (conditional captioning, e.g. "a photography of") the decoder continues the prompt and the
    prompt is removed from the start of each caption.
    """

    def __init__(
        self,
        model: str = DEFAULT_CAPTIONER,
        revision: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 30,
        prompt: str | None = None,
    ) -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt.strip() if prompt else None
        self.processor = BlipProcessor.from_pretrained(model, revision=revision)
        self.model = BlipForConditionalGeneration.from_pretrained(model, revision=revision, dtype=self.dtype)
        self.model.to(self.device).eval()

    def _batch(self, images: list[Image.Image]) -> list[str]:
        import torch

        rgb = [to_rgb(im) for im in images]
        if self.prompt:
            inputs = self.processor(images=rgb, text=[self.prompt] * len(rgb), return_tensors="pt")
        else:
            inputs = self.processor(images=rgb, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if self.prompt:
            # generate() feeds the prompt without its trailing [SEP] and returns it in front of the new tokens.
            out = out[:, inputs["input_ids"].shape[1] - 1 :]
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (any PIL mode; converted to RGB), in order."""
        captions: list[str] = []
        for i in range(0, len(images), self.batch_size):
            captions.extend(self._batch(images[i : i + self.batch_size]))
        return captions


BLIP_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # BLIP's decoder starts from [DEC]


def save_random_blip(folder: Path, words: list[str], text: dict, vision: dict, seed: int = 0, max_length: int = 512) -> Path:
    """A BLIP captioner with random weights, built from configs (``text`` and ``vision`` are
    BlipTextConfig / BlipVisionConfig arguments) with a word-level vocabulary, saved with
    ``save_pretrained`` so that :class:`BlipCaptioner` loads it like a hub checkpoint. For tests
    and benchmarks: nothing is downloaded."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = BLIP_SPECIAL_TOKENS + list(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5: the argument is `vocab` (a file or a dict); `vocab_file=` is silently ignored.
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=max_length)
    ids = {t: vocab.index(t) for t in BLIP_SPECIAL_TOKENS}
    text_cfg = BlipTextConfig(
        vocab_size=len(vocab),
        pad_token_id=ids["[PAD]"],
        bos_token_id=ids["[DEC]"],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
        **text,
    )
    vision_cfg = BlipVisionConfig(**vision)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(BlipConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict())).save_pretrained(
        folder
    )
    size = vision_cfg.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder
