"""Pre-tokenization: run a saved tokenizer over an image dataset once, store the index grids for any prior.

The dataset is cut into shards; each shard is encoded with `datasets.map(batched=True)` and written to disk
atomically, so an interrupted run resumes at the first missing shard, and `accelerate launch` spreads the
shards over processes. Only one shard is in memory at a time, so datasets larger than RAM work too.
Each shard records the parameters that decided its contents (`params.json` inside it); a resume with other
parameters is refused rather than mixing rows of two runs.
The result is an Arrow dataset per split with columns "indices" (int32, (h, w)) and, when labelled, "label",
plus `tokens.json` describing the grid shape, codebook size and classes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import warnings
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState

from tokenizer import VQImageProcessor, VQTokenizer
from tokenizer.weights import write_file_atomically

from .data._checks import check_positive_int, check_resolution_flag
from .data.sources import (
    DEFAULT_RESOLUTION,
    DEFAULT_VALIDATION_SPLIT,
    MISSING_LABELS,
    _find_columns,
    _pick_splits,
    decode_checked,
)
from .training import cpu_only_multiprocess

logger = logging.getLogger(__name__)
METADATA_NAME = "tokens.json"
PARAMS_NAME = "params.json"
SHARD_GLOB = "shard-[0-9]*[0-9]"  # finished shards only, not their ".tmp" folders


def _save(dataset: datasets.Dataset, path: Path) -> None:
    """`save_to_disk` without its per-call progress bar (the encoding bar already shows progress)."""
    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(path))
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _merge_shards(shard_root: Path, num_shards: int, output_dir: Path, params: dict[str, Any] | None) -> None:
    """Concatenate the (memory-mapped) shards into `output_dir` atomically, then delete the shards.

    `params` (with the data's fingerprint, for a dataset), when given, is recorded in the merged split: a rerun on
    the same data skips a split that is already finished, and `train-prior --tokenizer` checks the tokenizer.
    """
    shards = [datasets.load_from_disk(str(shard_root / f"shard-{i:05d}")) for i in range(num_shards)]
    temporary = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    _save(datasets.concatenate_datasets(shards), temporary)
    if params is not None:
        (temporary / PARAMS_NAME).write_text(json.dumps(_shard_params(params), indent=2, sort_keys=True) + "\n")
    shutil.rmtree(output_dir, ignore_errors=True)
    temporary.rename(output_dir)
    shutil.rmtree(shard_root)


def _finished_split(output_dir: Path, params: dict[str, Any]) -> datasets.Dataset | None:
    """The split already merged in `output_dir` by a run with the same `params`, or None."""
    record = output_dir / PARAMS_NAME
    if record.is_file() and json.loads(record.read_text()) == _shard_params(params):
        logger.info("%s is already encoded with these parameters: skipped", output_dir)
        return datasets.load_from_disk(str(output_dir))
    return None


def tokenizer_digest(tokenizer: VQTokenizer) -> str:
    """sha256 of the config and weights: a tokenizer retrained in place under the same path is told apart."""
    hasher = hashlib.sha256(json.dumps(tokenizer.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _processing_params(processor: VQImageProcessor) -> dict[str, Any]:
    """The resampling filter decides the encoded pixels too. Recorded only when it is not the default, so that
    shards and splits written before it was recorded (all with the default) still match."""
    default = VQImageProcessor.__dataclass_fields__["resample"].default
    return {} if processor.resample == default else {"resample": processor.resample}


def _shard_params(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=str))  # the form they take once written and read back


def _check_shards(shard_root: Path, params: dict[str, Any]) -> None:
    """Refuse to resume from finished shards written with other parameters than `params`.

    Shards are reused by name only, so a changed shard size, tokenizer, resolution, cap or dataset would
    otherwise mix stale rows (duplicated, missing or from another codebook) into the result.
    """
    params = _shard_params(params)
    for shard in sorted(shard_root.glob(SHARD_GLOB)):
        record = shard / PARAMS_NAME
        if not record.is_file():
            raise ValueError(f"{shard} has no {PARAMS_NAME} (it was written by an older version), so it cannot be "
                             f"checked against this run's parameters; delete {shard_root} to encode from scratch")
        recorded = json.loads(record.read_text())
        changed = sorted(key for key in recorded.keys() | params.keys() if recorded.get(key) != params.get(key))
        if changed:
            details = "; ".join(f"{key}: {recorded.get(key)!r} then, {params.get(key)!r} now" for key in changed)
            raise ValueError(f"{shard_root} holds shards of an interrupted encode with other parameters ({details}); "
                             "delete that folder to encode from scratch, or rerun with the old parameters to resume")


def _finish_shard(temporary: Path, final: Path, params: dict[str, Any]) -> None:
    """Record `params` inside a written shard, then publish it under its final name.

    The record is written into the temporary folder before one atomic rename, so a finished shard never
    exists without it, and an interrupted write leaves only a ".tmp" folder that the next run replaces.
    """
    (temporary / PARAMS_NAME).write_text(json.dumps(_shard_params(params), indent=2, sort_keys=True) + "\n")
    temporary.rename(final)


def _encode_batch(batch: dict, tokenizer: VQTokenizer, processor: VQImageProcessor, device) -> dict:
    pixels = processor.preprocess(batch["image"]).to(device)  # (B, C, H, W)
    with torch.no_grad():
        indices = tokenizer.encode(pixels).indices  # (B, h, w)
    output = {"indices": indices.to(torch.int32).cpu().numpy()}
    if "label" in batch:
        output["label"] = batch["label"]
    return output


def encode_split(tokenizer: VQTokenizer, dataset: datasets.Dataset, output_dir: Path, *, resolution: int,
                 batch_size: int = 64, shard_size: int = 10_000, state: PartialState | None = None,
                 source: dict[str, Any] | None = None) -> datasets.Dataset:
    """Encode one split into `output_dir` (an Arrow dataset); finished shards from an earlier run are reused.

    `source` describes where `dataset` came from (e.g. the data flags); it is recorded with the shards, and a
    resume whose source, size, shard size, resolution or tokenizer differ is refused (see `_check_shards`).
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("shard_size", shard_size)
    state = state or PartialState(cpu=cpu_only_multiprocess())
    if "image" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'image' column; its columns are {dataset.column_names}")
    processor = tokenizer.image_processor_for(resolution)
    grid = tokenizer.token_grid_shape(resolution, resolution)
    keep = [c for c in ("image", "label") if c in dataset.column_names]
    dataset = dataset.select_columns(keep)
    features = datasets.Features({"indices": datasets.Array2D(shape=grid, dtype="int32")})
    if "label" in keep:
        features["label"] = dataset.features["label"]
    num_shards = max(1, math.ceil(len(dataset) / shard_size))
    shard_root = output_dir.with_name(output_dir.name + ".shards")
    params = {**(source or {}), "num_rows": len(dataset), "columns": keep, "shard_size": shard_size,
              "resolution": resolution, **_processing_params(processor), "tokenizer_sha256": tokenizer_digest(tokenizer)}
    # A finished split is reused only for the same data: `datasets` fingerprints depend on the source files and
    # every operation applied since (an in-memory dataset gets a random one, so it is always encoded again).
    record = {**params, "fingerprint": dataset._fingerprint}
    finished = _finished_split(output_dir, record)
    if finished is not None:
        return finished
    _check_shards(shard_root, params)
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
        _finish_shard(temporary, final, params)
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_shards(shard_root, num_shards, output_dir, record)
    state.wait_for_everyone()
    return datasets.load_from_disk(str(output_dir))


def encode_stream(tokenizer: VQTokenizer, stream: datasets.IterableDataset, output_dir: str | Path, *,
                  resolution: int, batch_size: int = 64, shard_size: int = 10_000,
                  image_column: str = "image", label_column: str | None = "label", max_samples: int | None = None,
                  strict_data: bool = False, source: dict[str, Any] | None = None) -> datasets.Dataset:
    """Encode an `IterableDataset` (e.g. `load_dataset(..., streaming=True)`) of any size in bounded memory.

    Examples are read, encoded and written shard by shard (Arrow files on disk); the merged result is
    memory-mapped, never loaded. A rerun skips the shards already written and resumes the stream after them;
    it is refused when the shards were written with other parameters (`source` is recorded with them too).
    `max_samples` reads only the first that many examples of the stream. Unreadable images are skipped with a
    warning, or raise with `strict_data`, as `load_image_dataset` does.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("shard_size", shard_size)
    label_feature = _stream_label_feature(stream, label_column)
    output_dir = Path(output_dir)
    shard_root = output_dir.with_name(output_dir.name + ".shards")
    processor = tokenizer.image_processor_for(resolution)
    params = {**(source or {}), "max_samples": max_samples, "image_column": image_column,
              "label_column": label_column, "shard_size": shard_size, "resolution": resolution,
              **_processing_params(processor), "tokenizer_sha256": tokenizer_digest(tokenizer)}
    shard_root.mkdir(parents=True, exist_ok=True)  # a stream has no fingerprint: a finished split is encoded again
    _check_shards(shard_root, params)
    grid = tokenizer.token_grid_shape(resolution, resolution)
    done = len(list(shard_root.glob(SHARD_GLOB)))
    tokenizer = tokenizer.eval()
    if max_samples is not None:
        stream = stream.take(max_samples)  # before the image check, like the capped subset of `load_image_dataset`
    stream, skipped = _readable_only(stream, image_column, strict=strict_data)
    rows: dict[str, list] = {"indices": [], "label": []}

    def flush(index: int) -> None:
        columns = {"indices": rows["indices"]} | ({"label": rows["label"]} if rows["label"] else {})
        features = datasets.Features({"indices": datasets.Array2D(shape=grid, dtype="int32")})
        if rows["label"]:
            features["label"] = label_feature if isinstance(label_feature, datasets.ClassLabel) else datasets.Value("int64")
        temporary = shard_root / f"shard-{index:05d}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        _save(datasets.Dataset.from_dict(columns, features=features), temporary)
        _finish_shard(temporary, shard_root / f"shard-{index:05d}", params)
        rows["indices"], rows["label"] = [], []

    index = done
    # Skipped after the image check, so that positions count the same readable examples the shards hold.
    for batch in stream.skip(done * shard_size).iter(batch_size=batch_size):
        if image_column not in batch:
            raise ValueError(f"the stream has no {image_column!r} column; its columns are {sorted(batch)}")
        images = [_decode_image(value) for value in batch[image_column]]
        encoded = _encode_batch({"image": images}, tokenizer, processor, next(tokenizer.parameters()).device)
        rows["indices"].extend(encoded["indices"])
        if label_column and label_column in batch:
            rows["label"].extend(_label_id(v, label_column) for v in batch[label_column])
        while len(rows["indices"]) >= shard_size:
            head = {k: v[shard_size:] for k, v in rows.items()}
            rows.update({k: v[:shard_size] for k, v in rows.items()})
            flush(index)
            rows.update(head)
            index += 1
    if rows["indices"]:
        flush(index)
        index += 1
    if skipped:
        logger.warning("skipped %d unreadable image(s) of the stream; first: %s. Pass --strict_data to raise "
                       "instead.", len(skipped), skipped[0])
    if index == 0:
        raise ValueError("the stream yielded no examples")
    # Recorded like an encoded dataset's splits, so that `train-prior --tokenizer` can check the tokenizer (a stream
    # has no fingerprint, so a rerun never takes the split for finished).
    _merge_shards(shard_root, index, output_dir, params)
    return datasets.load_from_disk(str(output_dir))


def _stream_label_feature(stream: datasets.IterableDataset, label_column: str | None):
    """The label column's feature when the stream declares its features (None when it does not, or has none)."""
    if not label_column or stream.features is None:
        return None
    return stream.features.get(label_column)


def _label_id(value: Any, column: str) -> int:
    if _is_missing_label(value):
        raise ValueError(f"an example of the labelled stream has no label ({column!r}: {value!r}); label or remove "
                         "it (unlabelled examples are refused in labelled data, as without --streaming)")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"--streaming needs non-negative integer class ids (or a ClassLabel column) in {column!r}, "
                         f"got {value!r}: a stream's label vocabulary is unknown until it is read to the end; "
                         "encode without --streaming to map string labels to class ids")
    return int(value)


