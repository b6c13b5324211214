"""One-shot fine-grained sparsity for the drafter LM (SD², self-distilled sparse drafters): Wanda or magnitude.

Which weights: the linear layers inside the decoder layers (q, k, v, o, gate, up, down). Embeddings and
`lm_head` stay dense: they are a lookup and the vocabulary projection whose errors change every draft.

Scores: Wanda (Sun et al. 2023) scores weight W_ij by |W_ij| * ||X_j||_2, the weight's magnitude times the
L2 norm of input channel j over all calibration tokens, so a small weight on a loud channel survives.
`score="magnitude"` uses |W_ij| alone (no calibration data needed).

Comparison group: like Wanda, weights compete within their output row by default (`granularity="row"`:
exactly round(s * in_features) zeros in every row); `granularity="layer"` ranks the whole matrix instead.
`pattern="2:4"`: in every group of 4 consecutive input weights of a row, the 2 lowest scores are zeroed
(NVIDIA's semi-structured sparsity, 50 %).

Sequential (default, as in the Wanda reference code): decoder layers are pruned one at a time, and the
activation norms of layer `i` are measured with layers `< i` already pruned, so later layers see the inputs
they will actually get.

Masks: a `SparsityMasks` maps parameter names to bool keep-masks. During recovery fine-tuning they are held
fixed by zeroing the pruned entries' gradients and re-applying the mask after every optimizer step
(`SparsityMasks.attach`). No parametrization is used, so the model's state dict and `save_pretrained`
checkpoint are unchanged in layout: the saved weights contain exact zeros and `SparsityMasks.from_weights`
recovers the mask from them.

Gradient-free work sits in `with torch.no_grad():` blocks, not under the `@torch.no_grad()` decorator: mutmut
(`eval/mutation.py`) does not mutate decorated functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from massv.compress.angular import decoder_layers
from massv.compress.calibration import Batch, PreparedBatch, prepare_batches
from massv.drafter import MultimodalDrafter

logger = logging.getLogger(__name__)

PRUNABLE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Pattern = Literal["unstructured", "2:4"]
Score = Literal["wanda", "magnitude"]
Granularity = Literal["row", "layer"]


def prunable_linears(language_model: nn.Module, layer_index: int | None = None) -> dict[str, nn.Linear]:
    """`{parameter-path prefix: nn.Linear}` for the decoder-layer projections (all layers, or one)."""
    layers = decoder_layers(language_model)
    indices = range(len(layers)) if layer_index is None else [layer_index]
    found: dict[str, nn.Linear] = {}
    for index in indices:
        for name, module in layers[index].named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PRUNABLE_LINEARS:
                found[f"model.layers.{index}.{name}"] = module
    return found


# ---- masks from scores ------------------------------------------------------------------------------


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern = "unstructured",
              granularity: Granularity = "row") -> torch.Tensor:
    """Bool mask `(out, in)`, True where the weight is kept: the lowest-scoring weights are pruned.

    Exact counts (ties broken by index, via a stable sort): "row" zeroes round(sparsity * in) per row,
    "layer" round(sparsity * out * in) in the matrix, "2:4" exactly 2 in every group of 4 inputs of a row.
    """
    rows, cols = scores.shape
    if pattern == "2:4":
        if cols % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {cols}")
        groups = scores.reshape(rows, cols // 4, 4)
        order = groups.argsort(dim=-1, stable=True)
        mask = torch.ones_like(groups, dtype=torch.bool)
        mask.scatter_(-1, order[..., :2], False)
        return mask.reshape(rows, cols)
    if pattern != "unstructured":
        raise ValueError(f"pattern must be 'unstructured' or '2:4', got {pattern!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if granularity == "row":
        num_pruned = round(sparsity * cols)
        order = scores.argsort(dim=1, stable=True)
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(1, order[:, :num_pruned], False)
        return mask
    if granularity == "layer":
        num_pruned = round(sparsity * rows * cols)
        order = scores.flatten().argsort(stable=True)
        mask = torch.ones(rows * cols, dtype=torch.bool, device=scores.device)
        mask[order[:num_pruned]] = False
        return mask.reshape(rows, cols)
    raise ValueError(f"granularity must be 'row' or 'layer', got {granularity!r}")


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: `weight: (out, in)`, `input_norms: (in,)`."""
    return weight.detach().abs().float() * input_norms.float().unsqueeze(0)


# ---- masks held fixed -------------------------------------------------------------------------------


