"""Faults: NaN losses, a run killed with SIGKILL, a full disk at save time, and malicious checkpoints."""

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from pipelines.train_tokenizer import build_parser, train_tokenizer
from tokenizer import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--max_train_samples", "64", "--config", "tiny", "--train_batch_size", "4",
        "--perceptual_weight", "0", "--no_progress", "--max_validation_batches", "1", "--validation_steps", "100"]


def run(argv):
    return train_tokenizer(build_parser().parse_args(argv))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    from tokenizer.losses import VQGANLoss

    real = VQGANLoss.generator_loss
    calls = []

    def sometimes_nan(self, *args, **kwargs):
        loss, logs = real(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), logs) if len(calls) == 2 else (loss, logs)

    with mock.patch.object(VQGANLoss, "generator_loss", sometimes_nan), pytest.warns(UserWarning, match="non-finite"):
        exported = run(["--output_dir", str(tmp_path), "--max_train_steps", "3", "--checkpointing_steps", "3", *TINY])
    tokenizer = VQTokenizer.from_pretrained(exported)
    assert tokenizer.training_info["skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(exported / "model.safetensors").values())


def test_consecutive_nonfinite_steps_stop_without_saving(tmp_path):
    from tokenizer.losses import VQGANLoss

    real = VQGANLoss.generator_loss

    def always_nan(self, *args, **kwargs):
        loss, logs = real(self, *args, **kwargs)
        return loss * float("inf"), logs

    with mock.patch.object(VQGANLoss, "generator_loss", always_nan), pytest.warns(UserWarning), \
            pytest.raises(FloatingPointError, match="NaN/Inf for 3 consecutive steps"):
        run(["--output_dir", str(tmp_path), "--max_train_steps", "5", "--checkpointing_steps", "1",
             "--max_nonfinite_steps", "3", *TINY])
    assert not (tmp_path / "tokenizer").exists()
    for checkpoint in tmp_path.glob("checkpoint-*"):  # skipped steps leave the weights untouched and finite
        assert all(torch.isfinite(v).all() for v in load_file(checkpoint / "model.safetensors").values())


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), PermissionError("read-only")])
def test_failed_save_keeps_previous_checkpoint(tmp_path, error):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = []

    def fail_second(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir, "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise error
        return real(self, output_dir, **kwargs)

    with mock.patch.object(Accelerator, "save_state", fail_second), pytest.raises(type(error)):
        run(["--output_dir", str(tmp_path), "--max_train_steps", "4", "--checkpointing_steps", "2", *TINY])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    load_file(tmp_path / "checkpoint-2" / "model.safetensors")  # complete and readable
    exported = run(["--output_dir", str(tmp_path), "--max_train_steps", "4", "--checkpointing_steps", "2",
                    "--resume_from_checkpoint", "latest", *TINY])
    assert VQTokenizer.from_pretrained(exported).training_info["train_steps"] == 4


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    script = str(REPO / "scripts" / "train_tokenizer.py")
    args = ["--max_train_steps", "12", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, "--output_dir", str(tmp_path / "straight"), *args], check=True,
                   env=env, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, script, "--output_dir", str(killed), *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(killed.glob("checkpoint-[4-9]*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-run: possibly while a checkpoint is being written
    process.wait()
    assert not (killed / "tokenizer").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, script, "--output_dir", str(killed), "--resume_from_checkpoint", "latest", *args],
                   check=True, env=env, capture_output=True, timeout=600)
    a = load_file(tmp_path / "straight" / "tokenizer" / "model.safetensors")
    b = load_file(killed / "tokenizer" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "downloaded"
    VQTokenizer.from_preset("tiny").save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        VQTokenizer.from_pretrained(folder)
    # A pickle dressed up as safetensors is rejected as corrupt, not unpickled.
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Exploit()))
    from tokenizer import WeightsError

    with pytest.raises(WeightsError):
        VQTokenizer.from_pretrained(folder)
    # The one legacy path (LPIPS trunk weights) uses torch.load(weights_only=True).
    from tokenizer.losses import LPIPSLoss

    torch.save(_Exploit(), tmp_path / "vgg16.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        LPIPSLoss(trunk_weights=str(tmp_path / "vgg16.pth"))
    # So does LPIPS's file of calibrated linear heads, which lpips itself would read with a plain torch.load.
    from tokenizer.losses import perceptual

    torch.save(_Exploit(), tmp_path / "heads.pth")
    monkeypatch.setattr(perceptual, "linear_weights_path", lambda net: tmp_path / "heads.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        LPIPSLoss(pnet_rand=True)
    assert not (tmp_path / "PWNED").exists()


def test_no_unsafe_calls_in_library_code():
    import re

    builtin_call = re.compile(r"(?<![\w.`])(eval|exec)\(")
    sources = [p for package in ("tokenizer", "prior", "pipelines") for p in (REPO / package).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert not builtin_call.search(text), f"eval/exec in {path}"
        for pattern in ("pickle.load", "trust_remote_code=True", "import_module(config"):
            assert pattern not in text, f"{pattern} in {path}"
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"unsafe torch.load in {path}: {line.strip()}"
