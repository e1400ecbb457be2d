"""amdflow: AI-assisted discovery of new multinary crystalline materials.

A campaign generates candidates by substituting target elements into template
structures, screens them with a CGCNN formation-energy model, removes duplicates,
relaxes the survivors (VASP through Custodian on HPC, CHGNet on a laptop) and builds
convex hulls. Execution is FireWorks on MongoDB (or an embedded store on a laptop).

Importing this package does no work: no FireWorks import, no settings read.
"""

from __future__ import annotations

__version__ = "0.1.0"
