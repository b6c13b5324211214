"""Multiply-accumulates (MACs) per drafted token: what a compressed drafter saves, counted, not timed.

One decode step of the drafter LM at context length T (the new token attends to T keys, itself included):
  linear       every decoder-layer nn.Linear: its NONZERO weights (one MAC each per token), so layer pruning
               (fewer layers) and sparsity (fewer nonzeros) both show up. Dense: in * out.
  attention    per layer: QK^T scores num_heads * head_dim * T_eff and the weighted sum of values the same,
               with T_eff = min(T, sliding_window) on sliding-window layers (Gemma3's local layers).
               GQA shares keys/values between heads but every query head still does its own dot products.
  lm_head      hidden * vocab_rows, dense (never pruned): the full projection runs even for padded rows.
Not counted: norms, rotary embeddings, activations, residual adds, biases, softmax (elementwise, not MACs),
and the embedding lookup (a gather). Sparse MACs are the ideal count; realising them needs sparse kernels
(2:4 on Ampere+ tensor cores, unstructured only at high sparsity).

The vision encoder and projector run once per image, not per token, and are reported separately: the
projector analytically (its Linear layers times image tokens), the encoder by measuring one forward with
`torch.utils.flop_counter` (MACs = FLOPs / 2), because vision towers differ too much per family to count
by hand.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from massv.compress.angular import decoder_layers

logger = logging.getLogger(__name__)


@dataclass
class DrafterMACs:
    """MACs per drafted token (one decode step at `context_length`), with a breakdown; vision per image."""

    context_length: int
    num_layers: int
    attention_projections: int  # q, k, v, o (nonzero weights)
    mlp: int  # gate, up, down (nonzero weights)
    attention_scores: int  # QK^T over the context
    attention_values: int  # softmax(QK^T) V over the context
    lm_head: int
    vision_encoder_per_image: int | None = None
    projector_per_image: int | None = None

    @property
    def linear(self) -> int:
        return self.attention_projections + self.mlp

    @property
    def attention(self) -> int:
        return self.attention_scores + self.attention_values

    @property
    def decoder_layers(self) -> int:
        return self.linear + self.attention

    @property
    def per_token(self) -> int:
        """Everything one drafted token costs: decoder layers + lm_head."""
        return self.decoder_layers + self.lm_head

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(linear=self.linear, attention=self.attention, decoder_layers=self.decoder_layers,
                    per_token=self.per_token)
        return data


_ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _nonzeros(weight: torch.Tensor) -> int:
    return int(torch.count_nonzero(weight.detach()))


def _is_sliding(layer: nn.Module, layer_type: str | None) -> bool:
    attention = getattr(layer, "self_attn", None)
    window = getattr(attention, "sliding_window", None)
    if layer_type is not None:
        return layer_type == "sliding_attention" and window is not None
    return window is not None


def language_model_macs(language_model: nn.Module, context_length: int) -> DrafterMACs:
    """Per-token MACs of an HF causal LM's decode step at `context_length` keys (see the module docstring)."""
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    config = language_model.config
    layers = decoder_layers(language_model)
    layer_types = getattr(config, "layer_types", None)
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    projections = mlp = scores = values = 0
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                count = _nonzeros(module.weight)
                if name.rsplit(".", 1)[-1] in _ATTENTION_NAMES:
                    projections += count
                else:
                    mlp += count
        layer_type = layer_types[index] if layer_types is not None else None
        keys = context_length
        if _is_sliding(layer, layer_type):
            keys = min(context_length, int(layer.self_attn.sliding_window))
        scores += num_heads * head_dim * keys
        values += num_heads * head_dim * keys
    head = language_model.get_output_embeddings()
    lm_head = head.weight.numel() if head is not None else 0  # never pruned: dense (a tied padding row is still computed)
    return DrafterMACs(context_length=context_length, num_layers=len(layers), attention_projections=projections,
                       mlp=mlp, attention_scores=scores, attention_values=values, lm_head=lm_head)


def projector_macs(projector: nn.Module, num_image_tokens: int) -> int:
    """The projector MLP's MACs for one image of `num_image_tokens` features."""
    return num_image_tokens * sum(_nonzeros(module.weight) for module in projector.modules() if isinstance(module, nn.Linear))


@torch.no_grad()
def vision_encoder_macs(drafter: Any, image_inputs: dict[str, torch.Tensor], num_images: int = 1) -> tuple[int, int]:
    """`(encoder MACs, image tokens)` per image, measured on one forward of the frozen encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        features = drafter.encode_images(image_inputs)
    return counter.get_total_flops() // 2 // num_images, features.shape[0] // num_images


def drafter_macs(drafter: Any, context_length: int, image_inputs: dict[str, torch.Tensor] | None = None,
                 num_images: int = 1) -> DrafterMACs:
    """Per-token MACs of a `MultimodalDrafter` (or a plain causal LM); with `image_inputs` (holding
    `num_images` images) also the per-image vision encoder and projector MACs."""
    language_model = getattr(drafter, "language_model", drafter)
    macs = language_model_macs(language_model, context_length)
    if image_inputs is not None and hasattr(drafter, "encode_images"):
        encoder, image_tokens = vision_encoder_macs(drafter, image_inputs, num_images)
        macs.vision_encoder_per_image = encoder
        macs.projector_per_image = projector_macs(drafter.projector, image_tokens)
    return macs
