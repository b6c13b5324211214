"""Per-GPU memory of phase 1, distillation and phase 2 for each model pair, from parameter counts and measurements.

Parameter counts come from the real architectures (`eval/model_configs/*.json`) built on the meta device: no
weights are downloaded or allocated. The activation cost per token comes from `bench_activation_memory.py`
(Qwen2.5-0.5B, random weights, bf16 autocast, CPU, two lengths: the slope is free of every constant term);
it is carried to the other drafter LMs by the analytic per-layer count below (their ratio). The backward's
transient cost per trainable parameter comes from one `bench_train_memory.py --size real` step.

    python eval/bench_activation_memory.py --seq-lens 256 512 --out eval/results/activation_memory.json
    python eval/bench_train_memory.py --size real --family qwen2_5_vl --batch 1 --seq-len 256 --short-len 256 \\
        --image-tokens 64 --answer-fraction 0.5 --bf16 --out eval/results/train_memory_real_size_256.json
    python eval/scaling_estimates.py --out eval/results/scaling_memory.md

Everything here is an estimate for a GPU, derived from CPU measurements: docs/scaling.md says which.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from massv.families import get_adapter

MODEL_CONFIGS = ROOT / "eval" / "model_configs"
GIB = 2**30
# config file -> (target architecture, drafter LM architecture), both under eval/model_configs/
PAIRS = {
    "qwen2_5_vl_7b": ("qwen2_5_vl_7b", "qwen2_5_0_5b"),
    "qwen2_5_vl_3b": ("qwen2_5_vl_3b", "qwen2_5_0_5b"),
    "gemma3_12b": ("gemma3_12b", "gemma3_1b"),
    "gemma3_4b": ("gemma3_4b", "gemma3_270m"),
}
# Mean distill prompt + answer length used for the KV cache (tokens): see docs/scaling.md, "Time".
DISTILL_CONTEXT_TOKENS = {"qwen2_5_vl": 1280 + 100 + 512, "gemma3": 256 + 100 + 512}


def load_architecture(name: str) -> Any:
    from transformers import AutoConfig

    data = json.loads((MODEL_CONFIGS / f"{name}.json").read_text())
    data.pop("_comment", None)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def count(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())  # tied weights are one parameter


@dataclass
class Sizes:
    """Parameter counts of one pair and the shapes the activation formulas need."""

    vision: int  # the target's frozen vision modules the drafter shares (Qwen: visual incl. merger; Gemma: tower + projector)
    target: int  # the whole target (distillation holds all of it)
    drafter_lm: int
    projector: int
    feature_dim: int
    lm_hidden: int
    lm_layers: int
    lm_intermediate: int
    lm_q_dim: int
    lm_kv_dim: int
    lm_vocab: int
    target_kv_bytes_per_token: int  # bf16 K and V of every target layer
    lm_norms_per_layer: int = 2  # Qwen2: 2 RMSNorms; Gemma3: 4 (pre/post attention and feed-forward)
    lm_qk_norm: bool = False  # Gemma3 normalises q and k per head


def sizes(config_name: str) -> Sizes:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    target_name, drafter_name = PAIRS[config_name]
    target_config, drafter_config = load_architecture(target_name), load_architecture(drafter_name)
    with torch.device("meta"):
        target = AutoModelForImageTextToText.from_config(target_config)
        drafter = AutoModelForCausalLM.from_config(drafter_config)
    adapter = get_adapter(target.config)
    vision = sum(count(module) for module in adapter.vision_modules(target).values())
    feature_dim = adapter.feature_dim("projected")
    hidden = drafter_config.hidden_size
    projector = feature_dim * hidden + hidden + hidden * hidden + hidden  # 2-layer GELU MLP (massv.drafter)
    head_dim = getattr(drafter_config, "head_dim", None) or hidden // drafter_config.num_attention_heads
    text = target_config.get_text_config()
    target_head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    gemma = drafter_config.model_type.startswith("gemma3")
    return Sizes(vision=vision, target=count(target), drafter_lm=count(drafter), projector=projector,
                 feature_dim=feature_dim, lm_hidden=hidden, lm_layers=drafter_config.num_hidden_layers,
                 lm_intermediate=drafter_config.intermediate_size,
                 lm_q_dim=drafter_config.num_attention_heads * head_dim,
                 lm_kv_dim=drafter_config.num_key_value_heads * head_dim, lm_vocab=drafter_config.vocab_size,
                 target_kv_bytes_per_token=2 * text.num_hidden_layers * text.num_key_value_heads * target_head_dim * 2,
                 lm_norms_per_layer=4 if gemma else 2, lm_qk_norm=gemma)


def analytic_layer_bytes(s: Sizes) -> int:
    """Bytes one decoder layer keeps for backward per token under bf16 autocast, fp32 residual stream.

    Each RMSNorm: fp32 input + fp32 normalised = 8h (Qwen2 has 2 per layer, Gemma3 4); 2 bf16 casts of the
    normed input = 4h; attention: q, k, v out, rotated q, k (saved by SDPA), SDPA output, o_proj input =
    2 x (4q + 4kv) bytes, and Gemma3's q/k norms another 8q + 8kv; gated MLP: gate, up, act(gate), gate*up
    in bf16 = 8I bytes. Qwen2.5-0.5B: 20h + 8q + 8kv + 8I.
    """
    qk_norm = 8 * s.lm_q_dim + 8 * s.lm_kv_dim if s.lm_qk_norm else 0
    return ((8 * s.lm_norms_per_layer + 4) * s.lm_hidden + 8 * s.lm_q_dim + 8 * s.lm_kv_dim
            + 8 * s.lm_intermediate + qk_norm)


def read_calibration(activations: Path, step: Path) -> dict[str, Any]:
    """What the two benches measured, reduced to per-token and per-parameter costs.

    `activations`: bench_activation_memory.py rows (bytes still held after the forward) at two lengths;
    slope = activation bytes per token, intercept = the weights and autocast's weight copies.
    `step`: bench_train_memory.py rows (peak of forward + backward, phase 2, no checkpointing) at one length;
    what the peak holds beyond the fp32 weights and the activations, per trainable parameter, is the
    backward's transient cost (fp32 gradients, bf16 weight copies and their bf16 gradients).
    """
    rows = json.loads(activations.read_text())["rows"]
    lengths = sorted({r["seq_len"] for r in rows})
    short, long = lengths[0], lengths[-1]

    def held(phase: str, checkpointing: bool, seq_len: int, variant: str) -> int:
        (row,) = [r for r in rows if (r["phase"], r["gradient_checkpointing"], r["seq_len"], r["variant"])
                  == (phase, checkpointing, seq_len, variant)]
        return row["retained_bytes"]

    vocab = rows[0]["vocab"]
    out: dict[str, Any] = {"lengths": [short, long], "vocab": vocab}
    for phase in ("phase1", "phase2"):
        for checkpointing in (False, True):
            key = f"{phase}_{'gc' if checkpointing else 'no_gc'}"
            slope = (held(phase, checkpointing, long, "after") - held(phase, checkpointing, short, "after")) / (long - short)
            out[f"bytes_per_token_{key}"] = slope
            out[f"intercept_{key}"] = held(phase, checkpointing, short, "after") - slope * short
            out[f"held_logit_bytes_per_element_{key}"] = (
                held(phase, checkpointing, long, "before") - held(phase, checkpointing, long, "after")) / (long * vocab)
    (step_row,) = [r for r in json.loads(step.read_text())["rows"] if r["variant"] == "after"]
    qwen = sizes("qwen2_5_vl_7b")
    trainable = qwen.drafter_lm + qwen.projector
    activations_then = out["bytes_per_token_phase2_no_gc"] * step_row["seq_len"] * step_row["batch"]
    out["step_peak_bytes"] = step_row["step_bytes"]
    out["step_seq_len"] = step_row["seq_len"]
    # The profiler counts every tensor the step touches, weights included (the forward's intercept above equals
    # the weight bytes): the fp32 LM + projector and the bf16 vision tower (bench_train_memory runs it on pixels).
    weights = 4 * trainable + 2 * qwen.vision
    out["backward_bytes_per_trainable_param"] = (step_row["step_bytes"] - weights - activations_then) / trainable
    return out


# Peak bytes per full-logit element (position x vocabulary entry) of the old full-logits loss over forward +
# backward: eval/results/train_memory_real_vocab.json, tiny body with the real Qwen vocabulary, float32
# (2,509,461,416 bytes for 4 x 256 positions x 151,936 entries = 16.1; the tiny body adds almost nothing).
LOGIT_PEAK_BYTES_PER_ELEMENT = 16.0
LOSS_CHUNK_TOKENS = 1024  # massv.train.loss.LOSS_CHUNK_TOKENS


def memory_rows(config_name: str, calibration: dict[str, Any]) -> tuple[list[dict[str, Any]], Sizes]:
    cfg = yaml.safe_load((ROOT / "configs" / f"{config_name}.yaml").read_text())
    s = sizes(config_name)
    qwen = sizes("qwen2_5_vl_7b")
    rows = []
    for phase in ("phase1", "phase2"):
        section = cfg[phase]
        tokens = section["max_tokens_per_batch"]  # the micro-batch's padded-token ceiling
        # measured on Qwen2.5-0.5B, carried to this LM by the analytic count (measured / analytic)
        scale = (s.lm_layers * analytic_layer_bytes(s)) / (qwen.lm_layers * analytic_layer_bytes(qwen))
        per_token_no_gc = calibration[f"bytes_per_token_{phase}_no_gc"] * scale
        # checkpointing: each layer's input is held (measured, scaled by L x h), plus one layer recomputed in backward
        per_token_gc = (calibration[f"bytes_per_token_{phase}_gc"] * (s.lm_layers * s.lm_hidden)
                        / (qwen.lm_layers * qwen.lm_hidden) + per_token_no_gc / s.lm_layers)
        trainable = s.projector + (s.drafter_lm if phase == "phase2" else 0)
        rows.append({
            "config": config_name, "stage": phase, "micro_batch": f"{section['per_device_batch_size']} x "
            f"{tokens // section['per_device_batch_size']} = {tokens} tokens",
            "vision_weights": 2 * s.vision,
            "lm_weights": 4 * s.drafter_lm if phase == "phase2" else 2 * s.drafter_lm,
            "projector_weights": 4 * s.projector, "target_weights": 0,
            "optimizer": 8 * trainable,
            "backward_transient": calibration["backward_bytes_per_trainable_param"] * trainable,
            "ddp_buckets": 4 * trainable,
            "activations_gc": per_token_gc * tokens, "activations_no_gc": per_token_no_gc * tokens,
            "logits_before": LOGIT_PEAK_BYTES_PER_ELEMENT * tokens * s.lm_vocab,
            "logits_after": LOGIT_PEAK_BYTES_PER_ELEMENT * min(LOSS_CHUNK_TOKENS, tokens) * s.lm_vocab,
            "gradient_checkpointing": bool(section.get("gradient_checkpointing")),
        })
    batch = cfg["distill"]["batch_size"]
    family = get_adapter(load_architecture(PAIRS[config_name][0])).model_type
    kv = s.target_kv_bytes_per_token * batch * DISTILL_CONTEXT_TOKENS[family]
    rows.append({"config": config_name, "stage": "distill", "micro_batch": f"{batch} prompts",
                 "vision_weights": 0, "lm_weights": 0, "projector_weights": 0, "target_weights": 2 * s.target,
                 "optimizer": 0, "backward_transient": 0, "ddp_buckets": 0, "kv_cache": kv,
                 "activations_gc": 0, "activations_no_gc": 0, "logits_before": 0, "logits_after": 0,
                 "gradient_checkpointing": False})
    return rows, s


def total(row: dict[str, Any], checkpointing: bool, answer_only: bool = True, ddp: bool = True) -> float:
    parts = ["vision_weights", "lm_weights", "projector_weights", "target_weights", "optimizer",
             "backward_transient", "kv_cache"] + (["ddp_buckets"] if ddp else [])
    value = sum(row.get(part, 0) for part in parts)
    value += row["activations_gc"] if checkpointing else row["activations_no_gc"]
    value += row["logits_after"] if answer_only else row["logits_before"]
    return value


def gib(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value / GIB:.1f}" if value >= 0.1 * GIB else f"{value / GIB:.2f}"


def markdown(all_rows: list[dict[str, Any]], all_sizes: dict[str, Sizes], calibration: dict[str, Any]) -> str:
    c = calibration
    lines = ["Parameter counts (meta-device build of eval/model_configs/*.json):", "",
             "| config | vision (frozen) | target (all) | drafter LM | projector | feature dim -> LM hidden |",
             "|---|---|---|---|---|---|"]
    for name, s in all_sizes.items():
        lines.append(f"| {name} | {s.vision / 1e6:.1f} M | {s.target / 1e9:.2f} B | {s.drafter_lm / 1e6:.1f} M | "
                     f"{s.projector / 1e6:.2f} M | {s.feature_dim} -> {s.lm_hidden} |")
    lines += ["", ("Measured on the CPU (Qwen2.5-0.5B + Qwen2.5-VL-7B vision tower, random weights, batch 1, bf16 "
              f"autocast; lengths {c['lengths'][0]} and {c['lengths'][1]}):"), "",
              "| quantity | phase 1 (LM frozen, bf16) | phase 2 (LM trains, fp32 master) |", "|---|---|---|"]
    for label, key in (("held for backward per token, no checkpointing", "bytes_per_token_{}_no_gc"),
                       ("held for backward per token, checkpointing", "bytes_per_token_{}_gc")):
        lines.append(f"| {label} | {c[key.format('phase1')] / 1024:.1f} KiB | {c[key.format('phase2')] / 1024:.1f} KiB |")
    lines.append(f"| intercept (weights + autocast copies) | {c['intercept_phase1_no_gc'] / GIB:.2f} GiB | "
                 f"{c['intercept_phase2_no_gc'] / GIB:.2f} GiB |")
    lines.append(f"| full-logits loss, held per logit element | {c['held_logit_bytes_per_element_phase1_no_gc']:.2f} B | "
                 f"{c['held_logit_bytes_per_element_phase2_no_gc']:.2f} B |")
    lines += ["", (f"Phase-2 step peak at 1 x {c['step_seq_len']} (bench_train_memory.py --size real): "
              f"{c['step_peak_bytes'] / GIB:.2f} GiB; beyond weights and activations: "
              f"{c['backward_bytes_per_trainable_param']:.1f} bytes per trainable parameter."), "",
              ("Per GPU, GiB, at the configs' micro-batch ceilings (max_tokens_per_batch); total = the configs' "
              "settings (gradient checkpointing on, answer-only loss, DDP):"), "",
              ("| config | stage | micro-batch | vision | drafter LM | projector | target | AdamW | backward | DDP "
              "| KV cache | act. GC / no GC | logits full / answer-only | total |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in all_rows:
        training = row["stage"] != "distill"
        lines.append(
            f"| {row['config']} | {row['stage']} | {row['micro_batch']} | {gib(row['vision_weights'])} | "
            f"{gib(row['lm_weights'])} | {gib(row['projector_weights'])} | {gib(row['target_weights'])} | "
            f"{gib(row['optimizer'])} | {gib(row['backward_transient'])} | {gib(row['ddp_buckets'])} | "
            f"{gib(row.get('kv_cache', 0))} | "
            + (f"{gib(row['activations_gc'])} / {gib(row['activations_no_gc'])} | "
               f"{gib(row['logits_before'])} / {gib(row['logits_after'])} | " if training else "- | - | ")
            + f"{gib(total(row, row['gradient_checkpointing']))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", type=Path, default=ROOT / "eval/results/activation_memory.json",
                        help="bench_activation_memory.py rows (two lengths, both phases, with and without checkpointing)")
    parser.add_argument("--step", type=Path, default=ROOT / "eval/results/train_memory_real_size_256.json",
                        help="bench_train_memory.py --size real rows (phase-2 step peak, no checkpointing)")
    parser.add_argument("--out", type=Path, default=None, help="write the tables here (.md) and the numbers beside (.json)")
    args = parser.parse_args(argv)
    calibration = read_calibration(args.activations, args.step)
    all_rows, all_sizes = [], {}
    for name in PAIRS:
        rows, s = memory_rows(name, calibration)
        all_rows += rows
        all_sizes[name] = s
    text = markdown(all_rows, all_sizes, calibration)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"calibration": {k: v for k, v in calibration.items() if k != "rows"},
             "sizes": {name: vars(s) for name, s in all_sizes.items()}, "rows": all_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
