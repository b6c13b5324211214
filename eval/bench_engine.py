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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from massv.drafter import CONFIG_NAME, MultimodalDrafter  # noqa: E402
from massv.families import FamilyAdapter, get_adapter  # noqa: E402
from massv.speculative import GenerationStats, SpeculativeGenerator, TargetAsDrafter  # noqa: E402
from massv.speculative.engine import _DrafterSession, _TargetSession  # noqa: E402

logger = logging.getLogger("massv.bench_engine")

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


def load_models(args: argparse.Namespace) -> Models:
    """Tiny random pairs from massv.tiny, or real checkpoints when --target is a path/hub id."""
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
def build_inputs(models: Models, adapter: FamilyAdapter, num_prompts: int, image_size: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(num_prompts):
        image = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        messages = adapter.user_messages(PROMPTS[index % len(PROMPTS)])
        text = models.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        cases.append(models.processor(text=[text], images=[image], return_tensors="pt").to(models.target.device))
    return cases


# ---- timing ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_cost_ratio(models: Models, drafter: Any, adapter: FamilyAdapter, inputs: Any, repeats: int,
                       num_draft_tokens: int) -> dict[str, float]:
    """c = one drafter forward / one target forward, each a single token on a warm cache of the prompt.

    Also v = one target forward over γ + 1 tokens (a verification) / one single-token target forward. The
    textbook formula assumes v = 1 (verification as cheap as one decode step); on a CPU, where a forward is
    compute-bound, v grows with γ, and that is most of the gap between theory and measurement.
    Uses the engine's own sessions, so it times exactly the forwards the engine runs.
    """
    device = models.target.device
    image_inputs = {name: inputs[name] for name in adapter.image_input_names if name in inputs}
    with torch.no_grad():
        projected = adapter.encode_images(adapter.vision_modules(models.target), image_inputs, "projected")
        target_session = _TargetSession(models.target, adapter)
        target_session.prefill(inputs["input_ids"], image_inputs, projected)
        session = _drafter_session_for(models, drafter, adapter, inputs, projected)
        session.forward(session.prompt_ids)
        probe = int(inputs["input_ids"][0, -1])  # a text token (the prompt's last), never an image placeholder

        def time_target() -> float:
            _sync(device)
            start = time.perf_counter()
            target_session.extend([probe])
            target_session.rollback(1)
            _sync(device)
            return time.perf_counter() - start

        def time_verify() -> float:
            _sync(device)
            start = time.perf_counter()
            target_session.extend([probe] * (num_draft_tokens + 1))
            target_session.rollback(num_draft_tokens + 1)
            _sync(device)
            return time.perf_counter() - start

        def time_drafter() -> float:
            _sync(device)
            start = time.perf_counter()
            session.forward([probe])
            session.rollback(1)
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


def _drafter_session_for(models: Models, drafter: Any, adapter: FamilyAdapter, inputs: Any,
                         projected: torch.Tensor | None) -> _DrafterSession:
    generator = SpeculativeGenerator(models.target, drafter, models.processor)
    image_inputs = {name: inputs[name] for name in adapter.image_input_names if name in inputs}
    return generator._drafter_session(inputs["input_ids"], image_inputs, projected)


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
    new_tokens: int = 0
    total_seconds: float = 0.0
    decode_seconds: float = 0.0
    identical_to_target: bool = True
    stats: GenerationStats | None = None
    cost: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def summary(self, baseline: RowResult | None, num_draft_tokens: int) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "error": self.error}
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
        return data


def run_target(models: Models, cases: list[Any], max_new_tokens: int) -> tuple[RowResult, list[list[int]], list[float]]:
    """The baseline: returns its outputs (for the identity check) and per-prompt prefill times."""
    row = RowResult("target")
    outputs, prefill_times = [], []
    device = models.target.device
    for inputs in cases:
        _sync(device)
        start = time.perf_counter()
        models.target.generate(**inputs, do_sample=False, max_new_tokens=1)
        _sync(device)
        prefill_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        output = models.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        _sync(device)
        elapsed = time.perf_counter() - start
        new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        outputs.append(new_ids)
        row.new_tokens += len(new_ids)
        row.total_seconds += elapsed
        row.decode_seconds += elapsed - prefill_times[-1]
    return row, outputs, prefill_times


def run_engine(name: str, models: Models, drafter: Any, cases: list[Any], references: list[list[int]],
               max_new_tokens: int, num_draft_tokens: int) -> RowResult:
    row = RowResult(name)
    generator = SpeculativeGenerator(models.target, drafter, models.processor)
    runs = []
    for inputs, reference in zip(cases, references):
        output = generator.generate_from_inputs(inputs, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)
        runs.append(output.stats)
        row.identical_to_target &= output.generated_ids[0].tolist() == reference
    row.stats = GenerationStats.merge(runs)
    row.new_tokens = row.stats.new_tokens
    row.total_seconds = row.stats.total_seconds
    # decode-only: everything after the first token (vision, both prefills and the prefill token excluded)
    row.decode_seconds = row.stats.decode_seconds
    return row