def _readable_only(stream: datasets.IterableDataset, image_column: str, *,
                   strict: bool) -> tuple[datasets.IterableDataset, list]:
    """The stream with its readable images decoded (once) and its unreadable ones dropped, and the list it fills
    with the dropped ones' names.

    Left as it is when the column is not an `Image` feature: its own loader decodes it, and a broken example
    raises while the stream is read.
    """
    skipped: list = []
    if not _is_image_column(stream, image_column):
        return stream, skipped

    def decode(example: dict) -> dict:
        value = example[image_column]
        image, reason = decode_checked(value)
        if image is None:
            name = "(missing image)" if value is None else value.get("path") or "(bytes without a path)"
            if strict:
                raise ValueError(f"unreadable image {name!r} in the stream ({reason}); fix or remove it, or drop "
                                 "--strict_data to skip unreadable images with a warning")
            skipped.append(f"{name!r} ({reason})")
        return {image_column: image}

    # Decoded here, where the check has to read every pixel anyway, rather than checked here and decoded again
    # in `encode_stream`. The mapped stream has no declared features, so the PIL images pass through as they are.
    return (_undecoded(stream, image_column).map(decode)
            .filter(lambda example: example[image_column] is not None)), skipped


def _is_image_column(stream: datasets.IterableDataset, column: str) -> bool:
    return stream.features is not None and isinstance(stream.features.get(column), datasets.Image)


