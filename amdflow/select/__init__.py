"""Selection: duplicate detection among screened candidates (pure)."""

from amdflow.select.dedup import (
    Decision,
    Member,
    dedup_bucket,
    dedup_matcher,
    greedy_families,
    may_map_lattice,
    may_match,
    reduce_for_matching,
)

__all__ = ["Decision", "Member", "dedup_bucket", "dedup_matcher", "greedy_families",
    "may_map_lattice", "may_match", "reduce_for_matching"]
