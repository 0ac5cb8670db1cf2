"""Saving, loading and pushing tokenizers; every malformed file fails with a clear error."""

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizer import VQTokenizer, VQTokenizerConfig, WeightsError


@pytest.fixture
def saved(tmp_path) -> tuple[VQTokenizer, Path]:
    tok = VQTokenizer.from_preset("tiny").eval()
    tok.save_pretrained(tmp_path / "tok")
    return tok, tmp_path / "tok"


def test_save_writes_expected_files(saved):
    _, folder = saved
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_save_load_bit_identical(saved):
    tok, folder = saved
    loaded = VQTokenizer.from_pretrained(folder)
    assert loaded.config == tok.config
    assert loaded.image_processor == tok.image_processor
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = tok.encode(x), loaded.encode(x)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.quantized, b.quantized)
        assert torch.equal(tok.decode(a.indices), loaded.decode(b.indices))


def test_config_json_round_trip():
    config = VQTokenizerConfig.from_preset("f16-16384")
    assert VQTokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("field,value,message", [
    ("norm_groups", 0, "norm_groups must be >= 1, got 0"),
    ("base_channels", 0, "base_channels must be >= 1, got 0"),
    ("in_channels", 4, r"in_channels must be 1 \(grayscale\) or 3 \(RGB\), got 4"),
])
def test_config_rejects_impossible_sizes(field, value, message):
    with pytest.raises(ValueError, match=message):
        VQTokenizerConfig.from_preset("tiny", **{field: value})


def test_config_wrong_type_named():
    with pytest.raises(TypeError, match=r"base_channels must be int, got '64'"):
        VQTokenizerConfig(base_channels="64")
    with pytest.raises(TypeError, match="channel_multipliers"):
        VQTokenizerConfig.from_dict({"channel_multipliers": [1, "2"]})


def test_config_unknown_field_and_newer_version(tmp_path, saved):
    _, folder = saved
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "hidden_size": 3}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hidden_size'\]"):
        VQTokenizer.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**data, "config_version": 99}))
    with pytest.raises(ValueError, match="config_version=99"):
        VQTokenizer.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        VQTokenizer.from_pretrained(folder)
    for not_an_object in ("[]", '"x"', "null"):
        (folder / "config.json").write_text(not_an_object)
        with pytest.raises(ValueError, match="config.json must hold a JSON object"):
            VQTokenizer.from_pretrained(folder)


def test_corrupt_training_info_is_named(saved):
    _, folder = saved
    (folder / "training_info.json").write_text("{broken")
    with pytest.raises(ValueError, match="training_info.json is not valid JSON"):
        VQTokenizer.from_pretrained(folder)
    (folder / "training_info.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="training_info.json must hold a JSON object, got list"):
        VQTokenizer.from_pretrained(folder)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown tokenizer preset 'huge'"):
        VQTokenizerConfig.from_preset("huge")


def test_missing_weights_file(saved):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        VQTokenizer.from_pretrained(folder)


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        VQTokenizer.from_pretrained("./does/not/exist")


def test_corrupt_weights_file(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(WeightsError, match="corrupt, truncated"):
        VQTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("problem", ["missing", "extra", "mis-shaped", "wrong dtype"])
def test_mismatched_weights(saved, problem):
    _, folder = saved
    state = load_file(folder / "model.safetensors")
    key = "decoder.conv_out.weight"
    if problem == "missing":
        del state[key]
    elif problem == "extra":
        state["discriminator.weight"] = torch.zeros(1)
    elif problem == "mis-shaped":
        state[key] = torch.zeros(2, 2)
    else:
        state[key] = state[key].long()  # would otherwise be cast to float silently
    save_file(state, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=problem if problem != "extra" else "unexpected tensors"):
        VQTokenizer.from_pretrained(folder)


def test_weights_in_another_float_precision_load(saved):
    tok, folder = saved
    state = load_file(folder / "model.safetensors")
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}, folder / "model.safetensors")
    loaded = VQTokenizer.from_pretrained(folder)
    assert loaded.encoder.conv_in.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.encoder.conv_in.weight, tok.encoder.conv_in.weight.bfloat16().float())