def _undecoded(stream: datasets.IterableDataset, column: str) -> datasets.IterableDataset:
    """The stream with its `Image` column left as {"bytes", "path"} (so that a filter need not decode it)."""
    if not _is_image_column(stream, column) or not stream.features[column].decode:
        return stream
    return stream.cast_column(column, datasets.Image(decode=False))


def _decode_image(value: Any) -> Any:
    """An undecoded `Image` value ({"bytes", "path"}) as a PIL image; anything else as it is."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return datasets.Image().decode_example(value)
    return value


def encode_dataset(tokenizer: VQTokenizer, dataset_dict: datasets.DatasetDict, output_dir: str | Path, *,
                   resolution: int, batch_size: int = 64, shard_size: int = 10_000,
                   tokenizer_source: str | None = None,
                   source: dict[str, Any] | None = None) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Encode every split of `dataset_dict`; returns the token datasets and the metadata written to tokens.json.

    `source` (e.g. the data flags) is recorded with each split's shards; see `encode_split`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = PartialState(cpu=cpu_only_multiprocess())
    _remove_metadata(output_dir, state)
    encoded = datasets.DatasetDict({
        name: encode_split(tokenizer, split, output_dir / name, resolution=resolution, batch_size=batch_size,
                           shard_size=shard_size, state=state, source=source)
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
        write_file_atomically(output_dir / METADATA_NAME, json.dumps(metadata, indent=2) + "\n")
    return encoded, metadata


def _remove_metadata(output_dir: Path, state: PartialState) -> None:
    """tokens.json goes first and comes back last: a re-encode stopped half way (some splits from a new tokenizer,
    some from the old) is then not loadable as a finished token dataset."""
    if state.is_main_process:
        (output_dir / METADATA_NAME).unlink(missing_ok=True)
    state.wait_for_everyone()


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
    records = {name: json.loads((path / name / PARAMS_NAME).read_text()) for name in splits
               if (path / name / PARAMS_NAME).is_file()}
    for key in ("tokenizer_sha256", "resolution"):
        values = {name: record.get(key) for name, record in records.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"the splits of {path} were encoded with different settings ({key}: {values}); "
                             "encode the dataset again with one tokenizer")
    digests = {record.get("tokenizer_sha256") for record in records.values()} - {None}
    if digests:  # for checking a tokenizer given later against the one that encoded the splits
        metadata = {**metadata, "tokenizer_sha256": digests.pop()}
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
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds the validation split and the --max_train_samples subset (default: the tokenizer's "
                             "training seed on its training data, else 0); a stream is read in order, so --streaming "
                             "rejects it")
    parser.add_argument("--streaming", action="store_true",
                        help="read --dataset_name / --train_data_dir as a stream: bounded memory for any dataset size")
    add_data_args(parser)
    # Defaults from the tokenizer's training_info (see main): the resolution it was trained at and, on its
    # training data, the training run's --seed and --validation_split.
    parser.set_defaults(resolution=None, validation_split=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    from .data import load_image_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer)
    if args.resolution is None:
        args.resolution = tokenizer.trained_resolution
        if args.resolution is None:
            args.resolution = DEFAULT_RESOLUTION
            logger.warning("the tokenizer records no training resolution: encoding at %dpx (set --resolution)",
                           DEFAULT_RESOLUTION)
    check_resolution_flag(args.resolution, tokenizer.downsample_factor)
    if args.streaming:
        if args.validation_split is None:  # a stream's split is by position: no training run's split to follow
            args.validation_split = DEFAULT_VALIDATION_SPLIT
        _encode_streaming(args, tokenizer)
        return
    from .evaluate import apply_training_split_defaults

    apply_training_split_defaults(args, tokenizer)  # the images the tokenizer held out stay held out
    state = PartialState(cpu=cpu_only_multiprocess())
    with state.main_process_first():
        images = load_image_dataset(
            dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, embedded=args.dataset,
            dataset_config_name=args.dataset_config_name, image_column=args.image_column,
            label_column=args.label_column, validation_split=args.validation_split, resolution=args.resolution,
            seed=0 if args.seed is None else args.seed, cache_dir=args.cache_dir, strict_data=args.strict_data,
            max_samples=args.max_train_samples, require_labels=True)  # a prior trains on these labels
    _, metadata = encode_dataset(tokenizer, images, args.output_dir, resolution=args.resolution,
                                 batch_size=args.batch_size, shard_size=args.shard_size,
                                 tokenizer_source=args.tokenizer, source=_source_params(args))
    state.print(json.dumps(metadata, indent=2))
    state.wait_for_everyone()
    state.destroy_process_group()  # a process exiting with gloo's threads still running can abort the launch


def _source_params(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags that decide which images are encoded, recorded with the shards to check a resume."""
    folder = str(Path(args.train_data_dir).resolve()) if args.train_data_dir else None
    return {"dataset": args.dataset, "dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
            "train_data_dir": folder, "image_column": args.image_column, "label_column": args.label_column,
            "validation_split": args.validation_split, "max_train_samples": args.max_train_samples,
            "seed": 0 if args.seed is None else args.seed}


