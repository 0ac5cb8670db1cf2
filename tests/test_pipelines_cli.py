"""End to end on tiny settings: every `vqstack` subcommand, the generation pipeline, pushing, many processes."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import COMMANDS, main
from pipelines.encode import load_token_dataset
from pipelines.evaluate import build_parser as evaluate_parser
from pipelines.generation import GenerationPipeline, IncompatibleComponentsError
from prior import TransformerPrior, TransformerPriorConfig, load_prior
from tokenizer import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--no_progress", "--seed", "0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny tokenizer trained on digits, its token dataset, and a tiny class-conditional prior."""
    root = tmp_path_factory.mktemp("e2e")
    main(["train-tokenizer", "--dataset", "digits", "--config", "tiny", "--codebook_size", "32",
          "--output_dir", str(root / "tok"), "--max_train_steps", "2", "--train_batch_size", "8",
          "--perceptual_weight", "0", "--max_train_samples", "64", "--max_validation_batches", "1", *QUIET])
    main(["encode", "--tokenizer", str(root / "tok" / "tokenizer"), "--dataset", "digits",
          "--output_dir", str(root / "tokens"), "--shard_size", "120", "--batch_size", "64",
          "--max_train_samples", "300"])
    main(["train-prior", "--tokens_dir", str(root / "tokens"), "--prior", "transformer", "--prior_config", "tiny",
          "--output_dir", str(root / "prior"), "--max_train_steps", "2", "--train_batch_size", "8",
          "--tokenizer", str(root / "tok" / "tokenizer"), "--num_validation_samples", "4", *QUIET])
    tokenizer = VQTokenizer.from_pretrained(root / "tok" / "tokenizer")
    prior = load_prior(root / "prior" / "prior")
    GenerationPipeline(tokenizer, prior, class_names=[str(i) for i in range(10)]).save_pretrained(root / "pipe")
    return root


def test_train_prior_with_tokenizer_saves_a_pipeline(workdir):
    """train-prior --tokenizer joins the tokenizer and the exported prior, with the token data's class names."""
    pipe = GenerationPipeline.from_pretrained(workdir / "prior" / "pipeline")
    assert pipe.class_names == [str(i) for i in range(10)]
    prior = load_prior(workdir / "prior" / "prior")
    for name, tensor in prior.state_dict().items():
        assert torch.equal(tensor, pipe.prior.state_dict()[name]), name
    tokenizer = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    for name, tensor in tokenizer.state_dict().items():
        assert torch.equal(tensor, pipe.tokenizer.state_dict()[name]), name
    images = pipe(2, labels="7", seed=0, output_type="pt", progress=False).images
    assert images.shape == (2, 1, 32, 32)
    assert not (workdir / "prior" / "pipeline.tmp").exists()
    # one label as a 0-d tensor or a numpy int means the same as a plain int
    reference = pipe(2, labels=7, seed=0, output_type="pt", progress=False).indices
    for label in (torch.tensor(7), np.int64(7), np.array(7)):
        assert torch.equal(pipe(2, labels=label, seed=0, output_type="pt", progress=False).indices, reference)


@pytest.mark.parametrize("edit, fragment", [
    (lambda config: ["not", "an", "object"], "must hold a JSON object"),
    (lambda config: {**config, "format_version": True}, "expected a positive int"),
    (lambda config: {**config, "format_version": 0}, "expected a positive int"),
    (lambda config: {**config, "class_names": "0123456789"}, "list of distinct strings"),
    (lambda config: {**config, "class_names": list(range(10))}, "list of distinct strings"),
    (lambda config: {**config, "class_names": ["0"] * 10}, "list of distinct strings"),
    (lambda config: {**config, "class_names": ["0", "1"]}, "has 2 names"),
])
def test_malformed_pipeline_json_is_refused_naming_the_file(workdir, tmp_path, edit, fragment):
    folder = tmp_path / "pipe"
    shutil.copytree(workdir / "pipe", folder)
    path = folder / "pipeline.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=fragment) as error:
        GenerationPipeline.from_pretrained(folder)
    assert "pipeline.json" in str(error.value)


def test_class_names_argument_is_checked(workdir):
    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    with pytest.raises(ValueError, match="list of distinct strings"):
        GenerationPipeline(pipe.tokenizer, pipe.prior, class_names="0123456789")


def test_train_prior_resume_refuses_tokens_of_another_tokenizer(workdir, tmp_path):
    """Re-encoding --tokens_dir with another tokenizer between runs gave codes that mean other things, silently."""
    common = ["train-prior", "--prior", "pixelcnn", "--prior_config", "tiny", "--train_batch_size", "8",
              "--checkpointing_steps", "1", "--validation_steps", "100", "--output_dir", str(tmp_path / "run"), *QUIET]
    main([*common, "--tokens_dir", str(workdir / "tokens"), "--max_train_steps", "1"])
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "training_state.json").read_text())
    digest = load_token_dataset(workdir / "tokens")[1]["tokenizer_sha256"]
    assert state["flags"]["tokens_tokenizer_sha256"] == digest
    reencoded = shutil.copytree(workdir / "tokens", tmp_path / "tokens")
    for params in reencoded.glob("*/params.json"):  # as `vqstack encode` records another tokenizer
        params.write_text(json.dumps({**json.loads(params.read_text()), "tokenizer_sha256": "f" * 64}))
    with pytest.raises(ValueError, match=r"--tokens_dir .* was encoded by another tokenizer \(sha256 ffffffffffff…\) "
                                         rf"than the token data checkpoint .*checkpoint-1 trained on \({digest[:12]}…\)"):
        main([*common, "--tokens_dir", str(reencoded), "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    main([*common, "--tokens_dir", str(workdir / "tokens"), "--max_train_steps", "2", "--resume_from_checkpoint",
          "latest"])  # the original token data resumes


