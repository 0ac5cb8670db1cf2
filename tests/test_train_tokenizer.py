"""Tokenizer training: a smoke run on an image folder, exact resume, two processes, the offline LPIPS error."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_resume_with_gradient_accumulation_across_epoch_ends(tmp_path):
    # 20 examples in batches of 4: 5 micro-batches per epoch, so steps of 2 micro-batches straddle epoch ends.
    common = ["--dataset", "digits", "--max_train_samples", "20", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "3", "--validation_steps", "100", *TINY]
    straight = run(["--output_dir", str(tmp_path / "a"), "--max_train_steps", "5", *common])
    run(["--output_dir", str(tmp_path / "b"), "--max_train_steps", "3", *common])
    resumed = run(["--output_dir", str(tmp_path / "b"), "--max_train_steps", "5", "--resume_from_checkpoint", "latest",
                   *common])
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    state = json.loads((tmp_path / "a" / "checkpoint-5" / "training_state.json").read_text())
    assert state["global_step"] == 5


def test_discriminator_gradient_is_the_mean_over_micro_batches(tmp_path, monkeypatch):
    from tokenizer.losses import VQGANLoss

    per_micro_batch, at_step = [], []
    discriminator_loss, adam_step = VQGANLoss.discriminator_loss, torch.optim.Adam.step

    def spy_loss(self, *args, **kwargs):
        loss, logs = discriminator_loss(self, *args, **kwargs)
        weight = self.discriminator.layers[0].weight
        per_micro_batch.append((weight, torch.autograd.grad(loss, weight, retain_graph=True)[0]))
        return loss, logs

    def spy_step(self, *args, **kwargs):
        if per_micro_batch and any(p is per_micro_batch[0][0] for g in self.param_groups for p in g["params"]):
            at_step.append(per_micro_batch[0][0].grad.clone())
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(VQGANLoss, "discriminator_loss", spy_loss)
    monkeypatch.setattr(torch.optim.Adam, "step", spy_step)
    run(["--dataset", "digits", "--max_train_samples", "32", "--output_dir", str(tmp_path / "run"),
         "--max_train_steps", "2", "--gradient_accumulation_steps", "2", "--adversarial_weight", "0.5",
         "--disc_start", "0", "--validation_steps", "100", *TINY])
    assert len(per_micro_batch) == 4 and len(at_step) == 2
    for step, gradient in enumerate(at_step):
        # both micro-batches count, and the generator's GAN term leaves nothing on the discriminator
        expected = (per_micro_batch[2 * step][1] + per_micro_batch[2 * step + 1][1]) / 2
        torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_new_run_refuses_checkpoints_of_another_run(tmp_path):
    common = ["--dataset", "digits", "--max_train_samples", "16", "--max_train_steps", "1", "--validation_steps",
              "100", "--checkpoints_total_limit", "2", *TINY]
    out = tmp_path / "run"
    (out / "checkpoint-5000").mkdir(parents=True)  # left by an earlier, longer run
    with pytest.raises(FileExistsError, match="checkpoint-5000.*--overwrite_output_dir"):
        run(["--output_dir", str(out), *common])
    run(["--output_dir", str(out), "--overwrite_output_dir", *common])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    # resuming from an older checkpoint than the newest one would mix two runs as well
    (out / "checkpoint-7").mkdir()
    with pytest.raises(FileExistsError, match="newer than .*checkpoint-1.*checkpoint-7"):
        run(["--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-1"), *common])


def test_validation_log_holds_one_entry_per_step_of_this_run(tmp_path):
    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "1", "--checkpointing_steps",
              "2", "--num_validation_images", "6", "--output_dir", str(tmp_path / "run"), *TINY,
              "--max_validation_batches", "2"]

    def logged():
        lines = (tmp_path / "run" / "validation" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    run(["--max_train_steps", "3", *common])  # validates at steps 1, 2, 3; checkpoints at 2 and 3
    first = logged()
    assert [entry["step"] for entry in first] == [1, 2, 3]
    # Resuming from checkpoint-2 (named relative to --output_dir) redoes step 3: logged once, not twice.
    exported = run(["--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-2", "--overwrite_output_dir",
                    *common])
    assert [entry["step"] for entry in logged()] == [1, 2, 3, 4] and logged()[:2] == first[:2]
    # Rerunning the finished command does no step: the exported tokenizer keeps its validation metrics.
    rerun = run(["--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common])
    info = VQTokenizer.from_pretrained(rerun).training_info
    assert info["validation"] == {k: v for k, v in logged()[-1].items() if k != "step"} and info["validation"]
    assert info["seed"] == 3 and exported == rerun
    # A new run in the folder starts a new log, and older grids beyond its steps are gone.
    run(["--max_train_steps", "1", "--overwrite_output_dir", *common])
    assert [entry["step"] for entry in logged()] == [1]
    assert sorted(p.name for p in (tmp_path / "run" / "validation").glob("*.png")) == ["reconstructions-000001.png"]
    # --num_validation_images 6 with batches of 4: the grid takes images from two batches (6 columns, 2 rows).
    grid = Image.open(tmp_path / "run" / "validation" / "reconstructions-000001.png")
    assert grid.size[0] > grid.size[1] * 2


def _micro_step_setup(tmp_path, *flags, scaler=None):
    """A tiny tokenizer, its loss with a discriminator and both optimizers, prepared as in train_tokenizer."""
    from pipelines.train_tokenizer import DiscriminatorStep
    from pipelines.training import NonFiniteGuard, make_accelerator, make_scheduler
    from tokenizer import VQTokenizerConfig
    from tokenizer.losses import VQGANLoss, VQGANLossConfig

    args = build_parser().parse_args(["--output_dir", str(tmp_path), "--config", "tiny", "--adversarial_weight", "0.5",
                                      "--perceptual_weight", "0", "--gradient_accumulation_steps", "2", *flags])
    torch.manual_seed(0)
    accelerator = make_accelerator(args)
    if scaler is not None:  # accelerate's fp16 setup on a GPU (native AMP + GradScaler), emulated on the CPU
        accelerator.native_amp, accelerator.scaler = True, scaler
    model = VQTokenizer(VQTokenizerConfig.from_preset("tiny"))
    loss_fn = VQGANLoss(VQGANLossConfig(perceptual_weight=0.0, adversarial_weight=0.5, disc_base_channels=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = make_scheduler(args, optimizer, accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    disc = DiscriminatorStep(accelerator, accelerator.prepare(torch.optim.SGD(loss_fn.discriminator.parameters(), lr=1.0)),
                             loss_fn.discriminator, NonFiniteGuard(10, what="discriminator loss"))
    batches = [{"pixel_values": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
               for i in range(3)]
    return args, accelerator, model, loss_fn, optimizer, scheduler, disc, NonFiniteGuard(10), batches


def _discriminator_gradient(loss_fn, state, pixels, reconstruction, scale, accelerator=None):
    """The gradient of one micro-batch's discriminator loss (divided by `scale`) at discriminator weights `state`,
    under the accelerator's autocast when given."""
    import contextlib
    import copy

    reference = copy.deepcopy(loss_fn)
    reference.discriminator.load_state_dict(state)
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        loss, _ = type(reference).discriminator_loss(reference, pixels, reconstruction, 0)  # not a spy on loss_fn
    (loss.float() / scale).backward()
    return reference.discriminator.layers[0].weight.grad


