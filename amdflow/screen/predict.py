"""Batched CGCNN prediction: structures -> graphs -> one forward pass per batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Structure

from amdflow.errors import CheckpointError
from amdflow.screen.checkpoint import Checkpoint, load_checkpoint
from amdflow.screen.featurize import (
    CrystalGraph,
    atom_feature_table,
    crystal_graph,
    gaussian_expand,
)


def collate(graphs: Sequence[CrystalGraph], device: str = "cpu") -> tuple[Any, Any, Any, Any, int]:
    """One batch of crystals as tensors: atom features, bond features, neighbour indices, crystal index."""
    import torch

    table = atom_feature_table()
    offsets = np.cumsum([0] + [g.n_atoms for g in graphs[:-1]])
    atom_fea = np.concatenate([table[g.atomic_numbers] for g in graphs])
    nbr_idx = np.concatenate([g.nbr_idx + off for g, off in zip(graphs, offsets, strict=True)])
    nbr_fea = gaussian_expand(np.concatenate([g.nbr_dist for g in graphs]))
    crystal_idx = np.repeat(np.arange(len(graphs)), [g.n_atoms for g in graphs])
    return (
        torch.as_tensor(atom_fea, dtype=torch.float32, device=device),
        torch.as_tensor(nbr_fea, dtype=torch.float32, device=device),
        torch.as_tensor(nbr_idx, device=device),
        torch.as_tensor(crystal_idx, device=device),
        len(graphs),
    )


@dataclass
class CGCNNPredictor:
    """A loaded model on a device; ``predict`` returns de-normalized targets."""

    checkpoint: Checkpoint
    device: str = "cpu"

    def __post_init__(self) -> None:
        import torch

        from amdflow.screen.model import CGCNN

        arch = self.checkpoint.architecture
        if arch.orig_atom_fea_len != 92 or arch.nbr_fea_len != 41:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} expects {arch.orig_atom_fea_len} atom and "
                f"{arch.nbr_fea_len} bond features; amdflow's graphs have 92 and 41 (original CGCNN): "
                "use a checkpoint trained with the original featurization"
            )
        model = CGCNN(arch.orig_atom_fea_len, arch.nbr_fea_len, arch.atom_fea_len, arch.n_conv,
                      arch.h_fea_len, arch.n_h, arch.n_out)
        sd = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in self.checkpoint.state_dict.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} does not match the CGCNN architecture "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]}): use an original-format CGCNN checkpoint"
            )
        self.model = model.to(self.device).eval()
        atom_feature_table()  # load once here, not in every forked worker

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    def predict_graphs(self, graphs: Sequence[CrystalGraph], batch_size: int = 256) -> np.ndarray:
        """Predictions (eV/atom for the formation-energy model) for prepared graphs."""
        import torch

        out = np.empty(len(graphs))
        with torch.inference_mode():
            for start in range(0, len(graphs), batch_size):
                batch = graphs[start : start + batch_size]
                pred = self.model(*collate(batch, self.device))
                if self.checkpoint.is_classification:
                    values = torch.exp(pred[:, 1])  # probability of class 1
                else:
                    values = pred[:, 0] * self.checkpoint.normalizer_std + self.checkpoint.normalizer_mean
                out[start : start + len(batch)] = values.double().cpu().numpy()
        return out

    def predict(self, structures: Sequence[Structure], batch_size: int = 256) -> np.ndarray:
        """Predictions for pymatgen structures."""
        return self.predict_graphs([crystal_graph(s) for s in structures], batch_size=batch_size)


@lru_cache(maxsize=4)
def get_predictor(checkpoint: str = "formation-energy-per-atom", device: str = "cpu") -> CGCNNPredictor:
    """A cached predictor per (checkpoint, device) in this process."""
    return CGCNNPredictor(load_checkpoint(checkpoint), device=device)


# ---------------------------------------------------------------- parallel featurization
GRAPH_CHUNK = 32  # structures per worker task


def _init_worker() -> None:
    """One torch thread per worker: featurization is numpy/pymatgen, and 2 cores are shared."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _load_structure(source: Any) -> Structure:
    if isinstance(source, Structure):
        return source
    if isinstance(source, dict):
        return Structure.from_dict(source)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if str(source).lower().endswith(".cif"):
            # Same parser as Structure.from_file, without its post-parse composition
            # report (check_cif): 17 % faster here, identical structures (checked on
            # 500 CIFs; the tests compare predictions with Structure.from_file's).
            from pymatgen.io.cif import CifParser

            return CifParser(source, check_cif=False).parse_structures(primitive=False)[0]
        return Structure.from_file(source)


def _graph_chunk(sources: Sequence[Any]) -> list[CrystalGraph | str]:
    """Graphs of a chunk; a source that fails gives its one-line error instead."""
    out: list[CrystalGraph | str] = []
    for source in sources:
        try:
            out.append(crystal_graph(_load_structure(source)))
        except Exception as err:  # a bad file must not stop the others
            out.append(f"{type(err).__name__}: {err}".replace("\n", " ")[:300])
    return out


