"""`massv demo`: the whole MASSV pipeline on the embedded synthetic world, on a CPU, with a report.

world -> target VLM + text-only LM (shipped, or `--from-scratch`) -> MASSV phase 1 (projector on captions)
-> target answers the training prompts (self-distillation) -> phase 2 (projector + LM on those answers)
-> evaluation on the held-out split. Four drafters are compared at γ = 5, greedy and temperature 1:
  (a) the text-only drafter, (b) the text-only drafter tuned on the target's answers,
  (c) MASSV after phase 1, (d) full MASSV.
Every stage writes its result under `--out/<stage>/<key>/`, where the key hashes the stage's resolved config
(and the keys of the stages it reads from), so a later run reuses a stage only if nothing it depends on changed:
`--override phase2.learning_rate=5e-4` retrains phase 2 and baseline (b) and reuses phase 1 and the distilled
answers. Greedy outputs are checked token for token against the target's own `generate()`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from massv.config import RunConfig, final_dir, load_config
from massv.drafter import MultimodalDrafter
from massv.evaluate import EvalSettings, EvalSummary, evaluate_samples, sample_inputs, summarize
from massv.families import get_adapter
from massv.pipelines.stages import train_or_load
from massv.speculative.strategy import AdaptiveLength, TreeShape
from massv.strategy_eval import StrategyRun, compare_strategies, target_references
from massv.train.builders import build_drafter

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
DRAFTERS = {
    "text_only": "(a) text-only drafter",
    "text_only_tuned": "(b) text-only drafter tuned on target answers",
    "massv_phase1": "(c) MASSV after phase 1",
    "massv": "(d) full MASSV",
}
# (pretrain captions, instruction prompts, held-out eval samples, phase-1 steps, phase-2 steps, max new tokens)
# Phase 2 runs long on few prompts: on the shipped world, 400 -> 1000 steps raised full MASSV's greedy MAL from
# 3.81 to 4.26 while the text-only drafter tuned the same way stayed at 3.44-3.49 (the image is what it learns).
# 1500 steps added nothing greedy (4.29) and overfit: sampled (T=1) MAL fell from 3.28 to 2.92. That was on the
# answer tokens alone; on the target's distribution (logit distillation, below) 2000 steps raise it from 4.37-4.54
# to 4.81 on the validation world (eval/results/demo_validation.md).
# One drafter per serving temperature. Greedy decoding is served by the drafter distilled on the target's greedy
# answers; sampling (T = 1) by one distilled on `sampled_answers` answers per prompt that the target *sampled*
# at SAMPLED_TEMPERATURE: a drafter trained on greedy answers is sharpened towards one phrasing and loses to the
# text-only drafter at T = 1, while sampled answers teach it the spread the sampling target draws from.
# `sampled_steps` phase-2 steps, starting from `sampled_start` ("phase1": the phase-1 drafter; "phase2": the
# greedy-distilled one). `sampled_answers: 0` serves both temperatures with the greedy-distilled drafter.
# Both phase 2s learn the target's distribution (configs/demo.yaml: phase2.logit_distillation), so the T = 1
# drafter needs only a short tuning of the greedy one on sampled contexts: 300 steps from phase 2 gave T = 1 MAL
# 4.22 (1.35x text-only) against 3.69 (1.18x) for 1000 steps from phase 1.
# Chosen on the seed-2 validation world (`massv demo --heldout-seed 2`; eval/results/demo_validation.md).
SIZES = {
    "full": {"pretrain": 2400, "train": 1200, "heldout": 40, "phase1_steps": 300, "phase2_steps": 2000,
             "max_new_tokens": 96, "sampled_answers": 1, "sampled_steps": 300, "sampled_start": "phase2"},
    "quick": {"pretrain": 64, "train": 32, "heldout": 3, "phase1_steps": 10, "phase2_steps": 10,
              "max_new_tokens": 24, "sampled_answers": 1, "sampled_steps": 10, "sampled_start": "phase2"},
}
SAMPLED_TEMPERATURE = 1.0


# Keys that name where things are, not what they are: left out of the stage keys.
PATH_KEYS = ("pretrain_json", "pretrain_image_root", "instruct_json", "instruct_image_root", "distilled_dir",
             "output_dir")


def demo_config(config_path: Path, out: Path, size: dict[str, int], overrides: list[str]) -> RunConfig:
    """The demo's YAML with data paths moved under `out` and the size's step counts (stage directories: see
    `_keyed_config`)."""
    world = out / "world"
    paths = [
        f"data.pretrain_json={world / 'pretrain.jsonl'}", f"data.pretrain_image_root={world}",
        f"data.instruct_json={world / 'train.jsonl'}", f"data.instruct_image_root={world}",
        f"phase1.max_steps={size['phase1_steps']}",
        f"phase2.max_steps={size['phase2_steps']}", f"distill.max_new_tokens={size['max_new_tokens']}",
    ]
    return load_config(config_path, overrides=paths + list(overrides))


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _without_paths(section: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in section.items() if key not in PATH_KEYS}


def answer_passes(config: RunConfig, size: dict[str, int]) -> list[dict[str, Any]]:
    """The distill sections of the self-distillation passes: the configured one (greedy in configs/demo.yaml),
    then `size["sampled_answers"]` passes at SAMPLED_TEMPERATURE, each with its own sampling seed."""
    greedy = config.to_dict()["distill"]
    sampled = [{**greedy, "temperature": SAMPLED_TEMPERATURE, "seed": greedy["seed"] + 1 + index}
               for index in range(size.get("sampled_answers", 0))]
    return [greedy, *sampled]


def distill_stage(index: int) -> str:
    """The stage name of answer pass `index` ("distill", then "distill_sampled_1", ...)."""
    return "distill" if index == 0 else f"distill_sampled_{index}"


def stage_keys(config: RunConfig, world_hash: str, size: dict[str, int], seed: int) -> dict[str, str]:
    """One key per stage: a hash of everything the stage's output depends on, its upstream stages' keys included.

    phase 1 <- the world models, the model section, phase1, the caption data; each distill pass <- the world
    models, the model section, its distill settings, the prompts; phase 2 and baseline (b) <- phase2 and the
    keys they read from.
    """
    raw = config.to_dict()
    base = {"world": world_hash, "seed": seed, "model": raw["model"], "data": _without_paths(raw["data"])}
    phase1 = _hash({**base, "stage": "phase1", "pretrain": size["pretrain"], "phase1": _without_paths(raw["phase1"])})
    target_only = {key: raw["model"][key] for key in ("target", "torch_dtype", "attn_implementation")}
    distill = {distill_stage(index): _hash({**base, "model": target_only, "stage": "distill", "train": size["train"],
                                            "distill": settings})
               for index, settings in enumerate(answer_passes(config, size))}
    phase2 = _hash({**base, "stage": "phase2", "phase1": phase1, "distill": distill["distill"],
                    "phase2": _without_paths(raw["phase2"])})
    text_only_tuned = _hash({**base, "stage": "text_only_tuned", "distill": distill["distill"],
                             "phase2": _without_paths(raw["phase2"])})
    keys = {"phase1": phase1, **distill, "phase2": phase2, "text_only_tuned": text_only_tuned}
    sampled = sorted(key for stage, key in distill.items() if stage != "distill")
    if sampled:
        start = {"phase1": phase1, "phase2": phase2}[size["sampled_start"]]
        keys["phase2_sampled"] = _hash({**base, "stage": "phase2_sampled", "start": start, "distill": sampled,
                                        "steps": size["sampled_steps"], "phase2": _without_paths(raw["phase2"])})
    return keys


def _keyed_config(config: RunConfig, out: Path, keys: dict[str, str]) -> RunConfig:
    """`config` with each stage's output under `out/<stage>/<key>`."""
    return load_config(config.to_dict(), overrides=[
        f"phase1.output_dir={out / 'phase1' / keys['phase1']}", f"data.distilled_dir={out / 'distilled' / keys['distill']}",
        f"phase2.output_dir={out / 'phase2' / keys['phase2']}",
    ])