def test_a_skipped_generator_step_drops_the_discriminator_gradients(tmp_path):
    from pipelines.train_tokenizer import _train_micro_step

    args, acc, model, loss_fn, opt, sched, dopt, guard, batches = _micro_step_setup(tmp_path)
    seen, real_d, real_g, calls = [], loss_fn.discriminator_loss, loss_fn.generator_loss, []

    def generator_loss(*inputs):  # NaN on the second (last) micro-batch of the first step
        calls.append(1)
        loss, logs = real_g(*inputs)
        return (loss * float("nan") if len(calls) == 2 else loss), logs

    def spy(pixels, reconstruction, step):
        seen.append((pixels.clone(), reconstruction.clone()))
        return real_d(pixels, reconstruction, step)

    loss_fn.generator_loss, loss_fn.discriminator_loss = generator_loss, spy
    weight = loss_fn.discriminator.layers[0].weight
    _train_micro_step(acc, model, loss_fn, opt, sched, dopt, batches[0], 0, args, guard)
    assert weight.grad is not None  # the first micro-batch's discriminator gradient
    _train_micro_step(acc, model, loss_fn, opt, sched, dopt, batches[1], 0, args, guard)  # skipped
    assert weight.grad is None and guard.skipped == 1
    state = {k: v.clone() for k, v in loss_fn.discriminator.state_dict().items()}
    _train_micro_step(acc, model, loss_fn, opt, sched, dopt, batches[2], 1, args, guard)
    expected = _discriminator_gradient(loss_fn, state, *seen[-1], scale=2)  # this micro-batch's own, nothing else
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("bad_micro_batch", [0, 1])
def test_a_non_finite_micro_batch_skips_the_whole_accumulated_step(tmp_path, bad_micro_batch):
    """With accumulation, zero_grad before the last micro-batch is a no-op: the step used to go ahead with the
    other micro-batches' gradients when the first was bad. Now neither optimizer steps, and one skip is counted."""
    from pipelines.train_tokenizer import _train_micro_step

    args, acc, model, loss_fn, opt, sched, dopt, guard, batches = _micro_step_setup(tmp_path)
    real_g, calls = loss_fn.generator_loss, []

    def generator_loss(*inputs):
        calls.append(1)
        loss, logs = real_g(*inputs)
        return (loss * float("nan") if len(calls) == bad_micro_batch + 1 else loss), logs

    loss_fn.generator_loss = generator_loss
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    disc_before = {k: v.detach().clone() for k, v in loss_fn.discriminator.named_parameters()}
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        for batch in batches[:2]:  # one optimizer step of two micro-batches
            _train_micro_step(acc, model, loss_fn, opt, sched, dopt, batch, 0, args, guard)
    assert guard.skipped == 1 and not opt.optimizer.state  # Adam never stepped
    weights = model.state_dict()
    changed = [k for k, v in before.items() if "quantizer" not in k and not torch.equal(v, weights[k])]
    assert not changed
    for name, tensor in loss_fn.discriminator.named_parameters():  # (BatchNorm statistics follow every forward)
        assert torch.equal(tensor, disc_before[name]), name
    assert all(p.grad is None for p in model.parameters())
    _train_micro_step(acc, model, loss_fn, opt, sched, dopt, batches[2], 1, args, guard)  # the next step is clean
    assert guard.consecutive == 0 or not acc.sync_gradients


