"""Candidate generation: template sources, substitution, volume rule, content-hash ids (pure)."""

from amdflow.generate.substitute import (
    GenerateReport,
    candidate_id,
    generate_candidates,
    substitute,
    substitutions,
)

__all__ = ["GenerateReport", "candidate_id", "generate_candidates", "substitute", "substitutions"]