def _stage(name: str) -> None:
    logger.info("==== %s ====", name)


def _text_only_records(records: Any) -> Any:
    """The distilled answers without their images: what a text-only drafter can be tuned on."""
    from massv.train.data import strip_image_placeholder

    def strip(record: dict[str, Any]) -> dict[str, Any]:
        conversations = [{**turn, "value": strip_image_placeholder(turn["value"])} for turn in record["conversations"]]
        return {"image_path": None, "conversations": conversations}

    return records.map(strip)


def run_demo(out: Path, quick: bool = False, from_scratch: bool = False, config_path: Path = DEFAULT_CONFIG,
             overrides: list[str] | None = None, seed: int = 0, recipe: Any = None,
             compress: bool = False, heldout_seed: int | None = None,
             sampled_answers: int | None = None, sampled_steps: int | None = None,
             sampled_start: str | None = None, train_prompts: int | None = None) -> dict[str, Any]:
    """Run every stage (reusing finished ones) and write report.json / report.md / report.png under `out`.

    `heldout_seed` (default `seed + 1`) picks the world the drafters are evaluated on: choices are made on a
    validation world (2), the report shows another (1). `sampled_answers` / `sampled_steps` / `sampled_start`
    override the size's recipe of the T = 1 drafter (see SIZES), `train_prompts` its number of training prompts.

    `recipe` (a `WorldRecipe`) picks other world models than the shipped ones. `compress` adds the
    compression study (massv.pipelines.compression_study) under `out/compression`.
    """
    from datasets import concatenate_datasets

    from massv.benchmarks import load_benchmark
    from massv.pipelines.world import write_world
    from massv.pipelines.world_models import load_world_models
    from massv.train.distill import generate_responses, load_distilled_records
    from massv.train.llava_data import load_llava_records

    started = time.perf_counter()
    size = dict(SIZES["quick" if quick else "full"])
    for name, value in (("sampled_answers", sampled_answers), ("sampled_steps", sampled_steps),
                        ("sampled_start", sampled_start), ("train", train_prompts)):
        if value is not None:
            size[name] = value
    heldout_seed = seed + 1 if heldout_seed is None else heldout_seed
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(config_path, out, size, overrides or [])  # config errors before any model loads
    timings: dict[str, float] = {}
    reused: dict[str, bool] = {}

    def timed(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 1)

    _stage("world models (target VLM + text-only LM)")
    start = time.perf_counter()
    world_models = load_world_models(from_scratch=from_scratch, recipe=recipe)
    target, text_lm, processor = world_models.target, world_models.text_lm, world_models.processor
    target.eval()
    timed("world_models", start)
    keys = stage_keys(config, world_models.recipe.hash(), size, seed)
    config = _keyed_config(config, out, keys)

    _stage("synthetic world data")
    start = time.perf_counter()
    world_dir = out / "world"
    # Images at the size the target was trained on: the processor would resize other sizes, and a resized
    # (blurred) scene is not what the target's vision tower learned to parse.
    image_size = world_models.recipe.image_size
    write_world(world_dir, "pretrain", size["pretrain"], seed, image_size=image_size)
    write_world(world_dir, "train", size["train"], seed, image_size=image_size)
    write_world(world_dir, "heldout", size["heldout"], heldout_seed, image_size=image_size)
    timed("world_data", start)

    _stage("phase 1: projector pretraining on captions")
    start = time.perf_counter()
    pretrain_records, _ = load_llava_records(world_dir / "pretrain.jsonl", world_dir)
    # The drafter the config describes (model.vision_feature, projector_*), as `massv train --phase 1` builds it,
    # its projector drawn from a seeded generator: the global one's state here depends on what ran before.
    fresh = build_drafter(config.model, target, copy.deepcopy(text_lm), processor, seed=config.phase1.seed)
    phase1_drafter = train_or_load(config, 1, target, fresh, processor, pretrain_records, reused, "phase1")
    timed("phase1", start)

    _stage("self-distillation: the target answers the training prompts (greedy, then sampled)")
    start = time.perf_counter()
    train_records, _ = load_llava_records(world_dir / "train.jsonl", world_dir)
    answer_sets = []
    for index, settings in enumerate(answer_passes(config, size)):
        stage = distill_stage(index)
        pass_config = load_config(config.to_dict(), overrides=[
            f"distill.temperature={settings['temperature']}", f"distill.seed={settings['seed']}",
            f"data.distilled_dir={out / 'distilled' / keys[stage]}"])
        result = generate_responses(pass_config, target=target, processor=processor, records=train_records)
        reused[stage] = result.generated == 0
        answer_sets.append(load_distilled_records(pass_config.data.distilled_dir, world_dir, num_workers=0)[0])
    distilled, sampled_answers = answer_sets[0], answer_sets[1:]
    timed("distill", start)

    _stage("phase 2: projector + LM on the target's greedy answers (the drafter for T = 0)")
    start = time.perf_counter()
    phase2_start = MultimodalDrafter.from_pretrained(final_dir(config.phase1.output_dir), target=target)
    massv_drafter = train_or_load(config, 2, target, phase2_start, processor, distilled, reused, "phase2")
    timed("phase2", start)
    massv_by_temperature = {0.0: massv_drafter, 1.0: massv_drafter}
    if sampled_answers:
        _stage("phase 2 on the target's sampled answers (the drafter for T = 1)")
        start = time.perf_counter()
        sampled_config = load_config(config.to_dict(), overrides=[
            f"phase2.output_dir={out / 'phase2_sampled' / keys['phase2_sampled']}",
            f"phase2.max_steps={size['sampled_steps']}"])
        start_dir = final_dir(config.phase1.output_dir if size["sampled_start"] == "phase1" else config.phase2.output_dir)
        sampled_start = MultimodalDrafter.from_pretrained(start_dir, target=target)
        massv_by_temperature[1.0] = train_or_load(sampled_config, 2, target, sampled_start, processor,
                                                  concatenate_datasets(sampled_answers), reused, "phase2_sampled")
        timed("phase2_sampled", start)

    _stage("baseline (b): the text-only drafter tuned on the target's answers")
    start = time.perf_counter()
    text_config = load_config(config.to_dict(), overrides=[
        f"phase2.output_dir={out / 'phase2_text_only' / keys['text_only_tuned']}"])
    text_start = build_drafter(config.model, target, copy.deepcopy(text_lm), processor)
    tuned_text_lm = train_or_load(text_config, 2, target, text_start, processor, _text_only_records(distilled),
                                   reused, "text_only_tuned").language_model
    timed("text_only_tuned", start)

    _stage("evaluation on the held-out split")
    start = time.perf_counter()
    samples = load_benchmark("world", world_dir, split="heldout")
    results: dict[str, dict[str, EvalSummary]] = {}
    baseline_cache: dict[tuple[Any, ...], tuple[list[int], float]] = {}
    for temperature in (0.0, 1.0):
        drafters = {"text_only": text_lm, "text_only_tuned": tuned_text_lm, "massv_phase1": phase1_drafter,
                    "massv": massv_by_temperature[temperature]}
        settings = EvalSettings(num_draft_tokens=5, temperature=temperature, max_new_tokens=size["max_new_tokens"], seed=seed)
        rows_by_drafter: dict[str, list[dict[str, Any]]] = {name: [] for name in drafters}
        # Sample by sample, every drafter right after the target's own (timed) run: on a shared CPU the load
        # drifts within minutes, and a speedup compares two timings that should see the same load.
        for index, sample in enumerate(tqdm(samples, desc=f"evaluation T={temperature:g}", unit="sample")):
            for name, drafter in drafters.items():
                _, rows = evaluate_samples(target, drafter, processor, [sample], settings, baseline_cache=baseline_cache,
                                           indices=[index], progress=False)
                rows_by_drafter[name] += rows
        for name, rows in rows_by_drafter.items():
            results.setdefault(name, {})[f"T={temperature:g}"] = summarize(rows, settings)
            _write_rows(out / "samples" / f"{name}_T{temperature:g}.jsonl", rows)
    timed("evaluation", start)

    _stage("drafting strategies with the full MASSV drafter: chain, adaptive chain, tree")
    start = time.perf_counter()
    strategies = strategy_rows(target, massv_by_temperature, processor, samples, size["max_new_tokens"], seed)
    timed("strategies", start)

    # ---- --compress: MAL vs MACs of a deeper MASSV drafter, pruned / sparse, with and without recovery ----
    compression = None
    if compress:
        from massv.pipelines.compression_study import run_compression_study

        _stage("compression study: dense / layer-pruned / sparse drafters, with and without recovery")
        start = time.perf_counter()
        compression = run_compression_study(world_models, out / "compression", distilled, pretrain_records, samples,
                                            quick=quick, config_path=config_path, overrides=overrides or [], seed=seed)
        timed("compression", start)
    # ---- end --compress ----

    report = _report(results, world_models, size, timings, time.perf_counter() - started, quick)
    report["seeds"] = {"train": seed, "heldout": heldout_seed}
    report["massv_drafters"] = {
        "T=0": "phase2: phase 1 + phase 2 on the target's greedy answers",
        "T=1": (f"phase2_sampled: {size['sampled_start']} + {size['sampled_steps']} phase-2 steps on "
                f"{size['sampled_answers']} answer(s) per prompt sampled at T = {SAMPLED_TEMPERATURE:g}")
        if sampled_answers else "phase2 (the same drafter as at T = 0)"}
    report["stages"] = {stage: {"key": keys[stage], "reused": reused.get(stage, False)} for stage in keys}
    report["strategies"] = strategies
    greedy_strategy_rows = strategies["T=0"]
    report["lossless"]["checked"] += sum(row["requests"] for row in greedy_strategy_rows)
    report["lossless"]["mismatches"] += sum(row["requests"] - row["identical"] for row in greedy_strategy_rows)
    if compression is not None:
        report["compression"] = compression
    _record_in_model_card(final_dir(config.phase2.output_dir), results, "T=0" if sampled_answers else None)
    if sampled_answers:
        _record_in_model_card(final_dir(out / "phase2_sampled" / keys["phase2_sampled"]), results, "T=1")
    _write_report(out, report)
    return report


