"""How well a drafter's confidence predicts greedy acceptance, and what each stop rule would earn with it.

Teacher-forced on the target's own greedy answers (held-out world questions): at every answer position the
drafter's top-3 ids and probabilities, and whether its first choice is the target's token. Greedy drafting
follows exactly these states while its drafts are accepted, so a chain's or a width-1 tree's accepted length
under any stop rule can be replayed from them without running the engine. Time is modelled per block as
`drafts x drafter_ms + verify_ms + verified_tokens x token_ms + block_ms` plus `request_ms` per request; set
the constants to what `eval/bench_strategies.py` measures on your machine. Prints (and writes as JSON) the
confidence -> acceptance table and each rule's modelled tokens/s relative to the γ = 5 chain:

    python eval/drafter_calibration.py --massv-drafter runs/demo/phase2/<hash>/final --world-seed 2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import build_inputs, load_models  # noqa: E402

from massv.families import get_adapter  # noqa: E402

Answer = dict[str, list]  # "target": ids, "top": per position the drafter's top-3 ids, "probs": their probabilities
StopRule = Callable[[Answer, int, int], int]  # (answer, first position, positions left) -> drafts this block
CONFIDENCE_BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 1.01)


def teacher_forced(args: argparse.Namespace) -> list[Answer]:
    models = load_models(args)
    adapter = get_adapter(models.target.config)
    target, drafter = models.target, models.multimodal_drafter
    answers = []
    with torch.no_grad():
        for inputs in build_inputs(models, adapter, args):
            sequence = target.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
            prompt_length = inputs["input_ids"].shape[1]
            image_inputs = {name: inputs[name] for name in adapter.image_input_names if inputs.get(name) is not None}
            kind = drafter.config.vision_feature
            features = adapter.encode_image_features(adapter.vision_modules(target), image_inputs, (kind,))[kind]
            logits = drafter(input_ids=sequence, image_features=features).logits[0, prompt_length - 1 : -1].float()
            probs = torch.softmax(logits[:, : drafter.config.draftable_vocab_size], dim=-1).topk(3, dim=-1)
            answers.append({"target": sequence[0, prompt_length:].tolist(), "top": probs.indices.tolist(),
                            "probs": probs.values.tolist()})
    return answers


def calibration(answers: list[Answer]) -> list[dict[str, float]]:
    """Greedy acceptance of the drafter's first choice per bin of its probability."""
    rows = []
    for low, high in zip(CONFIDENCE_BINS, CONFIDENCE_BINS[1:]):
        hits = [answer["top"][t][0] == token for answer in answers for t, token in enumerate(answer["target"])
                if low <= answer["probs"][t][0] < high]
        if hits:
            rows.append({"confidence_from": low, "confidence_to": min(high, 1.0), "positions": len(hits),
                         "accepted": sum(hits) / len(hits)})
    return rows


def replay(answers: list[Answer], rule: StopRule, costs: argparse.Namespace, runner_ups: int = 0
           ) -> tuple[float, float]:
    """(modelled tokens per ms, tokens per block) of greedy blocks drafted by `rule`; `runner_ups` leaves per
    path node (a width-1 tree) let a block that misses at a node take its runner-up instead."""
    milliseconds = tokens = blocks = 0.0
    for answer in answers:
        length, position = len(answer["target"]), 1  # the prefill emits the first token
        milliseconds += costs.request_ms
        while position < length:
            drafts = max(1, min(rule(answer, position, length - position), length - position))
            accepted = 0
            while accepted < drafts and answer["top"][position + accepted][0] == answer["target"][position + accepted]:
                accepted += 1
            emitted = accepted + 1
            missed = position + accepted
            if accepted < drafts and answer["target"][missed] in answer["top"][missed][1 : 1 + runner_ups]:
                emitted += 1  # a runner-up leaf was the target's token: it is accepted, then the bonus token
            verified = 1 + drafts * (1 + runner_ups)
            milliseconds += drafts * costs.drafter_ms + costs.verify_ms + verified * costs.token_ms + costs.block_ms
            tokens += emitted
            blocks += 1
            position += emitted
    return tokens / milliseconds, tokens / blocks


def fixed(gamma: int) -> StopRule:
    return lambda answer, position, left: gamma


def path_confidence(threshold: float, most: int) -> StopRule:
    """Draft until the product of the drafter's first-choice probabilities falls below `threshold`."""
    def rule(answer: Answer, position: int, left: int) -> int:
        product, drafts = 1.0, 1
        while drafts < min(most, left):
            product *= answer["probs"][position + drafts - 1][0]
            if product < threshold:
                break
            drafts += 1
        return drafts
    return rule


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--massv-drafter", required=True)
    parser.add_argument("--world-seed", type=int, default=2, help="held-out split seed (2: the validation world)")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--drafter-ms", type=float, default=0.52, help="one drafter step, engine included")
    parser.add_argument("--verify-ms", type=float, default=3.5, help="a target verification forward, fixed part")
    parser.add_argument("--token-ms", type=float, default=0.07, help="each verified token's share of it")
    parser.add_argument("--block-ms", type=float, default=0.3, help="engine bookkeeping per block")
    parser.add_argument("--request-ms", type=float, default=15.0, help="vision + prefill per request")
    parser.add_argument("--out", type=Path, default=None, help="write the table and the replay as JSON here")
    args = parser.parse_args(argv)
    args.models, args.image_size, args.seed = "world", 64, 0
    torch.set_num_threads(1)
    answers = teacher_forced(args)
    table = calibration(answers)
    rules = {f"chain γ={gamma}": (fixed(gamma), 0) for gamma in (4, 5, 6, 7, 8, 10, 12)}
    for threshold in (0.25, 0.4, 0.55):
        rules[f"adaptive: path confidence ≥ {threshold}, ≤ 16"] = (path_confidence(threshold, 16), 0)
        rules[f"width-1 tree: path ≥ {threshold}, depth ≤ 10, best runner-up"] = (path_confidence(threshold, 10), 1)
    replayed = {name: replay(answers, rule, args, runner_ups) for name, (rule, runner_ups) in rules.items()}
    reference = replayed["chain γ=5"][0]
    print("drafter confidence -> greedy acceptance")
    for row in table:
        print(f"  [{row['confidence_from']:.2f}, {row['confidence_to']:.2f}): {row['positions']:5d} positions, "
              f"{row['accepted']:.3f} accepted")
    print("modelled tokens/s relative to chain γ=5 (MAL)")
    for name, (speed, mal) in replayed.items():
        print(f"  {name:55s} {speed / reference:.3f}x  ({mal:.2f})")
    report = {"calibration": table, "replay": {name: {"relative_speed": speed / reference, "mal": mal}
                                               for name, (speed, mal) in replayed.items()},
              "costs_ms": {key: getattr(args, key) for key in ("drafter_ms", "verify_ms", "token_ms", "block_ms",
                                                                "request_ms")}}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