def _encode_streaming(args: argparse.Namespace, tokenizer: VQTokenizer) -> None:
    """`vqstack encode --streaming`: train and validation splits, streamed from the Hub or a local image folder."""
    if args.dataset is not None:
        raise ValueError("--streaming reads --dataset_name or --train_data_dir; embedded datasets are small")
    if args.seed is not None:
        raise ValueError("--seed has no effect with --streaming: the stream is read in order (the validation split "
                         "holds out every n-th example, --max_train_samples keeps the first ones); drop --seed")
    if not (args.dataset_name or args.train_data_dir):
        raise ValueError("--streaming needs --dataset_name or --train_data_dir")
    state = PartialState(cpu=cpu_only_multiprocess())
    if not state.is_main_process:
        # A stream is read in order from its start, so it cannot be cut into shards per process without every
        # process reading it all; only the main process encodes. The others leave now instead of waiting at a
        # barrier, which would time out (30 minutes by default) long before a large stream is encoded.
        logger.info("process %d: --streaming encodes on the main process only; nothing to do here",
                    state.process_index)
        state.destroy_process_group()
        return
    if state.num_processes > 1:
        logger.warning("--streaming encodes on the main process only; the other %d process(es) exit",
                       state.num_processes - 1)
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, streaming=True,
                                    cache_dir=args.cache_dir)
    else:
        raw = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, streaming=True,
                                    cache_dir=args.cache_dir)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_metadata(output_dir, state)
    tokenizer = tokenizer.to(state.device)
    image_column, label_column = _stream_columns(raw, args.image_column, args.label_column)
    # Undecoded from the start: the positional filters of `streaming_splits` would otherwise decode every image,
    # held-out ones included, and fail on an unreadable one before `encode_stream` can skip it.
    raw = datasets.IterableDatasetDict({name: _undecoded(split, image_column) for name, split in raw.items()})
    label_column = _unless_unlabelled(raw, label_column)
    splits = streaming_splits(raw, args.validation_split, label_column)
    label_feature = _stream_label_feature(splits["train"], label_column)
    source = _source_params(args)
    if _holdout_fraction(args.validation_split).numerator != 1:
        # Earlier versions held out every round(1 / validation_split)-th example, which differs from the exact
        # fraction unless it is 1 / n: shards they wrote must not be resumed with the new split.
        source["holdout"] = "exact-fraction"
    # A stream without any label column is read with the default name, as earlier versions did, so that shards they
    # recorded (with label_column "label") resume; the column is simply absent from the batches.
    features = splits["train"].features
    has_label_column = features is not None and "label" in features
    read_labels_from = "label" if label_column is None and not has_label_column else label_column
    encoded = {}
    for name, stream in splits.items():
        encoded[name] = encode_stream(
            tokenizer, stream, output_dir / name, resolution=args.resolution, batch_size=args.batch_size,
            shard_size=args.shard_size, image_column=image_column,
            label_column=read_labels_from, strict_data=args.strict_data,
            max_samples=args.max_train_samples if name == "train" else None, source=source,
        )
    labelled = all("label" in split.column_names for split in encoded.values())
    metadata = {"grid_shape": list(tokenizer.token_grid_shape(args.resolution, args.resolution)),
                "codebook_size": tokenizer.codebook_size, "resolution": args.resolution,
                "num_classes": (len(label_feature.names) if isinstance(label_feature, datasets.ClassLabel)
                                else 1 + max(max(split["label"]) for split in encoded.values())) if labelled else 0,
                "class_names": list(label_feature.names) if labelled and isinstance(label_feature, datasets.ClassLabel)
                else None, "tokenizer": args.tokenizer,
                "splits": {name: len(split) for name, split in encoded.items()}}
    write_file_atomically(output_dir / METADATA_NAME, json.dumps(metadata, indent=2) + "\n")
    print(json.dumps(metadata, indent=2))
    state.destroy_process_group()


