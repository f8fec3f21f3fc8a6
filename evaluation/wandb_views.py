"""The family comparison on W&B, as code: a report of a compare config's results (the table, the
quality-vs-speed plot, the sample grids of each prompt set, the training curves of each family)
and one saved workspace view of training panels per family (``val/`` scores, ``perf/``
throughput, sample grids). Saving needs a W&B key and network; ``--dry-run`` builds everything
offline and prints what would be saved.

    python -m evaluation.wandb_views --config configs/compare/shapes.yaml --entity <you> [--project t2i]

What the views read is what the runs write: training runs are tagged with their family
(``callbacks.dashboard.run_tags``) and grouped by their experiment config; ``evaluate.py`` logs
one run tagged ``evaluation`` with ``results`` (the table), ``quality_vs_speed`` and ``grid/<set>``.
"""

from __future__ import annotations

import argparse
import sys

import yaml

FAMILIES = ("diffusion", "gan", "vq", "vae", "clip")
VAL_METRICS = ("val/shapes_all_correct", "val/loss")
PERF_METRICS = ("perf/samples_per_sec", "perf/steps_per_sec", "perf/max_memory_gib")
SAMPLES_KEY = "samples"  # callbacks.SampleGrid's W&B key
EVALUATION_TAG = "evaluation"  # evaluate.log_wandb's run tag


def _modules():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as err:  # the package is a dependency; a broken environment gets the fix
        raise SystemExit(f"wandb-workspaces is not importable ({err}); pip install -e . installs it") from err
    return wr, ws, expr


def _families(cfg: dict) -> list[str]:
    """The families of a compare config's rows, in FAMILIES' order (``gan+clip`` counts as both);
    all of them when a row leaves its family to its checkpoint (read only by evaluate.py)."""
    methods = cfg.get("methods") or []
    if not methods or any(not m.get("family") for m in methods):
        return list(FAMILIES)
    named = {part for m in methods for part in str(m["family"]).split("+")}
    return [f for f in FAMILIES if f in named]


def comparison_report(cfg: dict, entity: str, project: str = "t2i", title: str | None = None):
    """A W&B report: the evaluation runs' table, plot and grids, then one panel grid per family
    with its training runs' held-out score, loss, throughput and sample grids."""
    wr, _, expr = _modules()
    sets = list(cfg.get("prompt_sets") or [])
    evaluations = wr.Runset(entity=entity, project=project, name="evaluations",
                            filters=[expr.Tags().isin([EVALUATION_TAG])])  # fmt: skip
    blocks = [
        wr.H1(title or f"Text-to-image families on {cfg.get('output', 'the compare config')}"),
        wr.P(
            "Each row is one method under one protocol: the analytic scorer's held-out rates with "
            "bootstrap 95% intervals, R-precision, FID/KID with their N, diversity and speed. "
            "Reproduce: python evaluate.py --config <compare config>."
        ),  # fmt: skip
        wr.PanelGrid(
            runsets=[evaluations],
            panels=[
                wr.WeavePanelSummaryTable(table_name="results", layout=wr.Layout(w=24, h=12)),
                wr.MediaBrowser(title="quality against speed", media_keys=["quality_vs_speed"]),
                *[wr.MediaBrowser(title=f"{s} prompts", media_keys=[f"grid/{s}"]) for s in sets],
            ],
        ),  # fmt: skip
        wr.H2("Training, by family"),
    ]
    for family in _families(cfg):
        runs = wr.Runset(entity=entity, project=project, name=family, filters=[expr.Tags().isin([family])],
                         groupby=["group"])  # fmt: skip
        blocks += [wr.H3(family), wr.PanelGrid(runsets=[runs], panels=_training_panels(wr))]
    return wr.Report(
        entity=entity,
        project=project,
        title=blocks[0].text,
        blocks=blocks,
        description="The family comparison: table, intervals, grids and training curves.",
    )


def _training_panels(wr) -> list:
    return [
        *[wr.LinePlot(title=m, x="Step", y=[m]) for m in VAL_METRICS],
        *[wr.LinePlot(title=m, x="Step", y=[m]) for m in PERF_METRICS],
        wr.MediaBrowser(title="sample grids", media_keys=[SAMPLES_KEY]),
    ]


def training_workspace(entity: str, family: str, project: str = "t2i"):
    """A saved workspace view of one family's training runs, grouped by experiment config:
    a section each for the ``val/`` scores, ``perf/`` throughput and the sample grids."""
    wr, ws, expr = _modules()
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: the families are {', '.join(FAMILIES)}")
    return ws.Workspace(
        entity=entity, project=project, name=f"{family} training",
        sections=[
            ws.Section(name="val/ scores", is_open=True,
                       panels=[wr.LinePlot(title=m, x="Step", y=[m]) for m in VAL_METRICS]),
            ws.Section(name="perf/ throughput", is_open=True,
                       panels=[wr.LinePlot(title=m, x="Step", y=[m]) for m in PERF_METRICS]),
            ws.Section(name="sample grids", is_open=True,
                       panels=[wr.MediaBrowser(title="sample grids", media_keys=[SAMPLES_KEY])]),
        ],
        runset_settings=ws.RunsetSettings(filters=[expr.Tags().isin([family])],
                                          groupby=[expr.Metric("group")]),
    )  # fmt: skip


def build(cfg: dict, entity: str, project: str = "t2i") -> tuple:
    """The report and the per-family workspaces of a compare config, not saved."""
    return comparison_report(cfg, entity, project), [
        training_workspace(entity, f, project) for f in _families(cfg)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a compare config (configs/compare/*.yaml)")
    p.add_argument("--entity", required=True, help="your W&B user or team")
    p.add_argument(
        "--project", default=None, help="W&B project (default: the config's wandb.project, else t2i)"
    )
    p.add_argument("--dry-run", action="store_true", help="build offline and print what would be saved")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f) or {}
    project = args.project or (cfg.get("wandb") or {}).get("project") or "t2i"
    report, workspaces = build(cfg, args.entity, project)
    if args.dry_run:
        print(f"report {report.title!r}: {len(report.blocks)} blocks, in {args.entity}/{project}")
        for w in workspaces:
            print(f"workspace {w.name!r}: sections {', '.join(s.name for s in w.sections)}")
        return 0
    try:
        report.save()
        print(f"report: {report.url}")
        for w in workspaces:
            w.save()
            print(f"workspace: {w.url}")
    except Exception as err:  # noqa: BLE001 - no key or no network: say so, in one line
        print(f"error: saving to W&B failed ({type(err).__name__}: {err}); saving needs `wandb login` and "
              "network; --dry-run builds the views offline", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
