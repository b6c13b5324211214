"""Compressed drafters: angular-distance layer pruning, Wanda/2:4 sparsity, fixed masks, MACs, recipe, table."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict

import pytest
import torch
from torch import nn

from massv import MultimodalDrafter
from massv.compress import (
    Sample,
    SparsityMasks,
    Variant,
    build_batches,
    choose_block,
    compress_drafter,
    compression_table,
    drafter_macs,
    drop_layers,
    keep_mask,
    language_model_macs,
    prepare_batches,
    prune_layers,
    prune_sparse,
    recover,
)
from massv.compress.angular import block_distances, decoder_layers
from massv.compress.calibration import PreparedBatch
from massv.compress.sparsity import input_norms, prunable_linears, wanda_scores, weight_sparsity
from massv.compress.table import clone_drafter
from massv.config import CompressConfig, TrainingConfig
from massv.speculative import GenerationStats, SpeculativeGenerator
from massv.tiny import build_tiny_pair
from tests.conftest import FAMILIES, prompt_inputs, random_image
from tests.engine_helpers import noisy_multimodal_copy

NUM_LAYERS = 4
NOISE = 0.3  # on the LM head of the target-copy drafters: they agree with the target often, not always


class SkipLayer(nn.Module):
    """A decoder layer that passes the residual stream through: the model with layers 'manually skipped'."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    """A 4-layer drafter (never modified: tests work on clones) and two prepared calibration samples."""
    pair = build_tiny_pair(request.param, seed=0, drafter_kwargs={"num_layers": NUM_LAYERS})
    drafter = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer))
    samples = [Sample("What colour is the square?", random_image(0), "The square is blue."),
               Sample("How many triangles are there?", random_image(1), "There are three green triangles.")]
    batches = prepare_batches(drafter, build_batches(pair.processor, drafter.adapter, samples))
    return pair, drafter, samples, batches


def _text_ids(pair, length: int = 24) -> torch.Tensor:
    """Plain text ids, longer than Gemma's sliding window (16) so both cache kinds are exercised."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(10, len(pair.tokenizer), (1, length), generator=generator)


# ---- angular distance -------------------------------------------------------------------------------


def test_angular_distance_matches_hand_computation():
    # 4 boundaries (3 layers), batch of 2, seq 3, 2-D vectors given by their angle; row 1 is right-padded.
    angles = torch.tensor([[[0.0, 0.1, 0.0], [0.3, 0.0, 9.9]],              # entering layer 0
                           [[0.5, 0.2, math.pi / 2], [0.4, 0.3, 9.9]],      # entering layer 1
                           [[1.0, 0.2, math.pi], [0.4, 1.3, 9.9]],          # entering layer 2
                           [[1.0, 0.2, 3 * math.pi / 2], [0.4, 2.0, 9.9]]])  # leaving layer 2
    states = [torch.stack([torch.cos(a), torch.sin(a)], dim=-1) * (1 + index) for index, a in enumerate(angles)]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # Last tokens: row 0 at position 2 (angles 0, pi/2, pi, 3pi/2), row 1 at position 1 (0, 0.3, 1.3, 2.0).
    one = block_distances(states, mask, num_layers_to_drop=1, tokens="last")
    expected_one = torch.tensor([[0.5, 0.3 / math.pi], [0.5, 1.0 / math.pi], [0.5, 0.7 / math.pi]])
    torch.testing.assert_close(one, expected_one, atol=1e-6, rtol=0)
    two = block_distances(states, mask, num_layers_to_drop=2, tokens="last")
    torch.testing.assert_close(two, torch.tensor([[1.0, 1.3 / math.pi], [1.0, 1.7 / math.pi]]), atol=1e-6, rtol=0)
    three_layers_would_be_all = pytest.raises(ValueError, match="can drop")
    with three_layers_would_be_all:
        block_distances(states, mask, num_layers_to_drop=3)
    every = block_distances(states, mask, num_layers_to_drop=1, tokens="all")
    first_block = (angles[1] - angles[0]).abs()[mask] / math.pi
    torch.testing.assert_close(every[0], first_block, atol=1e-6, rtol=0)