def iter_graphs(sources: Sequence[Any], workers: int = 1) -> Iterator[CrystalGraph | str]:
    """Graphs (or error strings) of CIF/POSCAR paths, Structure dicts or Structures, in order."""
    chunks = [sources[i : i + GRAPH_CHUNK] for i in range(0, len(sources), GRAPH_CHUNK)]
    if workers <= 1 or len(chunks) < 2:
        for chunk in chunks:
            yield from _graph_chunk(chunk)
        return
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else multiprocessing.get_context()
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for result in pool.imap(_graph_chunk, chunks):
            yield from result


_WORKER_PREDICTOR: CGCNNPredictor | None = None  # set in the parent before the fork


def _predict_chunk(sources: Sequence[Any]) -> tuple[list[float], dict[int, str], float]:
    """Worker: graphs and one batched forward for a chunk -> (values, errors, graph seconds)."""
    import time

    assert _WORKER_PREDICTOR is not None
    t0 = time.perf_counter()
    graphs = _graph_chunk(sources)
    graph_seconds = time.perf_counter() - t0
    ok = [(i, g) for i, g in enumerate(graphs) if not isinstance(g, str)]
    values = [float("nan")] * len(graphs)
    if ok:
        out = _WORKER_PREDICTOR.predict_graphs([g for _, g in ok])
        for (i, _), v in zip(ok, out, strict=True):
            values[i] = float(v)
    return values, {i: g for i, g in enumerate(graphs) if isinstance(g, str)}, graph_seconds


def _predict_in_workers(predictor: CGCNNPredictor, sources: Sequence[Any], workers: int) -> Predictions:
    import multiprocessing
    import time

    global _WORKER_PREDICTOR
    chunks = [sources[i : i + GRAPH_CHUNK] for i in range(0, len(sources), GRAPH_CHUNK)]
    values = np.full(len(sources), np.nan)
    errors: dict[int, str] = {}
    graph_seconds = 0.0
    start = time.perf_counter()
    _WORKER_PREDICTOR = predictor
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for k, (vals, errs, gsec) in enumerate(pool.imap(_predict_chunk, chunks)):
                offset = k * GRAPH_CHUNK
                values[offset : offset + len(vals)] = vals
                errors.update({offset + i: e for i, e in errs.items()})
                graph_seconds += gsec
    finally:
        _WORKER_PREDICTOR = None
    total = time.perf_counter() - start
    # worker time split by the workers' own clocks: graph part measured, the rest is forward
    return Predictions(values, errors, graph_seconds=graph_seconds / workers, forward_seconds=max(total - graph_seconds / workers, 0.0))


@dataclass
class Predictions:
    """Predictions in input order; NaN where a structure could not be featurized."""

    values: np.ndarray
    errors: dict[int, str]
    graph_seconds: float = 0.0
    forward_seconds: float = 0.0


def predict_sources(predictor: CGCNNPredictor, sources: Sequence[Any], workers: int = 1, batch_size: int = 256) -> Predictions:
    """End to end: read, featurize and predict ``sources`` (paths, Structure dicts or Structures).

    On CPU with several workers, each worker reads, featurizes and runs one batched
    forward pass per chunk (the forked model is shared copy-on-write), so the parent
    only collects numbers. On a GPU, or in one process, graphs are built (by the workers
    if any) and the forward passes run here in batches of ``batch_size`` as graphs arrive.
    Measured (BENCHMARKS.md): forward in the workers beats forward in the parent on 2 cores.
    """
    import os
    import time

    if workers > 1 and predictor.device == "cpu" and hasattr(os, "fork") and len(sources) > 2 * GRAPH_CHUNK:
        return _predict_in_workers(predictor, sources, workers)

    values = np.full(len(sources), np.nan)
    errors: dict[int, str] = {}
    pending: list[tuple[int, CrystalGraph]] = []
    forward = 0.0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal forward
        t0 = time.perf_counter()
        out = predictor.predict_graphs([g for _, g in pending], batch_size)
        forward += time.perf_counter() - t0
        values[[i for i, _ in pending]] = out
        pending.clear()

    import torch

    threads = torch.get_num_threads()
    if workers > 1:
        # The workers already use the cores; torch's own threads in this process would
        # only oversubscribe them (measured: 813 -> see BENCHMARKS.md).
        torch.set_num_threads(1)
    try:
        for index, graph in enumerate(iter_graphs(sources, workers)):
            if isinstance(graph, str):
                errors[index] = graph
                continue
            pending.append((index, graph))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    finally:
        torch.set_num_threads(threads)
    total = time.perf_counter() - start
    return Predictions(values, errors, graph_seconds=total - forward, forward_seconds=forward)
