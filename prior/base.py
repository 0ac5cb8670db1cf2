"""The `Prior` interface: training loss, exact log-likelihood, sampling with shared filters and guidance, and
strict save/load through `huggingface_hub.ModelHubMixin`.

A concrete prior implements two things:
- `_logits(inputs, class_ids)`: teacher-forced logits (B, h, w, K) for a whole grid;
- `_logit_stream(class_ids, use_cache)`: a generator that yields the logits (N, K) of the next raster position
  and receives the chosen tokens (N,) through `send`, so that the sampling loop, logit filters and
  classifier-free guidance live here once for every prior.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .configuration import PriorConfig, config_from_dict
from .sampling import (
    Generators,
    _filter_logits,
    _sample_from_logits,
    check_filter_args,
    check_generators,
    guide_logits,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_METRICS_NAME = "training_metrics.json"
# Marks a card that save_pretrained wrote itself: rewritten on the next save into the same folder, since it describes
# the weights saved with it; a card without this line was written or edited by hand and is kept. (The same line as
# the tokenizer's: prior/ does not import tokenizer/.)
GENERATED_CARD_MARKER = ("<!-- Written by vqstack's save_pretrained, which rewrites this card when it saves into this "
                         "folder again. Delete this line to keep your edits. -->")

# prior_type -> Prior subclass; filled in as subclasses are defined (see `Prior.__init_subclass__`).
PRIOR_TYPES: dict[str, type[Prior]] = {}

LabelsLike = Tensor | Sequence[int] | None


@dataclass
class PriorOutput:
    """Output of `Prior.forward`."""

    loss: Tensor  # scalar: mean negative log-likelihood in nats per token
    logits: Tensor  # (B, h, w, K): logits of p(token | previous tokens, label)


class Prior(nn.Module, ModelHubMixin, library_name="vqstack", tags=["vqstack", "prior", "image-generation"]):
    """Autoregressive prior over integer grids `indices [B, h, w]` with values in `[0, K)`.

    Tokens are visited in raster order. With `num_classes > 0` the prior is class-conditional and reserves class
    id `num_classes` as the null label used for label dropout and classifier-free guidance.
    """

    prior_type: ClassVar[str] = ""
    config_class: ClassVar[type[PriorConfig]] = PriorConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.prior_type:
            PRIOR_TYPES[cls.prior_type] = cls

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config must be a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        # Shown in the model card when set, e.g. {"val_bits_per_token": 6.1}; not part of the weights.
        self.training_metrics: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------------------
    # To implement in subclasses
    def _logits(self, inputs: Tensor, class_ids: Tensor | None) -> Tensor:
        """Teacher-forced logits (B, h, w, K) of every position given the earlier ones."""
        raise NotImplementedError

    def _logit_stream(
        self, class_ids: Tensor | None, batch_size: int, use_cache: bool
    ) -> Generator[Tensor, Tensor, None]:
        """Yield next-position logits (N, K) in raster order; receive the chosen tokens (N,) via `send`."""
        raise NotImplementedError

    def _corrupt_inputs(self, indices: Tensor) -> Tensor:
        """Training-time input augmentation (targets stay unchanged); identity unless a prior overrides it."""
        return indices

    # ----------------------------------------------------------------------------------------------------------
    # Public API
    def forward(self, indices: Tensor, labels: LabelsLike = None) -> PriorOutput:
        """Teacher-forced loss (nats/token) and logits (B, h, w, K).

        In training mode labels are replaced by the null class with probability `config.label_dropout`
        (torch's global RNG), which trains the unconditional branch used by classifier-free guidance.
        """
        indices = self._check_indices(indices)
        class_ids = self._class_ids(labels, indices.shape[0], indices.device)
        inputs = indices
        if self.training:
            class_ids = self._drop_labels(class_ids)
            inputs = self._corrupt_inputs(indices)
        logits = self._logits(inputs, class_ids)  # (B, h, w, K)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), indices.reshape(-1))
        return PriorOutput(loss=loss, logits=logits)

    def log_prob(self, indices: Tensor, labels: LabelsLike = None) -> Tensor:
        """Exact log p(indices | label) in nats, summed over the grid: float32 tensor (B,).

        No label dropout, input corruption or dropout is applied, in either mode: the network runs in eval mode
        for this call (gradients still flow) and its mode is restored afterwards.
        """
        indices = self._check_indices(indices)
        class_ids = self._class_ids(labels, indices.shape[0], indices.device)
        with _eval_mode(self):
            logits = self._logits(indices, class_ids)
        log_probs = logits.float().log_softmax(dim=-1)  # (B, h, w, K)
        token_log_probs = log_probs.gather(-1, indices.unsqueeze(-1)).squeeze(-1)  # (B, h, w)
        return token_log_probs.flatten(1).sum(dim=1)

    def bits_per_token(self, indices: Tensor, labels: LabelsLike = None) -> Tensor:
        """Scalar -mean log2 p(token | previous, label) over all tokens of the batch; differentiable, as `log_prob`
        is (wrap the call in `torch.no_grad()` to evaluate without building a graph)."""
        log_prob = self.log_prob(indices, labels)  # (B,)
        return -log_prob.mean() / (self.config.num_tokens * math.log(2.0))

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        labels: LabelsLike = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float = 1.0,
        generator: Generators = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample grids, LongTensor (batch_size, h, w), in raster order.

        Logits are filtered temperature -> top-k -> top-p (`filter_logits`). With `guidance_scale != 1` a
        conditional prior runs one doubled batch (rows with the labels, rows with the null class) that shares
        each sampled token, and samples from `uncond + scale * (cond - uncond)` on log-probs (Ho & Salimans
        2022). `use_cache=False` recomputes every position from scratch (reference path for tests/benchmarks).
        `generator`: one `torch.Generator` for the whole batch, or a list of `batch_size` generators, one per grid;
        grid i then depends only on `generator[i]` (and its label), not on the batch it is sampled in.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_filter_args(temperature, top_k, top_p)
        check_generators(generator, batch_size)
        device = self._device()
        class_ids = self._class_ids(labels, batch_size, device)
        guided = self._check_guidance(guidance_scale, labels)
        if guided:
            null_ids = torch.full_like(class_ids, self.config.null_class_id)
            class_ids = torch.cat([class_ids, null_ids])  # (2B,): conditional rows, then null-class rows
        with _eval_mode(self):  # no dropout while sampling, whichever mode the prior is in; restored afterwards
            return self._sample_tokens(class_ids, batch_size, guided, temperature, top_k, top_p, guidance_scale,
                                       generator, use_cache)

    def _sample_tokens(self, class_ids: Tensor | None, batch_size: int, guided: bool, temperature: float,
                       top_k: int | None, top_p: float | None, guidance_scale: float,
                       generator: Generators, use_cache: bool) -> Tensor:
        """The token-by-token loop of `sample`, on validated arguments."""
        device = self._device()
        stream = self._logit_stream(class_ids, batch_size * (2 if guided else 1), use_cache)
        tokens = torch.empty(batch_size, self.config.num_tokens, dtype=torch.long, device=device)
        logits = next(stream)  # (N, K)
        for position in range(self.config.num_tokens):
            if guided:
                logits = guide_logits(logits[:batch_size], logits[batch_size:], guidance_scale)
            token = _sample_from_logits(_filter_logits(logits, temperature, top_k, top_p), generator)  # (B,)
            tokens[:, position] = token
            if position + 1 < self.config.num_tokens:
                logits = stream.send(token.repeat(2) if guided else token)
        stream.close()
        return tokens.view(batch_size, *self.config.grid_shape)

    def num_parameters(self) -> int:
        """Number of parameters (buffers such as masks excluded)."""
        return sum(parameter.numel() for parameter in self.parameters())

    # ----------------------------------------------------------------------------------------------------------
    # Input validation
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_indices(self, indices: Any) -> Tensor:
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices must have an integer dtype (torch.long), got {indices.dtype}")
        if indices.ndim != 3:
            raise ValueError(f"indices must have shape (B, h, w), got rank {indices.ndim} shape {tuple(indices.shape)}")
        if tuple(indices.shape[1:]) != self.config.grid_shape:
            raise ValueError(
                f"indices must have grid shape {self.config.grid_shape}, got {tuple(indices.shape[1:])}"
            )
        if indices.shape[0] == 0:
            raise ValueError("indices must hold at least one grid, got an empty batch (B=0)")
        indices = indices.long()  # also for unsigned dtypes, which have no min/max kernels
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= self.config.codebook_size:
            raise ValueError(
                f"indices must lie in [0, {self.config.codebook_size}), got values in [{low}, {high}]"
            )
        return indices

    def _class_ids(self, labels: LabelsLike, batch_size: int, device: torch.device) -> Tensor | None:
        """Validated class ids (B,) on `device`; the null class for a conditional prior given no labels."""
        num_classes = self.config.num_classes
        if labels is None:
            if num_classes == 0:
                return None
            return torch.full((batch_size,), self.config.null_class_id, dtype=torch.long, device=device)
        if num_classes == 0:
            raise ValueError(f"labels must be None for an unconditional prior (num_classes=0), got {labels!r}")
        if isinstance(labels, Tensor):
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must have an integer dtype (torch.long), got {labels.dtype}")
            if labels.ndim != 1:
                raise ValueError(f"labels must have shape (B,), got shape {tuple(labels.shape)}")
            labels = labels.long()  # also for unsigned dtypes, which have no min/max kernels
        elif isinstance(labels, Sequence) and not isinstance(labels, str):
            if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
                raise TypeError(f"labels must be a list of ints, got {list(labels)!r}")
            labels = torch.tensor(list(labels), dtype=torch.long)
        else:
            raise TypeError(f"labels must be a LongTensor (B,), a list of ints or None, got {type(labels).__name__}")
        if labels.shape[0] != batch_size:
            raise ValueError(f"labels must have length batch_size={batch_size}, got {labels.shape[0]}")
        if batch_size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
        return labels.to(device=device, dtype=torch.long)

    def _check_guidance(self, guidance_scale: float, labels: LabelsLike) -> bool:
        """Validate `guidance_scale`; True when the doubled guidance batch is needed."""
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale must be a float, got {guidance_scale!r}")
        if not guidance_scale >= 0.0 or guidance_scale == float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if guidance_scale == 1.0:
            return False  # plain conditional sampling, exactly: no doubled batch
        if self.config.num_classes == 0 or labels is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a class-conditional prior and labels; got "
                f"num_classes={self.config.num_classes}, labels={labels!r} (use guidance_scale=1.0)"
            )
        return True

    def _drop_labels(self, class_ids: Tensor | None) -> Tensor | None:
        if class_ids is None or self.config.label_dropout == 0.0:
            return class_ids
        drop = torch.rand(class_ids.shape, device=class_ids.device) < self.config.label_dropout  # (B,)
        return class_ids.masked_fill(drop, self.config.null_class_id)

    # ----------------------------------------------------------------------------------------------------------
    # Save / load / Hub
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> str | None:
        """ModelHubMixin.save_pretrained, made safe to interrupt: the mixin deletes config.json before anything is
        written, so a save that fails before the new weights land puts the previous config.json back (from a hard
        link: nothing is written, which a full disk could refuse)."""
        folder = Path(save_directory)
        config, backup = folder / CONFIG_NAME, folder / f".{CONFIG_NAME}.previous"
        weights = folder / WEIGHTS_NAME
        old_weights = weights.stat().st_ino if weights.is_file() else None  # a replaced file has a new inode
        backup.unlink(missing_ok=True)
        if config.is_file():
            with contextlib.suppress(OSError):  # a file system without hard links: no safety net, as before
                os.link(config, backup)
        try:
            return super().save_pretrained(folder, **kwargs)
        except BaseException:
            same_weights = weights.is_file() and weights.stat().st_ino == old_weights
            if backup.exists() and same_weights and not config.exists():
                os.replace(backup, config)
            raise
        finally:
            backup.unlink(missing_ok=True)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """ModelHubMixin.push_to_hub; a training_metrics.json that an earlier push left in the repo is deleted unless
        this prior uploads its own (the Hub keeps files an upload does not replace). With `private=True`, an existing
        public repo is refused (PermissionError) before anything is uploaded."""
        stale = kwargs.pop("delete_patterns", None) or []
        stale = [stale] if isinstance(stale, str) else list(stale)
        if kwargs.get("private"):  # ModelHubMixin would upload into an existing public repo
            repo_id = _create_private_repo(HfApi(token=kwargs.get("token")), repo_id)
        return super().push_to_hub(repo_id, delete_patterns=[*stale, TRAINING_METRICS_NAME], **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write `config.json` (with prior_type and config_version) and `model.safetensors`, each atomically.

        A model card that an earlier save generated here is removed, so that the one written next describes these
        weights; a hand-written README.md is kept.
        """
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        metadata = {"format": "pt", "prior_type": self.prior_type}
        # Serialized in memory and written by Python: safetensors' own file writer creates files with mode 0600.
        weights = save(state, metadata=metadata)
        # The weights first: a save stopped while writing them (the long write) leaves the previous model whole.
        _atomic_write(save_directory / WEIGHTS_NAME, lambda path: Path(path).write_bytes(weights))
        card = save_directory / "README.md"
        if card.is_file() and GENERATED_CARD_MARKER in card.read_text(errors="replace"):
            card.unlink()
        config_text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        _atomic_write(save_directory / CONFIG_NAME, lambda path: Path(path).write_text(config_text))
        if self.training_metrics:
            metrics_text = json.dumps(self.training_metrics, indent=2, sort_keys=True)
            _atomic_write(save_directory / TRAINING_METRICS_NAME, lambda path: Path(path).write_text(metrics_text))
        else:
            # A metrics file left by an earlier save to this folder describes other weights.
            (save_directory / TRAINING_METRICS_NAME).unlink(missing_ok=True)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        torch_dtype: torch.dtype | str | None = None,
    ) -> Prior:
        """Load a prior saved by `save_pretrained` from a folder or a Hub repo id, strictly.

        `torch_dtype`: None keeps float32 whatever the file holds, "auto" the floating dtype the weights were saved
        in, or a floating torch dtype to cast to (as `.to(dtype)`).
        Called on `Prior` itself it builds whatever `prior_type` the config names (like `load_prior`).
        ModelHubMixin's own `from_pretrained` is bypassed on purpose: it decodes config.json by dropping unknown
        keys, whereas a prior's config is checked strictly in `_from_pretrained`.
        """
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
            torch_dtype=torch_dtype,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
        torch_dtype: torch.dtype | str | None = None,
        **unused: Any,
    ) -> Prior:
        if not (torch_dtype is None or torch_dtype == "auto"
                or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point)):
            raise ValueError(f"torch_dtype must be None, 'auto' or a floating torch dtype, got {torch_dtype!r}")

        def resolve(filename: str) -> str:
            if os.path.isdir(model_id):
                path = os.path.join(model_id, filename)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{filename} not found in {model_id!r}: not a saved vqstack prior")
                return path
            if os.path.exists(model_id) or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
                raise FileNotFoundError(f"{model_id!r} is neither a folder written by save_pretrained nor a Hub "
                                        "repo id like 'user/name'")
            try:
                return hf_hub_download(
                    repo_id=model_id, filename=filename, revision=revision, cache_dir=cache_dir,
                    force_download=force_download, token=token, local_files_only=local_files_only,
                )
            except LocalEntryNotFoundError as error:
                raise OSError(
                    f"no local folder {model_id!r} exists, and as a Hub repo id it failed: could not download "
                    f"{filename} from the Hub repo {model_id!r} (no network or repo not cached): "
                    f"{error}. Download the repo elsewhere (e.g. `hf download {model_id} --local-dir DIR`), copy the "
                    "folder here and pass its path instead."
                ) from error

        config_path = resolve(CONFIG_NAME)
        try:
            with open(config_path, encoding="utf-8") as file:
                config_data = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
        config = config_from_dict(config_data, source=config_path)
        model_class = PRIOR_TYPES[config.prior_type] if cls.prior_type == "" else cls
        if config.prior_type != model_class.prior_type:
            raise ValueError(
                f"{config_path} holds prior_type {config.prior_type!r}, expected {model_class.prior_type!r} "
                f"for {model_class.__name__} (use prior.load_prior to load any prior)"
            )
        model = model_class(config)
        saved_dtype = model.load_state_dict_strict(resolve(WEIGHTS_NAME))
        model.training_metrics = _read_training_metrics(model_id, resolve)
        model = model.to(map_location)
        dtype = saved_dtype if torch_dtype == "auto" else torch_dtype
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
        return model.eval()

    def load_state_dict_strict(self, weights_path: str | Path) -> torch.dtype | None:
        """Load `model.safetensors`; every tensor must exist, be expected, and match in shape. Returns the floating
        dtype that most of the file's weights are stored in (None if it holds no floating tensor)."""
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mis_shaped = [
            f"{name}: file {tuple(state[name].shape)} vs model {tuple(tensor.shape)}"
            for name, tensor in expected.items()
            if name in state and state[name].shape != tensor.shape
        ]
        # Floating-point precision may differ (a bf16 file loads into float32), the kind of number may not: an
        # integer tensor where weights are expected would otherwise be cast silently.
        mistyped = [
            f"{name}: file {state[name].dtype} vs model {tensor.dtype}"
            for name, tensor in expected.items()
            if name in state and not _same_dtype_kind(state[name].dtype, tensor.dtype)
        ]
        if missing or unexpected or mis_shaped or mistyped:
            raise ValueError(
                f"{weights_path} does not match {type(self).__name__}({self.config}): "
                f"missing {missing}, unexpected {unexpected}, mis-shaped {mis_shaped}, wrong dtype {mistyped}"
            )
        self.load_state_dict(state, strict=True)
        elements: dict[torch.dtype, int] = {}
        for tensor in state.values():
            if tensor.is_floating_point():
                elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
        return max(elements, key=elements.__getitem__, default=None)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """Model card listing prior type, grid shape, K, classes, parameters and training metrics if set."""
        card_data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        config = self.config
        lines = [
            f"# vqstack {type(self).__name__}",
            "",
            "An autoregressive prior over integer index grids, saved with vqstack. Load it with "
            "`prior.load_prior(repo_id)` and draw grids with `.sample(batch_size)`; decode them with the "
            "matching vqstack tokenizer.",
            "",
            "| property | value |",
            "|---|---|",
            f"| prior type | `{self.prior_type}` |",
            f"| grid shape (h, w) | {config.grid_shape[0]} x {config.grid_shape[1]} |",
            f"| codebook size K | {config.codebook_size} |",
            f"| classes | {config.num_classes or 'unconditional'} |",
            f"| label dropout | {config.label_dropout if config.num_classes else '-'} |",
            f"| parameters | {self.num_parameters():,} |",
        ]
        if self.training_metrics:
            lines += ["", "## Training metrics", "", "| metric | value |", "|---|---|"]
            lines += [f"| {name} | {value:.6g} |" for name, value in sorted(self.training_metrics.items())]
        lines += ["", "## Config", "", "```json", json.dumps(config.to_dict(), indent=2, sort_keys=True), "```"]
        return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{GENERATED_CARD_MARKER}\n\n" + "\n".join(lines) + "\n")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Generator[None, None, None]:
    """`module` in eval mode inside the block, back in its own mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _same_dtype_kind(file_dtype: torch.dtype, model_dtype: torch.dtype) -> bool:
    """Both floating point (any precision), or the very same non-floating dtype."""
    if file_dtype.is_floating_point or model_dtype.is_floating_point:
        return file_dtype.is_floating_point and model_dtype.is_floating_point
    return file_dtype == model_dtype


def _atomic_write(path: Path, write: Any) -> None:
    """Write through `write(tmp_path)` then rename, so an interrupted save never leaves a half file.

    The temporary file is created by `write` itself (not by mkstemp, whose 0600 mode the rename would keep), so
    the saved files get the usual permissions of the user's umask.
    """
    tmp_path = str(path.with_name(f".{path.name}.tmp"))
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _read_training_metrics(model_id: str, resolve) -> dict[str, float]:
    """The optional training_metrics.json (numbers only); absent in priors that were never trained by vqstack."""
    try:
        path = resolve(TRAINING_METRICS_NAME)
    except (FileNotFoundError, EntryNotFoundError):
        return {}
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise ValueError(f"{path} must map metric names to numbers")
    return {str(k): float(v) for k, v in metrics.items()}


def load_prior(
    pretrained_model_name_or_path: str | Path, map_location: str | torch.device = "cpu", **hub_kwargs: Any
) -> Prior:
    """Load any saved prior, dispatching on the `prior_type` recorded in its config.json."""
    return Prior.from_pretrained(pretrained_model_name_or_path, map_location=map_location, **hub_kwargs)


def _create_private_repo(api: HfApi, repo_id: str) -> str:
    """Create the private model repo `repo_id` unless it exists; refuse an existing public one (`create_repo` leaves
    an existing repo's visibility as it is). The tokenizer's `create_model_repo` twin: `prior` does not import
    `tokenizer`."""
    repo = api.create_repo(repo_id, private=True, exist_ok=True).repo_id
    if not api.repo_info(repo, repo_type="model").private:
        raise PermissionError(f"a private push was asked for, but the Hub repo {repo!r} already exists and is public: "
                              "nothing was uploaded. Make it private on the Hub (or with HfApi.update_repo_settings) "
                              "first, or push to a new repo id")
    return repo
