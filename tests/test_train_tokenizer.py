"""Tokenizer training: a smoke run on an image folder, exact resume, two processes, the offline LPIPS error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.train_tokenizer import build_parser, train_tokenizer
from tokenizer import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--train_batch_size", "4", "--perceptual_weight", "0", "--no_progress",
        "--max_validation_batches", "1", "--seed", "3"]


def make_image_folder(root: Path, count: int = 24, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(1, 1, 3))
        image = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{index}.png")
    return root


def run(argv: list[str]) -> Path:
    return train_tokenizer(build_parser().parse_args(argv))


def test_smoke_run_on_image_folder(tmp_path):
    data = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    exported = run(["--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "2",
                    "--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--validation_steps", "2",
                    "--resolution", "32", "--adversarial_weight", "0.5", "--disc_start", "1", *TINY])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # pruned to the limit
    assert not list(out.glob("*.tmp"))
    assert (out / "validation" / "reconstructions-000002.png").is_file()
    metrics = [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]
    assert {"psnr", "ssim", "codebook_usage", "perplexity"} <= set(metrics[-1])
    tokenizer = VQTokenizer.from_pretrained(exported)
    assert tokenizer.training_info["train_steps"] == 2
    # The discriminator is saved in the checkpoint, never in the exported tokenizer.
    assert not any("disc" in key for key in load_file(exported / "model.safetensors"))
    assert any("discriminator" in key for key in load_file(out / "checkpoint-2" / "loss.safetensors"))


def test_resume_reproduces_uninterrupted_run(tmp_path):
    common = ["--dataset", "digits", "--max_train_samples", "64", "--checkpointing_steps", "2",
              "--validation_steps", "100", "--use_ema", "--adversarial_weight", "0.5", "--disc_start", "1", *TINY]
    straight = run(["--output_dir", str(tmp_path / "a"), "--max_train_steps", "4", *common])
    run(["--output_dir", str(tmp_path / "b"), "--max_train_steps", "2", *common])
    resumed = run(["--output_dir", str(tmp_path / "b"), "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                   *common])
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # and the discriminator too
    da = load_file(tmp_path / "a" / "checkpoint-4" / "loss.safetensors")
    db = load_file(tmp_path / "b" / "checkpoint-4" / "loss.safetensors")
    for key in da:
        torch.testing.assert_close(da[key], db[key], rtol=0, atol=1e-6, msg=key)


def test_offline_lpips_error_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    from tokenizer.losses import PerceptualWeightsUnavailableError

    with pytest.raises(PerceptualWeightsUnavailableError, match="--lpips_weights"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
             "--config", "tiny", "--perceptual_weight", "1.0", "--no_progress"])


def test_bad_flags_fail_early(tmp_path):
    with pytest.raises(ValueError, match="--max_train_steps must be >= 1, got 0"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), "--max_train_steps", "0", *TINY])
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), "--push_to_hub", *TINY])


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "scripts" / "train_tokenizer.py"), "--dataset", "digits", "--max_train_samples", "64",
               "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
               "--validation_steps", "2", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = VQTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.training_info["batch_size"] == 8  # 4 per process x 2 processes
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()
