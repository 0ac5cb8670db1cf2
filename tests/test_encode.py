"""`vqstack encode`: resumes refuse shards written with other parameters; --streaming honours the data flags."""

import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import encode
from pipelines.encode import encode_split, load_token_dataset
from tokenizer import VQImageProcessor, VQTokenizer, VQTokenizerConfig


def tiny_tokenizer(seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(VQTokenizerConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tiny_tokenizer().save_pretrained(path)
    return path


def images(count: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)) for _ in range(count)]


def image_folder(root: Path, count: int) -> Path:
    for index, image in enumerate(images(count)):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:03d}.png")
    return root


def failing_save(on_call: int, error: BaseException):
    """`save_to_disk` that raises `error` on its `on_call`-th call: an encode interrupted after some shards."""
    real_save = datasets.Dataset.save_to_disk
    calls = []

    def save(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == on_call:
            raise error
        return real_save(self, path, *args, **kwargs)

    return mock.patch.object(datasets.Dataset, "save_to_disk", save)


@pytest.fixture
def interrupted(tmp_path):
    """Ten images whose encode (shard_size 4, tokenizer seed 0) stopped after its first shard."""
    dataset = datasets.Dataset.from_dict({"image": images(10)}, features=datasets.Features({"image": datasets.Image()}))
    with failing_save(2, OSError("disk full")), pytest.raises(OSError, match="disk full"):
        encode_split(tiny_tokenizer(), dataset, tmp_path / "train", resolution=32, shard_size=4)
    assert [p.name for p in (tmp_path / "train.shards").glob(encode.SHARD_GLOB)] == ["shard-00000"]
    return dataset, tmp_path / "train"


def test_resume_with_the_same_parameters_reuses_the_shards(interrupted, tmp_path):
    dataset, target = interrupted
    resumed = encode_split(tiny_tokenizer(), dataset, target, resolution=32, shard_size=4)
    fresh = encode_split(tiny_tokenizer(), dataset, tmp_path / "fresh", resolution=32, shard_size=4)
    assert len(resumed) == 10
    assert torch.equal(torch.tensor(resumed["indices"]), torch.tensor(fresh["indices"]))


@pytest.mark.parametrize("change, message", [
    ({"shard_size": 5}, "shard_size: 4 then, 5 now"),
    ({"tokenizer": 1}, "tokenizer_sha256"),
    ({"resolution": 16}, "resolution: 32 then, 16 now"),
    ({"rows": 8}, "num_rows: 10 then, 8 now"),
])
def test_resume_with_other_parameters_is_refused(interrupted, change, message):
    dataset, target = interrupted
    if "rows" in change:
        dataset = dataset.select(range(change["rows"]))
    with pytest.raises(ValueError, match=message) as error:
        encode_split(tiny_tokenizer(change.get("tokenizer", 0)), dataset, target,
                     resolution=change.get("resolution", 32), shard_size=change.get("shard_size", 4))
    assert "delete that folder" in str(error.value)
    assert not target.exists()  # nothing merged from the stale shards


def test_resume_from_shards_without_a_record_is_refused(interrupted):
    dataset, target = interrupted
    (target.with_name("train.shards") / "shard-00000" / encode.PARAMS_NAME).unlink()  # as an older version wrote
    with pytest.raises(ValueError, match="older version"):
        encode_split(tiny_tokenizer(), dataset, target, resolution=32, shard_size=4)


def streaming_flags(tokenizer_dir: Path, folder: Path, output: Path, *extra: str) -> list[str]:
    return ["--streaming", "--tokenizer", str(tokenizer_dir), "--train_data_dir", str(folder), "--output_dir",
            str(output), "--shard_size", "2", "--batch_size", "2", "--validation_split", "0.25", *extra]


def test_streaming_max_train_samples_caps_the_train_split(tokenizer_dir, tmp_path):
    folder = image_folder(tmp_path / "images", 12)  # every 4th image held out: 3 validation, 9 train
    encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens", "--max_train_samples", "5"))
    tokens, metadata = load_token_dataset(tmp_path / "tokens")
    assert metadata["splits"] == {"train": 5, "validation": 3}
    assert len(tokens["train"]) == 5
    # recorded like an encoded dataset's, so that train-prior --tokenizer can refuse another tokenizer
    assert metadata["tokenizer_sha256"] == encode.tokenizer_digest(VQTokenizer.from_pretrained(tokenizer_dir))


def test_streaming_resume_with_another_cap_is_refused(tokenizer_dir, tmp_path):
    folder = image_folder(tmp_path / "images", 12)
    with failing_save(2, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens", "--max_train_samples", "6"))
    with pytest.raises(ValueError, match="max_samples: 6 then, 4 now"):
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens", "--max_train_samples", "4"))
    encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens", "--max_train_samples", "6"))
    assert json.loads((tmp_path / "tokens" / "tokens.json").read_text())["splits"] == {"train": 6, "validation": 3}


def test_streaming_skips_unreadable_images_unless_strict(tokenizer_dir, tmp_path, caplog):
    folder = image_folder(tmp_path / "images", 8)
    (folder / "cats" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "strict", "--strict_data"))
    encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "lenient"))
    _, metadata = load_token_dataset(tmp_path / "lenient")
    assert sum(metadata["splits"].values()) == 8  # the 9th file was skipped
    assert "skipped 1 unreadable image" in caplog.text


