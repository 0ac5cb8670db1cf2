"""`GenerationPipeline`: a prior samples index grids, the tokenizer decodes them into images.

Saved as one folder: `tokenizer/`, `prior/` and `pipeline.json`. `accelerate launch scripts/generate.py`
spreads a large request over all processes and gathers the images on the main process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from tqdm.auto import tqdm

from prior import Prior, load_prior
from prior.sampling import check_generators
from tokenizer import VQTokenizer
from tokenizer.model_card import GENERATED_CARD_MARKER, remove_generated_card
from tokenizer.weights import create_model_repo, hub_unreachable_error

from .images import image_grid, save_image
from .training import cpu_only_multiprocess

logger = logging.getLogger(__name__)

PIPELINE_CONFIG_NAME = "pipeline.json"
PIPELINE_FORMAT_VERSION = 1
# Files an earlier push may have left that this one does not replace when its parts have no training record.
STALE_HUB_FILES = ["tokenizer/training_info.json", "prior/training_metrics.json"]


class IncompatibleComponentsError(ValueError):
    """The prior's codebook size does not fit the tokenizer."""


@dataclass
class GenerationOutput:
    """Generated images with the index grids they were decoded from."""

    images: Any  # list of PIL images, uint8 numpy (N, H, W, C), or float tensor (N, C, H, W) in [-1, 1]
    indices: torch.Tensor  # (N, h, w)
    labels: torch.Tensor | None  # (N,) class ids, when the prior is class-conditional