def test_train_prior_resume_with_tokenizer_equals_uninterrupted_run(workdir, tmp_path):
    """Label dropout and pkeep draw random numbers: loading --tokenizer must not shift them after a resume."""
    common = ["train-prior", "--tokens_dir", str(workdir / "tokens"), "--prior", "transformer", "--prior_config",
              "tiny", "--train_batch_size", "8", "--tokenizer", str(workdir / "tok" / "tokenizer"),
              "--num_validation_samples", "2", "--label_dropout", "0.5", "--pkeep", "0.5", "--checkpointing_steps", "2",
              "--validation_steps", "100", "--use_ema", *QUIET]
    main([*common, "--max_train_steps", "4", "--output_dir", str(tmp_path / "a")])
    main([*common, "--max_train_steps", "2", "--output_dir", str(tmp_path / "b")])
    main([*common, "--max_train_steps", "4", "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    a, b = (load_prior(tmp_path / run / "prior").state_dict() for run in ("a", "b"))
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_train_prior_unconditional_with_tokenizer_and_early_sample_flag_checks(workdir, tmp_path):
    common = ["train-prior", "--tokens_dir", str(workdir / "tokens"), "--prior", "pixelcnn", "--prior_config", "tiny",
              "--max_train_steps", "1", "--train_batch_size", "8", "--tokenizer", str(workdir / "tok" / "tokenizer"),
              "--num_validation_samples", "2", "--unconditional", *QUIET]
    main([*common, "--output_dir", str(tmp_path / "uncond")])
    pipe = GenerationPipeline.from_pretrained(tmp_path / "uncond" / "pipeline")
    assert pipe.class_names is None and pipe.prior.config.num_classes == 0
    for flags, message in ((["--guidance_scale", "2"], "needs a class-conditional prior"),
                           (["--top_k", "0"], "top_k must be >= 1"),
                           (["--num_validation_samples", "0"], "--num_validation_samples must be >= 1"),
                           (["--label_dropout", "0.2"], "--unconditional ignores the labels; drop --label_dropout")):
        with pytest.raises(ValueError, match=message):
            main([*common, *flags, "--output_dir", str(tmp_path / "bad")])
        assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("checkpoint-*"))


def test_train_prior_refuses_sample_flags_without_a_tokenizer(workdir, tmp_path):
    """Without --tokenizer no validation samples are drawn: the flags (even invalid values) were accepted unused."""
    for flags in (["--guidance_scale", "-3"], ["--top_k", "5", "--num_validation_samples", "0"]):
        with pytest.raises(ValueError, match="set the validation samples, which are drawn only with --tokenizer"):
            main(["train-prior", "--tokens_dir", str(workdir / "tokens"), "--prior", "pixelcnn", "--prior_config",
                  "tiny", "--max_train_steps", "1", "--output_dir", str(tmp_path / "run"), *flags, *QUIET])
    assert not list(tmp_path.glob("run/checkpoint-*"))


def test_train_prior_refuses_a_tokenizer_other_than_the_encoding_one(workdir, tmp_path):
    """Same codebook size, other weights: its codes mean something else, so the pipeline would decode noise."""
    other = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="is not the tokenizer that encoded"):
        main(["train-prior", "--tokens_dir", str(workdir / "tokens"), "--prior", "pixelcnn", "--prior_config", "tiny",
              "--max_train_steps", "1", "--train_batch_size", "8", "--tokenizer", str(tmp_path / "other"),
              "--output_dir", str(tmp_path / "run"), *QUIET])
    assert not (tmp_path / "run" / "pipeline").exists()


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: vqstack {name}" in capsys.readouterr().out


