"""The drafter's model card (`README.md`): which target it drafts for, what it was trained on, how well it drafts.

Why: a drafter on the Hub is useless to someone who cannot tell which target it fits or what acceptance to
expect; Hugging Face shows `README.md` (YAML front matter + markdown) as the model's page. Everything in the
card is read from the drafter's own config (`training_data`, `evaluations`), so the card never says more than
was recorded (`massv.drafter.record_evaluation` adds a `massv eval` result to a saved drafter). It reads
no drafter file itself: the drafter module, which owns the files, calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from massv.drafter import MultimodalDrafterConfig

MODEL_CARD_NAME = "README.md"
# What identifies one measurement: a second result with the same key replaces the first.
EVALUATION_KEY = ("benchmark", "num_draft_tokens", "temperature", "max_new_tokens", "num_samples")


def render_model_card(config: MultimodalDrafterConfig) -> str:
    """The card's markdown for a drafter config (front matter for the Hub, then the human-readable page)."""
    target = config.target_name_or_path or "(not recorded)"
    language_model_name = config.language_model_name_or_path
    front_matter = ["---", "library_name: massv", "tags:", "- speculative-decoding", "- multimodal-drafter",
                    f"- {config.family}"]
    if language_model_name:
        front_matter.append(f"base_model: {language_model_name}")
    front_matter.append("---")
    lines = [
        *front_matter,
        "",
        f"# MASSV drafter for `{target}`",
        "",
        f"A multimodal drafter for lossless speculative decoding of the {config.family} target `{target}`: the "
        "target's own frozen vision encoder, a trained projector and a small language model"
        + (f" (`{language_model_name}`)" if language_model_name else "") + ". Greedy output with it is "
        "token-for-token the target's own.",
        "",
        "| | |",
        "|---|---|",
        f"| target | `{target}` ({config.family}) |",
        f"| drafter LM | `{language_model_name or '(not recorded)'}`, hidden size {config.lm_hidden_size} |",
        f"| vision feature | `{config.vision_feature}`, width {config.vision_feature_dim} |",
        f"| projector | {config.projector_layers} layers, {config.projector_activation} |",
        f"| image token id | {config.image_token_id} |",
        f"| vision encoder included | {'yes' if config.includes_vision_encoder else 'no: load with target='} |",
        "",
        "## Training data",
        "",
    ]
    if config.training_data:
        lines += [f"- {stage}: `{source}`" for stage, source in sorted(config.training_data.items())]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Mean accepted length", ""]
    if config.evaluations:
        lines += ["MAL counts the target's own token (tokens per target forward); γ drafts per step.", "",
                  "| benchmark | γ | T | max new tokens | samples | MAL | acceptance rate | speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        for entry in config.evaluations:
            lines.append(
                f"| {entry.get('benchmark')} | {entry.get('num_draft_tokens')} | {entry.get('temperature'):g} | "
                f"{entry.get('max_new_tokens')} | {entry.get('num_samples')} | "
                f"{entry.get('mean_accepted_length', 0.0):.2f} | {100 * entry.get('acceptance_rate', 0.0):.1f}% | "
                f"{entry.get('speedup', 0.0):.2f}x |"
            )
    else:
        lines.append("Not measured yet: `massv eval --drafter <this directory> --record-in-model-card ...` adds a row.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from massv import MultimodalDrafter, SpeculativeGenerator",
        f"drafter = MultimodalDrafter.from_pretrained(\"<this repo or directory>\", target=target)  # target: `{target}`",
        "out = SpeculativeGenerator(target, drafter, processor).generate(images=[image], prompt=\"...\")",
        "```",
        "",
    ]
    return "\n".join(lines)


def evaluation_entry(benchmark: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The card's row for one `massv eval` summary (`EvalSummary` as a dict)."""
    settings = summary.get("settings", {})
    return {
        "benchmark": benchmark,
        "num_draft_tokens": settings.get("num_draft_tokens"),
        "temperature": settings.get("temperature", 0.0),
        "max_new_tokens": settings.get("max_new_tokens"),
        "num_samples": summary.get("num_samples"),
        "mean_accepted_length": summary.get("mean_accepted_length"),
        "acceptance_rate": summary.get("acceptance_rate"),
        "speedup": summary.get("speedup"),
    }


def merge_evaluation(evaluations: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """`evaluations` with `entry` added, replacing an earlier one of the same setting."""
    key = tuple(entry.get(name) for name in EVALUATION_KEY)
    kept = [old for old in evaluations if tuple(old.get(name) for name in EVALUATION_KEY) != key]
    return [*kept, entry]