def test_streaming_decodes_each_image_once(tokenizer_dir, tmp_path):
    """The readability check decoded every image and the encoder then decoded it again."""
    folder = image_folder(tmp_path / "images", 8)
    with mock.patch.object(datasets.Image, "decode_example", autospec=True,
                           side_effect=datasets.Image.decode_example) as decode:
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens"))
    assert sum(load_token_dataset(tmp_path / "tokens")[1]["splits"].values()) == 8
    assert decode.call_count == 8


def test_streaming_rejects_seed_and_passes_cache_dir(tokenizer_dir, tmp_path):
    folder = image_folder(tmp_path / "images", 4)
    with pytest.raises(ValueError, match="--seed has no effect with --streaming"):
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens", "--seed", "1"))
    with mock.patch.object(datasets, "load_dataset", wraps=datasets.load_dataset) as load:
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens", "--cache_dir", str(tmp_path / "c")))
    assert load.call_args.kwargs["cache_dir"] == str(tmp_path / "c")


def test_streaming_encodes_on_the_main_process_only(tokenizer_dir, tmp_path):
    folder = image_folder(tmp_path / "images", 4)
    other = SimpleNamespace(is_main_process=False, process_index=1, num_processes=2, device=torch.device("cpu"),
                            destroy_process_group=mock.Mock())
    with mock.patch.object(encode, "PartialState", return_value=other):
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens"))
    assert not (tmp_path / "tokens").exists() and not list(tmp_path.glob("tokens/*.shards"))
    other.destroy_process_group.assert_called_once()  # it leaves the process group before exiting


def test_streaming_keeps_class_names_and_refuses_a_mistyped_label_column(tokenizer_dir, tmp_path):
    folder = image_folder(tmp_path / "images", 8)  # class subfolders "cats" and "dogs"
    encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens"))
    tokens, metadata = load_token_dataset(tmp_path / "tokens")
    assert metadata["class_names"] == ["cats", "dogs"] and metadata["num_classes"] == 2
    assert tokens["train"].features["label"].names == ["cats", "dogs"]
    with pytest.raises(ValueError, match=r"label_column \(--label_column\) 'lable' is not a column of the dataset; its columns are"):
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "other", "--label_column", "lable"))
    with pytest.raises(ValueError, match="non-negative integer class ids"):
        encode._label_id("dog", "species")