def test_chosen_block_is_argmin_of_hand_computed_distances(setup):
    pair, drafter, _, batches = setup
    for n in (1, 2):
        decision = choose_block(drafter, batches, n)
        # By hand: record what enters every layer and what leaves the last one, average the last tokens.
        entering, leaving = [], []
        layers = decoder_layers(drafter.language_model)
        handles = [layer.register_forward_pre_hook(lambda m, args, kw: entering.append(args[0] if args else kw["hidden_states"]),
                                                   with_kwargs=True) for layer in layers]
        handles.append(layers[-1].register_forward_hook(lambda m, a, out: leaving.append(out)))
        totals = torch.zeros(NUM_LAYERS - n + 1)
        with torch.no_grad():
            for batch in batches:
                entering.clear()
                leaving.clear()
                drafter(**{**batch.drafter_kwargs(), "labels": None})
                boundary = [state[0, -1] for state in entering + leaving]
                for start in range(NUM_LAYERS - n + 1):
                    cosine = torch.dot(boundary[start], boundary[start + n]) / (boundary[start].norm() * boundary[start + n].norm())
                    totals[start] += torch.arccos(cosine.clamp(-1, 1)) / math.pi
        for handle in handles:
            handle.remove()
        hand = totals / len(batches)
        torch.testing.assert_close(torch.tensor(decision.distances, dtype=torch.float32), hand, atol=1e-5, rtol=0)
        assert decision.start_layer == int(hand.argmin())
        assert decision.dropped_layers == list(range(decision.start_layer, decision.start_layer + n))


# ---- removing layers --------------------------------------------------------------------------------


