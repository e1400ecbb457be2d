"""SevenNet (Park et al., J. Chem. Theory Comput. 2024): a universal potential for the funnel.

The checkpoints amdflow offers ship inside the ``sevenn`` wheel (offline): SevenNet-0
(two releases), SevenNet-l3i5 and the multi-fidelity SevenNet-MF-0 (modal PBE or
R2SCAN). Structures are relaxed in batches through torch-sim (:mod:`amdflow.relax.torchsim_relax`),
one structure being a batch of one, so a relaxation does not depend on the path that ran it.

torch-sim 0.3.0's own SevenNet wrapper imports a name sevenn 0.13.0 no longer has
(``sevenn.calculator.torch_script_type``) and sevenn 0.13.0's wrapper needs a newer
torch-sim; :class:`SevenNetTorchSim` is the adapter between the two versions we can
install together: one SevenNet graph per structure (vesin neighbour list, the model's
cutoff), collated into one batched forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from amdflow.campaign import SEVENNET_MODELS
from amdflow.errors import AmdflowError
from amdflow.relax.base import RelaxResult, file_sha256, run_type_name
from amdflow.thermo.corrections import CorrectionPolicy, policy_for

MAX_ATOMS_IN_FLIGHT = {"cpu": 512, "cuda": 20_000}  # atoms in one batched forward pass


def sevenn_version() -> str:
    from importlib.metadata import version

    return version("sevenn")


@functools.lru_cache(maxsize=4)
def load_model(name: str, modal: str | None, device: str) -> Any:
    """The torch-sim model of a SevenNet checkpoint shipped in the wheel (cached per process)."""
    from sevenn.util import load_checkpoint

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # "no tensor-product accelerator" on CPU
        model = load_checkpoint(name).build_model()
    return SevenNetTorchSim(model, modal, device)


def _torchsim_model_base() -> type:
    from torch_sim.models.interface import ModelInterface

    return ModelInterface


class SevenNetTorchSim(_torchsim_model_base()):  # type: ignore[misc]
    """A SevenNet model behind torch-sim's ``ModelInterface``: energies (eV), forces (eV/A), stress (eV/A^3)."""

    def __init__(self, model: Any, modal: str | None, device: str) -> None:
        import torch

        super().__init__()
        self._device = torch.device(device)
        self._dtype = torch.float32  # SevenNet's precision
        self._compute_stress = True
        self._compute_forces = True
        self._memory_scales_with = "n_atoms_x_density"
        if model.modal_map and modal not in model.modal_map:
            raise ValueError(f"modal {modal!r} is not one of {list(model.modal_map)}")
        model.set_is_batch_data(True)
        self.modal = modal if model.modal_map else None
        self.cutoff = torch.tensor(model.cutoff)
        self.model = model.to(self._device).eval()

    def forward(self, state: Any, **kwargs: Any) -> dict[str, Any]:
        import sevenn._keys as key
        import torch
        from sevenn.atom_graph_data import AtomGraphData
        from torch_geometric.loader.dataloader import Collater
        from torch_sim.elastic import voigt_6_to_full_3x3_stress
        from torch_sim.neighbors import vesin_nl_ts

        graphs = []
        for b in range(state.n_systems):
            mask = state.system_idx == b
            pos = state.positions[mask]
            cell = state.row_vector_cell[b]
            numbers = state.atomic_numbers[mask]
            edges, shift_idx = vesin_nl_ts(positions=pos, cell=cell, pbc=state.pbc, cutoff=self.cutoff)
            edge_vec = pos[edges[1]] - pos[edges[0]] + torch.mm(shift_idx, cell)
            graph = AtomGraphData(**{
                key.NODE_FEATURE: numbers, key.ATOMIC_NUMBERS: numbers.to(torch.int64), key.POS: pos,
                key.EDGE_IDX: edges, key.EDGE_VEC: edge_vec, key.CELL: cell, key.CELL_SHIFT: shift_idx,
                key.CELL_VOLUME: torch.det(cell), key.NUM_ATOMS: torch.tensor(len(numbers), device=self._device),
                key.DATA_MODALITY: self.modal,
            })
            graph[key.INFO] = {}
            graphs.append(graph)
        batch = Collater([], follow_batch=None, exclude_keys=None)(graphs).to(self._device)
        output = self.model(batch)
        # SevenNet's Voigt order is (xx, yy, zz, xy, yz, zx); its stress has the opposite sign to torch-sim's
        stress = -voigt_6_to_full_3x3_stress(output[key.PRED_STRESS].detach()[..., [0, 1, 2, 4, 5, 3]])
        return {"energy": output[key.PRED_TOTAL_ENERGY].detach(), "forces": output[key.PRED_FORCE].detach(), "stress": stress}