def _stream_columns(raw: datasets.IterableDatasetDict, image_column: str | None,
                    label_column: str | None) -> tuple[str, str | None]:
    """The image and label columns of a stream, found from its declared features as for a dataset loaded whole
    (`_find_columns`: the Image column, "label" or "labels"); a stream that declares none falls back to "image" and
    "label", checked when it is read."""
    train, _ = _pick_splits(raw)
    if train.features is None:
        return image_column or "image", label_column or "label"
    return _find_columns(train, image_column, label_column)


def _unless_unlabelled(raw: datasets.IterableDatasetDict, label_column: str | None) -> str | None:
    """`label_column`, or None when the training stream's first example has no label: the stream is then
    encoded unlabelled, as a dataset loaded whole whose labels are all missing is (a stream cannot be read to the
    end first to check them all; a later example with a label is ignored, and the warning says so)."""
    if label_column is None:
        return None
    train, _ = _pick_splits(raw)
    first = next(iter(train.take(1)), None)
    value = None if first is None else first.get(label_column)
    if first is not None and _is_missing_label(value):
        warnings.warn(f"the training stream's first example has no label ({label_column!r}: {value!r}): the stream is "
                      "encoded as unlabelled and its label column is ignored", stacklevel=3)
        return None
    return label_column


def _is_missing_label(value: Any) -> bool:
    return isinstance(value, (int, np.integer, str, type(None))) and not isinstance(value, bool) and value in MISSING_LABELS


