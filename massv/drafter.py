"""The multimodal drafter: the target's frozen vision encoder + a small trainable projector + a small LM.

The projected image features replace the LM's input embeddings at the image placeholder positions, so a
text-only LM of the target's family can "see" the same image the target sees and predict what it will say.

On disk (LLaVA-style, each part loadable on its own), a Hugging Face model repository:
    massv_drafter.json         MultimodalDrafterConfig
    config.json                the same, with `model_type: massv_drafter`, for the Hub's tools
    README.md                  the model card: target, training data, MAL table (massv.model_card)
    projector.safetensors      the trained projector
    language_model/            the drafter LM, a plain Hugging Face checkpoint (safetensors)
    vision_encoder.safetensors optional: the target's vision modules, when saved with them

`from_pretrained` takes a local directory or a Hub id (downloaded through `huggingface_hub`, so its cache,
`HF_HUB_OFFLINE` and tokens apply); `push_to_hub` uploads a saved copy. Files get ordinary modes (0644/0755).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from massv.errors import DrafterMismatchError, InputError, MissingInputError
from massv.families import VISION_FEATURE_CHOICES, FamilyAdapter, get_adapter
from massv.io import atomic_directory, atomic_write_text, check_safetensors, load_safetensors, read_json, read_text

logger = logging.getLogger(__name__)

CONFIG_NAME = "massv_drafter.json"
HF_CONFIG_NAME = "config.json"
HF_MODEL_TYPE = "massv_drafter"
PROJECTOR_WEIGHTS = "projector.safetensors"
VISION_WEIGHTS = "vision_encoder.safetensors"
LANGUAGE_MODEL_DIR = "language_model"
CHECKPOINT_STATE_NAME = "train_state.json"  # written by massv.train.loop into checkpoint-<step>/
# "name" or "owner/name": what the Hub accepts as a repository id (a local path is tried first).
HUB_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass
class MultimodalDrafterConfig:
    """Everything needed to rebuild a drafter around a (re)loaded language model and vision encoder."""

    family: str
    target_config: dict[str, Any]  # the target VLM's config: names the family and rebuilds its vision modules
    vision_feature: str = "projected"
    vision_feature_dim: int = 0
    lm_hidden_size: int = 0
    projector_hidden_dim: int | None = None
    projector_layers: int = 2
    projector_activation: str = "gelu"
    image_token_id: int = 0
    draftable_vocab_size: int = 0  # ids >= this are padding or out-of-vocabulary: never drafted
    target_name_or_path: str | None = None
    includes_vision_encoder: bool = False
    massv_version: str = field(default="0.1.0")
    language_model_name_or_path: str | None = None  # the drafter LM it started from (model card)
    training_data: dict[str, str] = field(default_factory=dict)  # stage -> data it trained on (model card)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # MAL measurements (model card)
    # True: the LM has its own tokenizer, and `image_token_id` is that tokenizer's placeholder, not the target's
    # (massv.speculative.CrossTokenizerDrafter drafts with it through text).
    cross_tokenizer: bool = False

    def __post_init__(self) -> None:
        if self.vision_feature not in VISION_FEATURE_CHOICES:
            raise ValueError(f"vision_feature must be one of {VISION_FEATURE_CHOICES}, got {self.vision_feature!r}")
        if self.projector_layers < 1:
            raise ValueError(f"projector_layers must be >= 1, got {self.projector_layers}")

    def to_json(self) -> str:
        """Sorted, indented JSON: diffs between saved drafters stay readable."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MultimodalDrafterConfig:
        """Parse a saved config; an unknown key is an error rather than silently ignored."""
        data = json.loads(text)
        data.pop("model_type", None)  # config.json's copy carries the Hub's model_type / architectures
        data.pop("architectures", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in {CONFIG_NAME}; valid keys: {sorted(known)}")
        return cls(**data)

    def build_target_config(self) -> PretrainedConfig:
        """The target's config object, for picking the family adapter without loading the target."""
        data = dict(self.target_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)


class VisionProjector(nn.Module):
    """Vision features -> drafter embedding space: an MLP (LLaVA-1.5's 2-layer GELU MLP by default)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, num_layers: int = 2,
                 activation: str = "gelu") -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        hidden_dim = hidden_dim or out_dim
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for index in range(num_layers):
            layers.append(nn.Linear(widths[index], widths[index + 1]))
            if index < num_layers - 1:
                layers.append(ACT2FN[activation])
        self.layers = nn.Sequential(*layers)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """`image_features: (num_image_tokens, in_dim)` -> `(num_image_tokens, out_dim)`."""
        return self.layers(image_features)


class MultimodalDrafter(nn.Module):
    """Frozen target vision encoder + trainable projector + small causal LM, behaving like an HF causal LM."""

    def __init__(self, config: MultimodalDrafterConfig, language_model: PreTrainedModel,
                 vision_modules: dict[str, nn.Module] | None = None, share_vision: bool = True) -> None:
        """`share_vision=True` keeps the vision modules by reference only (not a submodule, never saved or
        copied), which is how a drafter sits next to a loaded target without a second vision encoder."""
        super().__init__()
        self.config = config
        self.adapter: FamilyAdapter = get_adapter(config.build_target_config())
        self.language_model = language_model
        self.projector = VisionProjector(
            config.vision_feature_dim, config.lm_hidden_size, config.projector_hidden_dim,
            config.projector_layers, config.projector_activation,
        )
        self._shared_vision: dict[str, nn.Module] | None = None
        self.vision_encoder: nn.ModuleDict | None = None
        if vision_modules is not None:
            self.attach_vision(vision_modules, share=share_vision)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_target(cls, target: PreTrainedModel, language_model: PreTrainedModel, tokenizer_size: int,
                    vision_feature: str = "projected", projector_hidden_dim: int | None = None,
                    projector_layers: int = 2, projector_activation: str = "gelu") -> MultimodalDrafter:
        """A fresh drafter around a loaded target's vision encoder (shared) and a drafter LM."""
        from massv.vocab import draftable_vocab_size

        adapter = get_adapter(target.config)
        config = MultimodalDrafterConfig(
            family=adapter.model_type,
            target_config=target.config.to_dict(),
            vision_feature=vision_feature,
            vision_feature_dim=adapter.feature_dim(vision_feature),
            lm_hidden_size=language_model.config.hidden_size,
            projector_hidden_dim=projector_hidden_dim,
            projector_layers=projector_layers,
            projector_activation=projector_activation,
            image_token_id=adapter.image_token_id,
            draftable_vocab_size=draftable_vocab_size(
                tokenizer_size, language_model.config.vocab_size, adapter.target_vocab_size
            ),
            target_name_or_path=getattr(target, "name_or_path", None) or None,
            language_model_name_or_path=getattr(language_model, "name_or_path", None) or None,
        )
        drafter = cls(config, language_model, adapter.vision_modules(target), share_vision=True)
        drafter.projector.to(device=language_model.device, dtype=language_model.dtype)
        return drafter

    def attach_vision(self, vision_modules: dict[str, nn.Module], share: bool = True) -> None:
        """Use these vision modules (frozen). Shared ones are held by reference and left out of `state_dict`."""
        for module in vision_modules.values():
            module.requires_grad_(False)
            module.eval()
        if share:
            self._shared_vision = dict(vision_modules)
            self.vision_encoder = None
        else:
            self._shared_vision = None
            self.vision_encoder = nn.ModuleDict(vision_modules)

    @property
    def vision_modules(self) -> dict[str, nn.Module]:
        """The frozen vision modules in use, wherever they live."""
        if self.vision_encoder is not None:
            return dict(self.vision_encoder.items())
        if self._shared_vision is not None:
            return self._shared_vision
        raise RuntimeError(
            "this drafter has no vision encoder: it was saved without one. Load it with "
            "MultimodalDrafter.from_pretrained(path, target=<loaded target VLM>) or pass image_features."
        )

    # ---- freezing -----------------------------------------------------------------------------------
    def set_trainable(self, phase: str) -> None:
        """Phase 1 trains the projector only; phase 2 trains projector + LM. The vision encoder never trains."""
        if phase not in ("phase1", "phase2"):
            raise ValueError(f"phase must be 'phase1' or 'phase2', got {phase!r}")
        self.language_model.requires_grad_(phase == "phase2")
        self.projector.requires_grad_(True)
        for module in self._all_vision_modules():
            module.requires_grad_(False)
            module.eval()

    def _all_vision_modules(self) -> list[nn.Module]:
        if self.vision_encoder is not None:
            return list(self.vision_encoder.values())
        return list((self._shared_vision or {}).values())

    def train(self, mode: bool = True) -> MultimodalDrafter:
        """Like `nn.Module.train`, but the frozen vision encoder stays in eval mode (no dropout drift)."""
        super().train(mode)
        for module in self._all_vision_modules():
            module.eval()
        return self

    # ---- forward ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs must go: the LM's device (the shared vision encoder may live with the target)."""
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        """The LM's compute dtype, as HF models expose it."""
        return self.language_model.dtype

    @torch.no_grad()
    def encode_images(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen encoder's features `(num_image_tokens, vision_feature_dim)`, before the projector."""
        return self.adapter.encode_images(self.vision_modules, image_inputs, self.config.vision_feature)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """LM input embeddings with projected image features spliced in at the placeholder positions."""
        safe_ids = self.adapter.drafter_safe_input_ids(input_ids, self.language_model.config.vocab_size)
        inputs_embeds = self.language_model.get_input_embeddings()(safe_ids)
        image_mask = input_ids == self.config.image_token_id
        num_placeholders = int(image_mask.sum())
        if image_features is None:
            if num_placeholders:
                raise ValueError(f"input_ids hold {num_placeholders} image placeholders but no image was given")
            return inputs_embeds
        if image_features.shape[0] != num_placeholders:
            raise ValueError(
                f"{image_features.shape[0]} image features for {num_placeholders} image placeholder tokens; the "
                "prompt and the images do not match (was the prompt built by the target's processor?)"
            )
        projected = self.projector(image_features.to(device=inputs_embeds.device, dtype=self.projector_dtype))
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), projected.to(inputs_embeds.dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        """Features are cast to this before projection (the projector may be kept in fp32 for training)."""
        return next(self.projector.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image_inputs: dict[str, torch.Tensor] | None = None, image_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values: Any = None,
                position_ids: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, cache_position: torch.Tensor | None = None,
                soft_labels: Any = None) -> CausalLMOutputWithPast:
        """Like an HF causal LM's forward, plus the image (raw `image_inputs` or precomputed features).

        Without `labels`: logits, where ids the drafter must never propose (padding rows) are -inf.
        With `labels` (training): only the loss, mean cross-entropy over the tokens whose label is not -100,
        computed from the LM head at those positions alone (`massv.train.loss`); `logits` is None, because
        full-vocabulary logits at every position are the largest tensor of a training step. `soft_labels` (a
        `massv.train.loss.SoftLabelBatch`) mixes in KL to the target's distribution at those positions.
        """
        if image_features is None and image_inputs is not None and bool((input_ids == self.config.image_token_id).any()):
            image_features = self.encode_images(image_inputs)
        inputs_embeds = self.embed(input_ids, image_features)
        if labels is not None:
            return self._loss_forward(inputs_embeds, attention_mask, position_ids, labels, past_key_values,
                                      use_cache, used_projector=image_features is not None, soft_labels=soft_labels)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=past_key_values,
            position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
            **({} if cache_position is None else {"cache_position": cache_position}),
        )
        logits = outputs.logits
        if self.config.draftable_vocab_size < logits.shape[-1]:
            logits = logits.clone()
            logits[..., self.config.draftable_vocab_size:] = float("-inf")
        return CausalLMOutputWithPast(logits=logits, past_key_values=outputs.past_key_values)

    def _loss_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None, labels: torch.Tensor, past_key_values: Any,
                      use_cache: bool | None, used_projector: bool, soft_labels: Any = None) -> CausalLMOutputWithPast:
        """The LM body, then the head only where labels are set; DDP-safe when no image was projected."""
        from massv.train.loss import answer_token_loss

        body = self.language_model.get_decoder()
        outputs = body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, use_cache=use_cache)
        softcap = getattr(self.language_model.config, "final_logit_softcapping", None)
        loss = answer_token_loss(outputs.last_hidden_state, labels, self.language_model.get_output_embeddings(),
                                 self.config.draftable_vocab_size, softcap, soft_labels=soft_labels)
        if not used_projector and torch.is_grad_enabled():
            # A micro-batch without images leaves the projector out of the graph. Under DDP every process must
            # produce a gradient for every trainable weight in each step, or the gradient all-reduce of a
            # process whose batch had an image meets a process whose batch had none (a collective mismatch, a
            # hang or a crash). A zero-weighted term gives the projector an exact zero gradient instead.
            trainable = [param.sum() for param in self.projector.parameters() if param.requires_grad]
            if trainable:
                loss = loss + 0.0 * torch.stack(trainable).sum().to(loss.dtype)
        return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values)

    # ---- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, include_vision_encoder: bool | None = None) -> Path:
        """Write config, model card, projector, LM (and optionally the vision encoder) as safetensors, atomically.

        The files are written into a temporary sibling directory that is renamed into place, so an
        interrupted save (or a full disk) never leaves a half-written drafter or a staging folder behind.
        """
        from massv.model_card import MODEL_CARD_NAME, render_model_card

        target_dir = Path(save_directory)
        include_vision = self.vision_encoder is not None if include_vision_encoder is None else include_vision_encoder
        config = MultimodalDrafterConfig(**{**asdict(self.config), "includes_vision_encoder": include_vision})
        with atomic_directory(target_dir) as staging:
            (staging / CONFIG_NAME).write_text(config.to_json())
            (staging / HF_CONFIG_NAME).write_text(json.dumps(hub_config(config), indent=2, sort_keys=True))
            (staging / MODEL_CARD_NAME).write_text(render_model_card(config))
            save_file(_contiguous(self.projector.state_dict()), str(staging / PROJECTOR_WEIGHTS))
            self.language_model.save_pretrained(staging / LANGUAGE_MODEL_DIR, safe_serialization=True)
            if include_vision:
                vision_state = {
                    f"{name}.{key}": value for name, module in self.vision_modules.items()
                    for key, value in module.state_dict().items()
                }
                save_file(_contiguous(vision_state), str(staging / VISION_WEIGHTS))
        return target_dir

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = "Upload MASSV drafter",
                    create_pr: bool = False, include_vision_encoder: bool | None = None) -> Any:
        """Save (as `save_pretrained` does, model card included) and upload to the Hub repository `repo_id`.

        The repository is created if needed. Returns `huggingface_hub`'s commit info.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "drafter", include_vision_encoder=include_vision_encoder)
            return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=folder, repo_type="model",
                                     commit_message=commit_message, revision=revision, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, target: PreTrainedModel | None = None,
                        torch_dtype: torch.dtype | None = None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | None = None,
                        local_files_only: bool = False, **lm_kwargs: Any) -> MultimodalDrafter:
        """Load a saved drafter from a directory or a Hub id (`owner/name`, through `huggingface_hub`).

        With `target`, the drafter is first checked against it (family *and* sizes: a drafter for another
        target size fails here, not mid-generation), its vision modules are re-attached by reference (no
        second copy), and the drafter goes to the device of the target's input embeddings. Without `target`,
        the saved vision encoder is loaded, and it is an error if none was saved.
        """
        path = resolve_drafter_directory(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                         token=token, local_files_only=local_files_only)
        config = read_drafter_config(path)
        if target is not None:
            check_target_fits(config, target, where=str(pretrained_model_name_or_path))
        elif not config.includes_vision_encoder:
            logger.info("drafter %s has no saved vision encoder; attach one with attach_vision() or pass target=", path)
        check_drafter_files(path, config)
        if torch_dtype is not None:
            lm_kwargs["dtype"] = torch_dtype
        language_model = AutoModelForCausalLM.from_pretrained(path / LANGUAGE_MODEL_DIR, **lm_kwargs)
        drafter = cls(config, language_model)
        drafter.projector.load_state_dict(load_safetensors(path / PROJECTOR_WEIGHTS))
        drafter.projector.to(device=language_model.device, dtype=language_model.dtype)
        if target is not None:
            drafter.attach_vision(drafter.adapter.vision_modules(target), share=True)
            if "device_map" not in lm_kwargs:
                drafter.to(device=target.get_input_embeddings().weight.device)
        elif config.includes_vision_encoder:
            modules = drafter.adapter.build_vision_modules()
            vision_state = load_safetensors(path / VISION_WEIGHTS)
            for name, module in modules.items():
                prefix = f"{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in vision_state.items() if k.startswith(prefix)})
                module.to(device=language_model.device, dtype=torch_dtype or language_model.dtype)
            drafter.attach_vision(modules, share=False)
        drafter.eval()
        return drafter


def hub_config(config: MultimodalDrafterConfig) -> dict[str, Any]:
    """`config.json`: the drafter config under the Hub's conventions (a `model_type`, the class that loads it)."""
    return {"model_type": HF_MODEL_TYPE, "architectures": [MultimodalDrafter.__name__], **asdict(config)}


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` (or `name`) as the Hub spells repository ids; paths such as `./x`, `/x` or `a/b/c` are not."""
    return bool(HUB_ID_PATTERN.match(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_drafter_directory(name_or_path: str | os.PathLike, *, revision: str | None = None,
                              cache_dir: str | os.PathLike | None = None, token: str | None = None,
                              local_files_only: bool = False) -> Path:
    """A local drafter directory: the path itself, or the Hub snapshot of a repository id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{path} is a file: a MASSV drafter is a directory (written by save_pretrained)")
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise MissingInputError(f"{name} is not a MASSV drafter directory: no such directory (and not a Hub id "
                                "of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_files_only))
    except Exception as error:  # RepositoryNotFoundError, LocalEntryNotFoundError (offline), HTTP errors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MissingInputError(f"{name} is not a local directory, and the Hub could not provide it "
                                f"({type(error).__name__}: {reason})") from error


def read_drafter_config(path: Path) -> MultimodalDrafterConfig:
    """The saved config of a drafter directory; a training checkpoint or another directory says what it is."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        if (path / CHECKPOINT_STATE_NAME).is_file():
            raise InputError(f"{path} is a training checkpoint, not a drafter: turn it into one with "
                             f"'massv export {path} --out DIR' (or use the phase's final/ directory)")
        raise MissingInputError(
            f"{config_file} not found: {path} is not a MASSV drafter directory (expected {CONFIG_NAME}, "
            f"{PROJECTOR_WEIGHTS} and {LANGUAGE_MODEL_DIR}/ written by MultimodalDrafter.save_pretrained)"
        )
    text = read_text(config_file, "drafter config")
    try:
        return MultimodalDrafterConfig.from_json(text)
    except (ValueError, TypeError) as error:
        raise InputError(f"{config_file}: {error}") from None


def check_drafter_files(path: Path, config: MultimodalDrafterConfig) -> None:
    """Every weight file of a drafter directory is present and complete (headers only: cheap, before any load)."""
    language_model_dir = path / LANGUAGE_MODEL_DIR
    if not (language_model_dir / "config.json").is_file():
        raise MissingInputError(f"{language_model_dir}/config.json not found: the drafter at {path} has no "
                                "language model (an interrupted copy?)")
    check_safetensors(path / PROJECTOR_WEIGHTS)
    for weights in sorted(language_model_dir.glob("*.safetensors")):
        check_safetensors(weights)
    if config.includes_vision_encoder:
        check_safetensors(path / VISION_WEIGHTS)


def check_target_fits(config: MultimodalDrafterConfig, target: PreTrainedModel, where: str = "drafter") -> None:
    """Refuse a target the drafter was not trained for: other family, vision feature width, image token or vocabulary.

    Why sizes and not only the family: a drafter trained for Qwen2.5-VL-3B loads fine next to a 7B target
    and then fails mid-generation with a shape error deep in the projector.
    """
    target_name = getattr(target, "name_or_path", None) or "the given target"
    if target.config.model_type != config.family:
        raise DrafterMismatchError(f"drafter {where} was trained for a {config.family!r} target, got "
                                   f"{target.config.model_type!r} ({target_name})")
    adapter = get_adapter(target.config)
    saved = get_adapter(config.build_target_config())
    checks = (
        ("vision feature width", config.vision_feature_dim, adapter.feature_dim(config.vision_feature)),
        ("image token id", config.image_token_id, adapter.image_token_id),
        ("target vocabulary size", saved.target_vocab_size, adapter.target_vocab_size),
    )
    if config.cross_tokenizer:  # its image token is its own tokenizer's; the target's tokens never reach it
        checks = tuple(check for check in checks if check[0] != "image token id")
    differences = [f"{what}: drafter {expected}, target {actual}" for what, expected, actual in checks
                   if expected != actual]
    if differences:
        trained_for = config.target_name_or_path or "another target"
        raise DrafterMismatchError(
            f"drafter {where} was trained for {trained_for}, which differs from {target_name} ("
            + "; ".join(differences) + "): use a drafter trained for this target"
        )
    if config.target_name_or_path and config.target_name_or_path != getattr(target, "name_or_path", None):
        logger.info("drafter %s was trained for %s; the target %s has the same sizes", where,
                    config.target_name_or_path, target_name)


def record_evaluation(drafter_dir: str | os.PathLike[str], entry: dict[str, Any]) -> None:
    """Add one MAL measurement to a saved drafter: its config and its model card are rewritten (atomically)."""
    from massv.model_card import MODEL_CARD_NAME, merge_evaluation, render_model_card

    drafter_dir = Path(drafter_dir)
    config = MultimodalDrafterConfig.from_json(json.dumps(read_json(drafter_dir / CONFIG_NAME, "drafter config")))
    config.evaluations = merge_evaluation(config.evaluations, entry)
    atomic_write_text(drafter_dir / CONFIG_NAME, config.to_json())
    atomic_write_text(drafter_dir / HF_CONFIG_NAME, json.dumps(hub_config(config), indent=2, sort_keys=True))
    atomic_write_text(drafter_dir / MODEL_CARD_NAME, render_model_card(config))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}
