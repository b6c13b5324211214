"""Peak memory of one phase-2 training step (forward + backward), before and after the answer-only loss.

"before" is the loss path MASSV used until the answer-only loss (kept here as the reference): the LM's
logits for every position (`logits_to_keep=0`), image tokens and padding included, cloned to mask the ids
the drafter never proposes, cast to float32 and fed to cross-entropy. "after" is `MultimodalDrafter`'s
loss today (`massv.train.loss`): the LM head only at the positions whose next token is an answer token, in
chunks recomputed in backward. Both losses are printed: they must agree.

The batch mimics phase 2: one image per sample (its frozen vision features spliced in at the image
tokens), the answer at the end of each sample, and right padding to the longest sample, which is one long
prompt (`--seq-len`) among short ones (`--short-len`). Memory is measured with torch's own tools: on CUDA
`torch.cuda.max_memory_allocated` (everything allocated, weights included), on the CPU the profiler's
memory timeline (`torch.profiler.profile(profile_memory=True)`, memory allocated during the step only).

    python eval/bench_train_memory.py                           # tiny pairs, both families, CPU, ~1 min
    python eval/bench_train_memory.py --vocab real              # tiny bodies with the real vocabularies
    python eval/bench_train_memory.py --size real --family qwen2_5_vl --batch 8 --seq-len 2048 --short-len 2048 \\
        --image-tokens 256 --answer-fraction 0.5 --variants after --gradient-checkpointing --bf16 --device cuda
        # one phase-2 step of Qwen2.5-0.5B + a Qwen2.5-VL-7B-sized vision tower at 8 x 2048 (GPU, random weights)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from massv.drafter import MultimodalDrafter  # noqa: E402
from massv.tiny import build_tiny_pair, gemma_drafter_config, qwen_drafter_config  # noqa: E402

# The drafter LMs' real vocabularies (Qwen2.5-0.5B, Gemma-3-1b / 270m) for `--vocab real`.
REAL_VOCAB = {"qwen2_5_vl": 151936, "gemma3": 262144}


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def tiny_drafter(family: str, vocab: str) -> MultimodalDrafter:
    """The tiny pair's drafter; `vocab="real"` gives its LM the real drafter's vocabulary size."""
    pair = build_tiny_pair(family, seed=0)
    lm = pair.drafter_lm
    if vocab == "real":
        config = (qwen_drafter_config if family == "qwen2_5_vl" else gemma_drafter_config)(pair.tokenizer)
        config.vocab_size = REAL_VOCAB[family]
        torch.manual_seed(0)
        lm = type(pair.drafter_lm)(config)
    return MultimodalDrafter.from_target(pair.target, lm, tokenizer_size=len(pair.tokenizer))


def real_size_qwen_drafter(device: torch.device) -> MultimodalDrafter:
    """Random-weight Qwen2.5-0.5B-Instruct LM + a Qwen2.5-VL-7B-sized vision tower (the target's LM is never
    built: training uses only its vision tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
              "fullatt_block_indexes": [7, 15, 23, 31]}
    text = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653)
    with torch.device("meta"):
        target = Qwen2_5_VLForConditionalGeneration(config)
    visual = type(target.model.visual)._from_config(target.config.vision_config)
    target.model.visual = visual.to(device=device, dtype=torch.bfloat16)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=32768))
    return MultimodalDrafter.from_target(target, lm.to(device), tokenizer_size=151665)


# --------------------------------------------------------------------------------------------------
# Batch and the two losses
# --------------------------------------------------------------------------------------------------


def make_batch(drafter: MultimodalDrafter, batch: int, seq_len: int, short_len: int, image_tokens: int,
               answer_fraction: float, device: torch.device, pixels: bool = False) -> dict[str, Any]:
    """Right-padded batch: row 0 `seq_len` tokens, the others `short_len`; the answer ends each row.

    `pixels=False`: precomputed vision features (as with `cache_image_features`); True: Qwen2.5-VL pixel
    patches, so the frozen vision tower runs in the step (`image_tokens` must be a square times 1: each
    image is a sqrt(4 x image_tokens)^2 patch grid, merged 2x2).
    """
    generator = torch.Generator().manual_seed(0)
    image_token = drafter.config.image_token_id
    # Ordinary text ids: past the special tokens (the first ids of both tiny tokenizers), below the image token
    # when it sits at the end of the vocabulary (Gemma3).
    high = min(drafter.config.draftable_vocab_size, image_token if image_token > 10 else 1 << 62)
    input_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    labels = torch.full((batch, seq_len), -100, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        length = seq_len if row == 0 else short_len
        ids = torch.randint(10, high, (length,), generator=generator)
        ids[1:1 + image_tokens] = image_token  # the image block right after the first token
        answer = max(1, int(answer_fraction * length))
        input_ids[row, :length], attention_mask[row, :length] = ids, 1
        labels[row, length - answer:length] = ids[length - answer:]
    tensors = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
               "labels": labels.to(device)}
    if pixels:
        side = int(round((4 * image_tokens) ** 0.5))
        if side * side != 4 * image_tokens:
            raise ValueError(f"--image-tokens {image_tokens}: 4 x it must be a square patch grid")
        vision_config = drafter.adapter.target_config.vision_config
        patch_dim = 3 * vision_config.temporal_patch_size * vision_config.patch_size ** 2
        tensors["image_inputs"] = {
            "pixel_values": torch.randn(batch * side * side, patch_dim, generator=generator).to(device, torch.bfloat16),
            "image_grid_thw": torch.tensor([[1, side, side]] * batch, device=device),
        }
        return tensors
    features = torch.randn(batch * image_tokens, drafter.config.vision_feature_dim, generator=generator)
    tensors["image_features"] = features.to(device, drafter.projector_dtype)
    return tensors


