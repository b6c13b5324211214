"""Drafting strategies on the held-out world with a trained MASSV drafter: chain γ sweep, adaptive, trees.

One process, the same prompts for every row (`massv.strategy_eval.compare_strategies`): chain at γ = 1..8,
the adaptive chain, and EAGLE-2 trees of several sizes, at T = 0 and T = 1. Reports tokens per target
forward (MAL), wall-clock tokens/s (median of interleaved passes), per-position acceptance, how many greedy
outputs equal `target.generate`, and checks the issue's acceptance targets against chain γ = 5:

    python eval/bench_strategies.py --massv-drafter /tmp/demo13/phase2/<hash>/final --out eval/results/strategies

Writes `<out>/strategies.json`, `strategies.md` and `strategies.png`.
"""

from __future__ import annotations

import argparse
import os
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import build_inputs, load_models  # noqa: E402

from massv.families import get_adapter  # noqa: E402
from massv.strategy_eval import compare_strategies, default_runs, target_references  # noqa: E402

logger = logging.getLogger("massv.bench_strategies")
CHAIN_REFERENCE = "chain γ=5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--massv-drafter", required=True, help="a trained MASSV drafter directory (the demo's phase 2)")
    parser.add_argument("--world-seed", type=int, default=1, help="held-out split seed (the demo's: 1)")
    parser.add_argument("--num-prompts", type=int, default=40, help="held-out questions (the demo's: 40)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="(the demo's: 96)")
    parser.add_argument("--gammas", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--tree-sizes", type=int, nargs="+", default=[6, 10, 16])
    parser.add_argument("--tree-depth", type=int, default=16)
    parser.add_argument("--tree-top-k", type=int, default=3)
    parser.add_argument("--tree-min-probability", type=float, default=0.4)
    parser.add_argument("--tree-widths", type=int, nargs="+", default=[1, 0],
                        help="nodes expanded per depth, one tree sweep each (0: --tree-top-k, EAGLE-2)")
    parser.add_argument("--tree-min-node-probability", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row (median reported)")
    parser.add_argument("--compiled", action="store_true",
                        help="also every row with the compiled drafter (compile_drafter=True), compared among themselves")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-note", default="", help="what else ran on the machine (written into the report)")
    parser.add_argument("--out", type=Path, default=Path("eval/results/strategies"))
    args = parser.parse_args(argv)
    args.models, args.image_size = "world", 64  # what bench_engine's loaders read
    return args


def acceptance_checks(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The issue's targets, each with the numbers it compares."""
    checks: dict[str, Any] = {}
    for temp, table in rows.items():
        by_name = {row["name"]: row for row in table}
        checks[temp] = _checks(temp, by_name, [row for row in table if not row.get("compiled")], "")
        if any(row.get("compiled") for row in table):
            checks[f"{temp}, compiled"] = _checks(temp, by_name, [row for row in table if row.get("compiled")],
                                                  ", compiled")
    return checks


def _checks(temp: str, by_name: dict[str, dict[str, Any]], table: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    """The targets among rows that all run the drafter the same way (eager, or compiled)."""
    chain = by_name[CHAIN_REFERENCE + suffix]
    trees = [row for row in table if row["strategy"] == "tree"]
    chains = [row for row in table if row["strategy"] == "chain"]
    best_mal = max(trees, key=lambda row: row["tokens_per_target_forward"])
    best_speed = max(trees, key=lambda row: row["tokens_per_second"])
    best_chain = max(chains, key=lambda row: row["tokens_per_second"])
    adaptive = by_name["adaptive" + suffix]
    entry = {
        "tree_mal_over_chain5": best_mal["tokens_per_target_forward"] / chain["tokens_per_target_forward"],
        "tree_best_mal_row": best_mal["name"],
        "tree_tokens_per_second_over_chain5": best_speed["tokens_per_second"] / chain["tokens_per_second"],
        "tree_best_speed_row": best_speed["name"],
        "adaptive_over_best_chain_speed": adaptive["tokens_per_second"] / best_chain["tokens_per_second"],
        "best_chain_speed_row": best_chain["name"],
    }
    if temp == "T=0":
        entry["all_identical"] = all(row["identical"] == row["requests"] for row in table)
        entry["pass_tree_mal_1.25x"] = entry["tree_mal_over_chain5"] >= 1.25
        entry["pass_tree_faster"] = entry["tree_tokens_per_second_over_chain5"] > 1.0
    else:
        entry["pass_tree_mal_above_chain"] = entry["tree_mal_over_chain5"] > 1.0
    entry["pass_adaptive_within_5pct"] = entry["adaptive_over_best_chain_speed"] >= 0.95
    return entry


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Drafting strategies on the held-out world (full MASSV drafter)", "",
        f"- drafter: `{report['drafter']}`; {report['num_prompts']} held-out prompts (world seed "
        f"{report['world_seed']}), max new tokens {report['max_new_tokens']}, {report['repeats']} timed passes per row",
        f"- machine: {report['machine']}; target alone (same interleaving): "
        + ", ".join(f"{temp} {speed:.1f} tok/s" for temp, speed in report["target_tokens_per_second"].items()),
        f"- {report['load']}",
        "- tok/s: the median of the timed passes; every prompt runs under every row (and the target alone) in a "
        "rotating order before the next prompt, so load from other jobs falls on all rows alike",
        "",
    ]
    for temp, table in report["rows"].items():
        lines += [f"## {temp}", "",
                  "| row | tokens / target forward | tok/s (median) | speedup | α | drafts / block | drafter fwd / block "
                  "| branch accepts | identical | acceptance by position |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in table:
            identical = "—" if row["identical"] is None else f"{row['identical']}/{row['requests']}"
            positions = " ".join(f"{value:.2f}" for value in row["position_acceptance"][:8])
            lines.append(
                f"| {row['name']} | {row['tokens_per_target_forward']:.3f} | {row['tokens_per_second']:.1f} | "
                f"{row['speedup']:.2f}x | {row['acceptance_rate']:.3f} | "
                f"{row['drafts_per_block']:.1f} | {row['drafter_forwards_per_block']:.1f} | {row['branch_accepted']} | "
                f"{identical} | {positions} |")
        lines.append("")
    lines += ["## Acceptance targets (against chain γ = 5)", "", "```", json.dumps(report["checks"], indent=2), "```", ""]
    return "\n".join(lines)


def plot(path: Path, report: dict[str, Any]) -> None:
    """γ sweep and tree-size sweep (MAL and tok/s), and per-position acceptance: the demo's matplotlib way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for temp, rows in report["rows"].items():
        table = [row for row in rows if not row.get("compiled")]
        compiled = [row for row in rows if row.get("compiled")]
        chains = [row for row in table if row["strategy"] == "chain"]
        trees = [row for row in table if row["strategy"] == "tree"]
        adaptive = next(row for row in table if row["strategy"] == "adaptive")
        if compiled:  # tok/s only: the compiled drafter drafts the same tokens, faster
            compiled_chains = [row for row in compiled if row["strategy"] == "chain"]
            compiled_trees = [row for row in compiled if row["strategy"] == "tree"]
            axes[1].plot([row["num_draft_tokens"] for row in compiled_chains],
                         [row["tokens_per_second"] for row in compiled_chains], "^-", label=f"chain γ, compiled, {temp}")
            axes[1].plot([row["tree_size"] / 4 for row in compiled_trees],
                         [row["tokens_per_second"] for row in compiled_trees], "v--", label=f"tree n (x/4), compiled, {temp}")
        line = axes[0].plot([row["num_draft_tokens"] for row in chains],
                            [row["tokens_per_target_forward"] for row in chains], "o-", label=f"chain γ, {temp}")[0]
        axes[0].axhline(adaptive["tokens_per_target_forward"], color=line.get_color(), ls=":", label=f"adaptive, {temp}")
        axes[1].plot([row["num_draft_tokens"] for row in chains], [row["tokens_per_second"] for row in chains], "o-",
                     color=line.get_color(), label=f"chain γ, {temp}")
        axes[1].axhline(adaptive["tokens_per_second"], color=line.get_color(), ls=":", label=f"adaptive, {temp}")
        for width in sorted({row.get("tree_width", 1) for row in trees}):  # one tree-size sweep per width
            sweep = [row for row in trees if row.get("tree_width", 1) == width]
            style = "s--" if width == 1 else "d-."
            label = f"tree n (x/4){'' if width == 1 else f', width {width}'}, {temp}"
            axes[0].plot([row["tree_size"] / 4 for row in sweep], [row["tokens_per_target_forward"] for row in sweep],
                         style, label=label)
            axes[1].plot([row["tree_size"] / 4 for row in sweep], [row["tokens_per_second"] for row in sweep], style,
                         label=label)
        for row in (next(r for r in chains if r["name"] == CHAIN_REFERENCE), adaptive,
                    max(trees, key=lambda r: r["tokens_per_target_forward"])):
            values = row["position_acceptance"]
            axes[2].plot(range(1, len(values) + 1), values, "o-" if temp == "T=0" else "x--",
                         label=f"{row['name']}, {temp}")
    axes[0].set(xlabel="γ (chain) or tree size / 4", ylabel="tokens per target forward", title="MAL: γ and tree-size sweeps")
    axes[1].set(xlabel="γ (chain) or tree size / 4", ylabel="tokens/s", title="wall-clock tokens/s")
    axes[2].set(xlabel="block position (tree: depth)", ylabel="acceptance", ylim=(0, 1.02),
                title="per-position acceptance")
    for axis in axes:
        axis.legend(fontsize=7)
    figure.suptitle("MASSV drafting strategies on the held-out world")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    models = load_models(args)
    adapter = get_adapter(models.target.config)
    cases = build_inputs(models, adapter, args)
    start = time.perf_counter()
    references = target_references(models.target, cases, args.max_new_tokens)
    runs = default_runs(tuple(args.gammas), tuple(args.tree_sizes), args.tree_depth, args.tree_top_k,
                        args.tree_min_probability, compiled=args.compiled,
                        tree_widths=tuple(width or None for width in args.tree_widths),
                        tree_min_node_probability=args.tree_min_node_probability)
    rows, target_speed = {}, {}
    for temperature in args.temperatures:
        name = f"T={temperature:g}"
        rows[name], target_speed[name] = compare_strategies(
            models.target, models.multimodal_drafter, models.processor, cases, runs, temperature,
            args.max_new_tokens, references=references, repeats=args.repeats, seed=args.seed)
    report = {
        "drafter": args.massv_drafter, "models": models.description, "num_prompts": len(cases),
        "world_seed": args.world_seed, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "target_tokens_per_second": target_speed, "rows": rows, "seconds": time.perf_counter() - start,
        "load": f"load average at the end: {_load_average()}" + (f"; {args.load_note}" if args.load_note else ""),
    }
    report["checks"] = acceptance_checks(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strategies.json").write_text(json.dumps(report, indent=2))
    (args.out / "strategies.md").write_text(markdown(report))
    plot(args.out / "strategies.png", report)
    print(markdown(report))
    print(f"report: {args.out / 'strategies.md'} (also strategies.json, strategies.png)")
    return report


if __name__ == "__main__":
    main()