def test_unknown_command_and_bad_flag(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-prior", "--prior", "lstm", "--tokens_dir", "x", "--output_dir", "y"])
    assert "invalid choice: 'lstm'" in capsys.readouterr().err


def test_token_dataset_and_prior_outputs(workdir):
    tokens, metadata = load_token_dataset(workdir / "tokens")
    assert metadata["grid_shape"] == [8, 8] and metadata["codebook_size"] == 32 and metadata["num_classes"] == 10
    assert tokens["train"][0]["indices"].shape == (8, 8)
    assert (len(tokens["train"]), len(tokens["validation"])) == (300, 180)
    assert not list(workdir.glob("tokens/*.shards"))  # shards merged and cleaned up
    assert (workdir / "prior" / "validation" / "samples-000002.png").is_file()
    prior = load_prior(workdir / "prior" / "prior")
    assert prior.config.num_classes == 10 and prior.training_metrics["validation_bits_per_token"] > 0


def test_encode_resumes_from_finished_shards(workdir, tmp_path):
    from pipelines.data import load_embedded_dataset
    from pipelines.encode import encode_split

    tokenizer = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    images = load_embedded_dataset("digits")["validation"].select(range(150))
    target = tmp_path / "validation"
    shards = tmp_path / "validation.shards"
    import datasets

    real_save = datasets.Dataset.save_to_disk
    calls = []

    def failing_second_save(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, path, *args, **kwargs)

    with mock.patch.object(datasets.Dataset, "save_to_disk", failing_second_save):
        with pytest.raises(OSError, match="disk full"):
            encode_split(tokenizer, images, target, resolution=32, shard_size=100)
    assert [p.name for p in shards.iterdir()] == ["shard-00000"]  # the finished shard survived
    encoded = encode_split(tokenizer, images, target, resolution=32, shard_size=100)
    expected = encode_split(tokenizer, images, tmp_path / "fresh", resolution=32, shard_size=150)
    assert torch.equal(torch.tensor(encoded["indices"]), torch.tensor(expected["indices"]))


def test_pipeline_save_load_generate_deterministic(workdir, tmp_path):
    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    a = pipe(4, labels=[0, 1, "2", 3], seed=7, output_type="np", progress=False)
    b = GenerationPipeline.from_pretrained(workdir / "pipe")(4, labels=[0, 1, 2, 3], seed=7, output_type="np",
                                                              progress=False)
    assert a.images.shape == (4, 32, 32, 1) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and torch.equal(a.indices, b.indices)
    pils = pipe(2, labels=5, seed=1, batch_size=1, progress=False).images
    assert len(pils) == 2 and pils[0].size == (32, 32)
    with pytest.raises(ValueError, match="unknown class name 'cat'"):
        pipe(1, labels=["cat"])
    with pytest.raises(ValueError, match="labels has 2 entries but num_images=3"):
        pipe(3, labels=[1, 2])


def test_bad_class_ids_are_refused_before_any_sampling(workdir, tmp_path):
    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")  # 10 classes
    with mock.patch.object(pipe.prior, "sample", side_effect=AssertionError("sampled")) as sample:
        for labels in ([0, 0, 0, 10], [-1, 0, 0, 0]):
            with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
                pipe(4, labels=labels, batch_size=1, progress=False)
        with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
            main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "gen"),
                  "--num_images", "2", "--labels", "3", "12"])
    assert sample.call_count == 0
    unconditional = GenerationPipeline(pipe.tokenizer, TransformerPrior(
        TransformerPriorConfig.from_preset("tiny", grid_shape=(8, 8), codebook_size=32)))
    with pytest.raises(ValueError, match="the prior is unconditional"):
        unconditional(2, labels=[0, 1], progress=False)


def test_sample_grid_keeps_to_num_images_when_there_are_more_classes(workdir):
    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")  # 10 classes, 32px images, grid scale 2
    seen = []
    real_call = GenerationPipeline.__call__

    def spy(self, count, labels=None, **kwargs):
        seen.append(list(labels))
        return real_call(self, count, labels=labels, **kwargs)

    with mock.patch.object(GenerationPipeline, "__call__", spy):
        many = pipe.sample_grid(20)
        few = pipe.sample_grid(4)
    assert seen[0] == [c for c in range(10) for _ in range(2)]  # one row of two per class
    assert many.size[1] > many.size[0]
    assert seen[1] == [0, 2, 5, 7]  # 4 images with classes spread over the 10
    assert few.size[0] == few.size[1]  # 2 x 2


def test_generate_command_rejects_bad_requests(workdir, tmp_path):
    with pytest.raises(ValueError, match="--num_images must be >= 1, got 0"):
        main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "gen"),
              "--num_images", "0"])
    tokenizer = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    unconditional = TransformerPrior(TransformerPriorConfig.from_preset("tiny", grid_shape=(8, 8), codebook_size=32))
    GenerationPipeline(tokenizer, unconditional).save_pretrained(tmp_path / "unconditional")
    with pytest.raises(ValueError, match="--labels all cycles through the classes, but this pipeline's prior is "
                                         "unconditional"):
        main(["generate", "--pipeline", str(tmp_path / "unconditional"), "--output_dir", str(tmp_path / "gen"),
              "--num_images", "2", "--labels", "all"])


def test_generate_label_names_win_over_ids_and_image_seeds_do_not_collide(workdir, tmp_path):
    from pipelines.generation import _parse_labels, image_seed

    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    pipe.class_names = ["0", "1", "10", "2", "3", "4", "5", "6", "7", "8"]  # image-folder classes, sorted as strings
    assert _parse_labels(["2"], pipe, 2) == [3, 3]  # the class named "2", as pipe(labels="2") gives
    assert pipe._label_ids("2", 1).tolist() == [3]
    seeds = {(seed, index): image_seed(seed, index) for seed in range(8) for index in range(8)}
    assert len(set(seeds.values())) == len(seeds) and all(0 <= value < 2**63 for value in seeds.values())
    with pytest.raises(FileNotFoundError, match="neither a folder written by save_pretrained nor a Hub repo id"):
        GenerationPipeline.from_pretrained(tmp_path / "no" / "such" / "pipeline")


def test_pipeline_resave_rewrites_its_generated_card(workdir, tmp_path):
    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    pipe.save_pretrained(tmp_path / "pipe")
    assert "Classes: 0, 1, 2" in (tmp_path / "pipe" / "README.md").read_text()
    pipe.class_names = None
    pipe.save_pretrained(tmp_path / "pipe")
    assert "Classes:" not in (tmp_path / "pipe" / "README.md").read_text()


def test_mismatched_tokenizer_and_prior(workdir, caplog):
    tokenizer = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    wrong_codes = TransformerPrior(TransformerPriorConfig.from_preset("tiny", grid_shape=(8, 8), codebook_size=64))
    with pytest.raises(IncompatibleComponentsError, match="prior models 64 codes but the tokenizer has 32"):
        GenerationPipeline(tokenizer, wrong_codes)
    # Grids encoded at another resolution than the tokenizer's training one decode fine: a warning, not an error.
    other_grid = TransformerPrior(TransformerPriorConfig.from_preset("tiny", grid_shape=(4, 6), codebook_size=32))
    with caplog.at_level("WARNING", logger="pipelines.generation"):
        pipe = GenerationPipeline(tokenizer, other_grid)
    assert "(4, 6) grids decode to 16x24 images, but the tokenizer was trained on 32px images ((8, 8) grids)" in caplog.text
    images = pipe(2, seed=0, output_type="pt", progress=False).images
    assert pipe.image_size == (16, 24) and images.shape == (2, 1, 16, 24)  # grayscale digits


