"""Write amdflow/data/element_ground_states.json.gz from the table in amdflow.thermo.ground_states.

Run it after editing that table (the tests compare the shipped file with the table):

    python scripts/make_element_ground_states.py
"""

from __future__ import annotations

from amdflow.thermo.ground_states import GROUND_STATES, write_shipped


def main() -> None:
    path = write_shipped()
    print(f"{len(GROUND_STATES)} elements written to {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