@pytest.mark.parametrize("growth_interval", [2000, 1])
def test_fp16_discriminator_gradients_are_unscaled_once_with_their_own_scale(tmp_path, growth_interval):
    """accelerate's clip_grad_norm_ unscales every prepared optimizer: the discriminator's gradients of the earlier
    micro-batches were divided by the loss scale twice. And with accelerate's scaler shared, the tokenizer's step
    changed the scale (here at every step: growth_interval 1) before the last micro-batch's discriminator backward,
    so the earlier micro-batch was unscaled with the new scale (weights 0.5 and 1)."""
    from pipelines.train_tokenizer import _train_micro_step

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=growth_interval)
    args, acc, model, loss_fn, opt, sched, dopt, guard, batches = _micro_step_setup(
        tmp_path, "--mixed_precision", "fp16", scaler=scaler)
    seen, real_d = [], loss_fn.discriminator_loss
    loss_fn.discriminator_loss = lambda p, r, s: (seen.append((p.clone(), r.clone())), real_d(p, r, s))[1]
    start = {k: v.clone() for k, v in loss_fn.discriminator.state_dict().items()}
    for batch in batches[:2]:  # one optimizer step of two micro-batches
        _train_micro_step(acc, model, loss_fn, opt, sched, dopt, batch, 0, args, guard)
    applied = start["layers.0.weight"] - loss_fn.discriminator.layers[0].weight.detach()  # SGD, lr 1
    expected = sum(_discriminator_gradient(loss_fn, start, *pair, scale=2, accelerator=acc) for pair in seen)
    # fp16 rounding differs elementwise; the double unscaling gave a norm ratio of 0.68 and a cosine of 0.71
    cosine = torch.nn.functional.cosine_similarity(applied.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.999 and abs(applied.norm() / expected.norm() - 1) < 0.01
    # each scaler grew once in this step (growth_interval 1), not the shared one twice; the discriminator's is saved
    assert scaler.get_scale() == 2.0**10 * (2 if growth_interval == 1 else 1)
    assert dopt.scaler.get_scale() == scaler.get_scale()
    restored = type(dopt)(acc, acc.prepare(torch.optim.SGD(loss_fn.discriminator.parameters(), lr=1.0)),
                          loss_fn.discriminator, guard)
    restored.load_state_dict(dopt.state_dict())
    assert restored.scaler.state_dict() == dopt.scaler.state_dict()


def test_ema_decay_warms_up_and_its_count_is_checkpointed():
    from pipelines.training import ExponentialMovingAverage

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ExponentialMovingAverage(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay 1/10 at the first update: the initial weights are nearly forgotten at once
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)
    for _ in range(9000):  # (1 + n) / (10 + n) reaches 0.999 at n = 8991
        ema.update(model)
    assert ema.current_decay() == 0.999 and ema.shadow["weight"].item() == pytest.approx(1.0)
    restored = ExponentialMovingAverage(model, decay=0.999)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 9001 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    old = {k: v for k, v in ema.state_dict().items() if k != "__num_updates__"}  # a checkpoint from before
    restored.load_state_dict(old)
    assert restored.current_decay() == 0.999


def test_resume_with_use_ema_from_a_checkpoint_without_ema_is_clear(tmp_path):
    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "100",
              "--output_dir", str(tmp_path / "run"), *TINY]
    run(["--max_train_steps", "1", *common])
    with pytest.raises(FileNotFoundError, match=r"no ema.safetensors \(it was written by a run without --use_ema\)"):
        run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--use_ema", *common])