def strategy_rows(target: Any, massv_by_temperature: dict[float, Any], processor: Any, samples: list[Any],
                  max_new_tokens: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The full MASSV drafter of each temperature under a γ = 5 chain, an adaptive chain, the default tree and
    an EAGLE-2-wide tree, on the held-out prompts, one timed pass interleaved with the target alone; greedy
    rows checked against the target's own output."""
    adapter = get_adapter(target.config)
    cases = [sample_inputs(processor, adapter, sample) for sample in samples]
    runs = [StrategyRun("chain γ=5", "chain", 5), StrategyRun("adaptive", "adaptive", 5, adaptive=AdaptiveLength()),
            StrategyRun("tree (default)", "tree", tree=TreeShape()),
            StrategyRun("tree (EAGLE-2 width, n=16)", "tree", tree=TreeShape(size=16, depth=10, min_probability=0.25,
                                                                           width=None, min_node_probability=0.0))]
    references = target_references(target, cases, max_new_tokens)
    rows = {}
    for temperature, drafter in massv_by_temperature.items():
        rows[f"T={temperature:g}"], _ = compare_strategies(
            target, drafter, processor, cases, runs, temperature, max_new_tokens,
            references=references if temperature == 0 else None, repeats=1, seed=seed)
    return rows


def _record_in_model_card(drafter_dir: Path, results: dict[str, dict[str, EvalSummary]],
                          temperature: str | None = None) -> None:
    """Full MASSV's MAL in its drafter's model card: at `temperature`, the one it serves, or at both (None)."""
    from massv.drafter import record_evaluation
    from massv.model_card import evaluation_entry

    for temp, summary in results["massv"].items():
        if temperature is not None and temp != temperature:
            continue
        record_evaluation(drafter_dir, evaluation_entry("world (held-out)", asdict(summary)))


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _report(results: dict[str, dict[str, EvalSummary]], world_models: Any, size: dict[str, int],
            timings: dict[str, float], total_seconds: float, quick: bool) -> dict[str, Any]:
    greedy_mal = {name: results[name]["T=0"].mean_accepted_length for name in results}
    mismatches = sum(summary.lossless_mismatches for by_temp in results.values() for summary in by_temp.values())
    checked = sum(summary.lossless_checked for by_temp in results.values() for summary in by_temp.values())
    return {
        "mode": "quick" if quick else "full",
        "num_draft_tokens": 5,
        "sizes": size,
        "world_models": {"recipe_hash": world_models.recipe.hash(), "metrics": world_models.metrics},
        "results": {name: {temp: asdict(summary) for temp, summary in by_temp.items()} for name, by_temp in results.items()},
        "mal_ratio_massv_vs_text_only_greedy": greedy_mal["massv"] / greedy_mal["text_only"] if greedy_mal["text_only"] else None,
        "mal_ratio_massv_vs_text_only": {
            temp: results["massv"][temp].mean_accepted_length / results["text_only"][temp].mean_accepted_length
            for temp in results["text_only"] if results["text_only"][temp].mean_accepted_length},
        "lossless": {"checked": checked, "mismatches": mismatches},
        "stage_seconds": timings,
        "total_seconds": round(total_seconds, 1),
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# MASSV demo report ({report['mode']})",
        "",
        f"γ = {report['num_draft_tokens']}; held-out samples: {report['sizes']['heldout']}; "
        f"total time {report['total_seconds']:.0f} s. MAL counts the bonus token (tokens per target forward).",
        "",
        "| drafter | T | MAL | accepted drafts / step | acceptance rate | speedup vs target | lossless |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_temp in report["results"].items():
        for temp, summary in by_temp.items():
            lossless = (f"{summary['lossless_checked'] - summary['lossless_mismatches']}/{summary['lossless_checked']} identical"
                        if summary["lossless_checked"] else "sampled")
            lines.append(
                f"| {DRAFTERS[name]} | {temp[2:]} | {summary['mean_accepted_length']:.2f} | "
                f"{summary['mean_accepted_drafts']:.2f} | {100 * summary['acceptance_rate']:.1f}% | "
                f"{summary['speedup']:.2f}x | {lossless} |"
            )
    lines += [""] + [f"MAL(full MASSV) / MAL(text-only drafter), T = {temp[2:]}: **{ratio:.3f}x**"
                     for temp, ratio in report["mal_ratio_massv_vs_text_only"].items()]
    if "massv_drafters" in report:
        lines += ["", "(d) full MASSV, one drafter per serving temperature: "
                  + "; ".join(f"{temp.replace('=', ' = ')}: {what}" for temp, what in report["massv_drafters"].items()) + "."]
    text_only = report["results"]["text_only"]
    lines += ["", f"(a) text-only drafter, speedup over the target alone: T = 0 {text_only['T=0']['speedup']:.2f}x, "
              f"T = 1 {text_only['T=1']['speedup']:.2f}x (T = 1 / T = 0: "
              f"{text_only['T=1']['speedup'] / text_only['T=0']['speedup']:.2f})."]
    lines += [
        "",
        f"Greedy outputs identical to the target's own: {report['lossless']['checked'] - report['lossless']['mismatches']}"
        f"/{report['lossless']['checked']}.",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items()),
    ]
    lines += _strategy_table(report.get("strategies", {}))
    lines += _world_target_table(report["world_models"])
    return "\n".join(lines) + "\n"


def _strategy_table(strategies: dict[str, list[dict[str, Any]]]) -> list[str]:
    if not strategies:
        return []
    lines = ["", "(d) full MASSV under each drafting strategy (one timed pass, interleaved with the target alone)", "",
             "| strategy | T | tokens / target forward | acceptance rate | tok/s | speedup vs target | lossless |",
             "|---|---|---|---|---|---|---|"]
    for temperature, rows in strategies.items():
        for row in rows:
            lossless = f"{row['identical']}/{row['requests']} identical" if row["identical"] is not None else "sampled"
            lines.append(f"| {row['name']} | {temperature.removeprefix('T=')} | {row['tokens_per_target_forward']:.2f} | "
                         f"{row['acceptance_rate']:.1%} | {row['tokens_per_second']:.1f} | {row['speedup']:.2f}x | {lossless} |")
    return lines


def _world_target_table(world_models: dict[str, Any]) -> list[str]:
    """The world target's held-out exact match per task, next to the blind text LM's: how much of each answer
    only the image carries (measured on the saved weights when they were trained; massv/assets/world)."""
    heldout = (world_models.get("metrics") or {}).get("heldout")
    if not heldout:
        return []
    lines = ["", f"World models {world_models['recipe_hash']}: held-out exact match by task (greedy)", "",
             "| task | n | target | text-only LM |", "|---|---|---|---|"]
    for task, row in heldout["target"].items():
        lines.append(f"| {task} | {row['n']} | {100 * row['exact']:.1f}% | {100 * heldout['text_lm'][task]['exact']:.1f}% |")
    return lines


def _plot(out: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, metric, label in zip(axes, ("mean_accepted_length", "acceptance_rate", "speedup"),
                                   ("mean accepted length", "acceptance rate", "speedup vs target")):
        for offset, temp in ((-0.2, "T=0"), (0.2, "T=1")):
            values = [report["results"][name][temp][metric] for name in names]
            axis.bar([i + offset for i in range(len(names))], values, width=0.4, label=temp)
        axis.set_xticks(range(len(names)), [DRAFTERS[name][:3] for name in names])
        axis.set_title(label)
    axes[0].legend()
    figure.suptitle("MASSV demo: (a) text-only, (b) text-only tuned, (c) MASSV phase 1, (d) full MASSV; γ=5")
    figure.tight_layout()
    figure.savefig(out / "report.png", dpi=100)
    plt.close(figure)


def _write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    markdown = _markdown(report)
    if "compression" in report:  # --compress
        markdown += "\n" + report["compression"]["markdown"]
    (out / "report.md").write_text(markdown)
    _plot(out, report)
    print(markdown)
    print(f"report: {out / 'report.md'} (also {out / 'report.json'}, {out / 'report.png'})")


def main(argv: list[str] | None = None) -> int:
    """`massv demo [--quick] [--from-scratch] [--out DIR]`; exits non-zero if any greedy output differs."""
    from massv.cli import HelpFormatter, add_override_argument

    parser = argparse.ArgumentParser(prog="massv demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="output directory; stages whose config did not change are reused from it "
                        "(--quick: <out>/quick when --out is not given)")
    parser.add_argument("--quick", action="store_true", help="a tiny version of every stage (CI's smoke run)")
    parser.add_argument("--from-scratch", action="store_true", help="retrain the world target and text LM too")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    add_override_argument(parser, "phase2.learning_rate=5e-4")
    parser.add_argument("--seed", type=int, default=0, help="world seed of the training splits")
    parser.add_argument("--heldout-seed", type=int, default=None,
                        help="world seed of the held-out split (default: --seed + 1; 2 is the validation world)")
    parser.add_argument("--sampled-answers", type=int, default=None,
                        help="answers per training prompt the target samples for the T = 1 drafter; 0: one drafter "
                        "(greedy-distilled) for both temperatures (default: the size's)")
    parser.add_argument("--train-prompts", type=int, default=None,
                        help="training prompts the target answers for phase 2 (default: the size's)")
    parser.add_argument("--sampled-steps", type=int, default=None, help="phase-2 steps of the T = 1 drafter")
    parser.add_argument("--sampled-start", choices=("phase1", "phase2"), default=None,
                        help="the T = 1 drafter starts from the phase-1 drafter or the greedy-distilled one")
    parser.add_argument("--compress", action="store_true",
                        help="also the compression study: MAL vs MACs of pruned / sparse drafters (massv.pipelines.compression_study)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = args.out / "quick" if args.quick and args.out == Path("runs/demo") else args.out
    report = run_demo(out, quick=args.quick, from_scratch=args.from_scratch, config_path=args.config,
                      overrides=args.override, seed=args.seed, compress=args.compress,
                      heldout_seed=args.heldout_seed, sampled_answers=args.sampled_answers,
                      sampled_steps=args.sampled_steps, sampled_start=args.sampled_start,
                      train_prompts=args.train_prompts)
    return 1 if report["lossless"]["mismatches"] else 0