def test_pruned_lm_equals_skipping_layers_and_generates_with_cache(setup):
    pair, drafter, _, _ = setup
    pruned = clone_drafter(drafter).language_model
    reference = clone_drafter(drafter).language_model
    original_types = list(pruned.config.layer_types)
    kept = drop_layers(pruned, [1, 2])
    assert kept == [0, 3] and len(pruned.model.layers) == pruned.config.num_hidden_layers == NUM_LAYERS - 2
    assert pruned.config.layer_types == [original_types[0], original_types[3]]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    for index in (1, 2):
        reference.model.layers[index] = SkipLayer()

    input_ids = _text_ids(pair)
    with torch.no_grad():
        expected = reference(input_ids, use_cache=False).logits
        torch.testing.assert_close(pruned(input_ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
        # Token by token on a KV cache: every step must see the kept layers' own keys and values.
        from transformers import DynamicCache

        cache = DynamicCache(config=pruned.config)
        prefix = 18
        steps = [pruned(input_ids[:, :prefix], past_key_values=cache, use_cache=True).logits[:, -1]]
        for position in range(prefix, input_ids.shape[1]):
            steps.append(pruned(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        torch.testing.assert_close(torch.stack(steps, dim=1), expected[:, prefix - 1 :], atol=1e-5, rtol=1e-5)
        generated = pruned.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=True)
        reference_generated = reference.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(generated, reference_generated)


def test_pruned_drafter_round_trips_save_load_with_identical_logits(setup, tmp_path):
    pair, drafter, _, batches = setup
    pruned = clone_drafter(drafter)
    decision = prune_layers(pruned, batches, 2)
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = MultimodalDrafter.from_pretrained(tmp_path / "pruned", target=pair.target)
    assert loaded.language_model.config.num_hidden_layers == NUM_LAYERS - 2
    assert loaded.language_model.config.layer_types == pruned.language_model.config.layer_types
    kept = [index for index in range(NUM_LAYERS) if index not in decision.dropped_layers]
    assert loaded.language_model.config.layer_types == [drafter.language_model.config.layer_types[i] for i in kept]
    with torch.no_grad():
        for batch in batches:
            kwargs = {**batch.drafter_kwargs(), "labels": None}
            assert torch.equal(loaded(**kwargs).logits, pruned(**kwargs).logits)


# ---- sparsity ---------------------------------------------------------------------------------------


def test_keep_mask_counts_are_exact():
    scores = torch.rand(6, 40)
    for sparsity in (0.5, 0.7):
        mask = keep_mask(scores, sparsity, "unstructured", "row")
        assert ((~mask).sum(dim=1) == round(sparsity * 40)).all()
        # The pruned weights are the lowest-scoring ones of their row.
        assert (scores.masked_fill(mask, float("inf")).amin(dim=1) <= scores.masked_fill(~mask, float("inf")).amin(dim=1)).all()
    layer_mask = keep_mask(scores, 0.7, "unstructured", "layer")
    assert int((~layer_mask).sum()) == round(0.7 * scores.numel())
    two_four = keep_mask(scores, 0.5, "2:4")
    assert ((~two_four).reshape(6, 10, 4).sum(dim=-1) == 2).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        keep_mask(torch.rand(2, 6), 0.5, "2:4")


def test_wanda_input_norms_match_hand_computation(setup):
    _, drafter, _, batches = setup
    layer = decoder_layers(drafter.language_model)[0]
    linears = prunable_linears(drafter.language_model, 0)
    with torch.no_grad():
        norms = input_norms(drafter, batches, linears)
        squares = sum(layer.input_layernorm(drafter.embed(b.input_ids, b.image_features)).pow(2).sum(dim=(0, 1)) for b in batches)
    torch.testing.assert_close(norms["model.layers.0.self_attn.q_proj"], squares.sqrt(), atol=1e-4, rtol=1e-4)
    assert torch.equal(norms["model.layers.0.self_attn.q_proj"], norms["model.layers.0.self_attn.v_proj"])


@pytest.mark.parametrize("sparsity,pattern", [(0.7, "unstructured"), (0.5, "2:4")])
def test_sparsity_after_pruning_is_exact_per_layer(setup, sparsity, pattern):
    _, drafter, _, batches = setup
    candidate = clone_drafter(drafter)
    embedding_before = candidate.language_model.get_input_embeddings().weight.clone()
    masks, decision = prune_sparse(candidate, batches, sparsity, pattern, "wanda")
    linears = prunable_linears(candidate.language_model)
    assert len(linears) == 7 * NUM_LAYERS and set(masks.masks) == {f"{name}.weight" for name in linears}
    for name, module in linears.items():
        zeros = module.weight == 0
        assert torch.equal(zeros, ~masks.masks[f"{name}.weight"])
        if pattern == "2:4":
            assert (zeros.reshape(module.out_features, -1, 4).sum(dim=-1) == 2).all(), name
        else:
            assert (zeros.sum(dim=1) == round(sparsity * module.in_features)).all(), name
    assert torch.equal(candidate.language_model.get_input_embeddings().weight, embedding_before)
    assert set(decision.per_layer) == set(masks.masks)
    assert decision.sparsity == sparsity and decision.per_layer == pytest.approx(weight_sparsity(candidate.language_model))
    if pattern == "2:4":  # the pattern fixes the sparsity: none need be given
        _, unset = prune_sparse(clone_drafter(drafter), batches, None, "2:4", "wanda")
        assert unset.sparsity == 0.5 and set(unset.per_layer.values()) == {0.5}


def test_masks_stay_fixed_through_recovery_and_survive_save_load(setup, tmp_path):
    pair, drafter, _, batches = setup
    candidate = clone_drafter(drafter)
    masks, _ = prune_sparse(candidate, batches, 0.5, "unstructured", "magnitude")
    before = {name: module.weight.detach().clone() for name, module in prunable_linears(candidate.language_model).items()}
    losses = recover(candidate, batches, steps=3, masks=masks, learning_rate=1e-2, weight_decay=0.1, log_every=0)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    for name, module in prunable_linears(candidate.language_model).items():
        keep = masks.masks[f"{name}.weight"]
        assert (module.weight[~keep] == 0).all(), f"{name}: a pruned weight came back"
        assert not torch.equal(module.weight[keep], before[name][keep]), f"{name}: kept weights did not train"
    candidate.save_pretrained(tmp_path / "sparse")
    loaded = MultimodalDrafter.from_pretrained(tmp_path / "sparse", target=pair.target)
    recovered = SparsityMasks.from_weights(loaded.language_model)
    assert set(recovered.masks) == set(masks.masks)
    assert all(torch.equal(recovered.masks[name], masks.masks[name]) for name in masks.masks)


def test_keep_mask_defaults_ties_and_bad_arguments():
    # Defaults: unstructured, per row. Ties go to the lower index (a stable sort), so all-equal scores prune
    # the first columns of each row, or the first rows of a matrix ranked as a whole.
    ties = torch.zeros(2, 64)
    by_row = keep_mask(ties, 0.25)
    assert torch.equal(by_row, torch.arange(64).expand(2, 64) >= 16)
    by_layer = keep_mask(ties, 0.5, granularity="layer")
    assert torch.equal(by_layer, torch.tensor([[False] * 64, [True] * 64]))
    assert keep_mask(ties, 0.0).all()
    for sparsity in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got"):
            keep_mask(ties, sparsity)
    with pytest.raises(ValueError, match="pattern must be 'unstructured' or '2:4', got '1:4'"):
        keep_mask(ties, 0.5, "1:4")
    with pytest.raises(ValueError, match="granularity must be 'row' or 'layer', got 'column'"):
        keep_mask(ties, 0.5, granularity="column")
    # 2:4: the first two of each group of four.
    assert torch.equal(keep_mask(ties, 0.5, "2:4"), (torch.arange(64) % 4 >= 2).expand(2, 64))


def test_keep_mask_lives_on_the_scores_device():
    # The meta device stands in for an accelerator: a mask built on the CPU for GPU scores would not be.
    scores = torch.empty(4, 8, device="meta")
    for pattern, granularity in (("unstructured", "row"), ("unstructured", "layer"), ("2:4", "row")):
        assert keep_mask(scores, 0.5, pattern, granularity).device == scores.device, (pattern, granularity)


def test_wanda_scores_keep_a_small_weight_on_a_loud_channel():
    weight = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    channel_norms = torch.tensor([4.0, 0.25, 10.0, 1.0])
    scores = wanda_scores(weight, channel_norms)
    torch.testing.assert_close(scores, torch.tensor([[4.0, 0.5, 5.0, 3.0]]), atol=0, rtol=0)
    # Magnitude prunes the two smallest weights (0.5 and 1.0); Wanda keeps 0.5, whose channel is loud, and
    # prunes -2.0, whose channel is almost silent.
    assert keep_mask(scores, 0.5).tolist() == [[True, False, True, False]]
    assert keep_mask(weight.abs(), 0.5).tolist() == [[False, True, False, True]]


def test_prunable_linears_are_the_projections_of_the_asked_layer_by_name(setup):
    _, drafter, _, _ = setup
    language_model = clone_drafter(drafter).language_model
    layer = decoder_layers(language_model)[1]
    layer.probe = nn.Linear(4, 4)  # a linear that is not a projection: never pruned
    layer.mlp.wrapper = nn.Module()
    layer.mlp.wrapper.down_proj = nn.Linear(4, 4)  # nested deeper, still named as a projection: pruned
    attention = [f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj", "wrapper.down_proj")]
    assert set(prunable_linears(language_model, 1)) == {f"model.layers.1.{name}" for name in attention + mlp}
    assert set(prunable_linears(language_model, 0)) == {f"model.layers.0.{name}" for name in attention + mlp[:3]}
    assert len(prunable_linears(language_model)) == 7 * NUM_LAYERS + 1


def _padded(batches: list[PreparedBatch], side: str, pad_id: int = 0, extra: int = 3) -> PreparedBatch:
    """The rows of several batch-1 batches as one batch, padded on `side` past the longest row."""
    length = max(batch.input_ids.shape[1] for batch in batches) + extra
    ids = torch.full((len(batches), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batches), length, dtype=torch.long)
    for row, batch in enumerate(batches):
        n = batch.input_ids.shape[1]
        where = slice(0, n) if side == "right" else slice(length - n, length)
        ids[row, where], mask[row, where] = batch.input_ids[0], 1
    features = [batch.image_features for batch in batches if batch.image_features is not None]
    return PreparedBatch(ids, mask, torch.cat(features) if features else None)


def test_wanda_input_norms_are_float64_sums_over_every_token(setup):
    """Exactly (bit for bit) the float64 sum of squares of what each projection was fed, over all batches."""
    _, drafter, _, batches = setup
    linears = prunable_linears(drafter.language_model)
    recorded: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [module.register_forward_pre_hook(lambda _m, args, key=name: recorded[key].append(args[0][0].double()))
               for name, module in linears.items()]
    with torch.no_grad():
        for batch in batches:
            drafter(**{**batch.drafter_kwargs(), "labels": None})
    for handle in handles:
        handle.remove()
    norms = input_norms(drafter, batches, linears)
    for name in linears:
        expected = torch.cat(recorded[name]).pow(2).sum(dim=0).sqrt().float()
        assert norms[name].dtype == torch.float32 and torch.equal(norms[name], expected), name


@pytest.mark.parametrize("side", ["right", "left"])
def test_wanda_input_norms_count_only_real_tokens_of_padded_batches(setup, side):
    """Two samples padded into one batch give the norms of the two alone: padding neither counts nor leaks in."""
    _, drafter, _, batches = setup
    linears = prunable_linears(drafter.language_model)
    alone = input_norms(drafter, batches, linears)
    padded = input_norms(drafter, [_padded(batches, side)], linears)
    for name in linears:
        torch.testing.assert_close(padded[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)


def _wanda_by_hand(drafter: MultimodalDrafter, batches: list[PreparedBatch], sparsity: float,
                   sequential: bool) -> dict[str, torch.Tensor]:
    """Wanda scores |W_ij| * ||X_j||_2, from every projection's recorded inputs, in float64, on a pruned copy.

    Sequential: layer i's inputs are recorded with layers < i already pruned to the given sparsity per row.
    """
    model = clone_drafter(drafter)
    layers = decoder_layers(model.language_model)
    groups = [[index] for index in range(len(layers))] if sequential else [list(range(len(layers)))]
    scores: dict[str, torch.Tensor] = {}
    for group in groups:
        inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        handles = []
        for index in group:
            for name, module in layers[index].named_modules():
                if isinstance(module, nn.Linear):
                    def record(_module, args, key=f"model.layers.{index}.{name}.weight"):
                        inputs[key].append(args[0][0].double())  # batch size 1: every token is real
                    handles.append(module.register_forward_pre_hook(record))
        with torch.no_grad():
            for batch in batches:
                model(**{**batch.drafter_kwargs(), "labels": None})
        for handle in handles:
            handle.remove()
        for key, recorded in inputs.items():
            weight = model.language_model.get_parameter(key)
            channel_norms = torch.cat(recorded).pow(2).sum(dim=0).sqrt()
            scores[key] = weight.detach().double().abs() * channel_norms
            num_pruned = round(sparsity * weight.shape[1])
            with torch.no_grad():  # prune this layer before the next one is measured
                weight.mul_(scores[key] > scores[key].kthvalue(num_pruned, dim=1, keepdim=True).values)
    return scores


def _assert_prunes_the_lowest(scores: torch.Tensor, keep: torch.Tensor, per_row: bool, name: str) -> None:
    """Every pruned weight scores no higher than every kept weight of its row (or of the matrix)."""
    dim = 1 if per_row else None
    highest_pruned = scores.masked_fill(keep, -math.inf)
    lowest_kept = scores.masked_fill(~keep, math.inf)
    if dim is None:
        assert highest_pruned.max() <= lowest_kept.min() * (1 + 1e-5), name
    else:
        assert (highest_pruned.amax(dim=1) <= lowest_kept.amin(dim=1) * (1 + 1e-5)).all(), name


@pytest.mark.parametrize("sequential,granularity,max_samples", [(True, "row", None), (False, "row", None),
                                                               (True, "layer", None), (True, "row", 1)])
def test_wanda_prunes_the_lowest_activation_weighted_weights(setup, sequential, granularity, max_samples):
    """prune_sparse against Wanda computed by hand, and magnitude pruning (the weights alone) disagrees."""
    _, drafter, _, batches = setup
    sparsity = 0.7
    candidate = clone_drafter(drafter)
    masks, decision = prune_sparse(candidate, batches, sparsity, "unstructured", "wanda", granularity=granularity,
                                   sequential=sequential, max_samples=max_samples)
    assert (decision.sequential, decision.granularity) == (sequential, granularity)
    used = batches[:max_samples] if max_samples else batches
    # Layer-wise pruning shifts the next layers' inputs differently from per-row pruning; the hand recording
    # prunes per row, so for 'layer' only the first layer (inputs untouched by pruning) is compared.
    by_hand = _wanda_by_hand(drafter, used, sparsity, sequential)
    compared = [name for name in masks.masks if granularity == "row" or name.startswith("model.layers.0.")]
    for name in compared:
        _assert_prunes_the_lowest(by_hand[name], masks.masks[name], granularity == "row", name)
    magnitude, _ = prune_sparse(clone_drafter(drafter), None, sparsity, "unstructured", "magnitude", granularity=granularity)
    assert any(not torch.equal(masks.masks[name], magnitude.masks[name]) for name in compared)
    if granularity == "row":  # the settings matter: with the other sequencing, or every sample, the masks differ
        other = _wanda_by_hand(drafter, batches, sparsity, sequential if max_samples else not sequential)
        assert any(not torch.equal(keep_mask(other[name], sparsity), masks.masks[name]) for name in compared)


def test_prune_sparse_defaults_raw_batches_decision_and_log(setup, caplog):
    """Defaults are 50 % unstructured Wanda per row, sequential; processor batches are prepared on the way."""
    pair, drafter, samples, _ = setup
    raw = build_batches(pair.processor, drafter.adapter, samples)
    candidate = clone_drafter(drafter)
    with caplog.at_level(logging.INFO, logger="massv.compress.sparsity"):
        masks, decision = prune_sparse(candidate, raw)
    by_hand = _wanda_by_hand(drafter, prepare_batches(drafter, raw), 0.5, sequential=True)
    for name, keep in masks.masks.items():
        _assert_prunes_the_lowest(by_hand[name], keep, True, name)
    assert decision.to_dict() == {"sparsity": 0.5, "pattern": "unstructured", "score": "wanda", "granularity": "row",
                                  "sequential": True, "sparsity_per_weight": {name: 0.5 for name in masks.masks}}
    assert weight_sparsity(candidate.language_model) == decision.per_layer

    sparse = clone_drafter(drafter)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="massv.compress.sparsity"):
        masks, decision = prune_sparse(sparse, None, 0.7, score="magnitude", granularity="layer")
    total = sum(mask.numel() for mask in masks.masks.values())
    pruned = sum(round(0.7 * mask.numel()) for mask in masks.masks.values())
    assert caplog.messages == [f"pruned {pruned} of {total} decoder-layer linear weights "
                               f"({100 * pruned / total:.1f} %, unstructured, magnitude scores, per layer)"]
    assert weight_sparsity(sparse.language_model) == decision.per_layer
    assert decision.per_layer == {name: pytest.approx(round(0.7 * mask.numel()) / mask.numel()) for name, mask in masks.masks.items()}


def test_prune_sparse_rejects_what_it_cannot_do(setup):
    _, drafter, _, batches = setup
    for arguments, message in (((batches, None), "unstructured sparsity needs a target sparsity in (0, 1)"),
                               ((None, 0.5), "Wanda scores need calibration batches (or use score='magnitude')"),
                               ((batches, 0.5, "unstructured", "random"), "score must be 'wanda' or 'magnitude', got 'random'")):
        with pytest.raises(ValueError) as error:
            prune_sparse(clone_drafter(drafter), *arguments)
        assert str(error.value) == message


def test_masks_hold_pruned_weights_at_zero_even_under_momentum_from_before():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    weight = model[0].weight
    keep = torch.rand(4, 8) > 0.5
    masks = SparsityMasks({"0.weight": keep})
    assert len(masks) == 1 and masks.sparsity() == {"0.weight": pytest.approx(1 - keep.float().mean().item())}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()  # momentum on every weight, pruned or not
    optimizer.zero_grad()
    masks.apply_(model)
    assert (weight[~keep] == 0).all() and (weight[keep] != 0).all()
    handles = masks.attach(model, optimizer)
    model(torch.randn(3, 8)).pow(2).sum().backward()
    assert (weight.grad[~keep] == 0).all() and (weight.grad[keep] != 0).any()
    optimizer.step()  # the old momentum moves pruned weights; the post-step hook zeroes them again
    assert (weight[~keep] == 0).all()
    for handle in handles:
        handle.remove()
    optimizer.zero_grad()
    model(torch.randn(3, 8)).pow(2).sum().backward()
    assert (weight.grad[~keep] != 0).any()  # detached: gradients reach every weight again
    with pytest.raises(KeyError, match="mask for '1.weight' but the model has no such parameter"):
        SparsityMasks({"1.weight": keep}).apply_(model)


# ---- MACs -------------------------------------------------------------------------------------------


def test_macs_match_hand_count_and_shrink_by_expected_amounts(setup):
    pair, drafter, _, batches = setup
    config = drafter.language_model.config
    hidden, heads, kv_heads, head_dim, inter = 32, 2, 1, 16, 64
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (hidden, heads, kv_heads, inter)
    context = 40
    projections = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * inter
    window = getattr(config, "sliding_window", None)
    keys = [min(context, window) if kind == "sliding_attention" else context for kind in config.layer_types]
    attention_per_layer = [2 * heads * head_dim * k for k in keys]  # scores + values
    lm_head = hidden * config.vocab_size
    macs = language_model_macs(drafter.language_model, context)
    assert macs.attention_projections == NUM_LAYERS * projections and macs.mlp == NUM_LAYERS * mlp
    assert macs.attention == sum(attention_per_layer) and macs.lm_head == lm_head
    assert macs.per_token == NUM_LAYERS * (projections + mlp) + sum(attention_per_layer) + lm_head
    if pair.target.config.model_type == "gemma3":
        assert keys == [16, 40, 16, 40]

    pruned = clone_drafter(drafter)
    drop_layers(pruned.language_model, [1, 2])
    pruned_macs = language_model_macs(pruned.language_model, context)
    assert macs.per_token - pruned_macs.per_token == 2 * (projections + mlp) + attention_per_layer[1] + attention_per_layer[2]

    half = clone_drafter(drafter)
    prune_sparse(half, None, 0.5, "2:4", "magnitude")
    half_macs = language_model_macs(half.language_model, context)
    assert half_macs.linear * 2 == macs.linear and half_macs.attention == macs.attention and half_macs.lm_head == lm_head
    sparse = clone_drafter(drafter)
    prune_sparse(sparse, None, 0.7, "unstructured", "magnitude")
    # Kept per row: in=32 -> 32 - round(22.4) = 10, in=64 -> 64 - round(44.8) = 19.
    kept_per_layer = 10 * (heads * head_dim * 2 + kv_heads * head_dim * 2) + 10 * 2 * inter + 19 * hidden
    assert language_model_macs(sparse.language_model, context).linear == NUM_LAYERS * kept_per_layer

    processed = pair.processor.image_processor(images=[random_image(0)], return_tensors="pt")
    image_inputs = {name: processed[name] for name in drafter.adapter.image_input_names}
    with_vision = drafter_macs(drafter, context, image_inputs)
    image_tokens = 16  # both tiny families: 64x64 image -> 16 image tokens
    in_dim = drafter.config.vision_feature_dim
    assert with_vision.projector_per_image == image_tokens * (in_dim * hidden + hidden * hidden)
    assert with_vision.vision_encoder_per_image > 0 and with_vision.per_token == macs.per_token


# ---- recipe and table -------------------------------------------------------------------------------


def test_compress_drafter_records_decision_and_macs(setup):
    _, drafter, _, batches = setup
    candidate = clone_drafter(drafter)
    config = CompressConfig(method="layer_prune", num_layers_to_drop=1, calibration_samples=2, recover=True)
    result = compress_drafter(config, candidate, batches, recovery_batches=batches, recovery_steps=1,
                              training=TrainingConfig(learning_rate=1e-3, warmup_ratio=0.0, gradient_accumulation_steps=1))
    report = json.loads(json.dumps(result.to_dict()))
    assert len(report["decision"]["angular_distances"]) == NUM_LAYERS
    assert report["decision"]["start_layer"] == min(range(NUM_LAYERS), key=report["decision"]["angular_distances"].__getitem__)
    assert report["macs_after"]["num_layers"] == NUM_LAYERS - 1 and 0 < result.macs_ratio < 1
    assert len(result.recovery_losses) == 1
    with pytest.raises(ValueError, match="no recovery batches"):
        compress_drafter(CompressConfig(method="sparsity", sparsity=0.5), clone_drafter(drafter), batches)


def _engine_mal(pair, drafter: MultimodalDrafter, samples: list[Sample], max_new_tokens: int, num_draft_tokens: int = 5) -> float:
    """Pooled greedy MAL of `drafter` over `samples`, measured with the engine directly."""
    generator = SpeculativeGenerator(pair.target, drafter.eval(), pair.processor)
    runs = [generator.generate(images=[sample.image], prompt=sample.prompt, max_new_tokens=max_new_tokens,
                               num_draft_tokens=num_draft_tokens, temperature=0.0).stats for sample in samples]
    return GenerationStats.merge(runs).mean_accepted_length


def test_compression_table_with_the_engine(setup):
    pair, _, samples, _ = setup
    if pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("one family is enough for the table's plumbing; the engine is tested on both elsewhere")
    # A drafter that agrees with the target partly, so MAL is above 1 and differs between variants.
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), NOISE)
    batches = prepare_batches(drafter, build_batches(pair.processor, drafter.adapter, samples))
    weights_before = {name: value.clone() for name, value in drafter.language_model.state_dict().items()}
    variants = (Variant("dense", "dense"), Variant("drop 1 layer", "layer_prune", num_layers_to_drop=1),
                Variant("2:4 sparse", "sparsity", sparsity=0.5, pattern="2:4"))
    rows = compression_table(pair.target, drafter, pair.processor, batches, samples, batches, variants=variants,
                             max_new_tokens=16, recovery_steps=1)
    assert [(row.variant, row.recovered) for row in rows] == [(v.name, r) for v in variants for r in (False, True)]
    assert rows[0].macs_ratio == 1.0 and all(row.macs_ratio < 1 for row in rows[2:])
    assert rows[2].decision["start_layer"] in range(drafter.language_model.config.num_hidden_layers)
    assert all(torch.equal(value, weights_before[name]) for name, value in drafter.language_model.state_dict().items())
    # Each one-shot row is the MAL of that variant, rebuilt here and measured with the engine directly.
    dropped, sparse = clone_drafter(drafter), clone_drafter(drafter)
    prune_layers(dropped, batches, 1)
    prune_sparse(sparse, batches, 0.5, "2:4", "wanda")
    one_shot = {row.variant: row.mean_accepted_length for row in rows if not row.recovered}
    measured = {name: _engine_mal(pair, candidate, samples, 16)
                for name, candidate in (("dense", drafter), ("drop 1 layer", dropped), ("2:4 sparse", sparse))}
    assert one_shot == pytest.approx(measured, abs=1e-9)
    assert one_shot["dense"] > 1.0 and len(set(one_shot.values())) > 1  # the comparison can tell variants apart


@pytest.mark.parametrize("method", ["layer_prune", "sparsity"])
def test_compressed_drafter_after_recovery_is_lossless_in_the_engine(setup, method):
    """Pruned (one layer dropped, or 2:4 Wanda) and recovered, a drafter of either family still gives exactly
    `target.generate`'s greedy output, and its drafts are accepted often enough to shape that output."""
    pair, _, samples, _ = setup
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), NOISE)
    num_layers = drafter.language_model.config.num_hidden_layers
    batches = prepare_batches(drafter, build_batches(pair.processor, drafter.adapter, samples))
    config = CompressConfig(method=method, num_layers_to_drop=1 if method == "layer_prune" else None,
                            sparsity=0.5 if method == "sparsity" else None, pattern="2:4", calibration_samples=2)
    result = compress_drafter(config, drafter, batches, recovery_batches=batches, recovery_steps=3,
                              training=TrainingConfig(learning_rate=1e-3, warmup_ratio=0.0, gradient_accumulation_steps=1))
    assert len(result.recovery_losses) == 3
    if method == "layer_prune":
        assert drafter.language_model.config.num_hidden_layers == num_layers - 1
    else:
        for module in prunable_linears(drafter.language_model).values():  # recovery kept the 2:4 pattern
            assert ((module.weight == 0).reshape(module.out_features, -1, 4).sum(dim=-1) == 2).all()
    generator = SpeculativeGenerator(pair.target, drafter.eval(), pair.processor)
    runs = []
    for index, prompt in enumerate(["Describe the image.", "What colour is the square?", "Count the shapes."]):
        image = random_image(10 + index)
        output = generator.generate(images=[image], prompt=prompt, max_new_tokens=24, num_draft_tokens=4, temperature=0.0)
        inputs = prompt_inputs(pair, prompt, image)
        prompt_length = inputs["input_ids"].shape[1]
        expected = pair.target.generate(**inputs, do_sample=False, max_new_tokens=24)[:, prompt_length:]
        assert torch.equal(output.sequences[:, :prompt_length], inputs["input_ids"])
        assert torch.equal(output.generated_ids, expected), prompt
        runs.append(output.stats)
    assert GenerationStats.merge(runs).mean_accepted_length > 1.0