def test_resume_with_other_discriminator_flags_names_them(tmp_path):
    """Pretraining without the GAN and resuming with it (or with LeCam) must fail naming the flags, not a file."""
    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "100",
              "--output_dir", str(tmp_path / "run"), *TINY]
    run(["--max_train_steps", "1", *common])
    with pytest.raises(ValueError, match="1 optimizer.*this run has 2.*--adversarial_weight"):
        run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--adversarial_weight", "0.1", *common])
    gan = ["--adversarial_weight", "0.1", "--output_dir", str(tmp_path / "gan")]
    run(["--max_train_steps", "1", *common, *gan])
    with pytest.raises(ValueError, match="(?s)loss.safetensors does not match.*--lecam_weight"):
        run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--lecam_weight", "0.1", *common, *gan])


def test_resume_with_other_training_flags_names_them(tmp_path, caplog):
    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "100",
              "--output_dir", str(tmp_path / "run"), "--adversarial_weight", "0.1", *TINY]
    run(["--max_train_steps", "1", *common])
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "training_state.json").read_text())
    assert state["flags"]["adversarial_weight"] == 0.1 and "hub_token" not in state["flags"]
    with caplog.at_level("WARNING", logger="pipelines.training"):
        # extended, and validation writes less: nothing to say, as neither changes what is trained
        run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--num_validation_images", "4",
             "--max_validation_batches", "1", *common])
    assert "flags other than" not in caplog.text
    with caplog.at_level("WARNING", logger="pipelines.training"):
        run(["--max_train_steps", "3", "--resume_from_checkpoint", "latest", *common[:-len(TINY)],
             "--learning_rate", "1e-3", "--adversarial_weight", "0.3", *TINY])
    assert "--adversarial_weight 0.1 -> 0.3, --learning_rate 0.0002 -> 0.001" in caplog.text