def test_streaming_replaces_an_unlabelled_source_test_split_before_encoding():
    """A test split published without labels (-1) crashed --streaming after the whole train split was encoded."""
    raw = datasets.IterableDatasetDict({
        "train": datasets.Dataset.from_dict({"image": images(8), "label": [0, 1] * 4}).to_iterable_dataset(),
        "test": datasets.Dataset.from_dict({"image": images(2), "label": [-1, -1]}).to_iterable_dataset(),
    })
    with pytest.warns(UserWarning, match="held-out split has no labels.*a fraction 0.25 of the training examples"):
        splits = encode.streaming_splits(raw, 0.25, "label")
    assert [row["label"] for row in splits["validation"]] == [0, 0]  # positions 0 and 4 of the training stream
    assert len(list(splits["train"])) == 6
    assert len(list(encode.streaming_splits(raw, 0.25, None)["validation"])) == 2  # labels unused: kept
    # A test split without the label column at all used to be kept, and the token data lost its labels.
    raw["test"] = datasets.Dataset.from_dict({"image": images(2)}).to_iterable_dataset()
    with pytest.warns(UserWarning, match="held-out split has no labels \\('label': no such column\\)"):
        splits = encode.streaming_splits(raw, 0.25, "label")
    assert [row["label"] for row in splits["validation"]] == [0, 0]
    # ... but a source with no labels anywhere keeps its own test split.
    raw["train"] = datasets.Dataset.from_dict({"image": images(8)}).to_iterable_dataset()
    assert len(list(encode.streaming_splits(raw, 0.25, "label")["validation"])) == 2


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.3, 0.6, 0.75, 0.9])
def test_streaming_holds_out_the_requested_fraction(fraction):
    """Every round(1 / fraction)-th example was held out: 0.6, 0.75 and 0.9 all held out 50%, 0.3 held out 33%."""
    raw = datasets.IterableDatasetDict({
        "train": datasets.Dataset.from_dict({"index": list(range(200))}).to_iterable_dataset()})
    splits = encode.streaming_splits(raw, fraction)
    validation = [row["index"] for row in splits["validation"]]
    train = [row["index"] for row in splits["train"]]
    assert sorted(validation + train) == list(range(200))
    assert len(validation) == round(200 * fraction)
    for start in range(0, 200, 20):  # spread evenly, not bunched at one end
        assert abs(sum(start <= i < start + 20 for i in validation) - 20 * fraction) <= 1
    if fraction in (0.05, 0.25):  # 1 / n: positions 0, n, 2n, ... as before
        assert validation == list(range(0, 200, round(1 / fraction)))


def test_a_half_finished_re_encode_is_not_loadable(tmp_path):
    """Splits are replaced one at a time: a re-encode stopped between them left splits of two tokenizers under the
    old tokens.json, and they loaded without an error."""
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images(6)}),
                                 "validation": datasets.Dataset.from_dict({"image": images(2)})})
    encode.encode_dataset(tiny_tokenizer(0), data, tmp_path / "tokens", resolution=32)
    real_split = encode.encode_split

    def stops_at_validation(tokenizer, split, output_dir, **kwargs):
        if output_dir.name == "validation":
            raise KeyboardInterrupt
        return real_split(tokenizer, split, output_dir, **kwargs)

    with mock.patch.object(encode, "encode_split", stops_at_validation), pytest.raises(KeyboardInterrupt):
        encode.encode_dataset(tiny_tokenizer(1), data, tmp_path / "tokens", resolution=32)
    with pytest.raises(FileNotFoundError, match="has no tokens.json"):
        load_token_dataset(tmp_path / "tokens")
    # a tokens.json put back by hand still does not hide the mix
    (tmp_path / "tokens" / "tokens.json").write_text(json.dumps({"splits": {"train": 6, "validation": 2}}))
    with pytest.raises(ValueError, match="encoded with different settings \\(tokenizer_sha256"):
        load_token_dataset(tmp_path / "tokens")


@pytest.mark.parametrize("flag", ["--shard_size", "--batch_size"])
def test_zero_sizes_are_refused_before_any_shard(tokenizer_dir, tmp_path, flag):
    folder = image_folder(tmp_path / "images", 4)
    for streaming in (True, False):
        flags = streaming_flags(tokenizer_dir, folder, tmp_path / "tokens", flag, "0")
        if not streaming:
            flags.remove("--streaming")
        with pytest.raises(ValueError, match=f"{flag[2:]} must be a positive int, got 0"):
            encode.main(flags)
    assert not list(tmp_path.glob("tokens/*/shard-*")) and not list(tmp_path.glob("tokens/*.shards/shard-*"))


def test_a_rerun_skips_splits_that_are_already_encoded(tokenizer_dir, tmp_path):
    folder = image_folder(tmp_path / "images", 8)
    flags = ["--tokenizer", str(tokenizer_dir), "--train_data_dir", str(folder), "--output_dir",
             str(tmp_path / "tokens"), "--shard_size", "2", "--validation_split", "0.25"]
    encode.main(flags)
    before = load_token_dataset(tmp_path / "tokens")[0]
    with mock.patch.object(encode, "_encode_batch", side_effect=AssertionError("re-encoded")):
        encode.main(flags)  # both splits finished: nothing is encoded again
    after = load_token_dataset(tmp_path / "tokens")[0]
    assert after["train"].with_format(None)["indices"] == before["train"].with_format(None)["indices"]
    with pytest.raises(AssertionError, match="re-encoded"), mock.patch.object(encode, "_encode_batch",
                                                                            side_effect=AssertionError("re-encoded")):
        encode.main([*flags[:-1], "0.5"])  # other parameters: encoded again


