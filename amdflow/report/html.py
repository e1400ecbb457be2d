"""The campaign report: one static HTML page beside the campaign's outputs.

It holds the campaign summary (elements, templates, model, engine and run type, code
version, settings hash), counts per state, the new stable and the metastable candidates
(linked to their CIF files in promising/), the known phases used, and the phase-diagram
plots (the PNG, and the interactive plotly page in a frame). Plain HTML and CSS: it opens
from a cluster's file system with no network.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from amdflow.report.export import PromisingRow, safe_name

REPORT_FILE = "report.html"

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f3f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 2em; } .muted { color: #777; font-size: 0.85em; }
img.plot { max-width: 100%; border: 1px solid #ddd; } iframe { width: 100%; height: 720px; border: 1px solid #ddd; }
tr.stable td:first-child { border-left: 4px solid #c00; }
"""


@dataclass
class ReportData:
    """Everything the page shows (energies eV/atom)."""

    campaign: str
    chemsys: str
    summary: dict[str, Any]  # label -> value, shown as a two-column table
    counts: dict[str, dict[str, int]]  # group (candidates, fireworks, ...) -> state -> count
    rows: list[PromisingRow] = field(default_factory=list)
    promising_threshold: float = 0.05
    known: list[dict[str, Any]] = field(default_factory=list)  # thermo docs of known phases
    plot_png: str | None = None  # paths relative to the report
    plot_html: str | None = None
    plot_note: str = ""
    stages: list[tuple[str, int]] = field(default_factory=list)  # candidates that reached each stage (the funnel's cuts)
    hit_rate: float | None = None  # of the final relaxations, the fraction within promising_threshold
    final_relaxations: int = 0
    parity_png: str | None = None
    energy_labels: dict[str, str] = field(default_factory=dict)  # which model made which energy
    random_search: list[dict[str, Any]] = field(default_factory=list)  # per composition (ops.random_search_status)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # closed active-learning rounds (amdflow.stages.rounds)
    generated_at: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: Iterable[str] | None = None, table_id: str = "") -> str:
    headers = list(headers)
    head = f"<thead><tr>{''.join(f'<th>{_e(h)}</th>' for h in headers)}</tr></thead>" if any(headers) else ""
    classes = list(cls) if cls is not None else None
    body = []
    for i, row in enumerate(rows):
        klass = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{klass}>" + "".join(row) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}>{head}<tbody>{''.join(body)}</tbody></table>"


def _potential_note(record: dict[str, Any]) -> str:
    """A round's potential fine-tuning for people: adopted or not and why, and the waiting pool relaxed again."""
    pot = record.get("potential")
    if not pot:
        return "not retrained"
    again = record.get("pool_refunneled") or 0
    return pot.get("why", "") + (f"; {again} waiting candidates relaxed again under it" if again else "")


def _candidate_rows(rows: list[PromisingRow]) -> tuple[list[list[str]], list[str]]:
    out, classes = [], []
    for r in rows:
        stem = safe_name(f"{r.formula}_{r.candidate_id}")
        out.append([
            f"<td>{_e(r.formula)}</td>", f"<td>{_e(r.spacegroup)}</td>",
            f'<td class="num">{_num(r.formation_energy_per_atom)}</td>', f'<td class="num">{_num(r.e_above_hull)}</td>',
            f'<td class="num">{_num(r.e_above_known_hull)}</td>',
            f'<td class="num">{_num(r.predicted_formation_energy_per_atom)}</td>',
            f"<td>{_e(r.decomposes_to)}</td>", f"<td>{_e(r.template)}</td>",
            f'<td class="num">{_num(r.min_bond_ratio)}</td>',
            f'<td><a href="promising/{_e(stem)}.cif">{_e(r.candidate_id[:12])}</a></td>',
        ])
        classes.append("stable" if r.is_stable else "")
    return out, classes


CANDIDATE_HEADERS = ["formula", "space group", "E_f", "E above hull", "E above known hull", "E_f predicted",
                     "decomposes to", "template", "start bond / radii", "structure (CIF)"]