def test_new_run_refuses_to_replace_an_earlier_runs_outputs(tmp_path, caplog):
    """A run without checkpoints left there (deleted, or it stopped before the first one) still owns its
    validation log and exported tokenizer: a new run wiped the log before its first step."""
    out = tmp_path / "run"
    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "1", "--output_dir", str(out),
              "--max_train_steps", "1", *TINY]
    run(common)
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    log = (out / "validation" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"earlier run \(validation/, tokenizer/\).*--overwrite_output_dir"):
        run(common)
    assert (out / "validation" / "metrics.jsonl").read_text() == log
    with caplog.at_level(logging.INFO, logger="pipelines.checkpointing"):
        run([*common, "--resume_from_checkpoint", "latest"])  # "latest" with no checkpoint continues: a new run
    # said once, though the quantizer's seed looks the checkpoint up before the resume does
    assert [r.getMessage() for r in caplog.records].count(f"no checkpoint in {out} yet: starting a new run") == 1
    run([*common, "--overwrite_output_dir"])


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    from pipelines.checkpointing import _prune

    for step in (4000, 4500, 500):
        (tmp_path / f"checkpoint-{step}").mkdir()
    _prune(tmp_path, 2, keep=tmp_path / "checkpoint-500")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4500", "checkpoint-500"]


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
    for flag in ("--num_validation_images", "--max_validation_batches"):
        with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
            run(["--dataset", "digits", "--output_dir", str(tmp_path), *TINY, flag, "0"])
    with pytest.raises(ValueError, match="--lr_scheduler constant has no warmup"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), "--lr_warmup_steps", "10", *TINY])
    with pytest.raises(ValueError, match="--lr_warmup_steps must be >= 0"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), "--lr_warmup_steps", "-1",
             "--lr_scheduler", "linear", *TINY])
    with pytest.raises(ValueError, match=r"--seed must lie in \[0, 2\*\*32\)"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), *TINY, "--seed", str(2**32)])
    # discriminator flags without the discriminator, and LPIPS weights without LPIPS, would be ignored
    for flags in (["--lecam_weight", "0.1"], ["--disc_start", "5"], ["--disc_learning_rate", "1e-4"],
                  ["--disc_loss", "non_saturating"]):
        with pytest.raises(ValueError, match=f"{flags[0]} set the discriminator"):
            run(["--dataset", "digits", "--output_dir", str(tmp_path), *TINY, *flags])
    with pytest.raises(ValueError, match="--lpips_weights is only used with --perceptual_weight > 0"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), *TINY, "--lpips_weights", "vgg.pth"])
    with pytest.raises(ValueError, match="--disc_learning_rate must be > 0"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), *TINY, "--adversarial_weight", "0.1",
             "--disc_learning_rate", "0"])
    # the PatchGAN needs 24 pixels: refused before training, not when --disc_start is reached
    with pytest.raises(ValueError, match="--resolution 16 is too small for the 3-layer PatchGAN.*at least 24"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path), *TINY, "--adversarial_weight", "0.1",
             "--disc_start", "1000", "--resolution", "16"])
    assert not list(tmp_path.glob("checkpoint-*"))  # refused before any step


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "scripts" / "train_tokenizer.py"), "--dataset", "digits", "--max_train_samples", "64",
               "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "1",
               "--validation_steps", "2", "--lr_scheduler", "linear", "--learning_rate", "1e-3", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = VQTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.training_info["batch_size"] == 8  # 4 per process x 2 processes
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()
    # accelerate steps the schedule once per process: after 1 of 2 steps a linear decay is half way, not at 0
    scheduler = torch.load(out / "checkpoint-1" / "scheduler.bin", weights_only=True)
    assert scheduler["_last_lr"][0] == pytest.approx(0.5e-3)
    # resuming with two CPU processes: their device is "cpu:0", which safetensors refused to load onto
    command[command.index("--max_train_steps") + 1] = "3"
    result = subprocess.run([*command, "--resume_from_checkpoint", "latest"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert VQTokenizer.from_pretrained(out / "tokenizer").training_info["train_steps"] == 3


def test_the_hub_token_never_reaches_a_tracker():
    """init_trackers passed every scalar flag as the tracker's config, --hub_token included (hparams.yml, wandb)."""
    from unittest import mock

    from pipelines.training import init_trackers

    accelerator = SimpleNamespace(is_main_process=True, init_trackers=mock.Mock())
    args = build_parser().parse_args(["--dataset", "digits", "--output_dir", "out", "--push_to_hub",
                                      "--hub_model_id", "me/tok", "--hub_token", "hf_secret"])
    init_trackers(accelerator, args, "vqstack-tokenizer")
    config = accelerator.init_trackers.call_args.kwargs["config"]
    assert config["hub_model_id"] == "me/tok" and "hub_token" not in config
    assert "hf_secret" not in json.dumps(config)


def test_a_longer_run_with_a_decaying_schedule_warns_on_resume(tmp_path, caplog):
    """--max_train_steps lays a cosine / linear schedule out: extending it on resume re-draws the learning rate."""
    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "100",
              "--output_dir", str(tmp_path / "run"), "--lr_scheduler", "cosine", *TINY]
    run(["--max_train_steps", "1", *common])
    with caplog.at_level("WARNING", logger="pipelines.training"):
        run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", *common])
    assert "--max_train_steps 1 -> 2" in caplog.text


def test_overwrite_output_dir_removes_the_earlier_exported_model(tmp_path):
    """With --overwrite_output_dir the earlier run's exported folders stayed: a pipeline/ this run does not write
    kept the old prior and looked like this run's result."""
    from pipelines.training import maybe_resume

    out = tmp_path / "run"
    for name in ("prior", "pipeline", "validation"):
        (out / name).mkdir(parents=True)
        (out / name / "old.txt").write_text("earlier run")
    (out / "notes.txt").write_text("the user's")
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=True,
                           validation_steps=1)
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    assert maybe_resume(accelerator, args, guard=None, extra_state={}, outputs=("prior", "pipeline")) == 0
    assert not (out / "prior").exists() and not (out / "pipeline").exists()
    assert (out / "notes.txt").exists()


