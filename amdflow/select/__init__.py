"""Selection: duplicate detection among screened candidates (pure)."""

from amdflow.select.dedup import Peer, find_representative

__all__ = ["Peer", "find_representative"]
