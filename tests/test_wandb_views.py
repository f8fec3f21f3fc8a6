"""The W&B comparison report and per-family workspaces build offline from a compare config, with
the keys that evaluate.py and the training runs actually log (saving needs a key: replaced here)."""

import json
import os

import pytest
import yaml

from evaluation import wandb_views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "compare", "shapes.yaml")


@pytest.fixture(autouse=True)
def offline_server(monkeypatch):
    """Building a report's run sets asks the server for the project's id: answered here."""
    from wandb_workspaces.reports.v2 import interface

    monkeypatch.setattr(interface, "_get_api", lambda: None)
    monkeypatch.setattr(
        interface, "execute_graphql", lambda api, query, variables: {"project": {"internalId": "p"}}
    )


def _spec(obj) -> dict:
    model = obj._to_model()  # what .save() sends
    spec = model.spec if hasattr(model, "spec") else model
    return json.loads(spec.model_dump_json(by_alias=True, exclude_none=True))


def _strings(tree) -> set[str]:
    if isinstance(tree, dict):
        return {s for v in tree.values() for s in _strings(v)}
    if isinstance(tree, list):
        return {s for v in tree for s in _strings(v)}
    return {tree} if isinstance(tree, str) else set()


def test_the_report_shows_the_table_plot_grids_and_each_familys_training(monkeypatch, capsys):
    cfg = yaml.safe_load(open(CONFIG))
    saved = []
    monkeypatch.setattr(wandb_views._modules()[0].Report, "save", lambda self, **k: saved.append(_spec(self)))
    monkeypatch.setattr(wandb_views._modules()[1].Workspace, "save", lambda self: saved.append(_spec(self)))
    monkeypatch.setattr(wandb_views._modules()[0].Report, "url", property(lambda self: "report-url"))
    monkeypatch.setattr(wandb_views._modules()[1].Workspace, "url", property(lambda self: "ws-url"))
    assert wandb_views.main(["--config", CONFIG, "--entity", "someone"]) == 0
    families = ["diffusion", "gan", "vq", "vae", "clip"]  # rows leave their family to the checkpoint: all
    assert len(saved) == 1 + len(families)
    report = _strings(saved[0])
    assert {
        "results",
        "quality_vs_speed",
        "samples",
        "val/shapes_all_correct",
        "perf/samples_per_sec",
    } <= report
    assert {f"grid/{s}" for s in cfg["prompt_sets"]} <= report
    assert {"evaluation", *families} <= report  # the runsets' tag filters
    for family, ws in zip(families, saved[1:]):
        strings = _strings(ws)
        assert family in strings and not (set(families) - {family}) & strings, family
        assert {"val/shapes_all_correct", "val/loss", "perf/steps_per_sec", "samples"} <= strings
    assert "report-url" in capsys.readouterr().out


def test_a_config_of_two_families_gets_two_workspaces_and_bad_families_are_named():
    cfg = {"prompt_sets": ["single"], "methods": [{"name": "a", "family": "diffusion"},
                                                  {"name": "b", "family": "gan+clip"}]}  # fmt: skip
    report, workspaces = wandb_views.build(cfg, "someone")
    assert [w.name for w in workspaces] == ["diffusion training", "gan training", "clip training"]
    assert "grid/two_objects" not in _strings(_spec(report))
    with pytest.raises(ValueError, match="family 'gans'"):
        wandb_views.training_workspace("someone", "gans")