def test_resuming_a_checkpoint_without_a_scaler_under_fp16_names_the_flag(tmp_path, monkeypatch):
    """On a GPU accelerate gives fp16 runs a gradient scaler; a checkpoint of a no / bf16 run has no scaler.pt and
    the resume failed on the missing file (or blamed the GAN flags). A scaler is attached here as on a GPU."""
    import pipelines.train_tokenizer as train_module

    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "100",
              "--output_dir", str(tmp_path / "run"), *TINY]
    run(["--max_train_steps", "1", *common])
    real = train_module.make_accelerator

    def with_scaler(args):
        accelerator = real(args)
        if args.mixed_precision == "fp16" and accelerator.scaler is None:
            accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    monkeypatch.setattr(train_module, "make_accelerator", with_scaler)
    with pytest.raises(ValueError, match="written without fp16 loss scaling.*--mixed_precision fp16"):
        run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--mixed_precision", "fp16", *common])


@pytest.mark.parametrize("flags, message", [
    (["--ema_decay", "0.99"], "--ema_decay 0.99 applies with --use_ema only"),
    (["--hub_model_id", "me/tok"], "--hub_model_id applies with --push_to_hub only; add --push_to_hub or drop it"),
    (["--hub_token", "hf_x"], "--hub_token applies with --push_to_hub only"),
    (["--hub_model_id", "me/tok", "--hub_token", "hf_x"],
     "--hub_model_id and --hub_token apply with --push_to_hub only; add --push_to_hub or drop them"),
])
def test_flags_of_a_feature_that_is_off_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(["--dataset", "digits", "--output_dir", str(tmp_path / "run"), *TINY, *flags])
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_resolution_too_small_for_lpips_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="--resolution 8 is too small for the LPIPS loss"):
        run(["--dataset", "digits", "--output_dir", str(tmp_path / "run"), "--resolution", "8", *TINY,
             "--perceptual_weight", "1"])