def run_hf_assisted(models: Models, cases: list[Any], references: list[list[int]], prefill_times: list[float],
                    max_new_tokens: int, num_draft_tokens: int) -> RowResult:
    row = RowResult("hf-assisted-text")
    try:
        assistant = hf_assistant(models.text_drafter, models.target)
        assistant.generation_config.num_assistant_tokens = num_draft_tokens
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0  # fixed γ, like the engine
        device = models.target.device
        for inputs, reference, prefill_time in zip(cases, references, prefill_times):
            _sync(device)
            start = time.perf_counter()
            output = models.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                            assistant_model=assistant)
            _sync(device)
            elapsed = time.perf_counter() - start
            new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
            row.identical_to_target &= new_ids == reference
            row.new_tokens += len(new_ids)
            row.total_seconds += elapsed
            row.decode_seconds += elapsed - prefill_time
    except Exception as error:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        logger.warning("HF assisted generation failed: %s: %s", type(error).__name__, error)
        row.error = f"{type(error).__name__}: {error}"
    return row


# ---- report ---------------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [  # (header, key, digits)
        ("tok/s", "tokens_per_second", 1), ("dec tok/s", "decode_tokens_per_second", 1),
        ("speedup", "speedup", 2), ("dec spdup", "decode_speedup", 2), ("theory", "theoretical_speedup", 2),
        ("theory(v)", "theoretical_speedup_measured_verify", 2), ("MAL", "mean_accepted_length", 2),
        ("acc/step", "mean_accepted_drafts", 2), ("alpha", "acceptance_rate", 2), ("c", "cost_ratio", 3),
        ("v", "verify_ratio", 2),
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
        same = "yes" if row.get("identical_to_target") else "NO"
        lines.append("  ".join([f"{row['name']:<19}"] + cells + [f"{same:>5}"]))
    for row in rows:
        if row.get("position_acceptance"):
            positions = ", ".join(f"{value:.2f}" for value in row["position_acceptance"])
            lines.append(f"{row['name']}: acceptance per draft position [{positions}]")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "gemma3"], help="tiny models only")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="tiny models only")
    parser.add_argument("--target", default=None, help="real target VLM (path or hub id); default: tiny random")
    parser.add_argument("--drafter", default=None,
                        help="'target-copy' (the target drafts for itself), a MASSV drafter directory, or a "
                             "causal LM path (text-only); default: the tiny random drafters")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="γ")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="random test images (tiny processors: 64)")
    parser.add_argument("--cost-repeats", type=int, default=30, help="single-token forwards timed for c")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="real models only")
    parser.add_argument("--dtype", default="bfloat16", help="real models only")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = load_models(args)
    adapter = get_adapter(models.target.config)
    cases = build_inputs(models, adapter, args.num_prompts, args.image_size, args.seed)
    gamma, max_new = args.num_draft_tokens, args.max_new_tokens
    logger.info("benchmarking %s: %d prompts, γ=%d, max_new_tokens=%d", models.description, len(cases), gamma, max_new)

    # warm-up: first calls pay for lazy initialisation, which would bias whichever row runs first
    models.target.generate(**cases[0], do_sample=False, max_new_tokens=4)

    target_row, references, prefill_times = run_target(models, cases, max_new)
    rows: list[RowResult] = [target_row]
    drafters: list[tuple[str, Any]] = []
    if args.drafter == "target-copy":
        drafters.append(("engine-target-copy", TargetAsDrafter(models.target)))
    else:
        if models.text_drafter is not None:
            drafters.append(("engine-text", models.text_drafter))
        if models.multimodal_drafter is not None:
            drafters.append(("engine-massv", models.multimodal_drafter))
    if not drafters:
        logger.warning("no drafter to benchmark (pass --drafter): reporting the target alone")
    for name, drafter in drafters:
        SpeculativeGenerator(models.target, drafter, models.processor).generate_from_inputs(
            cases[0], max_new_tokens=4, num_draft_tokens=gamma)  # warm-up
        row = run_engine(name, models, drafter, cases, references, max_new, gamma)
        row.cost = forward_cost_ratio(models, drafter, adapter, cases[0], args.cost_repeats, gamma)
        rows.append(row)
        if name == "engine-text":
            rows.append(run_hf_assisted(models, cases, references, prefill_times, max_new, gamma))

    summaries = [row.summary(target_row, gamma) for row in rows]
    table = format_table(summaries)
    print(table)
    result = {
        "description": models.description,
        "device": str(models.target.device),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "num_draft_tokens": gamma,
        "max_new_tokens": max_new,
        "num_prompts": len(cases),
        "rows": summaries,
        "notes": {
            "MAL": "tokens emitted per verification step including the bonus/correction token; prefill not a step",
            "acc/step": "accepted draft tokens per verification step",
            "alpha": "accepted drafts / judged drafts (drafts after a rejection are never judged)",
            "c": "drafter / target time of one single-token forward on a warm cache",
            "theory": "(1 - alpha^(γ+1)) / ((1 - alpha)(γc + 1)), compare with dec speedup",
            "theory(v)": "the same with the measured verification cost: denominator γc + v",
            "v": "one target forward over γ+1 tokens / one single-token target forward",
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


if __name__ == "__main__":
    main()
