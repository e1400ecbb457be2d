"""Fine-tuning the funnel's SevenNet potential on the final engine's own labels (energies, forces, stresses).

Between active-learning rounds (:mod:`amdflow.stages.rounds`, ``retrain: [potential]``) the funnel's
potential is fine-tuned on what the campaign's final engine computed: each final relaxation stores
its first and last ionic steps as labels on its task document (:func:`label_frame`). The recipe is
sevenn's own fine-tuning preset (``sevenn/presets/fine_tune.yaml``: Huber loss with delta 0.01 on the
energy per atom, forces weighted 1, stresses 0.01, Adam, exponential decay), run through sevenn's
``Trainer`` from the checkpoint in use, with three choices of ours:

* **Held-out by relaxation.** A tenth of the relaxations (at least one; both of a relaxation's
  frames on one side) is held out, and the tuned model is kept only when its energy error there
  beats the checkpoint in use (:attr:`FineTuneResult.better`): a few dozen structures can make a
  universal potential worse, as a few dozen materials made CGCNN worse (``stages/rounds.py``).
* **Best epoch.** The checkpoint written is the epoch with the lowest held-out energy error.
* **Energies as the final engine computed them.** The labels are the engine's raw energies, so the
  tuned potential's energies need the correction that engine's energies need (MP2020 for VASP's PBE(+U)
  with MP's input set); :func:`tuned_correction` says which, and refuses engines whose energies lie on
  another scale (CP2K's pseudopotentials, r2SCAN), where a few structures cannot move a PBE potential.

Units: energies eV, forces eV/A, stresses eV/A^3 in ASE's sign convention (tensile positive).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from amdflow.errors import AmdflowError

logger = logging.getLogger(__name__)

#: Held-out relaxations a fine-tuned potential must be judged on before it can be adopted.
MIN_HELD_OUT = 5

#: eV/A^3 per kbar (VASP reports stresses in kbar, with the opposite sign to ASE's).
EV_A3_PER_KBAR = 1.0 / 1602.1766208


class FineTuneError(AmdflowError):
    """The potential cannot be fine-tuned as asked (the message says why and what to do)."""


def label_frame(structure: Structure, energy: float, forces: Any, stress_ev_a3: Any | None) -> dict[str, Any]:
    """One training label: a structure and its total energy (eV), forces (eV/A) and stress (3x3, eV/A^3, ASE sign)."""
    f = np.asarray(forces, dtype=float).reshape(len(structure), 3)
    s = None
    if stress_ev_a3 is not None:
        s = np.asarray(stress_ev_a3, dtype=float)
        if s.shape == (6,):  # ASE Voigt: xx yy zz yz xz xy
            xx, yy, zz, yz, xz, xy = s
            s = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        s = s.reshape(3, 3)
    return {"structure": structure.as_dict(), "energy": float(energy), "forces": np.round(f, 6).tolist(),
            "stress": None if s is None else np.round(s, 9).tolist()}


def vasp_stress_to_ase(stress_kbar: Any) -> np.ndarray:
    """VASP's stress (kbar, positive compressive: pymatgen's ionic_steps) in ASE's convention (eV/A^3, tensile positive)."""
    return -np.asarray(stress_kbar, dtype=float) * EV_A3_PER_KBAR


def tuned_correction(final_scheme: str, final_engine: str) -> str:
    """The funnel correction a SevenNet checkpoint fine-tuned on a final engine's raw energies needs.

    ``final_scheme``: the final run type's correction scheme. VASP's PBE(+U) with MP's inputs (``mp2020``): the tuned
    potential predicts uncorrected PBE(+U) energies, as SevenNet-0 does, and gets MP2020. CHGNet standing in for DFT
    (``mp2020-in-model``): its energies carry MP2020 already, so the tuned potential's need none. Anything else (CP2K,
    r2SCAN) is on another energy scale: :class:`FineTuneError`."""
    if final_scheme == "mp2020":
        return "mp2020"
    if final_scheme == "mp2020-in-model":
        return "none"
    raise FineTuneError(f"the final engine's energies ({final_engine}, correction {final_scheme}) are on another scale "
                        "than the funnel's PBE potential: fine-tuning it on them is not offered; use rounds.retrain: "
                        "[cgcnn] (the final engine must be vasp with input_set mp, or chgnet standing in)")