def test_checkpoints_that_recorded_the_validation_flags_resume_without_a_warning(caplog):
    """Checkpoints written before the validation flags became bookkeeping recorded them among their flags."""
    from pipelines.training import _recorded_flags, _warn_changed_flags

    args = SimpleNamespace(learning_rate=1e-3, lr_scheduler="cosine", max_train_steps=10, num_validation_images=4)
    old = {**_recorded_flags(args), "num_validation_images": 16, "max_validation_batches": 8}
    with caplog.at_level("WARNING", logger="pipelines.training"):
        _warn_changed_flags(Path("checkpoint-5"), old, _recorded_flags(args))
    assert "flags other than" not in caplog.text
    with caplog.at_level("WARNING", logger="pipelines.training"):  # a decaying schedule still compares its length
        _warn_changed_flags(Path("checkpoint-5"), {**old, "max_train_steps": 20}, _recorded_flags(args))
    assert "--max_train_steps 20 -> 10" in caplog.text and "validation" not in caplog.text


def test_flags_of_the_prior_validation_samples_are_not_recorded_as_training_flags():
    from pipelines.training import _recorded_flags

    args = SimpleNamespace(num_validation_samples=4, guidance_scale=2.0, temperature=0.9, top_k=5, learning_rate=1e-3,
                           lr_scheduler="constant")
    assert _recorded_flags(args) == {"learning_rate": 1e-3, "lr_scheduler": "constant"}


def test_seed_also_seeds_the_quantizer_and_a_resume_keeps_the_checkpoints(tmp_path, caplog):
    """--seed seeds the quantizer's k-means and restart draws too; a checkpoint written before it did (no
    recorded quantizer_seed) came from a run whose quantizer used seed 0, and its resume keeps 0."""
    common = ["--dataset", "digits", "--max_train_samples", "16", "--validation_steps", "100",
              "--output_dir", str(tmp_path / "run"), *TINY]  # TINY has --seed 3
    exported = run(["--max_train_steps", "1", *common])
    assert json.loads((exported / "config.json").read_text())["quantizer"]["seed"] == 3
    state_path = tmp_path / "run" / "checkpoint-1" / "training_state.json"
    state = json.loads(state_path.read_text())
    assert state["flags"]["quantizer_seed"] == 3
    with caplog.at_level("WARNING", logger="pipelines.training"):
        exported = run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", *common])
    assert json.loads((exported / "config.json").read_text())["quantizer"]["seed"] == 3
    assert "flags other than" not in caplog.text

    del state["flags"]["quantizer_seed"]  # as written before the seed was recorded
    state_path.write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    with caplog.at_level("WARNING", logger="pipelines.training"):
        exported = run(["--max_train_steps", "2", "--resume_from_checkpoint", "latest", *common])
    assert json.loads((exported / "config.json").read_text())["quantizer"]["seed"] == 0
    assert "flags other than" not in caplog.text
