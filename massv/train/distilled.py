"""The on-disk layout of self-distillation output (`massv distill` writes it, phase 2 and the input checks
read it), in a module of its own that imports nothing of massv's but its errors.

Why apart from massv.train.distill: `massv.preflight` checks that a run's distilled data is complete before
any model loads, and `massv distill` runs those checks first; both need the layout, neither the other.
"""

from __future__ import annotations

from massv.errors import MassvError

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.jsonl"


class DistillIncompleteError(MassvError, RuntimeError):
    """Phase 2 was pointed at self-distillation output that is not finished."""