def test_generate_and_reconstruct_commands(workdir, tmp_path, capsys):
    main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "gen"),
          "--num_images", "3", "--labels", "all"])
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == ["00000.png", "00001.png", "00002.png",
                                                                         "grid.png"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 45), dtype=np.uint8)).save(photo)
    main(["reconstruct", str(photo), "--tokenizer", str(workdir / "tok" / "tokenizer"),
          "--output_dir", str(tmp_path / "rec")])
    assert Image.open(tmp_path / "rec" / "photo.png").size == (44, 36)
    assert np.load(tmp_path / "rec" / "photo.indices.npy").shape == (9, 11)
    (tmp_path / "b").mkdir()
    Image.open(photo).save(tmp_path / "b" / "photo.jpg")
    with pytest.raises(ValueError, match=r"same output \(photo.png\)"):
        main(["reconstruct", str(photo), str(tmp_path / "b" / "photo.jpg"), "--tokenizer",
              str(workdir / "tok" / "tokenizer"), "--output_dir", str(tmp_path / "rec2")])
    with pytest.raises(ValueError, match="would overwrite the input"):
        main(["reconstruct", str(photo), "--tokenizer", str(workdir / "tok" / "tokenizer"),
              "--output_dir", str(tmp_path)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        main(["reconstruct", str(broken), "--tokenizer", str(workdir / "tok" / "tokenizer"),
              "--output_dir", str(tmp_path / "rec")])
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(tiny)
    with pytest.raises(ValueError, match=r"tiny\.png.*smaller than"):  # the error names the file
        main(["reconstruct", str(tiny), "--tokenizer", str(workdir / "tok" / "tokenizer"),
              "--output_dir", str(tmp_path / "rec")])
    # EXIF orientation 6 (rotate 90°): reconstructed upright, as `datasets` decodes it for training
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((16, 40), dtype=np.uint8)).save(rotated, exif=exif)
    assert datasets.Image().decode_example({"path": str(rotated), "bytes": None}).size == (16, 40)
    main(["reconstruct", str(rotated), "--tokenizer", str(workdir / "tok" / "tokenizer"),
          "--output_dir", str(tmp_path / "rec")])
    assert Image.open(tmp_path / "rec" / "rotated.png").size == (16, 40)


def test_evaluate_tokenizer_command(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))  # no cached weights
    main(["evaluate-tokenizer", "--tokenizer", str(workdir / "tok" / "tokenizer"), "--dataset", "digits",
          "--max_batches", "2", "--batch_size", "16", "--output", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 32 and 0 < metrics["codebook_usage"] <= 1 and metrics["psnr"] > 0
    assert metrics["lpips"] is None and metrics["rfid"] is None  # no VGG16 trunk, no FID Inception weights
    err = capsys.readouterr().err
    assert "--fid_weights PATH" in err and "--lpips_weights PATH" in err
    # a mistyped --lpips_weights path is an error, not a silently missing metric
    with pytest.raises(FileNotFoundError, match="--lpips_weights .* is not a file"):
        main(["evaluate-tokenizer", "--tokenizer", str(workdir / "tok" / "tokenizer"), "--dataset", "digits",
              "--lpips_weights", str(tmp_path / "missing-vgg16.pth")])


def test_evaluate_tokenizer_skips_lpips_below_its_smallest_input(workdir, tmp_path, capsys, monkeypatch):
    """At 8 px the VGG trunk pools the images away: with LPIPS available the whole evaluation failed."""
    import tokenizer.losses as losses
    from tokenizer.losses import LPIPSLoss

    monkeypatch.setattr(losses, "lpips_available", lambda **kwargs: True)
    monkeypatch.setattr(losses, "LPIPSLoss", lambda **kwargs: LPIPSLoss(pnet_rand=True))
    with pytest.warns(UserWarning, match="randomly initialised trunk"):
        main(["evaluate-tokenizer", "--tokenizer", str(workdir / "tok" / "tokenizer"), "--dataset", "digits",
              "--max_batches", "1", "--batch_size", "8", "--resolution", "8", "--output", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["lpips"] is None
    assert "needs images of at least 16 pixels, and --resolution is 8" in capsys.readouterr().err


def test_evaluate_tokenizer_writes_valid_json_for_a_diverged_tokenizer(workdir, tmp_path, capsys):
    broken = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    with torch.no_grad():
        broken.decoder.conv_out.bias.fill_(float("nan"))  # every reconstruction is NaN
    broken.save_pretrained(tmp_path / "broken")
    main(["evaluate-tokenizer", "--tokenizer", str(tmp_path / "broken"), "--dataset", "digits", "--max_batches", "1",
          "--batch_size", "8", "--output", str(tmp_path / "m.json")])

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    metrics = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert metrics["psnr"] is None and metrics["ssim"] is None and metrics["num_images"] == 8
    assert "psnr, ssim not finite (NaN/Inf), written as null" in capsys.readouterr().err


def test_reconstruct_files_leaves_a_training_mode_tokenizer_unchanged(workdir, tmp_path):
    from pipelines.reconstruct import reconstruct_files

    tokenizer = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer").train()
    before = {name: tensor.clone() for name, tensor in tokenizer.state_dict().items()}
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(photo)
    reconstruct_files(tokenizer, [str(photo)], tmp_path / "rec")
    assert tokenizer.training  # its mode is given back
    for name, tensor in tokenizer.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_evaluate_tokenizer_defaults_to_training_resolution_and_plain_crops(workdir, tmp_path):
    from pipelines.train_tokenizer import load_data

    tokenizer = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    tokenizer.training_info["resolution"] = 24  # as if trained at 24 px (the parser's default is 32)
    tokenizer.training_info["seed"] = 5  # the held-out split of a run with --seed 5
    tokenizer.save_pretrained(tmp_path / "tok24")
    output = tmp_path / "new" / "folder" / "m.json"  # created, not an error after the metrics are computed
    main(["evaluate-tokenizer", "--tokenizer", str(tmp_path / "tok24"), "--dataset", "digits",
          "--split", "train", "--max_batches", "1", "--batch_size", "8", "--output", str(output)])
    metrics = json.loads(output.read_text())
    assert metrics["resolution"] == 24 and metrics["seed"] == 5
    # trained on other data: its seed and validation_split do not apply (an embedded dataset refuses the latter)
    tokenizer.training_info.update(dataset="./my-images", seed=7, validation_split=0.1)
    tokenizer.save_pretrained(tmp_path / "tok-folder")
    main(["evaluate-tokenizer", "--tokenizer", str(tmp_path / "tok-folder"), "--dataset", "digits",
          "--max_batches", "1", "--batch_size", "8", "--output", str(output)])
    assert json.loads(output.read_text())["seed"] == 0
    # the train split is evaluated without the training augmentation (random flips)
    args = evaluate_parser().parse_args(["--tokenizer", "x", "--dataset", "digits", "--resolution", "16"])
    assert args.seed is None and args.validation_split is None  # filled from the tokenizer's training_info
    args.seed, args.validation_split = 0, 0.05
    plain = load_data(args, 1, augment=False)[0]["train"]
    augmented = load_data(args, 1)[0]["train"]
    flipped = 0
    for index in range(16):
        a, b = plain[index]["pixel_values"], augmented[index]["pixel_values"]
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
        flipped += not torch.equal(a, b)
    assert 0 < flipped < 16


def test_evaluate_tokenizer_knows_a_training_folder_however_it_is_spelled(tmp_path, monkeypatch):
    """A trailing slash or an absolute path named another dataset: the training seed and split were dropped."""
    from pipelines.evaluate import _same_data

    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    for spelling in ("imgs/", "./imgs", str(tmp_path / "imgs")):
        args = evaluate_parser().parse_args(["--tokenizer", "x", "--train_data_dir", spelling])
        assert _same_data("./imgs", args), spelling
    assert not _same_data("./other", args) and not _same_data(None, args)
    digits = evaluate_parser().parse_args(["--tokenizer", "x", "--dataset", "digits"])
    assert _same_data("digits", digits) and not _same_data("./imgs", digits)


@pytest.mark.parametrize("flag", ["--max_batches", "--batch_size"])
def test_evaluate_tokenizer_refuses_non_positive_sizes(workdir, flag):
    with pytest.raises(ValueError, match=f"{flag} must be a positive int, got 0"):
        main(["evaluate-tokenizer", "--tokenizer", str(workdir / "tok" / "tokenizer"), "--dataset", "digits",
              flag, "0"])


def test_evaluate_tokenizer_reports_rfid_with_local_inception_weights(workdir, tmp_path, fid_weights_file):
    with pytest.warns(UserWarning, match="not comparable with published ones"):  # random-init weights
        main(["evaluate-tokenizer", "--tokenizer", str(workdir / "tok" / "tokenizer"), "--dataset", "digits",
              "--max_batches", "1", "--batch_size", "8", "--fid_weights", str(fid_weights_file),
              "--output", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 8 and metrics["rfid"] > 0 and math.isfinite(metrics["rfid"])
    # a bad weights file fails before the tokenizer or the data is touched
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        main(["evaluate-tokenizer", "--tokenizer", str(tmp_path / "no-such-tokenizer"), "--dataset", "digits",
              "--fid_weights", str(tmp_path / "missing.pth")])


def test_push_pipeline_uploads_both_parts_and_card(workdir):
    uploaded = {}

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        uploaded.update({str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()})
        uploaded["README"] = (root / "README.md").read_text()
        return "https://hub.example/commit"

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/digits")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder):
        main(["push", str(workdir / "pipe"), "--repo_id", "me/digits"])
    assert {"pipeline.json", "samples.png", "tokenizer/model.safetensors", "tokenizer/config.json",
            "prior/model.safetensors", "prior/config.json", "README.md"} <= set(uploaded)
    assert "![samples](samples.png)" in uploaded["README"] and "transformer prior" in uploaded["README"]


def test_push_detects_the_folder_kind_and_leaves_visibility_to_the_hub(workdir, tmp_path):
    import shutil

    created = []

    def fake_create_repo(self, repo_id, **kwargs):
        created.append(kwargs.get("private"))
        return mock.Mock(repo_id=repo_id)

    uploaded = {}

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded[repo_id] = sorted(p.name for p in Path(folder_path).iterdir())
        return "https://hub.example/commit"

    tokenizer = tmp_path / "tok"
    shutil.copytree(workdir / "tok" / "tokenizer", tokenizer)
    (tokenizer / "preprocessor_config.json").unlink()  # optional: the folder still loads as a tokenizer
    with mock.patch("huggingface_hub.HfApi.create_repo", fake_create_repo), \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder), \
            mock.patch("huggingface_hub.HfApi.repo_info", return_value=mock.Mock(private=True)):
        main(["push", str(tokenizer), "--repo_id", "me/tok"])
        main(["push", str(workdir / "prior" / "prior"), "--repo_id", "me/prior", "--private"])
    assert "preprocessor_config.json" in uploaded["me/tok"] and "training_metrics.json" in uploaded["me/prior"]
    assert created[0] is None and set(created[1:]) == {True}  # no flag: the account's default, not "public"


def test_push_private_refuses_an_existing_public_repo(workdir):
    """create_repo(private=True, exist_ok=True) leaves an existing repo public: the weights went up public."""
    upload = mock.Mock(return_value="https://hub.example/commit")
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tok")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload), \
            mock.patch("huggingface_hub.HfApi.repo_info", return_value=mock.Mock(private=False)):
        with pytest.raises(PermissionError, match="already exists and is public: nothing was uploaded"):
            main(["push", str(workdir / "tok" / "tokenizer"), "--repo_id", "me/tok", "--private"])
        with pytest.raises(PermissionError, match="already exists and is public"):
            GenerationPipeline.from_pretrained(workdir / "pipe").push_to_hub("me/pipe", private=True)
        # The tokenizer's and prior's own push_to_hub (ModelHubMixin's would upload into the public repo).
        with pytest.raises(PermissionError, match="already exists and is public: nothing was uploaded"):
            VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer").push_to_hub("me/tok", private=True)
        with pytest.raises(PermissionError, match="already exists and is public: nothing was uploaded"):
            load_prior(workdir / "prior" / "prior").push_to_hub("me/prior", private=True)
        with pytest.raises(PermissionError, match="already exists and is public"):
            main(["push", str(workdir / "prior" / "prior"), "--repo_id", "me/prior", "--private"])
    upload.assert_not_called()
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tok")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload), \
            mock.patch("huggingface_hub.HfApi.repo_info", return_value=mock.Mock(private=True)):
        main(["push", str(workdir / "tok" / "tokenizer"), "--repo_id", "me/tok", "--private"])
        load_prior(workdir / "prior" / "prior").push_to_hub("me/prior", private=True)
    assert upload.call_count == 2


def test_train_prior_push_sends_the_saved_pipeline(workdir, tmp_path):
    """--push_to_hub pushed the prior alone, before the pipeline was saved: a failed push lost the pipeline too."""
    pushed = []

    def fake_push(self, repo_id, **kwargs):
        pushed.append((type(self).__name__, repo_id))
        raise ConnectionError("Hub unreachable")

    common = ["train-prior", "--tokens_dir", str(workdir / "tokens"), "--prior", "pixelcnn", "--prior_config", "tiny",
              "--max_train_steps", "1", "--train_batch_size", "8", "--tokenizer", str(workdir / "tok" / "tokenizer"),
              "--num_validation_samples", "2", "--push_to_hub", "--hub_model_id", "me/digits", *QUIET]
    with mock.patch.object(GenerationPipeline, "push_to_hub", fake_push), pytest.raises(ConnectionError):
        main([*common, "--output_dir", str(tmp_path / "run")])
    assert pushed == [("GenerationPipeline", "me/digits")]
    assert GenerationPipeline.from_pretrained(tmp_path / "run" / "pipeline").prior.config.prior_type == "pixelcnn"


def test_push_uploads_a_hand_written_folder_as_it_is_and_deletes_stale_records(workdir, tmp_path):
    """A hand-written card was replaced by a generated one and bf16 weights were re-serialized as float32; and a
    training record that the new upload lacks stayed on the Hub from an earlier push."""
    import shutil

    calls = []

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        calls.append(({p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}, kwargs.get("delete_patterns")))
        return "https://hub.example/commit"

    tokenizer = tmp_path / "tok"
    shutil.copytree(workdir / "tok" / "tokenizer", tokenizer)
    (tokenizer / "README.md").write_text("# My tokenizer\n\nHand-written.\n")
    VQTokenizer.from_pretrained(tokenizer).to(torch.bfloat16).save_pretrained(tokenizer)  # keeps the card
    on_disk = {p.name: p.read_bytes() for p in tokenizer.iterdir()}
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tok")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder):
        main(["push", str(tokenizer), "--repo_id", "me/tok"])
        VQTokenizer.from_pretrained(tokenizer).push_to_hub("me/tok")  # the Python API: a generated card
        main(["push", str(workdir / "pipe"), "--repo_id", "me/pipe"])
    (files, stale), (generated, stale_api), (_, stale_pipe) = calls
    assert files == on_disk  # byte for byte: card and bf16 weights
    assert stale == stale_api == ["training_info.json"]
    assert b"Hand-written" not in generated["README.md"]
    assert stale_pipe == ["tokenizer/training_info.json", "prior/training_metrics.json"]


@pytest.mark.slow
def test_two_process_generate_returns_distinct_images(workdir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "scripts" / "generate.py"), "--pipeline", str(workdir / "pipe"),
               "--output_dir", str(tmp_path / "gen"), "--num_images", "6"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    indices = np.load(tmp_path / "gen" / "indices.npy")
    assert indices.shape == (6, 8, 8)
    assert len({row.tobytes() for row in indices}) == 6
    # Image i has its own seed whichever process samples it: the same images as one process (generate's --seed 0).
    one_process = GenerationPipeline.from_pretrained(workdir / "pipe")(6, seed=0, output_type="np", progress=False)
    np.testing.assert_array_equal(indices, one_process.indices.numpy())


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_seeded_images_do_not_depend_on_the_batch_size(workdir, guidance_scale):
    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    request = dict(labels=[0, 1, 2, 0, 1], seed=3, guidance_scale=guidance_scale, top_k=8, output_type="pt",
                   progress=False)
    whole = pipe(5, batch_size=5, **request)
    for batch_size in (1, 2):
        split = pipe(5, batch_size=batch_size, **request)
        assert torch.equal(split.indices, whole.indices)
        torch.testing.assert_close(split.images, whole.images)
    # Image i depends on (seed, i) alone: a shorter request is a prefix of a longer one, another seed differs.
    assert torch.equal(pipe(2, **{**request, "labels": [0, 1]}).indices, whole.indices[:2])
    assert not torch.equal(pipe(5, **{**request, "seed": 4}).indices, whole.indices)


def test_generator_lists_give_one_generator_per_image(workdir):
    from pipelines.generation import image_generators

    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    listed = pipe(3, labels=2, generator=image_generators(9, range(3), "cpu"), batch_size=2, output_type="pt",
                  progress=False)
    assert torch.equal(listed.indices, pipe(3, labels=2, seed=9, output_type="pt", progress=False).indices)
    with pytest.raises(ValueError, match="a list of generators needs one per sample: got 2 for 3 samples"):
        pipe(3, labels=2, generator=image_generators(9, range(2), "cpu"), progress=False)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, a list of them"):
        pipe(3, labels=2, generator=[1, 2, 3], progress=False)
    # One shared generator keeps its meaning: its draws follow the batching.
    shared = pipe(3, labels=2, generator=torch.Generator().manual_seed(9), output_type="pt", progress=False)
    assert shared.indices.shape == (3, 8, 8)


@pytest.mark.parametrize("flags, message", [
    (["--top_k", "0"], "--top_k must be >= 1"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--guidance_scale", "-1"], "--guidance_scale must be a finite number >= 0"),
    (["--samples_per_class", "0"], "--samples_per_class must be >= 1"),
    (["--resolution", "0"], "--resolution must be >= 1"),
    (["--tokenizer_steps", "0"], "--tokenizer_steps must be >= 1"),
])
def test_quickstart_checks_its_flags_before_training(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(["quickstart", "--fast", "--output_dir", str(tmp_path / "qs"), "--no_progress", *flags])
    assert not (tmp_path / "qs" / "tokenizer-run").exists()  # refused before the first stage


def test_generate_rerun_replaces_outputs_and_refuses_bad_labels_and_seeds(workdir, tmp_path):
    main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "gen"), "--num_images", "5"])
    main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "gen"), "--num_images", "2"])
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == ["00000.png", "00001.png", "grid.png"]
    assert np.load(tmp_path / "gen" / "indices.npy").shape[0] == 2
    for name in ("100000.png", "1234567.png"):  # the names of images past the 100,000th of an earlier run
        Image.new("L", (4, 4)).save(tmp_path / "gen" / name)
    (tmp_path / "gen" / "notes.png").write_bytes(b"kept")  # not one of generate's names
    main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "gen"), "--num_images", "1"])
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == ["00000.png", "grid.png", "notes.png"]
    with pytest.raises(ValueError, match=r"--seed must lie in \[0, 2\*\*63\)"):
        main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "g"), "--seed", "-1"])
    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    for labels in ([0.9, 2.7], [True, 1], torch.tensor([1.7, 3.2])):
        with pytest.raises(TypeError, match="labels must be class ids"):
            pipe(2, labels=labels, progress=False)