def test_other_data_of_the_same_size_is_encoded_again(tmp_path):
    """The finished-split skip is keyed on the data's fingerprint, not just on its size and the parameters."""
    first = datasets.Dataset.from_dict({"image": images(4)}).cast_column("image", datasets.Image())
    second = datasets.Dataset.from_dict({"image": images(8)[4:]}).cast_column("image", datasets.Image())
    encode_split(tiny_tokenizer(), first, tmp_path / "tokens" / "train", resolution=32, shard_size=4)
    again = encode_split(tiny_tokenizer(), second, tmp_path / "tokens" / "train", resolution=32, shard_size=4)
    fresh = encode_split(tiny_tokenizer(), second, tmp_path / "fresh" / "train", resolution=32, shard_size=4)
    assert again.with_format(None)["indices"] == fresh.with_format(None)["indices"]


def test_encode_defaults_to_the_tokenizer_training_resolution(tmp_path, caplog):
    """--resolution defaulted to 32 whatever the tokenizer was trained at, so a 16px tokenizer's grids came out 8x8."""
    tokenizer = tiny_tokenizer()
    tokenizer.training_info = {"resolution": 16}
    tokenizer.save_pretrained(tmp_path / "trained16")
    folder = image_folder(tmp_path / "images", 8)
    flags = ["--train_data_dir", str(folder), "--validation_split", "0.25", "--batch_size", "4"]
    encode.main(["--tokenizer", str(tmp_path / "trained16"), "--output_dir", str(tmp_path / "tokens16"), *flags])
    _, metadata = load_token_dataset(tmp_path / "tokens16")
    assert metadata["resolution"] == 16 and metadata["grid_shape"] == [4, 4]
    encode.main(["--tokenizer", str(tmp_path / "trained16"), "--output_dir", str(tmp_path / "tokens32"), *flags,
                 "--resolution", "32"])  # an explicit flag wins
    assert load_token_dataset(tmp_path / "tokens32")[1]["grid_shape"] == [8, 8]
    tiny_tokenizer().save_pretrained(tmp_path / "unknown")  # no training_info: the old default, with a warning
    encode.main(["--tokenizer", str(tmp_path / "unknown"), "--output_dir", str(tmp_path / "tokens"), *flags])
    assert load_token_dataset(tmp_path / "tokens")[1]["resolution"] == 32
    assert "records no training resolution: encoding at 32px" in caplog.text


def test_encode_uses_the_tokenizer_resampling_filter(tmp_path):
    """The saved image processor's filter was ignored: encode and reconstruct always resized with bicubic."""
    nearest = VQTokenizer(VQTokenizerConfig.from_preset("tiny"),
                          VQImageProcessor(channels=3, crop_to_multiple=4, resample="nearest"))
    nearest.load_state_dict(tiny_tokenizer().state_dict())
    processor = nearest.image_processor_for(16)
    assert (processor.resolution, processor.crop_to_multiple, processor.resample) == (16, None, "nearest")
    assert nearest.image_processor_for(None).crop_to_multiple == 4
    with pytest.raises(ValueError, match="multiple"):
        nearest.image_processor_for(18)
    dataset = datasets.Dataset.from_dict({"image": images(4, size=40)})  # resized to 16: the filter matters
    bicubic = encode_split(tiny_tokenizer(), dataset, tmp_path / "bicubic", resolution=16)
    resampled = encode_split(nearest, dataset, tmp_path / "nearest", resolution=16)
    expected = nearest.encode(processor.preprocess(images(4, size=40))).indices
    assert torch.equal(torch.as_tensor(np.array(resampled["indices"])), expected.to(torch.int32))
    assert not np.array_equal(np.array(bicubic["indices"]), np.array(resampled["indices"]))
    assert json.loads((tmp_path / "nearest" / encode.PARAMS_NAME).read_text())["resample"] == "nearest"


def _hub_stream(columns: dict, features: dict):
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return datasets.IterableDatasetDict({"train": dataset.to_iterable_dataset()})


