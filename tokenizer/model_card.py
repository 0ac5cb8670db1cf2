"""The model card written next to a saved or pushed tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .modeling import VQTokenizer


# Marks a card that save_pretrained wrote itself: such a card is rewritten on the next save (it describes the
# weights saved with it); a card without this line was written or edited by hand and is kept.
GENERATED_CARD_MARKER = ("<!-- Written by vqstack's save_pretrained, which rewrites this card when it saves into this "
                         "folder again. Delete this line to keep your edits. -->")


def remove_generated_card(folder: Path) -> None:
    """Delete `folder`/README.md if save_pretrained generated it, so that the next save writes a current one."""
    card = folder / "README.md"
    if card.is_file() and GENERATED_CARD_MARKER in card.read_text(errors="replace"):
        card.unlink()


def tokenizer_model_card(tokenizer: VQTokenizer) -> ModelCard:
    """Architecture, codebook, downsampling factor, and training data / metrics when known."""
    config = tokenizer.config
    info = tokenizer.training_info
    params = sum(p.numel() for p in tokenizer.parameters())
    lines = [
        "---",
        ModelCardData(library_name="vqstack", tags=["vqstack", "image-tokenizer", "vqgan"]).to_yaml(),
        "---",
        "",
        GENERATED_CARD_MARKER,
        "",
        "# VQ image tokenizer",
        "",
        "A VQGAN-style image tokenizer made with [vqstack](https://pypi.org/project/vqstack/): a convolutional",
        "encoder, a codebook quantizer and a convolutional decoder. It turns images into grids of integer codes",
        "and back.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        f"| parameters | {params / 1e6:.2f}M |",
        f"| image channels | {config.in_channels} |",
        f"| downsampling factor | {config.downsample_factor} (a {8 * config.downsample_factor}px image becomes "
        f"an 8x8 grid) |",
        f"| quantizer | {config.quantizer.kind} |",
        f"| codebook size | {tokenizer.codebook_size} |",
        f"| latent channels | {config.latent_channels} |",
        f"| channel multipliers | {list(config.channel_multipliers)} x {config.base_channels} |",
        f"| ResNet blocks per level | {config.num_res_blocks} |",
        f"| attention levels | {list(config.attention_levels) or 'none'} (bottleneck: {config.mid_attention}) |",
        f"| parameter-free shortcuts | resampling: {config.resample_shortcuts}, latent: {config.latent_shortcuts} |",
        "",
        "## Training",
        "",
    ]
    if info:
        lines += [f"- **{key}**: {value}" for key, value in info.items() if not isinstance(value, dict)]
        for key, value in info.items():
            if isinstance(value, dict):
                lines += ["", f"### {key}", "", "| metric | value |", "|---|---|"]
                lines += [f"| {name} | {_fmt(v)} |" for name, v in value.items()]
    else:
        lines.append("Training data and metrics were not recorded for this checkpoint.")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from tokenizer import VQTokenizer",
        "tok = VQTokenizer.from_pretrained(\"<this repo or folder>\")",
        "pixels = tok.image_processor.preprocess(images)   # PIL / numpy / uint8 -> [-1, 1]",
        "indices = tok.encode(pixels).indices              # (B, h, w) integers",
        "images = tok.image_processor.postprocess(tok.decode(indices))",
        "```",
        "",
    ]
    return ModelCard("\n".join(lines))


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
