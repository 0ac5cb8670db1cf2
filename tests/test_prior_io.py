"""Save/load of the priors: round trips, strict config and weight checks, Hub upload with a model card."""

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from prior import (
    CONFIG_VERSION,
    PRIOR_TYPES,
    PixelCNNConfig,
    PixelCNNPrior,
    Prior,
    TransformerPrior,
    TransformerPriorConfig,
    load_prior,
)
from prior.configuration import config_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


PRIORS = {
    "pixelcnn": lambda: PixelCNNPrior(PixelCNNConfig.from_preset("tiny", num_classes=3)).eval(),
    "transformer": lambda: TransformerPrior(TransformerPriorConfig.from_preset("tiny", num_classes=3)).eval(),
}


@pytest.fixture(params=sorted(PRIORS))
def prior(request):
    return PRIORS[request.param]()


@pytest.fixture
def saved(prior, tmp_path):
    prior.save_pretrained(tmp_path / "prior")
    return prior, tmp_path / "prior"


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_registry():
    assert PRIOR_TYPES == {"pixelcnn": PixelCNNPrior, "transformer": TransformerPrior}


def test_round_trip_gives_identical_outputs(saved):
    prior, folder = saved
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["prior_type"] == prior.prior_type and config["config_version"] == CONFIG_VERSION
    for loaded in (type(prior).from_pretrained(folder), load_prior(folder), Prior.from_pretrained(str(folder))):
        assert type(loaded) is type(prior) and loaded.config == prior.config and not loaded.training
        indices, labels = torch.randint(0, 16, (2, 4, 4)), [1, 2]
        torch.testing.assert_close(loaded(indices, labels).logits, prior(indices, labels).logits, rtol=0, atol=0)
        kwargs = dict(labels=[0, 2], top_k=5, guidance_scale=2.0)
        assert torch.equal(
            loaded.sample(2, generator=torch.Generator().manual_seed(0), **kwargs),
            prior.sample(2, generator=torch.Generator().manual_seed(0), **kwargs),
        )


def test_config_dict_round_trip():
    for config in (PixelCNNConfig.from_preset("tiny", num_classes=2), TransformerPriorConfig(pkeep=0.7)):
        data = json.loads(json.dumps(config.to_dict()))
        assert config_from_dict(data) == config


def test_wrong_prior_class_refused(saved):
    prior, folder = saved
    other = TransformerPrior if isinstance(prior, PixelCNNPrior) else PixelCNNPrior
    with pytest.raises(ValueError, match=f"holds prior_type '{prior.prior_type}'"):
        other.from_pretrained(folder)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda data: data.update(surprise=1), r"unknown \['surprise'\]"),
        (lambda data: data.pop("codebook_size"), r"missing \['codebook_size'\]"),
        (lambda data: data.update(codebook_size="16"), "codebook_size must be an int"),
        (lambda data: data.update(num_classes=-1), "num_classes must be >= 0"),
        (lambda data: data.update(grid_shape=[4, 4, 4]), "grid_shape must be a pair"),
        (lambda data: data.update(prior_type="maskgit"), "prior_type must be one of"),
        (lambda data: data.pop("prior_type"), "prior_type must be one of"),
        (lambda data: data.update(config_version=CONFIG_VERSION + 1), "newer than this vqstack"),
        (lambda data: data.update(config_version="1"), "config_version must be a positive int"),
    ],
)
def test_strict_config_errors(saved, edit, fragment):
    _, folder = saved
    edit_config(folder, edit)
    with pytest.raises(ValueError, match=fragment):
        load_prior(folder)


