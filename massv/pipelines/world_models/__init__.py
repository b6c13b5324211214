"""A target VLM and a text-only drafter LM trained from scratch on the synthetic world, shipped and cached.

No pretrained VLM can be downloaded where this project is proven, so the demo of speculative decoding needs
models that it trains itself. They use the real architectures and the real processor path:

* a byte-level BPE tokenizer with Qwen2's special tokens and chat template, trained on world text;
* a TARGET `Qwen2_5_VLForConditionalGeneration` (window-attention ViT + patch merger + mrope LM), trained
  end to end on the world's `train` split (LLaVA format, loss on answer tokens only) until it answers
  held-out questions about colours, counts and positions correctly: the answers live in the pixels only;
* a TEXT-ONLY `Qwen2ForCausalLM` with the same tokenizer, pretrained on the world's conversations without
  images: it knows how answers are phrased but not what the picture shows. It is the paper's text-only
  drafter baseline and the language model inside the MASSV drafter.

The drafter LM is kept much cheaper per token than the target (one layer against ten), because the speedup
of speculative decoding is bounded by that cost ratio; `measure_cost_ratio` reports it.

`load_world_models()` returns the weights shipped in `massv/assets/world/` when their recipe hash matches the
requested `WorldRecipe`; otherwise it trains (a recipe hash names the cache `~/.cache/massv/world/<hash>/`)
and reuses that cache next time. Saves are atomic: a half-written directory never looks complete.

Modules, in the order a run uses them: `recipe` (WorldRecipe: every setting, hashed), `models` (tokenizer,
target, text LM built untrained; the chat format), `data` (training batches), `loop` (the one training
loop), `vision` (vision-tower pretraining), `training` (answer training, text-only pretraining), `grading`
(is an answer one the world could give?), `evaluation` (held-out accuracy, cost ratio), `store` (train and
save atomically; load the shipped or cached copy).
"""

from massv.pipelines.world_models.data import (
    chat_prompt,
    encode_target_batch,
    encode_text_batch,
    record_answer,
    record_question,
    train_examples,
)
from massv.pipelines.world_models.evaluation import (
    evaluate_world_models,
    generate_target_answers,
    generate_text_answers,
    measure_cost_ratio,
)
from massv.pipelines.world_models.grading import (
    CONTENT_WORDS,
    asked_colour,
    content_words,
    heldout_records,
    is_well_formed_answer,
    score_answers,
    valid_answers,
)
from massv.pipelines.world_models.loop import (
    adamw,
    cosine_schedule,
    train_loop,
)
from massv.pipelines.world_models.models import (
    build_world_target,
    build_world_text_lm,
    build_world_tokenizer,
    world_end_of_turn,
)
from massv.pipelines.world_models.recipe import (
    FORMAT_VERSION,
    MERGE_SIZE,
    NUM_CELLS,
    WorldModels,
    WorldRecipe,
)
from massv.pipelines.world_models.store import (
    ASSETS_DIR,
    CACHE_ENV,
    METRICS_FILE,
    PROCESSOR_DIR,
    RECIPE_FILE,
    TARGET_DIR,
    TEXT_LM_DIR,
    default_cache_root,
    load_world_models,
    stored_recipe_hash,
    train_world_models,
)
from massv.pipelines.world_models.training import (
    text_records,
    train_target,
    train_text_lm,
)
from massv.pipelines.world_models.vision import (
    PARSE_FIELDS,
    SceneParser,
    SceneParserOutput,
    encode_vision_batch,
    pretrain_vision,
    scene_cell_labels,
    scene_parsing_accuracy,
)

__all__ = [
    "CONTENT_WORDS",
    "PARSE_FIELDS",
    "ASSETS_DIR",
    "CACHE_ENV",
    "FORMAT_VERSION",
    "MERGE_SIZE",
    "METRICS_FILE",
    "NUM_CELLS",
    "PROCESSOR_DIR",
    "RECIPE_FILE",
    "SceneParser",
    "SceneParserOutput",
    "TARGET_DIR",
    "TEXT_LM_DIR",
    "WorldModels",
    "WorldRecipe",
    "adamw",
    "asked_colour",
    "build_world_target",
    "build_world_text_lm",
    "build_world_tokenizer",
    "chat_prompt",
    "content_words",
    "cosine_schedule",
    "default_cache_root",
    "encode_target_batch",
    "encode_text_batch",
    "encode_vision_batch",
    "evaluate_world_models",
    "generate_target_answers",
    "generate_text_answers",
    "heldout_records",
    "is_well_formed_answer",
    "load_world_models",
    "measure_cost_ratio",
    "pretrain_vision",
    "record_answer",
    "record_question",
    "scene_cell_labels",
    "scene_parsing_accuracy",
    "score_answers",
    "stored_recipe_hash",
    "text_records",
    "train_examples",
    "train_loop",
    "train_target",
    "train_text_lm",
    "train_world_models",
    "valid_answers",
    "world_end_of_turn",
]