class GenerationPipeline:
    """Sample images: `pipeline(num_images, labels=...)`.

    `labels` are class ids (ints) or class names from `class_names`. Sampling options are those of
    `Prior.sample` (temperature -> top-k -> top-p, classifier-free `guidance_scale`).
    """

    def __init__(self, tokenizer: VQTokenizer, prior: Prior, class_names: Sequence[str] | None = None):
        if not isinstance(tokenizer, VQTokenizer):
            raise TypeError(f"tokenizer must be a VQTokenizer, got {type(tokenizer).__name__}")
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a vqstack Prior, got {type(prior).__name__}")
        check_compatible(tokenizer, prior)
        if class_names is not None and (isinstance(class_names, str) or not isinstance(class_names, Sequence)
                                        or not all(isinstance(name, str) for name in class_names)
                                        or len(set(class_names)) != len(class_names)):
            raise ValueError(f"class_names must be a list of distinct strings, got {class_names!r}")
        if class_names is not None and len(class_names) != prior.config.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but the prior has "
                             f"num_classes={prior.config.num_classes}")
        self.tokenizer = tokenizer.eval()
        self.prior = prior.eval()
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.prior.config.grid_shape
        return h * self.tokenizer.downsample_factor, w * self.tokenizer.downsample_factor

    def to(self, device: torch.device | str) -> GenerationPipeline:
        self.tokenizer.to(device)
        self.prior.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    def _label_ids(self, labels: Sequence[int | str] | torch.Tensor | None, num_images: int) -> torch.Tensor | None:
        if labels is None:
            return None
        if isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim == 0:
            labels = labels.item()
        if isinstance(labels, str) or not hasattr(labels, "__iter__"):
            labels = [labels] * num_images  # one label for every image; each label is checked below
        ids = []
        for label in labels.tolist() if isinstance(labels, torch.Tensor) else labels:
            if isinstance(label, bool) or not isinstance(label, (numbers.Integral, str)):
                raise TypeError(f"labels must be class ids (ints) or class names, got {label!r}")
            if isinstance(label, str):
                if not self.class_names or label not in self.class_names:
                    raise ValueError(f"unknown class name {label!r}; known names: {self.class_names}")
                label = self.class_names.index(label)
            ids.append(int(label))
        if len(ids) != num_images:
            raise ValueError(f"labels has {len(ids)} entries but num_images={num_images}")
        # Checked here, before any sampling: the prior would only refuse the batch that holds a bad id.
        num_classes = self.prior.config.num_classes
        if not num_classes:
            raise ValueError("labels were given, but the prior is unconditional (num_classes=0); pass labels=None")
        bad = sorted({i for i in ids if not 0 <= i < num_classes})
        if bad:
            raise ValueError(f"labels must be class ids in [0, {num_classes}), got {bad[:8]}")
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, num_images: int = 1, labels: Sequence[int | str] | torch.Tensor | int | str | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 guidance_scale: float = 1.0, batch_size: int = 64,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 seed: int | None = None, output_type: str = "pil", progress: bool = True) -> GenerationOutput:
        """Sample `num_images` grids in batches of `batch_size` and decode them.

        Randomness: `seed` gives image i its own generator, seeded by `image_seed(seed, i)`, so the images do not
        depend on `batch_size` (nor, in `generate_distributed`, on the number of processes). `generator` is either
        a list of `num_images` generators, one per image (the same independence), or one generator shared by the
        whole call, whose draws then depend on how the images are batched.
        """
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if seed is not None:
            generator = image_generators(seed, range(num_images), self.device)
        check_generators(generator, num_images)
        label_ids = self._label_ids(labels, num_images)
        grids, images = [], []
        starts = range(0, num_images, batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress or len(starts) == 1):
            count = min(batch_size, num_images - start)
            batch_labels = None if label_ids is None else label_ids[start:start + count].to(self.device)
            batch_generator = generator if not isinstance(generator, Sequence) else generator[start:start + count]
            indices = self.prior.sample(count, labels=batch_labels, temperature=temperature, top_k=top_k, top_p=top_p,
                                        guidance_scale=guidance_scale, generator=batch_generator)  # (b, h, w)
            grids.append(indices.cpu())
            images.append(self.tokenizer.decode(indices).cpu())  # (b, C, H, W) in [-1, 1]
        pixels = torch.cat(images)
        result = pixels if output_type == "pt" else self.tokenizer.image_processor.postprocess(pixels, output_type)
        return GenerationOutput(images=result, indices=torch.cat(grids), labels=label_ids)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `tokenizer/`, `prior/` and `pipeline.json` under `save_directory`."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.prior.save_pretrained(folder / "prior")
        config = {"format_version": PIPELINE_FORMAT_VERSION, "tokenizer": "tokenizer", "prior": "prior",
                  "prior_type": self.prior.config.prior_type, "class_names": self.class_names,
                  "image_size": list(self.image_size)}
        (folder / PIPELINE_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        remove_generated_card(folder)  # a card from an earlier save here describes other weights; keep hand-written ones
        if not (folder / "README.md").exists():
            pipeline_model_card(self, sample_grid=None).save(folder / "README.md")

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None,
                        map_location: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | str | None = None) -> GenerationPipeline:
        """Load a pipeline folder, or download one from the Hub (JSON and safetensors files only); the Hub options
        apply to a repo id only. `map_location`: the device both parts are loaded onto; `torch_dtype`: the
        precision of both, as in `VQTokenizer.from_pretrained` ("auto": each part in the one it was saved in)."""
        folder = Path(path_or_repo_id)
        name = str(path_or_repo_id)
        if not folder.is_dir() and (folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"{name!r} is neither a folder written by save_pretrained nor a Hub repo id "
                                    "like 'user/name'")
        if not folder.is_dir():
            try:
                folder = Path(snapshot_download(
                    name, allow_patterns=["*.json", "*.safetensors", "*.md"], revision=revision, cache_dir=cache_dir,
                    force_download=force_download, local_files_only=local_files_only, token=token))
            except LocalEntryNotFoundError as error:
                raise hub_unreachable_error(name, "the pipeline", error) from error
        config_file = folder / PIPELINE_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{path_or_repo_id} has no {PIPELINE_CONFIG_NAME}: it is not a saved pipeline")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
        version = config.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{config_file} has format_version={version!r}; expected a positive int")
        if version > PIPELINE_FORMAT_VERSION:
            raise ValueError(f"{config_file} has format_version={version!r}; this vqstack reads versions <= "
                             f"{PIPELINE_FORMAT_VERSION}, upgrade vqstack to load it")
        tokenizer = VQTokenizer.from_pretrained(folder / "tokenizer", map_location=map_location, torch_dtype=torch_dtype)
        prior = load_prior(folder / "prior", map_location=map_location, torch_dtype=torch_dtype)
        try:
            return cls(tokenizer, prior, class_names=config.get("class_names"))
        except ValueError as error:
            raise ValueError(f"{config_file}: {error}") from None

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    num_sample_images: int = 16, seed: int = 0) -> str:
        """Upload both parts, `pipeline.json`, a sample grid and one model card covering everything.

        `private=True` creates a private repo and refuses an existing public one (the Hub would keep it public)."""
        api = HfApi(token=token)
        repo_id = create_model_repo(api, repo_id, private)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self.save_pretrained(folder)
            grid = self.sample_grid(num_sample_images, seed=seed)
            save_image(grid, folder / "samples.png")
            pipeline_model_card(self, sample_grid="samples.png").save(folder / "README.md")
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                       commit_message="Upload vqstack generation pipeline",
                                       delete_patterns=STALE_HUB_FILES)
        return str(commit)

    def sample_grid(self, num_images: int = 16, seed: int = 0, **sampling: Any):
        """A PIL grid of about `num_images` samples: one row per class for a class-conditional prior with at most
        `num_images` classes; with more classes, `num_images` samples of classes spread evenly over them."""
        num_classes = self.prior.config.num_classes
        if num_classes and num_classes <= num_images:
            columns = num_images // num_classes
            labels = [c for c in range(num_classes) for _ in range(columns)]
        else:
            columns = math.ceil(math.sqrt(num_images))
            labels = [i * num_classes // num_images for i in range(num_images)] if num_classes else None
        count = len(labels) if labels else num_images
        out = self(count, labels=labels, seed=seed, output_type="pt", progress=False, **sampling)
        return image_grid(out.images, columns=columns, scale=2)


def replace_saved_pipeline(pipeline: GenerationPipeline, folder: Path) -> None:
    """`pipeline.save_pretrained(folder)`, replacing an earlier pipeline there in one rename (no mix of the two)."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    pipeline.save_pretrained(temporary)
    card = folder / "README.md"
    if card.is_file() and GENERATED_CARD_MARKER not in card.read_text(errors="replace"):
        shutil.copyfile(card, temporary / "README.md")  # a card the user wrote is theirs, as in save_pretrained
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)


def check_compatible(tokenizer: VQTokenizer, prior: Prior) -> None:
    """Raise `IncompatibleComponentsError` when the prior's tokens cannot be decoded by the tokenizer.

    The codebook sizes must match. The grid shape need not: the tokenizer is convolutional and decodes a grid of
    any size, so a prior trained on grids encoded at another resolution than the tokenizer's training resolution
    (e.g. `vqstack encode --resolution 64` with a tokenizer trained on 32px images) is accepted, with a warning.
    """
    if prior.config.codebook_size != tokenizer.codebook_size:
        raise IncompatibleComponentsError(
            f"the prior models {prior.config.codebook_size} codes but the tokenizer has {tokenizer.codebook_size}: "
            "train the prior on grids encoded by this tokenizer")
    resolution = tokenizer.training_info.get("resolution")
    if resolution:
        expected = tokenizer.token_grid_shape(resolution, resolution)
        grid = tuple(prior.config.grid_shape)
        if grid != tuple(expected):
            f = tokenizer.downsample_factor
            logger.warning(
                "the prior's %s grids decode to %dx%d images, but the tokenizer was trained on %dpx images (%s grids); "
                "that is expected when the prior's data was encoded at another resolution, otherwise check that the "
                "prior was trained on grids from this tokenizer", grid, grid[0] * f, grid[1] * f, resolution, expected)


def pipeline_model_card(pipeline: GenerationPipeline, sample_grid: str | None) -> ModelCard:
    tokenizer, prior = pipeline.tokenizer, pipeline.prior
    h, w = prior.config.grid_shape
    lines = [
        "---", "library_name: vqstack", "tags:", "- vqstack", "- image-generation", "- vqgan", "---", "",
        GENERATED_CARD_MARKER, "",
        "# vqstack generation pipeline", "",
        f"A {prior.config.prior_type} prior over {h}x{w} grids of {prior.config.codebook_size} codes, decoded by a "
        f"VQ tokenizer (downsampling factor {tokenizer.downsample_factor}) into "
        f"{pipeline.image_size[0]}x{pipeline.image_size[1]} images.", "",
    ]
    if sample_grid:
        lines += [f"![samples]({sample_grid})", ""]
    lines += ["| part | parameters | details |", "|---|---|---|",
              f"| tokenizer | {sum(p.numel() for p in tokenizer.parameters()) / 1e6:.2f}M | "
              f"{tokenizer.config.quantizer.kind}, {tokenizer.codebook_size} codes |",
              f"| prior | {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M | {prior.config.prior_type}, "
              f"{f'{prior.config.num_classes} classes' if prior.config.num_classes else 'unconditional'} |", ""]
    if pipeline.class_names:
        lines += [f"Classes: {', '.join(pipeline.class_names)}", ""]
    for title, info in (("Tokenizer training", tokenizer.training_info), ("Prior training", prior.training_metrics)):
        if info:
            lines += [f"## {title}", "", "```json", json.dumps(info, indent=2, default=str), "```", ""]
    lines += ["## Usage", "", "```python", "from pipelines import GenerationPipeline",
              'pipe = GenerationPipeline.from_pretrained("<this repo or folder>")',
              "images = pipe(8, labels=[0] * 8, seed=0).images" if prior.config.num_classes
              else "images = pipe(8, seed=0).images", "```", ""]
    return ModelCard("\n".join(lines))


def image_seed(seed: int, index: int) -> int:
    """Seed of image `index` of a request with `seed`: derived from the pair, so that neighbouring seeds share no
    images (with seed + index, image 1 of seed 0 would repeat image 0 of seed 1)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_generators(seed: int, indices: Iterable[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image of `indices`, seeded by `image_seed(seed, index)`."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, index)) for index in indices]


def generate_distributed(pipeline: GenerationPipeline, num_images: int, labels: Sequence[int] | None = None,
                         seed: int = 0, **sampling: Any) -> GenerationOutput | None:
    """Split a request over all `accelerate` processes; the main process gets every image, the others None.

    Image i is sampled with its own generator, seeded by `image_seed(seed, i)` whichever process samples it: the
    result is that of `pipeline(num_images, seed=seed)` in one process, whatever the number of processes.
    """
    state = PartialState(cpu=cpu_only_multiprocess())
    pipeline.to(state.device)
    positions = list(range(num_images))
    with state.split_between_processes(positions) as mine:
        local_labels = [labels[i] for i in mine] if labels is not None else None
        generators = image_generators(seed, mine, pipeline.device)
        out = pipeline(len(mine), labels=local_labels, generator=generators, output_type="np", **sampling) if mine else None
        shard = [] if out is None else list(zip(mine, out.images, out.indices.numpy()))
    gathered = gather_object(shard)
    if not state.is_main_process:
        return None
    gathered.sort(key=lambda item: item[0])
    images = np.stack([item[1] for item in gathered])
    indices = torch.from_numpy(np.stack([item[2] for item in gathered]))
    label_tensor = torch.tensor(labels) if labels is not None else None
    return GenerationOutput(images=images, indices=indices, labels=label_tensor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate images with a saved vqstack pipeline.")
    parser.add_argument("--pipeline", type=str, required=True, help="folder or Hub id of a saved pipeline")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--labels", type=str, nargs="*", default=None,
                        help="class ids or names; one per image, or one for all; 'all' = cycle through classes")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _parse_labels(raw: list[str] | None, pipeline: GenerationPipeline, num_images: int) -> list | None:
    if not raw:
        return None
    if raw == ["all"]:
        if not pipeline.prior.config.num_classes:
            raise ValueError("--labels all cycles through the classes, but this pipeline's prior is unconditional; "
                             "drop --labels")
        return [i % pipeline.prior.config.num_classes for i in range(num_images)]
    # A class name wins over an id: image-folder classes named "0".."10" are sorted as strings ("10" before "2").
    names = pipeline.class_names or []
    labels = [x if x in names else int(x) if x.lstrip("-").isdigit() else x for x in raw]
    if len(labels) == 1:
        labels = labels * num_images
    ids = pipeline._label_ids(labels, num_images)
    return ids.tolist() if ids is not None else None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if PartialState(cpu=cpu_only_multiprocess()).is_main_process:
        # Before sampling: an unusable --output_dir (a file, no permission) would otherwise fail after all of it.
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    pipeline = GenerationPipeline.from_pretrained(args.pipeline)
    labels = _parse_labels(args.labels, pipeline, args.num_images)
    out = generate_distributed(pipeline, args.num_images, labels=labels, seed=args.seed,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    if out is not None:  # the main process
        _write_outputs(out, pipeline, args)
    # Every process leaves the process group before exiting: a process that exits with gloo's threads still
    # running can abort ("terminate called without an active exception") and fail the whole launch.
    state = PartialState(cpu=cpu_only_multiprocess())
    state.wait_for_everyone()
    state.destroy_process_group()


def _write_outputs(out: GenerationOutput, pipeline: GenerationPipeline, args: argparse.Namespace) -> None:
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # A rerun into the folder replaces the earlier run's outputs, so that no image of that run is left beside these.
    numbered = [path for path in folder.glob("*.png") if re.fullmatch(r"\d{5,}\.png", path.name)]  # {index:05d}
    stale = [*numbered, folder / "grid.png", folder / "indices.npy"]
    for path in stale:
        path.unlink(missing_ok=True)
    from PIL import Image

    for index, image in enumerate(out.images):
        save_image(Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image), folder / f"{index:05d}.png")
    pixels = torch.from_numpy(out.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    columns = pipeline.prior.config.num_classes or int(math.sqrt(args.num_images)) or 1
    save_image(image_grid(pixels, columns=min(columns, args.num_images), scale=2), folder / "grid.png")
    np.save(folder / "indices.npy", out.indices.numpy())
    print(f"wrote {len(out.images)} images and grid.png to {folder}")