def test_unreadable_config_errors(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prior(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_prior(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_prior(folder)


def test_strict_weight_errors(saved):
    _, folder = saved
    weights_path = folder / "model.safetensors"
    state = load_file(weights_path)
    name = sorted(state)[0]

    save_file({key: value for key, value in state.items() if key != name}, weights_path)
    with pytest.raises(ValueError, match=rf"missing \['{name}'\]"):
        load_prior(folder)

    save_file({**state, "extra.weight": torch.zeros(2)}, weights_path)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        load_prior(folder)

    save_file({**state, name: torch.zeros(*state[name].shape, 2)}, weights_path)
    with pytest.raises(ValueError, match=f"mis-shaped.*{name}"):
        load_prior(folder)

    floats = [key for key, value in state.items() if value.is_floating_point()]
    save_file({**state, floats[0]: state[floats[0]].long()}, weights_path)
    with pytest.raises(ValueError, match=f"wrong dtype.*{floats[0]}: file torch.int64"):
        load_prior(folder)

    save_file({key: value.bfloat16() if value.is_floating_point() else value for key, value in state.items()},
              weights_path)
    assert load_prior(folder) is not None  # another float precision loads (cast to the model's)

    weights_path.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_prior(folder)

    weights_path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_prior(folder)


def test_interrupted_resave_keeps_the_previous_prior_loadable(saved, monkeypatch):
    """The Hub mixin deletes config.json before writing: a save that failed left a folder that could not load."""
    prior, folder = saved
    before = {name: path.read_bytes() for name in ("config.json", "model.safetensors") for path in [folder / name]}

    def fail(self, data):  # a full disk while writing the weights
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", fail)
    other = type(prior)(type(prior.config).from_preset("tiny", num_classes=5))
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(folder)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert load_prior(folder).config.num_classes == 3 and not list(folder.glob(".*"))


def test_saved_files_follow_the_umask(prior, tmp_path):
    old_umask = os.umask(0o022)
    try:
        prior.training_metrics = {"val_bits_per_token": 1.5}
        prior.save_pretrained(tmp_path / "prior")
    finally:
        os.umask(old_umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "prior").iterdir()}
    assert modes == dict.fromkeys(["README.md", "config.json", "model.safetensors", "training_metrics.json"], 0o644)


def test_resave_without_metrics_drops_the_old_metrics_file(prior, tmp_path):
    prior.training_metrics = {"val_bits_per_token": 1.23}
    prior.save_pretrained(tmp_path / "prior")
    assert load_prior(tmp_path / "prior").training_metrics == {"val_bits_per_token": 1.23}
    prior.training_metrics = {}
    prior.save_pretrained(tmp_path / "prior")
    assert load_prior(tmp_path / "prior").training_metrics == {}
    assert not (tmp_path / "prior" / "training_metrics.json").exists()


def test_resave_rewrites_a_generated_card_and_keeps_a_hand_written_one(prior, tmp_path):
    prior.training_metrics = {"val_bits_per_token": 1.23}
    prior.save_pretrained(tmp_path / "prior")
    assert "val_bits_per_token" in (tmp_path / "prior" / "README.md").read_text()
    prior.training_metrics = {}
    prior.save_pretrained(tmp_path / "prior")
    assert "val_bits_per_token" not in (tmp_path / "prior" / "README.md").read_text()
    (tmp_path / "prior" / "README.md").write_text("# my notes\n")
    prior.save_pretrained(tmp_path / "prior")
    assert (tmp_path / "prior" / "README.md").read_text() == "# my notes\n"


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder written by save_pretrained nor a Hub repo id"):
        load_prior(str(tmp_path / "no" / "such" / "prior"))


def test_push_to_hub_uploads_weights_config_and_card(prior, monkeypatch):
    uploads = []

    def fake_create_repo(self, repo_id, **kwargs):
        class Url(str):
            pass

        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploads.append({
            "repo_id": repo_id,
            "files": sorted(path.name for path in folder.iterdir()),
            "card": (folder / "README.md").read_text(),
            "config": json.loads((folder / "config.json").read_text()),
            "delete_patterns": kwargs.get("delete_patterns"),
        })
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    prior.training_metrics = {"val_bits_per_token": 3.25}
    prior.push_to_hub("someone/tiny-prior")

    (upload,) = uploads
    assert upload["repo_id"] == "someone/tiny-prior"
    assert upload["files"] == ["README.md", "config.json", "model.safetensors", "training_metrics.json"]
    assert upload["config"]["prior_type"] == prior.prior_type
    assert upload["delete_patterns"] == ["training_metrics.json"]  # an earlier push's record, unless replaced
    card = upload["card"]
    assert card.startswith("---\n") and "library_name: vqstack" in card
    for expected in (f"`{prior.prior_type}`", "4 x 4", "| codebook size K | 16 |", "| classes | 3 |",
                     f"{prior.num_parameters():,}", "val_bits_per_token", "3.25"):
        assert expected in card, expected


def test_torch_dtype_auto_keeps_the_saved_precision(prior, tmp_path):
    """A bf16 prior loaded (and so pushed by `vqstack push`) as float32 weights twice its size."""
    prior.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values() if t.is_floating_point()} \
        == {torch.bfloat16}
    default = load_prior(tmp_path / "bf16")
    auto = load_prior(tmp_path / "bf16", torch_dtype="auto")
    cast = type(prior).from_pretrained(tmp_path / "bf16", torch_dtype=torch.float16)
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in cast.parameters()} == {torch.float16}
    indices, labels = torch.randint(0, 16, (2, 4, 4)), [1, 2]
    torch.testing.assert_close(auto(indices, labels).logits, prior(indices, labels).logits, rtol=0, atol=0)
    sample = auto.sample(2, labels=[0, 2], top_k=5, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (2, 4, 4) and sample.dtype == torch.long
    with pytest.raises(ValueError, match="torch_dtype must be"):
        load_prior(tmp_path / "bf16", torch_dtype=torch.int8)
