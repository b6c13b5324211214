"""Benchmark the speculative engine against the target alone and Hugging Face assisted generation.

Rows, all greedy, on the same prompts in the same process:
  target            `target.generate(do_sample=False)`: the baseline every speedup is relative to
  engine-text       SpeculativeGenerator with the drafter LM alone (prompt without the image block)
  hf-assisted-text  `target.generate(assistant_model=...)` with the same drafter LM, through a thin wrapper
                    (see `hf_assistant`): without it HF refuses or crashes on VLM targets
  engine-massv      SpeculativeGenerator with the multimodal drafter (LM + projector + target vision)
  engine-target-copy  (`--drafter target-copy`) the target drafting for itself: the machinery's ceiling

For each row: tokens/s end to end (vision + prefill included) and decode only, MAL (tokens per
verification step including the bonus token, and accepted drafts per step), α (accepted / judged drafts),
per-position acceptance, whether the output is identical to the target's, and the measured speedup beside
the theoretical one, (1 - α^(γ+1)) / ((1 - α)(γc + 1)), where c = drafter / target time of one single-token
forward on a warm cache (measured here, not assumed).

Decode-only time of `target.generate` and HF assisted generation is their total minus the target's time for
`max_new_tokens=1` on the same prompt (vision + prefill + one token), measured alongside.

    python eval/bench_engine.py                          # tiny random Qwen2.5-VL pair, CPU, < 5 min
    python eval/bench_engine.py --size small --drafter target-copy --out bench.json
    python eval/bench_engine.py --target Qwen/Qwen2.5-VL-7B-Instruct --drafter path/to/massv_drafter
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from massv.drafter import CONFIG_NAME, MultimodalDrafter  # noqa: E402
from massv.families import FamilyAdapter, get_adapter  # noqa: E402
from massv.speculative import (  # noqa: E402
    CommittedTokens,
    DraftRequest,
    GenerationStats,
    SamplingConfig,
    SpeculativeGenerator,
    TargetAsDrafter,
    TargetVerifier,
    proposer_class_for,
)

logger = logging.getLogger("massv.bench_engine")
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"

PROMPTS = [
    "Describe the image in detail.",
    "What colour is the large square?",
    "How many circles are there, and where are they?",
    "What is in the top left corner?",
    "Write a short caption for this picture.",
    "Which shape is closest to the center?",
]
# Target meaningfully more expensive than the drafter (--size small), still CPU-friendly.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"target": {}, "drafter": {}},
    "small": {
        "target": {"hidden_size": 256, "num_layers": 4, "num_heads": 4},
        "drafter": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
    },
    # Past per-forward Python overhead on CPU, so c reflects compute (~80M-parameter target).
    "medium": {
        "target": {"hidden_size": 768, "num_layers": 8, "num_heads": 8},
        "drafter": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
    },
}


# ---- models ---------------------------------------------------------------------------------------
@dataclass
class Models:
    target: Any
    processor: Any
    text_drafter: Any | None  # plain causal LM (text-only baseline and HF assistant)
    multimodal_drafter: MultimodalDrafter | None
    description: str
    image_size: int | None = None  # the size the target was trained on (world models)
    synthetic_inputs: bool = False  # real-size random models: no processor, prompts built from ids


def load_models(args: argparse.Namespace) -> Models:
    """Tiny random pairs, the shipped world models, real-size random architectures, or real checkpoints."""
    if args.models == "world":
        return _world_models(args)
    if args.models.startswith("real-"):
        return _real_size_models(args)
    if args.target is None:
        from massv.tiny import build_tiny_pair

        size = SIZES[args.size]
        pair = build_tiny_pair(args.family, target_kwargs=size["target"], drafter_kwargs=size["drafter"])
        drafter = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer)).eval()
        return Models(pair.target, pair.processor, pair.drafter_lm, drafter, f"tiny random {args.family} ({args.size})")

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    dtype = getattr(torch, args.dtype)
    device = args.device
    target = AutoModelForImageTextToText.from_pretrained(args.target, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.target)
    text_drafter = multimodal = None
    if args.drafter not in (None, "target-copy"):
        if (Path(args.drafter) / CONFIG_NAME).is_file():
            multimodal = MultimodalDrafter.from_pretrained(args.drafter, target=target, torch_dtype=dtype).to(device).eval()
            text_drafter = multimodal.language_model  # the same LM without the image: the text-only baseline
        else:
            text_drafter = AutoModelForCausalLM.from_pretrained(args.drafter, dtype=dtype).to(device).eval()
    return Models(target, processor, text_drafter, multimodal, f"{args.target} + {args.drafter}")


def _world_models(args: argparse.Namespace) -> Models:
    """The shipped world target and text-only LM; MASSV from `--massv-drafter` (e.g. the demo's phase 2)."""
    from massv.pipelines.world_models import load_world_models

    world_models = load_world_models(progress=False)
    target, text_lm = world_models.target, world_models.text_lm
    if args.massv_drafter:
        multimodal = MultimodalDrafter.from_pretrained(args.massv_drafter, target=target).eval()
        label = f"MASSV from {args.massv_drafter}"
    else:
        multimodal = MultimodalDrafter.from_target(target, text_lm, len(world_models.tokenizer)).eval()
        label = "MASSV untrained (pass --massv-drafter for a trained one)"
    models = Models(target, world_models.processor, text_lm, multimodal,
                    f"world models {world_models.recipe.hash()} ({label})")
    models.image_size = world_models.recipe.image_size
    return models


def _config_from_file(name: str) -> Any:
    from transformers import AutoConfig

    data = json.loads((MODEL_CONFIGS / f"{name}.json").read_text())
    data.pop("_comment", None)
    return AutoConfig.for_model(data.pop("model_type"), **data)


REAL_SIZE_PAIRS = {  # --models name: (target config, drafter LM config), both under eval/model_configs/
    "real-qwen": ("qwen2_5_vl_7b", "qwen2_5_0_5b"),
    "real-gemma": ("gemma3_12b", "gemma3_1b"),
}


def build_real_size_pair(name: str, device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """Real architectures at their published sizes, randomly initialised (weights never downloaded)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    target_name, drafter_name = REAL_SIZE_PAIRS[name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            target = AutoModelForImageTextToText.from_config(_config_from_file(target_name))
            drafter = AutoModelForCausalLM.from_config(_config_from_file(drafter_name))
    finally:
        torch.set_default_dtype(previous)
    return target.eval(), drafter.eval()


def _real_size_models(args: argparse.Namespace) -> Models:
    target, drafter = build_real_size_pair(args.models, args.device, getattr(torch, args.dtype))
    models = Models(target, None, drafter, None, f"{args.models}: {REAL_SIZE_PAIRS[args.models]} random weights")
    models.synthetic_inputs = True
    return models


def hf_assistant(drafter_lm: Any, target: Any) -> Any:
    """The drafter LM as an HF `assistant_model` for a VLM target (a view: weights shared, not copied).

    HF assisted generation hands the assistant the target's model kwargs. For VLM targets that breaks it:
    Qwen2.5-VL passes `mm_token_type_ids` and 3-D (mrope) position ids, Gemma3 `token_type_ids` and an
    image token id past a text model's embedding; and HF treats the two as having *different tokenizers*
    when only the embedding padding differs (152064 vs 151936 rows), demanding universal assisted decoding.
    The wrapper drops image-only arguments, keeps the first (temporal) row of 3-D positions, maps ids past
    the embedding to 0, and pads logits with -inf to the target's vocabulary (reported in its config).
    """
    base = type(drafter_lm)
    rows = drafter_lm.get_input_embeddings().num_embeddings
    target_vocab = target.config.get_text_config().vocab_size

    class HFAssistant(base):  # type: ignore[misc, valid-type]
        # The image arguments are named (not just **kwargs) because generate() validates model kwargs
        # against the forward signature; they are accepted here only to be dropped.
        def forward(self, input_ids=None, position_ids=None, mm_token_type_ids=None, token_type_ids=None,  # noqa: ANN001, ANN202
                    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                    second_per_grid_ts=None, rope_deltas=None, **kwargs):
            kwargs.pop("mm_encoder_outputs", None)
            if position_ids is not None and position_ids.dim() == 3:
                position_ids = position_ids[0]
            if input_ids is not None:
                input_ids = torch.where(input_ids >= rows, torch.zeros_like(input_ids), input_ids)
            outputs = super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
            width = outputs.logits.shape[-1]
            if width < target_vocab:
                pad = outputs.logits.new_full((*outputs.logits.shape[:-1], target_vocab - width), float("-inf"))
                outputs.logits = torch.cat([outputs.logits, pad], dim=-1)
            return outputs

    assistant = copy.copy(drafter_lm)  # shallow: same parameters, own class and config
    assistant.__class__ = HFAssistant
    assistant.config = copy.deepcopy(drafter_lm.config)
    assistant.config.vocab_size = target_vocab
    assistant.generation_config = copy.deepcopy(drafter_lm.generation_config)
    return assistant


# ---- inputs ---------------------------------------------------------------------------------------
def build_inputs(models: Models, adapter: FamilyAdapter, args: argparse.Namespace) -> list[Any]:
    """Processor outputs, one per prompt: world held-out questions on their scenes, or random images."""
    if models.synthetic_inputs:
        return [synthetic_inputs(models.target, adapter, args.seed + index) for index in range(args.num_prompts)]
    rng = np.random.default_rng(args.seed)
    cases = []
    for index in range(args.num_prompts):
        if models.image_size is not None:  # the world: a held-out question about its own scene
            from massv.pipelines.world import make_record, render_scene
            from massv.pipelines.world_models import record_question

            record, scene = make_record("heldout", args.world_seed, index)
            image, prompt = render_scene(scene, models.image_size), record_question(record)
        else:
            image = Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
            prompt = PROMPTS[index % len(PROMPTS)]
        text = models.processor.apply_chat_template(adapter.user_messages(prompt), add_generation_prompt=True,
                                                    tokenize=False)
        inputs = models.processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
        cases.append(inputs.to(models.target.device))
    return cases


def synthetic_inputs(target: Any, adapter: FamilyAdapter, seed: int, text_tokens: int = 48) -> dict[str, torch.Tensor]:
    """A real-size prompt without a processor: random text ids around one image block, random pixels.

    Qwen2.5-VL: a 448 x 448 image (32 x 32 patches of 14, 256 merged tokens); Gemma3: 896 x 896 (256 tokens).
    """
    generator = torch.Generator().manual_seed(seed)
    config = target.config
    device, dtype = target.device, target.dtype
    text = torch.randint(1000, 100000, (text_tokens,), generator=generator)
    block_ids = adapter.image_block_token_ids  # (start, placeholder, end)
    if config.model_type == "qwen2_5_vl":
        vision = config.vision_config
        grid = torch.tensor([[1, 32, 32]])
        num_image_tokens = 32 * 32 // vision.spatial_merge_size**2
        patch_dim = vision.in_chans * vision.temporal_patch_size * vision.patch_size**2
        images = {"pixel_values": torch.randn(32 * 32, patch_dim, generator=generator).to(device, dtype),
                  "image_grid_thw": grid.to(device)}
    else:
        num_image_tokens = config.mm_tokens_per_image
        side = config.vision_config.image_size
        images = {"pixel_values": torch.randn(1, 3, side, side, generator=generator).to(device, dtype)}
    ids = torch.cat([text[:8], torch.tensor([block_ids[0]] + [block_ids[1]] * num_image_tokens + [block_ids[2]]),
                     text[8:]]).view(1, -1).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **images}


# ---- timing ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_cost_ratio(models: Models, drafter: Any, adapter: FamilyAdapter, inputs: Any, repeats: int,
                       num_draft_tokens: int) -> dict[str, float]:
    """c = one draft step / one single-token target forward, each on a warm cache of the prompt.

    A draft step is what the engine runs per draft (one drafter forward, scoring, reading the id back).
    Also v = one target forward over γ + 1 tokens (a verification) / one single-token target forward. The
    textbook formula assumes v = 1 (verification as cheap as one decode step); on a CPU, where a forward is
    compute-bound, v grows with γ, and that is most of the gap between theory and measurement.
    Uses the engine's own public pieces (`TargetVerifier`, the registered proposer), so it times exactly
    the forwards the engine runs.
    """
    device = models.target.device
    image_inputs = {name: inputs[name] for name in adapter.image_input_names if name in inputs}
    with torch.no_grad():
        proposer_class = proposer_class_for(drafter)
        kinds = ("projected",) + tuple(kind for kind in proposer_class.vision_features_needed(drafter) if kind != "projected")
        features = (adapter.encode_image_features(adapter.vision_modules(models.target), image_inputs, kinds)
                    if image_inputs else {})
        verifier = TargetVerifier(models.target, adapter)
        verifier.prefill(inputs["input_ids"], image_inputs, features.get("projected"))
        request = DraftRequest(target=models.target, adapter=adapter, prompt_ids=inputs["input_ids"],
                               image_inputs=image_inputs, vision_features=features, settings=SamplingConfig(),
                               eos_token_ids=frozenset(), replacement_id=0)
        proposer = proposer_class(drafter, request)
        sequence = CommittedTokens(inputs["input_ids"], capacity=4 * repeats + 16)
        proposer.prefill(sequence)
        probe = int(inputs["input_ids"][0, -1])  # a text token (the prompt's last), never an image placeholder
        probe_ids = torch.tensor([[probe]], device=device)

        def time_target() -> float:
            _sync(device)
            start = time.perf_counter()
            verifier.verify(probe_ids)
            verifier.rollback(1)
            _sync(device)
            return time.perf_counter() - start

        def time_verify() -> float:
            _sync(device)
            start = time.perf_counter()
            verifier.verify(probe_ids.expand(1, num_draft_tokens + 1))
            verifier.rollback(num_draft_tokens + 1)
            _sync(device)
            return time.perf_counter() - start

        def time_drafter() -> float:
            sequence.append([probe])  # one new committed token: the step feeds it and drafts one
            _sync(device)
            start = time.perf_counter()
            proposer.propose(sequence, 1)
            proposer.commit(0)
            _sync(device)
            return time.perf_counter() - start

        for _ in range(3):  # warm-up
            time_target(), time_drafter(), time_verify()
        # interleaved, so load from other processes drifting over time hits all sides alike
        target_times, drafter_times, verify_times = [], [], []
        for _ in range(repeats):
            target_times.append(time_target())
            drafter_times.append(time_drafter())
            verify_times.append(time_verify())
    target_ms, drafter_ms = statistics.median(target_times) * 1e3, statistics.median(drafter_times) * 1e3
    verify_ms = statistics.median(verify_times) * 1e3
    return {"target_forward_ms": target_ms, "drafter_forward_ms": drafter_ms, "verify_forward_ms": verify_ms,
            "cost_ratio": drafter_ms / target_ms, "verify_ratio": verify_ms / target_ms}


def theoretical_speedup(alpha: float, num_draft_tokens: int, cost_ratio: float, verify_ratio: float = 1.0) -> float:
    """Leviathan et al.: expected tokens per step over the relative cost of a step, (1 - α^(γ+1)) /
    ((1 - α)(γc + 1)); with `verify_ratio` v the step costs γc + v instead of γc + 1."""
    if alpha >= 1.0:
        expected_tokens = num_draft_tokens + 1.0
    else:
        expected_tokens = (1 - alpha ** (num_draft_tokens + 1)) / (1 - alpha)
    return expected_tokens / (num_draft_tokens * cost_ratio + verify_ratio)


@dataclass
class RowResult:
    name: str
    temperature: float = 0.0
    new_tokens: int = 0
    total_seconds: float = 0.0
    decode_seconds: float = 0.0
    identical_to_target: bool | None = True  # None when sampling: outputs are draws, not comparable
    stats: GenerationStats | None = None
    cost: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def summary(self, baseline: RowResult | None, num_draft_tokens: int) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "temperature": self.temperature, "error": self.error}
        if self.error:
            return data
        data.update(
            new_tokens=self.new_tokens,
            tokens_per_second=self.new_tokens / self.total_seconds,
            decode_tokens_per_second=(self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else None,
            identical_to_target=self.identical_to_target,
        )
        if baseline is not None and baseline.error is None:
            data["speedup"] = data["tokens_per_second"] / (baseline.new_tokens / baseline.total_seconds)
            if data["decode_tokens_per_second"] and baseline.decode_seconds > 0:
                data["decode_speedup"] = data["decode_tokens_per_second"] / ((baseline.new_tokens - 1) / baseline.decode_seconds)
        if self.stats is not None:
            stats = self.stats
            data.update(
                mean_accepted_length=stats.mean_accepted_length,
                mean_accepted_length_full_blocks=stats.mean_accepted_length_full_blocks,
                mean_accepted_drafts=stats.mean_accepted_drafts,
                acceptance_rate=stats.acceptance_rate,
                accepted_over_proposed=stats.accepted_over_proposed,
                position_acceptance=stats.position_acceptance,
                target_forwards=stats.target_forwards,
                drafter_forwards=stats.drafter_forwards,
                vision_seconds=stats.vision_seconds,
                prefill_seconds=stats.prefill_seconds,
                drafting_seconds=stats.drafting_seconds,
                verifying_seconds=stats.verifying_seconds,
            )
        if self.cost:
            data.update(self.cost)
            if self.stats is not None:
                alpha, cost = self.stats.acceptance_rate, self.cost["cost_ratio"]
                data["theoretical_speedup"] = theoretical_speedup(alpha, num_draft_tokens, cost)
                data["theoretical_speedup_measured_verify"] = theoretical_speedup(
                    alpha, num_draft_tokens, cost, self.cost["verify_ratio"])
                if data.get("decode_speedup"):
                    # measured over predicted: what the loop itself (not the models) costs or wastes
                    data["efficiency"] = data["decode_speedup"] / data["theoretical_speedup_measured_verify"]
                self._overhead(data)
        return data

    def _overhead(self, data: dict[str, Any]) -> None:
        """Engine time per verification step beyond its forwards (drafts at c, the verification at v)."""
        stats = self.stats
        if not stats.verification_steps:
            return
        forwards_ms = ((stats.drafter_forwards - 1) * self.cost["drafter_forward_ms"]  # less the prompt pass
                       + stats.verification_steps * self.cost["verify_forward_ms"])
        data["engine_overhead_ms_per_step"] = (stats.decode_seconds * 1e3 - forwards_ms) / stats.verification_steps


def _sampling_kwargs(settings: SamplingConfig) -> dict[str, Any]:
    return settings.generate_kwargs()


def run_target(models: Models, cases: list[Any], max_new_tokens: int, settings: SamplingConfig
               ) -> tuple[RowResult, list[list[int]], list[float]]:
    """The baseline: returns its outputs (for the identity check) and per-prompt prefill times."""
    row = RowResult("target", temperature=settings.temperature, identical_to_target=None)
    outputs, prefill_times = [], []
    device = models.target.device
    for index, inputs in enumerate(cases):
        _sync(device)
        start = time.perf_counter()
        models.target.generate(**inputs, max_new_tokens=1, **_sampling_kwargs(settings))
        _sync(device)
        prefill_times.append(time.perf_counter() - start)
        torch.manual_seed(index)
        start = time.perf_counter()
        output = models.target.generate(**inputs, max_new_tokens=max_new_tokens, **_sampling_kwargs(settings))
        _sync(device)
        elapsed = time.perf_counter() - start
        new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        outputs.append(new_ids)
        row.new_tokens += len(new_ids)
        row.total_seconds += elapsed
        row.decode_seconds += elapsed - prefill_times[-1]
    return row, outputs, prefill_times


def run_engine(name: str, generator: SpeculativeGenerator, cases: list[Any], references: list[list[int]],
               max_new_tokens: int, num_draft_tokens: int, settings: SamplingConfig) -> RowResult:
    row = RowResult(name, temperature=settings.temperature)
    runs = []
    for index, (inputs, reference) in enumerate(zip(cases, references)):
        output = generator.generate_from_inputs(
            inputs, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, seed=index,
            **{key: value for key, value in asdict(settings).items()})
        runs.append(output.stats)
        if settings.greedy:
            row.identical_to_target &= output.generated_ids[0].tolist() == reference
    row.identical_to_target = row.identical_to_target if settings.greedy else None
    row.stats = GenerationStats.merge(runs)
    row.new_tokens = row.stats.new_tokens
    row.total_seconds = row.stats.total_seconds
    # decode-only: everything after the first token (vision, both prefills and the prefill token excluded)
    row.decode_seconds = row.stats.decode_seconds
    return row


def run_hf_assisted(models: Models, cases: list[Any], references: list[list[int]], prefill_times: list[float],
                    max_new_tokens: int, num_draft_tokens: int, settings: SamplingConfig) -> RowResult:
    row = RowResult("hf-assisted-text", temperature=settings.temperature)
    try:
        assistant = hf_assistant(models.text_drafter, models.target)
        assistant.generation_config.num_assistant_tokens = num_draft_tokens
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0  # fixed γ, like the engine
        device = models.target.device
        for index, (inputs, reference, prefill_time) in enumerate(zip(cases, references, prefill_times)):
            torch.manual_seed(index)
            _sync(device)
            start = time.perf_counter()
            output = models.target.generate(**inputs, max_new_tokens=max_new_tokens, assistant_model=assistant,
                                            **_sampling_kwargs(settings))
            _sync(device)
            elapsed = time.perf_counter() - start
            new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
            if settings.greedy:
                row.identical_to_target &= new_ids == reference
            row.new_tokens += len(new_ids)
            row.total_seconds += elapsed
            row.decode_seconds += elapsed - prefill_time
        row.identical_to_target = row.identical_to_target if settings.greedy else None
    except Exception as error:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        logger.warning("HF assisted generation failed: %s: %s", type(error).__name__, error)
        row.error = f"{type(error).__name__}: {error}"
    return row


# ---- report ---------------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [  # (header, key, digits)
        ("T", "temperature", 1), ("tok/s", "tokens_per_second", 1), ("dec tok/s", "decode_tokens_per_second", 1),
        ("speedup", "speedup", 2), ("dec spdup", "decode_speedup", 2), ("theory(v)", "theoretical_speedup_measured_verify", 2),
        ("effic.", "efficiency", 2), ("MAL", "mean_accepted_length", 2), ("MAL full", "mean_accepted_length_full_blocks", 2),
        ("alpha", "acceptance_rate", 2), ("c", "cost_ratio", 3), ("v", "verify_ratio", 2),
        ("ovh ms", "engine_overhead_ms_per_step", 2),
    ]
    lines = ["  ".join([f"{'row':<19}"] + [f"{header:>9}" for header, _, _ in columns] + [f"{'same':>5}"])]
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['name']:<19}  FAILED: {row['error'][:120]}")
            continue
        cells = []
        for _, key, digits in columns:
            value = row.get(key)
            cells.append(f"{value:>9.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>9}")
        same = {True: "yes", False: "NO", None: "-"}[row.get("identical_to_target")]
        lines.append("  ".join([f"{row['name']:<19}"] + cells + [f"{same:>5}"]))
    for row in rows:
        if row.get("position_acceptance"):
            positions = ", ".join(f"{value:.2f}" for value in row["position_acceptance"])
            lines.append(f"{row['name']} (T={row['temperature']}): acceptance per draft position [{positions}]")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="tiny", choices=["tiny", "world", *sorted(REAL_SIZE_PAIRS)],
                        help="tiny random pairs, the shipped world models, or real-size random architectures")
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "gemma3"], help="tiny models only")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="tiny models only")
    parser.add_argument("--target", default=None, help="real target VLM (path or hub id); default: tiny random")
    parser.add_argument("--drafter", default=None,
                        help="'target-copy' (the target drafts for itself), a MASSV drafter directory, or a "
                             "causal LM path (text-only); default: the tiny random drafters")
    parser.add_argument("--massv-drafter", default=None, help="world models: a trained MASSV drafter directory")
    parser.add_argument("--world-seed", type=int, default=1, help="world models: held-out split seed (demo: 1)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0], help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sampling: top-k on both sides (0 = off)")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="γ")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="random test images (tiny processors: 64)")
    parser.add_argument("--cost-repeats", type=int, default=30, help="single-token forwards timed for c")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every row, interleaved; medians reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="real models only")
    parser.add_argument("--dtype", default="bfloat16", help="real models only")
    parser.add_argument("--compiled-drafter", action="store_true",
                        help="also run each LM drafter with compile_drafter=True (static cache + torch.compile); "
                             "its compilation happens in the warm-up and is reported as compile_seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def _drafters(args: argparse.Namespace, models: Models) -> list[tuple[str, Any]]:
    if args.drafter == "target-copy":
        return [("engine-target-copy", TargetAsDrafter(models.target))]
    drafters = []
    if models.text_drafter is not None:
        drafters.append(("engine-text", models.text_drafter))
    if models.multimodal_drafter is not None:
        drafters.append(("engine-massv", models.multimodal_drafter))
    if models.synthetic_inputs:  # real-size random weights: the copy shows the machinery at full acceptance
        drafters.append(("engine-target-copy", TargetAsDrafter(models.target)))
    return drafters


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = load_models(args)
    adapter = get_adapter(models.target.config)
    cases = build_inputs(models, adapter, args)
    gamma, max_new = args.num_draft_tokens, args.max_new_tokens
    logger.info("benchmarking %s: %d prompts, γ=%d, max_new_tokens=%d", models.description, len(cases), gamma, max_new)
    device = models.target.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # warm-up: first calls pay for lazy initialisation, which would bias whichever row runs first
    models.target.generate(**cases[0], do_sample=False, max_new_tokens=4)
    drafters = _drafters(args, models)
    if not drafters:
        logger.warning("no drafter to benchmark (pass --drafter): reporting the target alone")
    costs, generators, compile_seconds = {}, {}, {}
    for name, drafter in drafters:
        generators[name] = SpeculativeGenerator(models.target, drafter, models.processor)
        generators[name].generate_from_inputs(cases[0], max_new_tokens=4, num_draft_tokens=gamma)  # warm-up
        costs[name] = forward_cost_ratio(models, drafter, adapter, cases[0], args.cost_repeats, gamma)
        if args.compiled_drafter and name != "engine-target-copy":
            # One generator per row for the whole run: its compiled step is traced once, here.
            compiled = SpeculativeGenerator(models.target, drafter, models.processor, compile_drafter=True,
                                            compile_max_length=_static_cache_length(models, cases, max_new, gamma))
            clock = time.perf_counter()
            for temperature in args.temperatures:
                compiled.generate_from_inputs(cases[0], max_new_tokens=8, num_draft_tokens=gamma,
                                              temperature=temperature, seed=0)
            compile_seconds[f"{name}-compiled"] = time.perf_counter() - clock
            generators[f"{name}-compiled"] = compiled
            logger.info("%s-compiled: compiled in %.1f s", name, compile_seconds[f"{name}-compiled"])

    summaries = []
    # Repeats interleave every row and temperature, so load drifting over time hits all rows alike.
    for repeat in range(args.repeats):
        for temperature in args.temperatures:
            settings = SamplingConfig(temperature=temperature, top_k=args.top_k if temperature > 0 else 0)
            target_row, references, prefill_times = run_target(models, cases, max_new, settings)
            rows: list[RowResult] = [target_row]
            for name, generator in generators.items():
                row = run_engine(name, generator, cases, references, max_new, gamma, settings)
                row.cost = costs.get(name, {})  # compiled rows: c of the eager step does not apply
                rows.append(row)
                if name == "engine-text" and not models.synthetic_inputs:
                    rows.append(run_hf_assisted(models, cases, references, prefill_times, max_new, gamma, settings))
            block = [dict(row.summary(target_row, gamma), repeat=repeat) for row in rows]
            _engine_over_hf(block)
            summaries += block
    table = format_table(summaries)
    medians = median_summary(summaries)
    print(table)
    print(format_medians(medians))
    result = {
        "description": models.description,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": str(models.target.dtype),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "num_draft_tokens": gamma,
        "max_new_tokens": max_new,
        "num_prompts": len(cases),
        "temperatures": args.temperatures,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "repeats": args.repeats,
        "compile_seconds": compile_seconds,
        "rows": summaries,
        "medians": medians,
        "notes": {
            "MAL": "tokens emitted per verification step including the bonus/correction token; prefill not a step",
            "MAL full": "MAL over steps whose drafting the max_new_tokens budget did not cut short",
            "alpha": "accepted drafts / judged drafts (drafts after a rejection are never judged)",
            "c": "one draft step (drafter forward + scoring) / one single-token target forward, warm cache",
            "v": "one target forward over γ+1 tokens / one single-token target forward",
            "theory(v)": "(1 - alpha^(γ+1)) / ((1 - alpha)(γc + v)): the expected decode speedup",
            "efficiency": "decode speedup / theory(v): 1.0 means the loop adds nothing to its forwards",
            "ovh ms": "decode time per verification step beyond the timed forwards (drafts at c, verification at v)",
            "decode": "engine: drafting + verifying time; target / HF: total minus generate(max_new_tokens=1)",
            "hf-assisted-text": "target.generate(assistant_model=hf_assistant(drafter)): image kwargs dropped, "
                                "3-D positions flattened to their first row, logits padded to the target vocab",
        },
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        logger.info("wrote %s", args.out)
    return result


MEDIAN_KEYS = ("tokens_per_second", "speedup", "decode_speedup", "efficiency", "tokens_per_second_over_hf_assisted",
               "tokens_per_second_over_eager", "mean_accepted_length", "acceptance_rate", "engine_overhead_ms_per_step")


def median_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (row, temperature): the median over repeats of each headline number, and every repeat's value."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        if not row.get("error"):
            groups.setdefault((row["name"], row["temperature"]), []).append(row)
    medians = []
    for (name, temperature), group in groups.items():
        entry: dict[str, Any] = {"name": name, "temperature": temperature, "runs": len(group)}
        for key in MEDIAN_KEYS:
            values = [row[key] for row in group if isinstance(row.get(key), (int, float))]
            if values:
                entry[key] = statistics.median(values)
                entry[f"{key}_runs"] = values
        medians.append(entry)
    return medians


def format_medians(medians: list[dict[str, Any]]) -> str:
    lines = ["medians over repeats:"]
    for entry in medians:
        parts = [f"{key}={entry[key]:.3f}" for key in MEDIAN_KEYS if key in entry]
        lines.append(f"  {entry['name']:<19} T={entry['temperature']}: " + ", ".join(parts))
    return "\n".join(lines)


def _engine_over_hf(rows: list[dict[str, Any]]) -> None:
    """The engine's tokens/s over HF assisted generation's, with the same text LM, same settings; a compiled
    row's tokens/s over its eager row's."""
    by_name = {row["name"]: row for row in rows}
    engine, hf = by_name.get("engine-text"), by_name.get("hf-assisted-text")
    if engine and hf and not engine.get("error") and not hf.get("error"):
        engine["tokens_per_second_over_hf_assisted"] = engine["tokens_per_second"] / hf["tokens_per_second"]
    for name, row in by_name.items():
        eager = by_name.get(name.removesuffix("-compiled"))
        if name.endswith("-compiled") and eager and not row.get("error") and not eager.get("error"):
            row["tokens_per_second_over_eager"] = row["tokens_per_second"] / eager["tokens_per_second"]


def _static_cache_length(models: Models, cases: list[Any], max_new_tokens: int, num_draft_tokens: int) -> int:
    """Room for the longest prompt and its generation: every request takes the static path."""
    return max(case["input_ids"].shape[1] for case in cases) + max_new_tokens + num_draft_tokens + 1


if __name__ == "__main__":
    main()