def test_saved_files_follow_the_umask_and_leave_no_temporary_files(tmp_path):
    tok = VQTokenizer.from_preset("tiny")
    tok.training_info = {"steps": 3}
    old_umask = os.umask(0o022)
    try:
        tok.save_pretrained(tmp_path / "tok")
    finally:
        os.umask(old_umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "tok").iterdir()}
    assert modes == dict.fromkeys(["README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                                   "training_info.json"], 0o644)


def test_resave_without_training_info_drops_the_old_file(tmp_path):
    tok = VQTokenizer.from_preset("tiny")
    tok.training_info = {"steps": 3}
    tok.save_pretrained(tmp_path / "tok")
    assert VQTokenizer.from_pretrained(tmp_path / "tok").training_info == {"steps": 3}
    tok.training_info = {}
    tok.save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "training_info.json").exists()
    assert not VQTokenizer.from_pretrained(tmp_path / "tok").training_info


def test_resave_rewrites_a_generated_card_and_keeps_a_hand_written_one(tmp_path):
    tok = VQTokenizer.from_preset("tiny", quantizer={"codebook_size": 64})
    tok.training_info = {"steps": 1000}
    tok.save_pretrained(tmp_path / "tok")
    assert "codebook size | 64" in (tmp_path / "tok" / "README.md").read_text()
    other = VQTokenizer.from_preset("tiny", quantizer={"codebook_size": 32})
    other.save_pretrained(tmp_path / "tok")
    card = (tmp_path / "tok" / "README.md").read_text()
    assert "codebook size | 32" in card and "steps" not in card  # describes the weights now in the folder
    (tmp_path / "tok" / "README.md").write_text("# my notes\n")  # written by hand: no marker line
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "README.md").read_text() == "# my notes\n"


def test_interrupted_save_keeps_the_previous_weights(saved, monkeypatch):
    tok, folder = saved
    before = (folder / "model.safetensors").read_bytes()

    write_bytes = Path.write_bytes

    def fail(self, data):  # writes part of the file, then fails, as a full disk would
        write_bytes(self, data[:100])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", fail)
    card = (folder / "README.md").read_text()
    with pytest.raises(OSError, match="disk full"):  # another architecture: its config must not land either
        VQTokenizer.from_preset("tiny", quantizer={"codebook_size": 32}).save_pretrained(folder)
    monkeypatch.undo()
    assert (folder / "model.safetensors").read_bytes() == before
    assert not list(folder.glob(".*.tmp"))
    assert VQTokenizer.from_pretrained(folder).codebook_size == tok.codebook_size  # the previous model, whole
    assert (folder / "README.md").read_text() == card


def test_push_to_hub_uploads_weights_config_and_card(tmp_path):
    tok = VQTokenizer.from_preset("tiny")
    tok.training_info = {"dataset": "digits", "steps": 10, "validation": {"psnr": 25.5}}
    uploaded = {}

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploaded.update({p.name: p.read_text() if p.suffix in (".md", ".json") else p.stat().st_size
                         for p in folder.iterdir()})
        return f"https://hub.example/{repo_id}/commit/1"

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tok")) as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder):
        tok.push_to_hub("me/tok")
    create.assert_called_once()
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
            "training_info.json"} == set(uploaded)
    card = uploaded["README.md"]
    assert "codebook size | 64" in card and "downsampling factor | 4" in card
    assert "digits" in card and "25.5" in card and "library_name: vqstack" in card


def test_load_from_hub_id_uses_hub_download(saved, tmp_path):
    _, folder = saved

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "me/tok"
        path = folder / filename
        if not path.exists():
            from huggingface_hub.errors import EntryNotFoundError
            raise EntryNotFoundError(filename)
        return str(path)

    with mock.patch("tokenizer.weights.hf_hub_download", side_effect=fake_download), \
            mock.patch("huggingface_hub.hub_mixin.hf_hub_download", side_effect=fake_download):
        loaded = VQTokenizer.from_pretrained("me/tok")
    assert loaded.codebook_size == 64


