"""docs/errors.md names a test for every case: each named test must exist (the table cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_case_in_the_errors_table_names_existing_tests():
    # the cases' tables; the repeated-runs table below them (scripts/repeat_faults.py) holds figures, not cases
    text = (REPO / "docs" / "errors.md").read_text().split("## Repeated runs of the fault tests")[0]
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case") and not line.startswith("| fault")]
    assert len(rows) >= 30
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", row)
        assert refs, f"no test named for: {row[:80]}"
        for path, name in refs:
            source = (REPO / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} (docs/errors.md) does not exist"