def loss_before(drafter: MultimodalDrafter, batch: dict[str, Any]) -> torch.Tensor:
    """The earlier loss path: full logits at every position, cloned, masked, cast to float32."""
    features = batch.get("image_features")
    if features is None:
        features = drafter.encode_images(batch["image_inputs"])
    inputs_embeds = drafter.embed(batch["input_ids"], features)
    logits = drafter.language_model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"],
                                    use_cache=False, logits_to_keep=0).logits
    if drafter.config.draftable_vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[..., drafter.config.draftable_vocab_size:] = float("-inf")
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                       ignore_index=-100)


def loss_after(drafter: MultimodalDrafter, batch: dict[str, Any]) -> torch.Tensor:
    return drafter(**batch, use_cache=False).loss


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _profiled_peak(step) -> tuple[float, int]:
    """(loss, peak bytes allocated during `step`) from the CPU profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        loss = step()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA users; the CPU timeline has no successor
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    return loss, max((sum(point) for point in sizes), default=0)


def measure(drafter: MultimodalDrafter, batch: dict[str, Any], variant: str, device: torch.device) -> dict[str, Any]:
    """Forward + backward of one step; peak memory and the loss."""
    compute = loss_before if variant == "before" else loss_after
    drafter.zero_grad(set_to_none=True)

    def step() -> float:
        loss = compute(drafter, batch)
        loss.backward()
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        loss = step()
        torch.cuda.synchronize()
        peak, scope = torch.cuda.max_memory_allocated(), "all CUDA memory allocated (weights included)"
        return {"variant": variant, "loss": loss, "peak_bytes": peak, "step_bytes": peak - baseline, "scope": scope}
    loss, step_peak = _profiled_peak(step)
    return {"variant": variant, "loss": loss, "peak_bytes": None, "step_bytes": step_peak,
            "scope": "allocated during the step (CPU profiler memory timeline)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("qwen2_5_vl", "gemma3", "both"), default="both")
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny",
                        help="real: Qwen2.5-0.5B + Qwen2.5-VL-7B vision tower, random weights (qwen2_5_vl only)")
    parser.add_argument("--vocab", choices=("tiny", "real"), default="tiny", help="tiny size: the LM's vocabulary")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="the longest sample (all are padded to it)")
    parser.add_argument("--short-len", type=int, default=64, help="every other sample's length")
    parser.add_argument("--image-tokens", type=int, default=16)
    parser.add_argument("--answer-fraction", type=float, default=0.25, help="share of each sample that is answer")
    parser.add_argument("--variants", nargs="+", choices=("before", "after"), default=["before", "after"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (as mixed_precision: bf16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here (and a .md table beside)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    families = ["qwen2_5_vl", "gemma3"] if args.family == "both" else [args.family]
    if args.size == "real" and families != ["qwen2_5_vl"]:
        parser.error("--size real is the Qwen2.5-0.5B / Qwen2.5-VL-7B pair: pass --family qwen2_5_vl")

    rows = []
    for family in families:
        drafter = real_size_qwen_drafter(device) if args.size == "real" else tiny_drafter(family, args.vocab)
        drafter.to(device)
        drafter.set_trainable("phase2")
        drafter.language_model.float()
        drafter.projector.float()
        if args.gradient_checkpointing:
            drafter.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        drafter.train()
        batch = make_batch(drafter, args.batch, args.seq_len, args.short_len, args.image_tokens,
                           args.answer_fraction, device, pixels=args.size == "real")
        vocab = drafter.language_model.get_output_embeddings().out_features
        for variant in args.variants:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                row = measure(drafter, batch, variant, device)
            row.update(family=family, size=args.size, vocab=vocab, batch=args.batch, seq_len=args.seq_len,
                       short_len=args.short_len, answer_tokens=int((batch["labels"] != -100).sum()),
                       gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, device=str(device))
            rows.append(row)
            print(f"{family:11s} vocab {vocab:6d} {variant:6s} loss {row['loss']:.5f}  step peak "
                  f"{row['step_bytes'] / 2**20:9.1f} MiB" + (f"  total peak {row['peak_bytes'] / 2**30:.2f} GiB"
                                                         if row["peak_bytes"] else ""), flush=True)
        del drafter, batch
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                        "command": " ".join(sys.argv), "rows": rows}, indent=2))
        args.out.with_suffix(".md").write_text(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Before/after per family: the step's peak memory and the loss (which must agree)."""
    lines = ["| family | LM vocab | batch (longest / others) | answer tokens | loss before / after | "
             "step peak before | step peak after | ratio |", "|---|---|---|---|---|---|---|---|"]
    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["family"], row["vocab"], row["batch"], row["seq_len"], row["short_len"]), {})[row["variant"]] = row
    for (family, vocab, batch, seq_len, short_len), variants in by_key.items():
        before, after = variants.get("before"), variants.get("after")
        if before is None or after is None:
            continue
        lines.append(
            f"| {family} | {vocab} | {batch} x {seq_len} ({seq_len} / {short_len}) | {after['answer_tokens']} | "
            f"{before['loss']:.5f} / {after['loss']:.5f} | {before['step_bytes'] / 2**20:.1f} MiB | "
            f"{after['step_bytes'] / 2**20:.1f} MiB | {before['step_bytes'] / max(after['step_bytes'], 1):.1f}x |")
    scope = rows[0]["scope"] if rows else ""
    return "\n".join(lines) + f"\n\nMemory: {scope}.\n"


if __name__ == "__main__":
    raise SystemExit(main())