def streaming_splits(raw: datasets.IterableDatasetDict, validation_split: float,
                     label_column: str | None = None) -> dict[str, datasets.IterableDataset]:
    """"train" and "validation" streams: the source's own validation (or test) split when it has one, unless its
    first example has no label in `label_column` (a test split published without labels).

    Otherwise the training stream's examples at positions i where ceil((i + 1) * validation_split) exceeds
    ceil(i * validation_split) are held out: exactly that fraction of every long run of examples, spread evenly
    (positions 0, n, 2n, ... for validation_split = 1 / n). Membership depends only on an example's position, so
    a resumed run splits the same way without reading the stream ahead.
    """
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split must lie strictly between 0 and 1, got {validation_split}")
    train, validation = _pick_splits(raw)
    if validation is not None and label_column is not None:
        first = next(iter(validation.take(1)), None)
        label = "no such column" if first is None or label_column not in first else repr(first[label_column])
        unlabelled = first is not None and (label_column not in first or first[label_column] in MISSING_LABELS)
        if unlabelled and label_column not in first:  # no column at all: only a loss if the training split has one
            first_train = next(iter(train.take(1)), None)
            unlabelled = first_train is not None and first_train.get(label_column) not in MISSING_LABELS
        if unlabelled:
            warnings.warn(f"the source's held-out split has no labels ({label_column!r}: {label}): it is not used; "
                          f"a fraction {validation_split} of the training examples is held out instead", stacklevel=2)
            validation = None
    if validation is not None:
        return {"train": train, "validation": validation}
    held_out = partial(_held_out, fraction=_holdout_fraction(validation_split))
    return {
        "train": train.filter(lambda _, index: not held_out(index), with_indices=True),
        "validation": train.filter(lambda _, index: held_out(index), with_indices=True),
    }


def _holdout_fraction(validation_split: float) -> Fraction:
    return Fraction(validation_split).limit_denominator(1_000_000)


def _held_out(index: int, fraction: Fraction) -> bool:
    """Whether the stream's example at `index` is held out (see `streaming_splits`); exact rational arithmetic,
    so that the pattern never drifts however long the stream."""
    p, q = fraction.numerator, fraction.denominator
    return -(-(index + 1) * p // q) > -(-index * p // q)
