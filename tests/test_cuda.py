"""CUDA and bfloat16: run only where a GPU is present (`eval/device_check.sh` runs them on a lent machine).

On the CPU these skip; CI has no GPU. What they pin: every tensor the engine and adapters build lands on
the model's device (Gemma3 once crashed at its first verification on CUDA), target and drafter may sit on
different devices, seeded sampling is reproducible per device, and float32 greedy output is identical to
`target.generate` on the GPU as on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from massv.drafter import MultimodalDrafter
from massv.speculative import SpeculativeGenerator
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image
from tests.engine_helpers import noisy_multimodal_copy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FAMILIES = ["qwen2_5_vl", "gemma3"]


def _reference(target, inputs, max_new_tokens: int) -> list[int]:
    output = target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drafter_device", ["cuda", "cpu"])
def test_greedy_on_cuda_matches_generate(family: str, drafter_device: str) -> None:
    pair = build_tiny_pair(family)
    target = pair.target.to("cuda")
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), noise=0.5)
    drafter.language_model.to(drafter_device)
    drafter.projector.to(drafter_device)
    inputs = prompt_inputs(pair, "Describe the image.", random_image(4))
    inputs = {name: value.to("cuda") for name, value in inputs.items()}
    output = SpeculativeGenerator(target, drafter, pair.processor).generate_from_inputs(
        inputs, max_new_tokens=24, num_draft_tokens=4)
    assert output.generated_ids[0].tolist() == _reference(target, inputs, 24)
    assert 0 < output.stats.acceptance_rate < 1  # partial acceptance: rollback on the GPU exercised


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_and_seeded_sampling_on_cuda(family: str) -> None:
    pair = build_tiny_pair(family)
    target = pair.target.to("cuda", torch.bfloat16)
    drafter = MultimodalDrafter.from_target(target, pair.drafter_lm.to("cuda", torch.bfloat16), len(pair.tokenizer))
    inputs = prompt_inputs(pair, "Describe the image.", random_image(5))
    inputs = {name: value.to("cuda") for name, value in inputs.items()}
    generator = SpeculativeGenerator(target, drafter, pair.processor)
    runs = [generator.generate_from_inputs(inputs, max_new_tokens=16, num_draft_tokens=3, temperature=1.0, seed=seed)
            .generated_ids[0].tolist() for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0]) == 16
    greedy = generator.generate_from_inputs(inputs, max_new_tokens=16, num_draft_tokens=3)
    assert greedy.generated_ids.device.type == "cuda" and greedy.generated_ids.shape[1] == 16
