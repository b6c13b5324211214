"""Drafters that agree with the target *partly*: the target's own text weights with noise on the LM head.

A random drafter is almost always rejected and `TargetAsDrafter` always accepted; neither exercises a
block that is partly accepted (the case where a rollback of the wrong length would break things).
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from massv.drafter import MultimodalDrafter


def noisy_text_copy(target: PreTrainedModel, noise: float, seed: int = 3) -> PreTrainedModel:
    """A causal LM of the target's family holding the target's text weights, its LM head perturbed by `noise`."""
    text_config = target.config.get_text_config()
    if target.config.model_type == "qwen2_5_vl":
        drafter = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size, num_hidden_layers=text_config.num_hidden_layers,
            num_attention_heads=text_config.num_attention_heads, num_key_value_heads=text_config.num_key_value_heads,
            rms_norm_eps=text_config.rms_norm_eps, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": text_config.rope_parameters["rope_theta"]},
        ))
    else:
        config = text_config.__class__.from_dict(text_config.to_dict())
        config.tie_word_embeddings = False
        drafter = Gemma3ForCausalLM(config)
    prefix = "model.language_model."
    state = {key.replace(prefix, "model."): value for key, value in target.state_dict().items()
             if key.startswith(prefix) or key.startswith("lm_head")}
    drafter.load_state_dict(state, strict=True)
    with torch.no_grad():
        weight = drafter.lm_head.weight
        weight += noise * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    drafter.generation_config.pad_token_id = target.generation_config.pad_token_id
    return drafter.eval()


def noisy_multimodal_copy(target: PreTrainedModel, tokenizer_size: int, noise: float, seed: int = 3) -> MultimodalDrafter:
    """A MASSV drafter around `noisy_text_copy`, its one-layer projector the identity: it splices the
    target's own projected image features, so it sees what the target sees (through causal attention)."""
    drafter = MultimodalDrafter.from_target(target, noisy_text_copy(target, noise, seed), tokenizer_size,
                                            projector_layers=1)
    linear = drafter.projector.layers[0]
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.weight.shape[0], linear.weight.shape[1]))
        linear.bias.zero_()
    return drafter.eval()