def test_quickstart_fast(tmp_path):
    main(["quickstart", "--fast", "--output_dir", str(tmp_path / "qs"), "--no_progress", "--samples_per_class", "1"])
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert {"psnr", "ssim", "codebook_usage", "perplexity"} <= set(metrics["tokenizer"])
    assert metrics["prior"]["held_out_bits_per_token"] > 0
    assert Image.open(tmp_path / "qs" / "samples.png").size[0] > 0
    assert (tmp_path / "qs" / "reconstructions.png").is_file()
    pipe = GenerationPipeline.from_pretrained(tmp_path / "qs" / "pipeline")
    assert pipe.prior.config.num_classes == 10 and pipe.class_names[3] == "3"


def test_quickstart_summary_of_metrics_that_are_not_finite(tmp_path, capsys):
    """Non-finite metrics are written as null; the printed summary says n/a instead of failing on them."""
    from pipelines import quickstart
    from pipelines.metrics import json_ready

    metrics = {"tokenizer": {"psnr": float("nan"), "ssim": float("inf"), "codebook_usage": 0.5, "codebook_size": 32,
                             "perplexity": 4.0}, "prior": {}}
    with mock.patch.object(quickstart, "run_quickstart", lambda args: json_ready(metrics)[0]):
        quickstart.main(["--output_dir", str(tmp_path / "qs")])
    assert "PSNR n/a dB, SSIM n/a, codebook usage 50.0% of 32 codes" in capsys.readouterr().out


