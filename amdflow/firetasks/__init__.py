"""FireWorks Firetasks, one thin shell per stage.

DATABASE CONTRACT: FireWorks stores each task as ``{{module.ClassName}}``. These paths
are permanent; never rename or move a class without leaving an alias at the old path:

* ``{{amdflow.firetasks.stages.PredictTask}}``
* ``{{amdflow.firetasks.stages.DedupTask}}``
* ``{{amdflow.firetasks.stages.FunnelTask}}``
* ``{{amdflow.firetasks.stages.RelaxTask}}``
* ``{{amdflow.firetasks.stages.RelaxReferenceTask}}``
* ``{{amdflow.firetasks.stages.RelaxKnownTask}}``
* ``{{amdflow.firetasks.stages.AnalyzeTask}}``
"""

from amdflow.firetasks.stages import (
    AnalyzeTask,
    DedupTask,
    FunnelTask,
    PredictTask,
    RelaxKnownTask,
    RelaxReferenceTask,
    RelaxTask,
)

__all__ = ["AnalyzeTask", "DedupTask", "FunnelTask", "PredictTask", "RelaxKnownTask", "RelaxReferenceTask", "RelaxTask"]