@dataclass
class FineTuneSettings:
    """sevenn's fine-tuning preset, sized for a campaign's round (a few dozen to a few thousand structures)."""

    epochs: int = 20
    lr: float = 1e-4  # the preset's 0.004 is for thousands of structures; a round's few dozen overfit at it
    batch_size: int = 4
    force_weight: float = 1.0
    stress_weight: float = 0.01
    huber_delta: float = 0.01
    gamma: float = 0.99
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class FineTuneResult:
    """A fine-tuned checkpoint and how it did on the held-out relaxations against the checkpoint it started from."""

    checkpoint: str | None
    n_train: int  # frames
    n_val: int
    val_relaxations: int  # the held-out relaxations (a relaxation's frames are held out together)
    parent_val_energy_mae: float  # eV/atom
    val_energy_mae: float
    parent_val_force_mae: float  # eV/A
    val_force_mae: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def better(self) -> bool:
        """The adoption rule: the tuned model's held-out energy error beats the parent's, on at least
        :data:`MIN_HELD_OUT` held-out relaxations (on one or two, a better error is noise)."""
        return self.val_relaxations >= MIN_HELD_OUT and self.val_energy_mae < self.parent_val_energy_mae

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"better": self.better}


def split_groups(groups: Sequence[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Pure: (train, validation) groups (relaxations), seeded; at least one in each when there are two or more."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise FineTuneError(f"fine-tuning needs at least 2 finished final relaxations with labels, found {len(unique)}: "
                            "let the round's relaxations finish")
    rng = random.Random(seed)
    rng.shuffle(unique)
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    return set(unique[n_val:]), set(unique[:n_val])


def _graph(frame: dict[str, Any], cutoff: float) -> Any:
    from pymatgen.io.ase import AseAtomsAdaptor
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import atoms_to_graph

    structure = Structure.from_dict(frame["structure"])
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.info["y_energy"] = float(frame["energy"])
    atoms.arrays["y_force"] = np.asarray(frame["forces"], dtype=float)
    if frame.get("stress") is not None:  # sevenn's label: minus ASE's stress, Voigt xx yy zz xy yz zx
        s = np.asarray(frame["stress"], dtype=float)
        atoms.info["y_stress"] = -np.array([s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[1, 2], s[2, 0]])
    return AtomGraphData.from_numpy_dict(atoms_to_graph(atoms, cutoff, transfer_info=False))


def _errors(trainer: Any, loader: Any) -> tuple[float, float]:
    """(energy MAE per atom, force MAE per component) of the trainer's model over a loader."""
    import sevenn._keys as key

    e_err, f_err, n_e, n_f = 0.0, 0.0, 0, 0
    trainer.model.eval()
    for batch in loader:
        batch = batch.to(trainer.device)
        out = trainer.model(batch)
        n_atoms = out[key.NUM_ATOMS].detach().reshape(-1).float()
        pred = out[key.PRED_TOTAL_ENERGY].detach().reshape(-1) / n_atoms
        ref = out[key.ENERGY].detach().reshape(-1) / n_atoms
        e_err += float((pred - ref).abs().sum())
        n_e += int(pred.numel())
        df = (out[key.PRED_FORCE].detach() - out[key.FORCE].detach()).abs()
        f_err += float(df.sum())
        n_f += int(df.numel())
    return e_err / max(n_e, 1), f_err / max(n_f, 1)


def finetune_sevennet(frames: Sequence[dict[str, Any]], groups: Sequence[str], parent: str, out: Path,
                      settings: FineTuneSettings | None = None, device: str = "cpu") -> FineTuneResult:
    """Fine-tune the SevenNet checkpoint ``parent`` (a shipped name such as '7net-0', or a file) on ``frames``
    (:func:`label_frame` dicts; ``groups[i]`` names the relaxation frame i belongs to, for the held-out split).

    Writes the best epoch's checkpoint to ``out`` (atomically: a killed run leaves none) whether or not it beats the
    parent; the caller adopts it only when :attr:`FineTuneResult.better`. Single-fidelity checkpoints only."""
    import torch
    from sevenn.train.trainer import Trainer
    from sevenn.util import load_checkpoint
    from torch_geometric.loader import DataLoader

    settings = settings or FineTuneSettings()
    if len(frames) != len(groups):
        raise ValueError("one group per frame")
    start = time.perf_counter()
    train_groups, val_groups = split_groups(groups, settings.val_fraction, settings.seed)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        cp = load_checkpoint(parent)
        model = cp.build_model()
    config = copy.deepcopy(cp.config)
    if getattr(model, "modal_map", None):
        raise FineTuneError(f"{parent} is a multi-fidelity checkpoint: fine-tuning one modal is not offered; use a "
                            "single-fidelity funnel.model (7net-0, 7net-l3i5) or rounds.retrain: [cgcnn]")
    cutoff = float(model.cutoff)
    graphs = [_graph(f, cutoff) for f in frames]
    train = [g for g, grp in zip(graphs, groups, strict=True) if grp in train_groups]
    val = [g for g, grp in zip(graphs, groups, strict=True) if grp in val_groups]
    torch.manual_seed(settings.seed)
    config.update({"loss": "huber", "loss_param": {"delta": settings.huber_delta}, "force_loss_weight": settings.force_weight,
                   "stress_loss_weight": settings.stress_weight, "is_train_stress": any(f.get("stress") is not None for f in frames),
                   "optimizer": "adam", "optim_param": {"lr": settings.lr}, "scheduler": "exponentiallr",
                   "scheduler_param": {"gamma": settings.gamma}, "device": device, "is_ddp": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer.from_config(model, config)
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = DataLoader(train, batch_size=settings.batch_size, shuffle=True, generator=generator)
    val_loader = DataLoader(val, batch_size=settings.batch_size)
    parent_e, parent_f = _errors(trainer, val_loader)
    best: tuple[float, int, dict[str, Any], float] | None = None  # the tuned epochs' best, even when worse than the parent
    history = [{"epoch": 0, "val_energy_mae": round(parent_e, 6), "val_force_mae": round(parent_f, 6)}]
    for epoch in range(1, settings.epochs + 1):
        trainer.run_one_epoch(train_loader, is_train=True)
        trainer.scheduler_step()
        e, f = _errors(trainer, val_loader)
        history.append({"epoch": epoch, "val_energy_mae": round(e, 6), "val_force_mae": round(f, 6)})
        if best is None or e < best[0]:
            best = (e, epoch, copy.deepcopy(trainer.model.state_dict()), f)
        logger.info("fine-tune epoch %d: held-out energy MAE %.4f eV/atom, force MAE %.4f eV/A", epoch, e, f)
    assert best is not None
    trainer.model.load_state_dict(best[2])
    # the state dict is in this sevenn's layout (build_model converted an older checkpoint's); a config that kept the
    # old version would have it converted again on loading (measured: 0.18 eV/atom off on SrTiO3 with no training)
    from sevenn import __version__ as sevenn_version

    config["version"] = sevenn_version
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    trainer.write_checkpoint(str(tmp), config=config, epoch=best[1])
    tmp.replace(out)
    return FineTuneResult(checkpoint=str(out), n_train=len(train), n_val=len(val), val_relaxations=len(val_groups),
                          parent_val_energy_mae=parent_e,
                          val_energy_mae=best[0], parent_val_force_mae=parent_f, val_force_mae=best[3],
                          best_epoch=best[1], epochs_run=settings.epochs, seconds=time.perf_counter() - start,
                          history=history)