def test_streaming_encode_of_image_folder_resumes(workdir, tmp_path):
    from tests.test_train_tokenizer import make_image_folder

    folder = make_image_folder(tmp_path / "images", count=30, size=32)
    flags = ["encode", "--streaming", "--tokenizer", str(workdir / "tok" / "tokenizer"), "--train_data_dir",
             str(folder), "--output_dir", str(tmp_path / "tokens"), "--shard_size", "8", "--batch_size", "4"]
    import datasets

    real_save = datasets.Dataset.save_to_disk
    calls = []

    def crash_on_third(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is stopped after two shards
        return real_save(self, path, *args, **kwargs)

    with mock.patch.object(datasets.Dataset, "save_to_disk", crash_on_third), pytest.raises(KeyboardInterrupt):
        main(flags)
    assert len(list((tmp_path / "tokens").glob("train.shards/shard-0000[0-9]"))) == 2
    main(flags)
    tokens, metadata = load_token_dataset(tmp_path / "tokens")
    # --validation_split 0.05 holds out every 20th image of the stream: positions 0 and 20
    assert metadata["splits"] == {"train": 28, "validation": 2} and metadata["num_classes"] == 2
    assert len(tokens["train"]) == 28 and len(tokens["validation"]) == 2
    assert tokens["train"][0]["indices"].shape == (8, 8)


def test_streaming_splits_use_the_source_validation_split_or_hold_out_every_nth_example():
    import datasets

    from pipelines.encode import streaming_splits

    def stream(count):
        return datasets.IterableDataset.from_generator(lambda: ({"x": i} for i in range(count)))

    own = streaming_splits(datasets.IterableDatasetDict({"train": stream(5), "test": stream(3)}), 0.05)
    assert [row["x"] for row in own["validation"]] == [0, 1, 2]
    assert [row["x"] for row in own["train"]] == [0, 1, 2, 3, 4]
    held = streaming_splits(datasets.IterableDatasetDict({"train": stream(10)}), 0.25)  # every 4th example
    assert [row["x"] for row in held["validation"]] == [0, 4, 8]
    assert [row["x"] for row in held["train"]] == [1, 2, 3, 5, 6, 7, 9]
    with pytest.raises(ValueError, match="validation_split"):
        streaming_splits(datasets.IterableDatasetDict({"train": stream(3)}), 1.5)


def test_offline_hub_loads_of_priors_and_pipelines_say_what_to_do(monkeypatch):
    """The tokenizer named the repo and a way out; a prior or pipeline gave huggingface_hub's raw message."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    import pipelines.generation as generation
    import prior.base as prior_base

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(prior_base, "hf_hub_download", offline)
    monkeypatch.setattr(generation, "snapshot_download", offline)
    # A mistyped local folder reads like a repo id: the message says that no such folder exists either.
    with pytest.raises(OSError, match="no local folder 'me/prior' exists.*config.json from the Hub repo 'me/prior'"
                                      ".*hf download me/prior --local-dir"):
        load_prior("me/prior")
    with pytest.raises(OSError, match="no local folder 'me/pipe' exists.*pipeline from the Hub repo 'me/pipe'"
                                      ".*hf download me/pipe --local-dir"):
        GenerationPipeline.from_pretrained("me/pipe")
    with pytest.raises(TypeError, match="unexpected keyword argument 'map_loaction'"):
        GenerationPipeline.from_pretrained("me/pipe", map_loaction="cpu")  # was dropped silently for a folder


def test_generate_checks_its_output_dir_before_sampling(workdir, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with mock.patch.object(GenerationPipeline, "__call__", side_effect=AssertionError("sampled")):
        with pytest.raises((FileExistsError, NotADirectoryError)):
            main(["generate", "--pipeline", str(workdir / "pipe"), "--output_dir", str(tmp_path / "a_file" / "gen"),
                  "--num_images", "2"])


def test_unconditional_pipeline_card_usage_runs(workdir, tmp_path):
    """The card's usage line passed labels=[0] * 8, which an unconditional pipeline refuses."""
    from pipelines.generation import pipeline_model_card

    tokenizer = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer")
    prior = TransformerPrior(TransformerPriorConfig.from_preset("tiny", grid_shape=(8, 8), codebook_size=32))
    pipe = GenerationPipeline(tokenizer, prior)
    card = str(pipeline_model_card(pipe, sample_grid=None))
    assert "images = pipe(8, seed=0).images" in card.splitlines() and "unconditional" in card
    assert len(pipe(8, seed=0, progress=False).images) == 8  # the line runs (with labels=[0] * 8 it raised)


def test_re_saving_a_pipeline_keeps_a_hand_written_card(workdir, tmp_path):
    from pipelines.generation import replace_saved_pipeline

    pipe = GenerationPipeline.from_pretrained(workdir / "pipe")
    replace_saved_pipeline(pipe, tmp_path / "pipeline")
    (tmp_path / "pipeline" / "README.md").write_text("# Digits\n\nMy notes.\n")
    replace_saved_pipeline(pipe, tmp_path / "pipeline")  # what a resumed train-prior --tokenizer does
    assert (tmp_path / "pipeline" / "README.md").read_text() == "# Digits\n\nMy notes.\n"


def test_push_of_a_bf16_tokenizer_or_prior_uploads_bf16(workdir, tmp_path):
    from safetensors import safe_open

    half = VQTokenizer.from_pretrained(workdir / "tok" / "tokenizer").to(torch.bfloat16).eval()
    half.save_pretrained(tmp_path / "tok")
    half_prior = load_prior(workdir / "prior" / "prior").to(torch.bfloat16)
    half_prior.save_pretrained(tmp_path / "prior")
    GenerationPipeline(half, half_prior).save_pretrained(tmp_path / "pipe")
    dtypes = {}

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        for weights_file in sorted(Path(folder_path).rglob("model.safetensors")):
            with safe_open(str(weights_file), "pt") as weights:
                part = f"{repo_id}:{weights_file.parent.name}"
                dtypes[part] = {weights.get_slice(name).get_dtype() for name in weights.keys()}
        return "https://hub.example/commit"

    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=lambda repo_id, **k: mock.Mock(repo_id=repo_id)), \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder):
        main(["push", str(tmp_path / "tok"), "--repo_id", "me/tok"])
        main(["push", str(tmp_path / "prior"), "--repo_id", "me/prior"])
        main(["push", str(tmp_path / "pipe"), "--repo_id", "me/pipe"])
    assert sorted(dtypes) == ["me/pipe:prior", "me/pipe:tokenizer", "me/prior:prior", "me/tok:tok"]
    for part, found in dtypes.items():
        assert "BF16" in found and "F32" not in found, part
