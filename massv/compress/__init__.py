"""Compressed multimodal drafters: fewer layers (angular distance) or sparse weights (Wanda / magnitude).

- `angular.py`     which block of layers changes the residual stream least; removing it from an HF LM
- `sparsity.py`    one-shot unstructured / 2:4 pruning of the decoder-layer linears, masks held fixed
- `macs.py`        multiply-accumulates per drafted token (and per image for vision + projector)
- `recover.py`     short phase-2 fine-tuning on self-distilled answers with masks re-applied
- `calibration.py` the batches all of the above run on
- `recipe.py`      `compress_drafter` and the `massv compress --config` command
- `table.py`       `compression_table`: MAL vs MACs for dense / pruned / sparse, with and without recovery
"""

from massv.compress.angular import LayerPruneDecision, angular_distance, choose_block, drop_layers, prune_layers
from massv.compress.calibration import PreparedBatch, Sample, build_batches, prepare_batches
from massv.compress.macs import DrafterMACs, drafter_macs, language_model_macs
from massv.compress.recipe import CompressionResult, compress_drafter
from massv.compress.recover import recover
from massv.compress.sparsity import SparsityMasks, keep_mask, prune_sparse, weight_sparsity
from massv.compress.table import CompressionRow, Variant, compression_table, format_table

__all__ = [
    "CompressionResult",
    "CompressionRow",
    "DrafterMACs",
    "LayerPruneDecision",
    "PreparedBatch",
    "Sample",
    "SparsityMasks",
    "Variant",
    "angular_distance",
    "build_batches",
    "choose_block",
    "compress_drafter",
    "compression_table",
    "drafter_macs",
    "drop_layers",
    "format_table",
    "keep_mask",
    "language_model_macs",
    "prepare_batches",
    "prune_layers",
    "prune_sparse",
    "recover",
    "weight_sparsity",
]