@dataclass
class SparsityMasks:
    """Keep-masks by parameter name (`model.layers.0.self_attn.q_proj.weight`), applied to one model."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_weights(cls, language_model: nn.Module) -> SparsityMasks:
        """Recover masks from a saved sparse model: the zero entries of each prunable weight are the pruned ones."""
        return cls({f"{prefix}.weight": module.weight.detach() != 0 for prefix, module in prunable_linears(language_model).items()})

    def _parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        parameters = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in parameters:
                raise KeyError(f"mask for {name!r} but the model has no such parameter")
            parameter = parameters[name]
            yield name, parameter, mask.to(parameter.device)

    def apply_(self, model: nn.Module) -> None:
        """Zero every pruned weight (in place)."""
        with torch.no_grad():
            for _name, parameter, mask in self._parameters(model):
                parameter.mul_(mask.to(parameter.dtype))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.utils.hooks.RemovableHandle]:
        """Keep pruned weights at exactly zero while `optimizer` trains `model`; returns removable handles.

        Gradients of pruned entries are zeroed (so Adam's moments for them stay zero) and the mask is
        re-applied after each `optimizer.step()` (so nothing, weight decay or numerical drift, revives them).
        """
        handles = []
        for _name, parameter, mask in self._parameters(model):
            gradient_mask = mask.to(parameter.dtype)
            handles.append(parameter.register_hook(lambda grad, keep=gradient_mask: grad * keep))
        handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_(model)))
        return handles

    def sparsity(self) -> dict[str, float]:
        """Fraction of pruned weights per parameter."""
        return {name: 1.0 - mask.float().mean().item() for name, mask in self.masks.items()}

    def __len__(self) -> int:
        return len(self.masks)


def weight_sparsity(language_model: nn.Module) -> dict[str, float]:
    """Measured fraction of exact zeros in each prunable weight (what is really in the model)."""
    return {f"{prefix}.weight": (module.weight == 0).float().mean().item()
            for prefix, module in prunable_linears(language_model).items()}


# ---- calibration ------------------------------------------------------------------------------------


def input_norms(drafter: MultimodalDrafter, batches: list[PreparedBatch], linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """||X_j||_2 over all non-padding calibration tokens, for each input channel of each linear: `(in,)`."""
    sums = {name: torch.zeros(module.in_features, dtype=torch.float64, device=module.weight.device)
            for name, module in linears.items()}
    current_mask: list[torch.Tensor] = []

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            # (batch, seq, in) -> (real tokens, in). A linear fed flattened tokens fails here rather than
            # counting padding: the token mask is (batch, seq).
            real = args[0][current_mask[0]]
            sums[name] += real.double().pow(2).sum(dim=0)
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                current_mask[:] = [batch.token_mask()]
                inputs_embeds = drafter.embed(batch.input_ids, batch.image_features)
                # Run only up to the last layer that holds a hooked linear would be cheaper; the full forward is simple.
                drafter.language_model(inputs_embeds=inputs_embeds, attention_mask=batch.attention_mask,
                                       use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt().float() for name, total in sums.items()}


@dataclass
class SparsityDecision:
    """What was pruned: the settings and the resulting sparsity of every pruned weight."""

    sparsity: float
    pattern: Pattern
    score: Score
    granularity: Granularity
    sequential: bool
    per_layer: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return {"sparsity": self.sparsity, "pattern": self.pattern, "score": self.score,
                "granularity": self.granularity, "sequential": self.sequential, "sparsity_per_weight": self.per_layer}


def prune_sparse(drafter: MultimodalDrafter, calibration_batches: Iterable[Batch | PreparedBatch] | None,
                 sparsity: float | None = 0.5, pattern: Pattern = "unstructured", score: Score = "wanda",
                 granularity: Granularity = "row", sequential: bool = True,
                 max_samples: int | None = None) -> tuple[SparsityMasks, SparsityDecision]:
    """Prune the drafter LM's decoder-layer linears one-shot, in place; returns the masks to hold fixed."""
    if pattern == "2:4":
        sparsity = 0.5
    if sparsity is None:
        raise ValueError("unstructured sparsity needs a target sparsity in (0, 1)")
    language_model = drafter.language_model
    batches: list[PreparedBatch] = []
    if score == "wanda":
        if calibration_batches is None:
            raise ValueError("Wanda scores need calibration batches (or use score='magnitude')")
        batches = prepare_batches(drafter, calibration_batches, max_samples)
    elif score != "magnitude":
        raise ValueError(f"score must be 'wanda' or 'magnitude', got {score!r}")
    was_training = drafter.training
    drafter.eval()
    masks = SparsityMasks()
    try:
        groups = ([prunable_linears(language_model, index) for index in range(len(decoder_layers(language_model)))]
                  if sequential else [prunable_linears(language_model)])
        for linears in groups:
            norms = input_norms(drafter, batches, linears) if score == "wanda" else {}
            for name, module in linears.items():
                scores = wanda_scores(module.weight, norms[name]) if score == "wanda" else module.weight.detach().abs().float()
                mask = keep_mask(scores, sparsity, pattern, granularity)
                with torch.no_grad():
                    module.weight.mul_(mask.to(module.weight.dtype))
                masks.masks[f"{name}.weight"] = mask
    finally:
        drafter.train(was_training)
    decision = SparsityDecision(sparsity, pattern, score, granularity, sequential, masks.sparsity())
    total = sum(mask.numel() for mask in masks.masks.values())
    pruned = sum(int((~mask).sum()) for mask in masks.masks.values())
    logger.info("pruned %d of %d decoder-layer linear weights (%.1f %%, %s, %s scores, per %s)",
                pruned, total, 100.0 * pruned / max(total, 1), pattern, score, granularity)
    return masks, decision