def render_report(data: ReportData) -> str:
    """The page as text (pure)."""
    stable = [r for r in data.rows if r.is_stable]
    meta = [r for r in data.rows if not r.is_stable]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>amdflow: {_e(data.campaign)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>amdflow campaign {_e(data.campaign)} <span class='muted'>({_e(data.chemsys)})</span></h1>",
             f"<p class='muted'>report written {_e(data.generated_at)}</p>",
             "<h2>Campaign</h2>",
             _table(["", ""], [[f"<th>{_e(k)}</th>", f"<td>{_e(v)}</td>"] for k, v in data.summary.items()], table_id="summary"),
             "<h2>Counts</h2><div class='grid'>"]
    for group, counts in data.counts.items():
        parts.append(_table([group, "count"], [[f"<td>{_e(k)}</td>", f'<td class="num">{v}</td>'] for k, v in counts.items()],
                            table_id=f"counts-{safe_name(group)}"))
    parts.append("</div>")
    if data.stages:
        parts.append("<h2>From candidates to final relaxations</h2>")
        parts.append(_table(["stage", "candidates"], [[f"<td>{_e(k)}</td>", f'<td class="num">{v}</td>'] for k, v in data.stages],
                            table_id="stages"))
        if data.hit_rate is not None:
            parts.append(f"<p id='hit-rate'>Hit rate: {data.hit_rate:.0%} of the {data.final_relaxations} final relaxations landed "
                         f"at most {data.promising_threshold} eV/atom above the hull.</p>")
        if data.energy_labels:
            parts.append(_table(["energy", "made by"], [[f"<td>{_e(k)}</td>", f"<td>{_e(v)}</td>"] for k, v in data.energy_labels.items()],
                                table_id="energy-sources"))
        if data.parity_png:
            parts.append(f"<img class='plot' id='funnel-parity' src='{_e(data.parity_png)}' alt='ML and CGCNN against the final energies'>")
    parts.append(f"<h2>New stable phases ({len(stable)})</h2>")
    parts.append("<p class='muted'>Candidates on the hull of every computed phase (energies eV/atom). A negative "
                 "'E above known hull' lies below every reference and known phase. 'Start bond / radii': the generated "
                 "cell's shortest bond over the summed covalent radii (generate.min_bond_ratio is its floor).</p>")
    rows, classes = _candidate_rows(stable)
    parts.append(_table(CANDIDATE_HEADERS, rows, classes, table_id="stable") if rows else "<p>none yet</p>")
    parts.append(f"<h2>Metastable candidates ({len(meta)}, at most {data.promising_threshold} eV/atom above the hull)</h2>")
    rows, classes = _candidate_rows(meta)
    parts.append(_table(CANDIDATE_HEADERS, rows, classes, table_id="metastable") if rows else "<p>none</p>")
    if data.rounds:
        parts.append(f"<h2>Rounds ({len(data.rounds)})</h2>")
        parts.append("<p class='muted'>Each round spends its share of the DFT budget on the best-ranked candidates; its "
                     "results retrain CGCNN and/or the funnel's potential (each adopted only when it beats the model in use on "
                     "held-out results) and the waiting pool is ranked again. A hit: a candidate the round relaxed on or near the final hull.</p>")
        rows = [[f'<td class="num">{r["k"]}</td>', f'<td class="num">{r["relaxed"]}</td>', f'<td class="num">{r["hits"]}</td>',
                 f'<td class="num">{_num(r.get("hit_rate"), 2)}</td>',
                 f"<td>{_e(', '.join(r.get('stable_on_hull') or []) or '-')}</td>",
                 f"<td>{_e(r.get('why') or ('not retrained' if not r.get('checkpoint') else ''))}</td>",
                 f"<td>{_e(_potential_note(r))}</td>",
                 f"<td>{_e(r.get('stop_reason') or '')}</td>"] for r in data.rounds]
        parts.append(_table(["round", "relaxed", "hits", "hit rate", "stable on the hull at its close", "CGCNN",
                             "funnel's potential", "rounds stopped"], rows, table_id="rounds"))
    if data.random_search:
        parts.append(f"<h2>Random structure search ({len(data.random_search)} compositions)</h2>")
        parts.append("<p class='muted'>Random symmetric starts (pyxtal) relaxed by the funnel's potential. A composition is "
                     "searched enough (AIRSS) when its lowest structure has been found stop_found times; energies are "
                     "the funnel's ML energies (eV/atom). Starts in holes of the potential are cut, not sent to DFT.</p>")
        rows = [[f"<td>{_e(r['composition'])}</td>", f'<td class="num">{r["generated"]}</td>',
                 f'<td class="num">{r["relaxed"]}</td>', f'<td class="num">{r["stopped_early"]}</td>',
                 f'<td class="num">{r.get("holes", 0)}</td>',
                 f'<td class="num">{_num(r["lowest_energy_per_atom"], 4)}</td>', f"<td>{_e(r['lowest_space_group'] or '')}</td>",
                 f'<td class="num">{r["found_lowest"]} / {r["stop_found"]}</td>',
                 f"<td>{'yes' if r['converged'] else 'not yet'}</td>"] for r in data.random_search]
        parts.append(_table(["composition", "starts", "relaxed", "stopped after the first pass", "in holes (cut)", "lowest E (ML)",
                             "its space group", "lowest found", "searched enough"], rows, table_id="random-search"))
    if data.known:
        parts.append(f"<h2>Known phases on this hull ({len(data.known)})</h2>")
        parts.append(_table(["formula", "source", "E_f", "E above hull", "stable"],
                            [[f"<td>{_e(k['formula'])}</td>", f"<td>{_e(k.get('source') or '')}</td>",
                              f'<td class="num">{_num(k["formation_energy_per_atom"])}</td>',
                              f'<td class="num">{_num(k["e_above_hull"])}</td>', f"<td>{'yes' if k['is_stable'] else ''}</td>"]
                             for k in data.known], table_id="known"))
    parts.append("<h2>Phase diagram</h2>")
    if data.plot_png:
        parts.append(f"<img class='plot' id='phase-diagram' src='{_e(data.plot_png)}' alt='phase diagram of {_e(data.chemsys)}'>")
    if data.plot_html:
        parts.append(f"<p><a href='{_e(data.plot_html)}'>interactive phase diagram</a></p>"
                     f"<iframe src='{_e(data.plot_html)}' title='interactive phase diagram'></iframe>")
    if not data.plot_png and not data.plot_html:
        parts.append(f"<p>no plot: {_e(data.plot_note or 'no hull yet')}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: Path, data: ReportData) -> Path:
    """Write ``folder/report.html`` atomically."""
    path = Path(folder) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(render_report(data), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        from amdflow.report.export import output_error

        raise output_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
