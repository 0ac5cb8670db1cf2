"""How the command line reports bad input: one line naming the problem, not a traceback."""

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub.errors import HfHubHTTPError

from pipelines import cli
from pipelines.hub import hub_push_errors
from tokenizer import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--codebook_size", "32", "--perceptual_weight", "0", "--train_batch_size", "8",
        "--max_train_steps", "1", "--max_train_samples", "16", "--no_progress"]


@pytest.fixture
def tokenizer_folder(tmp_path) -> Path:
    folder = tmp_path / "tok"
    VQTokenizer.from_preset("tiny").save_pretrained(folder)
    return folder


def run_console(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["vqstack", *argv])
    status = cli.console_main()
    return status, capsys.readouterr().err


def test_bad_input_prints_one_line_naming_the_command_and_the_problem(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("VQSTACK_TRACEBACK", raising=False)
    missing = tmp_path / "no-such-pipeline"
    status, err = run_console(monkeypatch, capsys, "generate", "--pipeline", str(missing), "--output_dir",
                              str(tmp_path / "out"))
    assert status == 1
    assert err.strip().splitlines() == [
        f"vqstack generate: error: {str(missing)!r} is neither a folder written by save_pretrained nor a Hub repo id "
        "like 'user/name'"]
    assert "Traceback" not in err


def test_vqstack_traceback_shows_the_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("VQSTACK_TRACEBACK", "1")
    argv = ("generate", "--pipeline", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="neither a folder written by save_pretrained"):
        run_console(monkeypatch, capsys, *argv)
    monkeypatch.setenv("VQSTACK_TRACEBACK", "0")  # "0" keeps the one line
    assert run_console(monkeypatch, capsys, *argv)[0] == 1


def test_programming_errors_keep_their_traceback(monkeypatch, capsys):
    monkeypatch.delenv("VQSTACK_TRACEBACK", raising=False)
    with mock.patch("pipelines.generation.main", side_effect=KeyError("a bug")):
        with pytest.raises(KeyError, match="a bug"):
            run_console(monkeypatch, capsys, "generate", "--pipeline", "x")


def test_an_interrupt_ends_with_status_130_and_one_line(monkeypatch, capsys):
    with mock.patch("pipelines.generation.main", side_effect=KeyboardInterrupt):
        status, err = run_console(monkeypatch, capsys, "generate", "--pipeline", "x")
    assert (status, err) == (130, "vqstack generate: interrupted\n")


def test_usage_errors_and_help_are_unchanged(monkeypatch, capsys):
    assert run_console(monkeypatch, capsys, "fly")[0] == 2
    assert run_console(monkeypatch, capsys)[0] == 0
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error, exit status 2
        run_console(monkeypatch, capsys, "generate", "--num_images", "many")
    assert exit_info.value.code == 2


def test_accelerate_launchable_scripts_report_errors_the_same_way(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "generate.py"), "--pipeline", str(tmp_path / "missing"),
               "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("generate.py: error: ")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ --resolution
def test_train_tokenizer_refuses_a_resolution_the_downsampling_does_not_divide_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--resolution 18 is not a positive multiple of the tokenizer's "
                                         r"downsampling factor 4: use a multiple of 4, e.g. --resolution 16"):
        cli.main(["train-tokenizer", "--dataset", "digits", "--resolution", "18", "--output_dir", str(out), *TINY])
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("command", ["encode", "evaluate-tokenizer"])
def test_encode_and_evaluate_name_the_resolution_flag(tokenizer_folder, tmp_path, command):
    extra = ["--output_dir", str(tmp_path / "tokens")] if command == "encode" else []
    with pytest.raises(ValueError, match="--resolution 18 is not a positive multiple of the tokenizer's downsampling "
                                         "factor 4"):
        cli.main([command, "--tokenizer", str(tokenizer_folder), "--dataset", "digits", "--resolution", "18", *extra])


# ------------------------------------------------------------------------------------------ pushing
class ConnectError(Exception):
    """Stands for the transport error of huggingface_hub's HTTP library (httpx in recent versions)."""


ConnectError.__module__ = "httpx"


def test_push_without_network_names_the_hub_the_repo_and_the_saved_folder(monkeypatch, capsys, tokenizer_folder):
    monkeypatch.delenv("VQSTACK_TRACEBACK", raising=False)
    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=ConnectError("Name or service not known")):
        status, err = run_console(monkeypatch, capsys, "push", str(tokenizer_folder), "--repo_id", "me/tok")
    assert status == 1
    assert "could not reach the Hugging Face Hub to push to 'me/tok' (ConnectError: Name or service not known)" in err
    assert f"vqstack push {tokenizer_folder} --repo_id me/tok" in err


def test_a_private_push_that_failed_is_retried_private(tokenizer_folder):
    with pytest.raises(ConnectionError, match=f"`vqstack push {tokenizer_folder} --repo_id me/tok --private`"):
        with hub_push_errors(tokenizer_folder, "me/tok", private=True):
            raise ConnectError("timed out")


def test_transport_errors_that_are_oserrors_are_recognised(tokenizer_folder):
    """requests' ConnectionError (huggingface_hub before 1.0) is an OSError: the library decides, not the type."""
    RequestsConnectionError = type("ConnectionError", (OSError,), {"__module__": "requests.exceptions"})
    with pytest.raises(ConnectionError, match="could not reach the Hugging Face Hub"):
        with hub_push_errors(tokenizer_folder, "me/tok"):
            raise RequestsConnectionError("Max retries exceeded")
    with pytest.raises(PermissionError, match="already exists and is public"):  # vqstack's own OSErrors pass through
        with hub_push_errors(tokenizer_folder, "me/tok"):
            raise PermissionError("a private push was asked for, but the Hub repo 'me/tok' already exists and is public")


def test_push_errors_from_the_hub_itself_pass_through(tokenizer_folder):
    response = mock.Mock(status_code=403, headers={}, request=mock.Mock())
    refused = HfHubHTTPError("403 Forbidden: you cannot write to this repo", response=response)
    with pytest.raises(HfHubHTTPError, match="403 Forbidden"):
        with hub_push_errors(tokenizer_folder, "me/tok"):
            raise refused
    with pytest.raises(ValueError, match="not network"):
        with hub_push_errors(tokenizer_folder, "me/tok"):
            raise ValueError("not network")


def test_a_failed_push_at_the_end_of_training_keeps_the_saved_tokenizer(tmp_path):
    out = tmp_path / "run"
    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=ConnectError("timed out")):
        with pytest.raises(ConnectionError, match=rf"push to 'me/tok' \(ConnectError: timed out\)\. Nothing was lost: "
                                                  rf"{out / 'tokenizer'} is saved"):
            cli.main(["train-tokenizer", "--dataset", "digits", "--output_dir", str(out), "--push_to_hub",
                      "--hub_model_id", "me/tok", *TINY])
    assert VQTokenizer.from_pretrained(out / "tokenizer").codebook_size == 32
