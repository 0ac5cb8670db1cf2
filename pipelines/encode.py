"""Pre-tokenization: run a saved tokenizer over an image dataset once, store the index grids for any prior.

The dataset is cut into shards; each shard is encoded with `datasets.map(batched=True)` and written to disk
atomically, so an interrupted run resumes at the first missing shard, and `accelerate launch` spreads the
shards over processes. Only one shard is in memory at a time, so datasets larger than RAM work too.
The result is an Arrow dataset per split with columns "indices" (int32, (h, w)) and, when labelled, "label",
plus `tokens.json` describing the grid shape, codebook size and classes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState

from tokenizer import VQImageProcessor, VQTokenizer

from .training import cpu_only_multiprocess

logger = logging.getLogger(__name__)
METADATA_NAME = "tokens.json"


def _save(dataset: datasets.Dataset, path: Path) -> None:
    """`save_to_disk` without its per-call progress bar (the encoding bar already shows progress)."""
    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(path))
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _merge_shards(shard_root: Path, num_shards: int, output_dir: Path) -> None:
    """Concatenate the (memory-mapped) shards into `output_dir` atomically, then delete the shards."""
    shards = [datasets.load_from_disk(str(shard_root / f"shard-{i:05d}")) for i in range(num_shards)]
    temporary = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    _save(datasets.concatenate_datasets(shards), temporary)
    shutil.rmtree(output_dir, ignore_errors=True)
    temporary.rename(output_dir)
    shutil.rmtree(shard_root)


def _encode_batch(batch: dict, tokenizer: VQTokenizer, processor: VQImageProcessor, device) -> dict:
    pixels = processor.preprocess(batch["image"]).to(device)  # (B, C, H, W)
    with torch.no_grad():
        indices = tokenizer.encode(pixels).indices  # (B, h, w)
    output = {"indices": indices.to(torch.int32).cpu().numpy()}
    if "label" in batch:
        output["label"] = batch["label"]
    return output


def encode_split(tokenizer: VQTokenizer, dataset: datasets.Dataset, output_dir: Path, *, resolution: int,
                 batch_size: int = 64, shard_size: int = 10_000, state: PartialState | None = None) -> datasets.Dataset:
    """Encode one split into `output_dir` (an Arrow dataset); finished shards from an earlier run are reused."""
    state = state or PartialState(cpu=cpu_only_multiprocess())
    if "image" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'image' column; its columns are {dataset.column_names}")
    processor = VQImageProcessor(channels=tokenizer.config.in_channels, resolution=resolution)
    grid = tokenizer.token_grid_shape(resolution, resolution)
    keep = [c for c in ("image", "label") if c in dataset.column_names]
    dataset = dataset.select_columns(keep)
    features = datasets.Features({"indices": datasets.Array2D(shape=grid, dtype="int32")})
    if "label" in keep:
        features["label"] = dataset.features["label"]
    num_shards = max(1, math.ceil(len(dataset) / shard_size))
    shard_root = output_dir.with_name(output_dir.name + ".shards")
    tokenizer = tokenizer.to(state.device).eval()
    for index in range(state.process_index, num_shards, state.num_processes):
        final = shard_root / f"shard-{index:05d}"
        if final.is_dir():
            continue
        shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
        encoded = shard.map(_encode_batch, batched=True, batch_size=batch_size, remove_columns=keep,
                            features=features, fn_kwargs={"tokenizer": tokenizer, "processor": processor,
                                                          "device": state.device},
                            desc=f"encoding shard {index + 1}/{num_shards}", load_from_cache_file=False)
        temporary = shard_root / f"shard-{index:05d}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        _save(encoded, temporary)
        temporary.rename(final)
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_shards(shard_root, num_shards, output_dir)
    state.wait_for_everyone()
    return datasets.load_from_disk(str(output_dir))


def encode_stream(tokenizer: VQTokenizer, stream: datasets.IterableDataset, output_dir: str | Path, *,
                  resolution: int, batch_size: int = 64, shard_size: int = 10_000,
                  image_column: str = "image", label_column: str | None = "label") -> datasets.Dataset:
    """Encode an `IterableDataset` (e.g. `load_dataset(..., streaming=True)`) of any size in bounded memory.

    Examples are read, encoded and written shard by shard (Arrow files on disk); the merged result is
    memory-mapped, never loaded. A rerun skips the shards already written and resumes the stream after them.
    """
    output_dir = Path(output_dir)
    shard_root = output_dir.with_name(output_dir.name + ".shards")
    shard_root.mkdir(parents=True, exist_ok=True)
    processor = VQImageProcessor(channels=tokenizer.config.in_channels, resolution=resolution)
    grid = tokenizer.token_grid_shape(resolution, resolution)
    done = len(list(shard_root.glob("shard-[0-9]*[0-9]")))
    tokenizer = tokenizer.eval()
    rows: dict[str, list] = {"indices": [], "label": []}

    def flush(index: int) -> None:
        columns = {"indices": rows["indices"]} | ({"label": rows["label"]} if rows["label"] else {})
        features = datasets.Features({"indices": datasets.Array2D(shape=grid, dtype="int32")})
        if rows["label"]:
            features["label"] = datasets.Value("int64")
        temporary = shard_root / f"shard-{index:05d}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        _save(datasets.Dataset.from_dict(columns, features=features), temporary)
        temporary.rename(shard_root / f"shard-{index:05d}")
        rows["indices"], rows["label"] = [], []

    index = done
    for batch in stream.skip(done * shard_size).iter(batch_size=batch_size):
        if image_column not in batch:
            raise ValueError(f"the stream has no {image_column!r} column; its columns are {sorted(batch)}")
        encoded = _encode_batch({"image": batch[image_column]}, tokenizer, processor, next(tokenizer.parameters()).device)
        rows["indices"].extend(encoded["indices"])
        if label_column and label_column in batch:
            rows["label"].extend(int(v) for v in batch[label_column])
        while len(rows["indices"]) >= shard_size:
            head = {k: v[shard_size:] for k, v in rows.items()}
            rows.update({k: v[:shard_size] for k, v in rows.items()})
            flush(index)
            rows.update(head)
            index += 1
    if rows["indices"]:
        flush(index)
        index += 1
    if index == 0:
        raise ValueError("the stream yielded no examples")
    _merge_shards(shard_root, index, output_dir)
    return datasets.load_from_disk(str(output_dir))


def encode_dataset(tokenizer: VQTokenizer, dataset_dict: datasets.DatasetDict, output_dir: str | Path, *,
                   resolution: int, batch_size: int = 64, shard_size: int = 10_000,
                   tokenizer_source: str | None = None) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Encode every split of `dataset_dict`; returns the token datasets and the metadata written to tokens.json."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = PartialState(cpu=cpu_only_multiprocess())
    encoded = datasets.DatasetDict({
        name: encode_split(tokenizer, split, output_dir / name, resolution=resolution, batch_size=batch_size,
                           shard_size=shard_size, state=state)
        for name, split in dataset_dict.items()
    })
    label_feature = next((s.features.get("label") for s in dataset_dict.values() if "label" in s.column_names), None)
    metadata = {
        "grid_shape": list(tokenizer.token_grid_shape(resolution, resolution)),
        "codebook_size": tokenizer.codebook_size,
        "resolution": resolution,
        "num_classes": _num_classes(label_feature, encoded),
        "class_names": list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None,
        "tokenizer": tokenizer_source,
        "splits": {name: len(split) for name, split in encoded.items()},
    }
    if state.is_main_process:
        (output_dir / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    return encoded, metadata


def _num_classes(feature, encoded: datasets.DatasetDict) -> int:
    if feature is None:
        return 0
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return 1 + max(int(max(split["label"])) for split in encoded.values() if len(split))


def load_token_dataset(path: str | Path) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """A folder written by `encode_dataset`: its splits (torch-formatted) and its metadata."""
    path = Path(path)
    metadata_file = path / METADATA_NAME
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{path} has no {METADATA_NAME}; create it with `vqstack encode` first")
    metadata = json.loads(metadata_file.read_text())
    splits = {name: datasets.load_from_disk(str(path / name)) for name in metadata["splits"]}
    for name, split in splits.items():
        if "indices" not in split.column_names:
            raise ValueError(f"split {name!r} of {path} has no 'indices' column; its columns are {split.column_names}")
        split.set_format("torch")
    return datasets.DatasetDict(splits), metadata


def build_parser() -> argparse.ArgumentParser:
    from .train_tokenizer import add_data_args

    parser = argparse.ArgumentParser(description="Encode an image dataset into index grids with a saved tokenizer.")
    parser.add_argument("--tokenizer", type=str, required=True, help="folder or Hub id of a saved tokenizer")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=10_000, help="images per resumable shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--streaming", action="store_true",
                        help="read --dataset_name / --train_data_dir as a stream: bounded memory for any dataset size")
    add_data_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    from .data import load_image_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer)
    if args.streaming:
        _encode_streaming(args, tokenizer)
        return
    state = PartialState(cpu=cpu_only_multiprocess())
    with state.main_process_first():
        images = load_image_dataset(
            dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, embedded=args.dataset,
            dataset_config_name=args.dataset_config_name, image_column=args.image_column,
            label_column=args.label_column, validation_split=args.validation_split, resolution=args.resolution,
            seed=args.seed, cache_dir=args.cache_dir, strict_data=args.strict_data, max_samples=args.max_train_samples)
    _, metadata = encode_dataset(tokenizer, images, args.output_dir, resolution=args.resolution,
                                 batch_size=args.batch_size, shard_size=args.shard_size,
                                 tokenizer_source=args.tokenizer)
    state.print(json.dumps(metadata, indent=2))


def _encode_streaming(args: argparse.Namespace, tokenizer: VQTokenizer) -> None:
    """`vqstack encode --streaming`: train and validation splits, streamed from the Hub or a local image folder."""
    if args.dataset is not None:
        raise ValueError("--streaming reads --dataset_name or --train_data_dir; embedded datasets are small")
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, streaming=True)
    elif args.train_data_dir:
        raw = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, streaming=True)
    else:
        raise ValueError("--streaming needs --dataset_name or --train_data_dir")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for name, stream in streaming_splits(raw, args.validation_split).items():
        encoded[name] = encode_stream(
            tokenizer, stream, output_dir / name, resolution=args.resolution, batch_size=args.batch_size,
            shard_size=args.shard_size, image_column=args.image_column or "image",
            label_column=args.label_column or "label",
        )
    labelled = all("label" in split.column_names for split in encoded.values())
    metadata = {"grid_shape": list(tokenizer.token_grid_shape(args.resolution, args.resolution)),
                "codebook_size": tokenizer.codebook_size, "resolution": args.resolution,
                "num_classes": 1 + max(max(split["label"]) for split in encoded.values()) if labelled else 0,
                "class_names": None, "tokenizer": args.tokenizer,
                "splits": {name: len(split) for name, split in encoded.items()}}
    (output_dir / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    print(json.dumps(metadata, indent=2))


def streaming_splits(raw: datasets.IterableDatasetDict, validation_split: float) -> dict[str, datasets.IterableDataset]:
    """"train" and "validation" streams: the source's own validation (or test) split when it has one.

    Otherwise every round(1 / validation_split)-th example of the training stream (positions 0, n, 2n, ...)
    is held out. Membership depends only on an example's position, so a resumed run splits the same way
    without reading the stream ahead.
    """
    from .data.sources import _pick_splits

    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split must lie strictly between 0 and 1, got {validation_split}")
    train, validation = _pick_splits(raw)
    if validation is not None:
        return {"train": train, "validation": validation}
    period = max(2, round(1.0 / validation_split))
    return {
        "train": train.filter(lambda _, index: index % period != 0, with_indices=True),
        "validation": train.filter(lambda _, index: index % period == 0, with_indices=True),
    }