def test_streaming_finds_the_columns_a_whole_load_finds(tokenizer_dir, tmp_path, monkeypatch):
    """--streaming looked for "image" and "label" only: columns "img" and "labels" failed, then lost the labels."""
    stream = _hub_stream({"img": images(8), "labels": [0, 1] * 4},
                         {"img": datasets.Image(), "labels": datasets.ClassLabel(names=["cat", "dog"])})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: stream)
    flags = ["--streaming", "--tokenizer", str(tokenizer_dir), "--dataset_name", "user/pets", "--batch_size", "4",
             "--validation_split", "0.25"]
    encode.main([*flags, "--output_dir", str(tmp_path / "tokens")])
    tokens, metadata = load_token_dataset(tmp_path / "tokens")
    assert metadata["class_names"] == ["cat", "dog"] and metadata["splits"] == {"train": 6, "validation": 2}
    assert list(tokens["train"]["label"]) == [1, 0, 1, 1, 0, 1]  # positions 1, 2, 3, 5, 6, 7


def test_streaming_encodes_a_split_without_labels_as_unlabelled(tokenizer_dir, tmp_path, monkeypatch):
    """All labels -1 (an "unlabeled" split): loaded whole it is encoded unlabelled; --streaming raised."""
    stream = _hub_stream({"image": images(8), "label": [-1] * 8},
                         {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: stream)
    flags = ["--streaming", "--tokenizer", str(tokenizer_dir), "--dataset_name", "user/unlabeled", "--batch_size", "4"]
    with pytest.warns(UserWarning, match=r"first example has no label \('label': -1\).*encoded as unlabelled"):
        encode.main([*flags, "--output_dir", str(tmp_path / "tokens")])
    tokens, metadata = load_token_dataset(tmp_path / "tokens")
    assert metadata["num_classes"] == 0 and "label" not in tokens["train"].column_names
    # In a labelled stream an example without a label is refused by name, as without --streaming.
    stream["train"] = datasets.Dataset.from_dict(
        {"image": images(8), "label": [0, 1, -1, 0, 1, 0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    ).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"an example of the labelled stream has no label \('label': -1\)"):
        encode.main([*flags, "--output_dir", str(tmp_path / "other")])


def test_encode_holds_out_what_the_tokenizer_held_out(tmp_path):
    """encode drew its split with seed 0 and 5% whatever the tokenizer trained with, so the images the tokenizer
    held out landed in the prior's training split (evaluate-tokenizer already followed the training run)."""
    from pipelines.data import load_image_dataset

    rng = np.random.default_rng(6)
    for index in range(20):
        array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        array[0, 0] = index  # tells the images apart after encoding: each grid differs
        folder = tmp_path / "images" / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{index:03d}.png")
    tokenizer = tiny_tokenizer()
    tokenizer.training_info = {"dataset": str(tmp_path / "images"), "seed": 3, "validation_split": 0.2,
                               "resolution": 32}
    tokenizer.save_pretrained(tmp_path / "tok")
    encode.main(["--tokenizer", str(tmp_path / "tok"), "--train_data_dir", str(tmp_path / "images"),
                 "--output_dir", str(tmp_path / "tokens")])
    tokens, _ = load_token_dataset(tmp_path / "tokens")
    held_out = load_image_dataset(train_data_dir=str(tmp_path / "images"), seed=3, validation_split=0.2)["validation"]
    expected = tokenizer.encode(tokenizer.image_processor_for(32).preprocess(list(held_out["image"]))).indices
    assert torch.equal(torch.stack(list(tokens["validation"]["indices"])).long(), expected)


def test_unlabelled_streams_record_shards_as_earlier_versions_did(tokenizer_dir, tmp_path):
    """Earlier versions recorded label_column "label" for a stream without labels: its interrupted shards must still
    resume (a recorded None was refused, and --label_column label then named a missing column)."""
    folder = tmp_path / "flat"
    folder.mkdir()
    for index, image in enumerate(images(8)):
        image.save(folder / f"{index}.png")
    with failing_save(2, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
        encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens"))
    shard = tmp_path / "tokens" / "train.shards" / "shard-00000"
    assert json.loads((shard / encode.PARAMS_NAME).read_text())["label_column"] == "label"
    encode.main(streaming_flags(tokenizer_dir, folder, tmp_path / "tokens"))
    tokens, metadata = load_token_dataset(tmp_path / "tokens")
    assert metadata["num_classes"] == 0 and metadata["splits"] == {"train": 6, "validation": 2}
