"""amdflow: AI-assisted discovery of new multinary crystalline materials.

A campaign generates candidates by substituting target elements into template
structures, screens them with a CGCNN formation-energy model, removes duplicates,
relaxes the survivors (VASP through Custodian on HPC, CHGNet on a laptop) and builds
convex hulls. Execution is FireWorks on MongoDB (or an embedded store on a laptop).

Importing this package does no work: no FireWorks import, no settings read.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from os import PathLike

    from amdflow.api import Campaign

__all__ = ["__version__", "open_campaign"]


def open_campaign(campaign: str | PathLike[str], launchpad: str | PathLike[str] | None = None) -> Campaign:
    """A campaign's results, read-only: see :func:`amdflow.api.open_campaign` (imported on first use)."""
    from amdflow.api import open_campaign as _open

    return _open(campaign, launchpad)  # type: ignore[arg-type]