def test_compress_command_end_to_end(tmp_path):
    """`massv compress --config`: load target + drafter from disk, calibrate on distilled data, prune, recover, save."""
    pytest.importorskip("massv.train.builders")
    import yaml

    from massv.compress.recipe import REPORT_NAME, main

    pair = build_tiny_pair("qwen2_5_vl", seed=0, drafter_kwargs={"num_layers": 2})
    drafter = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer))
    pair.target.save_pretrained(tmp_path / "target")
    pair.processor.save_pretrained(tmp_path / "target")
    drafter.save_pretrained(tmp_path / "drafter")
    (tmp_path / "images").mkdir()
    records = []
    for index, (question, answer) in enumerate([("What colour is the square?", "The square is blue."),
                                                ("How many triangles are there?", "There are three triangles.")]):
        random_image(index).save(tmp_path / "images" / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    config = {
        "model": {"target": str(tmp_path / "target"), "drafter_lm": str(tmp_path / "drafter"), "torch_dtype": "float32"},
        "data": {"instruct_image_root": str(tmp_path / "images"), "max_length": 256, "num_workers": 0},
        "phase2": {"max_steps": 1, "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "mixed_precision": "no"},
        "compress": {"method": "sparsity", "pattern": "2:4", "calibration_samples": 2, "recover": True},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    assert main(["--config", str(tmp_path / "run.yaml"), "--drafter", str(tmp_path / "drafter"),
                 "--data", str(tmp_path / "answers.jsonl"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["decision"]["pattern"] == "2:4" and len(report["recovery_losses"]) == 1
    assert set(report["decision"]["measured_sparsity_per_weight"].values()) == {0.5}
    assert report["macs_after"]["vision_encoder_per_image"] > 0 and report["macs_ratio"] < 1
    loaded = MultimodalDrafter.from_pretrained(tmp_path / "out", target=pair.target)
    for module in prunable_linears(loaded.language_model).values():
        assert ((module.weight == 0).reshape(module.out_features, -1, 4).sum(dim=-1) == 2).all()