class SevenNetEngine:
    """Relaxes structures with a SevenNet checkpoint (batched through torch-sim)."""

    name = "sevennet"

    def __init__(self, cfg: Any, device: str = "cpu", max_atoms_in_flight: int | None = None) -> None:
        self.cfg = cfg  # fmax, max_steps, relax_cell, model, modal (a FunnelConfig)
        self.device = device
        self.max_atoms_in_flight = max_atoms_in_flight or MAX_ATOMS_IN_FLIGHT.get(device.split(":")[0], 512)

    @property
    def model_name(self) -> str:
        """The shipped checkpoint's name ('7net-0', ...), or 'checkpoint' for a fine-tuned file."""
        return "checkpoint" if getattr(self.cfg, "checkpoint", None) else str(self.cfg.model)

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint file the model is read from (a shipped one inside the sevenn wheel, or the user's)."""
        user = getattr(self.cfg, "checkpoint", None)
        if user:
            if not Path(user).is_file():
                raise AmdflowError(f"funnel.checkpoint {user} not found: fix the path (a SevenNet checkpoint file)")
            return str(user)
        from sevenn.util import pretrained_name_to_path

        return str(pretrained_name_to_path(self.model_name))

    @property
    def correction(self) -> CorrectionPolicy:
        return policy_for("sevennet", self.cfg)

    @property
    def run_type(self) -> str:
        modal = f"-{self.cfg.modal.lower()}" if self.cfg.modal else ""
        return run_type_name("sevennet", f"{self.model_name}{modal}-{sevenn_version()}", self.correction.scheme, {
            "checkpoint_sha256": file_sha256(self.checkpoint_path), "modal": self.cfg.modal, "fmax": float(self.cfg.fmax),
            "max_steps": int(self.cfg.max_steps), "relax_cell": bool(self.cfg.relax_cell)})

    @property
    def note(self) -> str:
        what = (f"fine-tuned SevenNet checkpoint {Path(self.checkpoint_path).name}" if self.model_name == "checkpoint"
                else SEVENNET_MODELS.get(self.model_name, self.model_name))
        return (f"{what} universal potential (sevenn {sevenn_version()}"
                f"{', modal ' + self.cfg.modal if self.cfg.modal else ''}): an ML energy, not a DFT energy")

    def relax(self, structure: Structure, directory: Path | None = None) -> RelaxResult:
        (result,) = self.relax_many([structure])
        if isinstance(result, BaseException):
            raise result
        return result

    def relax_many(self, structures: Sequence[Structure], workers: int = 1) -> list[RelaxResult | BaseException]:
        """One batched relaxation in this process (``workers`` is not used: the batch uses the cores)."""
        from amdflow.relax.torchsim_relax import relax_structures

        model = load_model(self.checkpoint_path if self.model_name == "checkpoint" else self.model_name, self.cfg.modal,
                           self.device)
        return relax_structures(structures, model, self.cfg.fmax, self.cfg.max_steps, self.cfg.relax_cell,
                                self.max_atoms_in_flight)
