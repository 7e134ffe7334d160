"""Global-batch ops across processes (docs/spec.md §5): the ``process_group=`` keyword of every loss, selection and
metric runs here. ``_comm`` holds the collective building blocks (uneven-shard gather with gradient, ordered
reductions, call fingerprints)."""
from ._comm import Shards, check_same_call, gather_rows, shard_layout  # noqa: F401