def test_hub_unreachable_error_says_what_to_do():
    with pytest.raises(OSError, match="no local folder 'nobody/nothing' exists.*could not download config.json from "
                                      "the Hub repo 'nobody/nothing'"):
        VQTokenizer.from_pretrained("nobody/nothing")


def test_torch_dtype_auto_keeps_the_saved_precision_and_unknown_keywords_are_refused(tmp_path):
    """ModelHubMixin handed every extra keyword to the loader, which dropped it: torch_dtype=torch.bfloat16 (or a
    misspelt map_location) loaded float32 on the CPU without a word."""
    tok = VQTokenizer.from_preset("tiny").to(torch.bfloat16).eval()  # .to casts in place
    tok.save_pretrained(tmp_path / "bf16")
    assert VQTokenizer.from_pretrained(tmp_path / "bf16").encoder.conv_in.weight.dtype == torch.float32
    auto = VQTokenizer.from_pretrained(tmp_path / "bf16", torch_dtype="auto")
    assert auto.encoder.conv_in.weight.dtype == torch.bfloat16
    for name, tensor in tok.state_dict().items():
        assert torch.equal(auto.state_dict()[name], tensor), name
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    assert auto.encode(pixels).indices.equal(tok.encode(pixels).indices)
    cast = VQTokenizer.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float16)
    assert cast.decoder.conv_out.weight.dtype == torch.float16
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['map_loaction'\]"):
        VQTokenizer.from_pretrained(tmp_path / "bf16", map_loaction="cpu")
    with pytest.raises(ValueError, match="torch_dtype must be"):
        VQTokenizer.from_pretrained(tmp_path / "bf16", torch_dtype=torch.int8)


def test_a_save_that_cannot_encode_its_metadata_writes_nothing(tmp_path):
    """The weights were written before training_info was encoded: a value JSON refuses (np.float32) left the new
    weights beside the previous save's training_info.json, and loading paired them."""
    import numpy as np

    old = VQTokenizer.from_preset("tiny")
    old.training_info = {"resolution": 32}
    old.save_pretrained(tmp_path / "tok")
    new = VQTokenizer.from_preset("tiny")
    new.training_info = {"resolution": 64, "psnr": np.float32(30.0)}
    with pytest.raises(TypeError, match="not JSON serializable"):
        new.save_pretrained(tmp_path / "tok")
    loaded = VQTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.trained_resolution == 32
    for name, tensor in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_preprocess_takes_float_tensors_in_zero_one():
    """torchvision's ToTensor gives float tensors in [0, 1]: refused, with a message that sent them to encode as
    they were, where they passed the range check and gave wrong tokens."""
    import numpy as np

    from tokenizer import VQImageProcessor

    processor = VQImageProcessor(channels=3)
    rng = np.random.default_rng(0)
    array = rng.random((16, 12, 3)).astype(np.float32)
    from_tensor = processor.preprocess(torch.from_numpy(array).permute(2, 0, 1))
    assert torch.equal(from_tensor, processor.preprocess(array))
    assert torch.equal(processor.preprocess(torch.from_numpy(array).permute(2, 0, 1)[None]), from_tensor)
    with pytest.raises(ValueError, match="float tensors must lie in \\[0, 1\\].*already in \\[-1, 1\\] need no"):
        processor.preprocess(torch.from_numpy(array).permute(2, 0, 1) * 2 - 1)
    with pytest.raises(TypeError, match="uint8 in \\[0, 255\\] or float in \\[0, 1\\]"):
        processor.preprocess(torch.zeros(3, 8, 8, dtype=torch.int32))


def test_from_preset_refuses_a_quantizer_it_cannot_read():
    from tokenizer import VQTokenizerConfig

    for value in ("lfq", 256, ["kind", "lfq"]):
        with pytest.raises(TypeError, match="quantizer must be a QuantizerConfig or a dict"):
            VQTokenizerConfig.from_preset("tiny", quantizer=value)
    assert VQTokenizerConfig.from_preset("tiny", quantizer={"kind": "fsq", "fsq_levels": (4, 4, 4),
                                                            "codebook_size": 64}).quantizer.kind == "fsq"
