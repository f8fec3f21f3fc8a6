"""Every method of a compare config, measured by one protocol, in one table.

    python evaluate.py --config configs/compare/shapes.yaml
    python evaluate.py --config configs/compare/shapes.yaml --methods diffusion,stackgan --num-samples 512

The config lists the methods (a name, and a ``checkpoint`` saved by ``train.py fit`` or a
``model`` with ``class_path`` and ``init_args`` for methods with nothing to fit, such as
reranking) with their ``sampling`` options, and fixes the protocol: the prompt sets, the seeds,
the sample counts, the CLIP and the feature extractors. Each method is loaded through its class's
``load_from_checkpoint`` and used only through ``generate``. The output folder gets
``results.md`` (the table, the protocol and the command), ``results.csv``, ``results.json``
(everything, with the resolved config, the package versions and each checkpoint's sha256),
``quality_vs_speed.png``, one image grid per prompt set, and the W&B run (offline without a key
or network). A method that fails is reported in its row; the others are still evaluated.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import importlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from importlib import metadata

import torch
import yaml
from tqdm import tqdm

from datamodules.shapes import DATA_VERSION, HELDOUT_PARTS, PROMPT_SETS, SCORER_VERSION
from datamodules.shapes_datamodule import checkpoint_data_version
from evaluation import openmoji_protocol as OM
from evaluation import retrain
from evaluation.harness import (
    IMAGE_SEED_RULE,
    Protocol,
    RealFeatures,
    chance,
    floors,
    generate_images,
    mark_floors,
    own_r_precision,
    paired,
    paired_diversity,
    parameter_count,
    prompts_for,
    quality,
    render_real,
    sample_problems,
    training_budget,
)
from evaluation.lineage import checkpoints_named, is_clip, judge_problems, read_checkpoint

TOP_KEYS = {
    "dataset": "the data the protocol measures: shapes (default) or openmoji",
    "data_root": "openmoji: the folder of the methods' rendered data (its held-out designs are the prompts)",
    "output": "folder for results.md/csv/json, the plot, the grids and the W&B run",
    "seed": "protocol seed: prompts and every image's seed",
    "resolution": "images are compared at this side (a method's own size is resized to it)",
    "prompt_sets": f"any of {', '.join(PROMPT_SETS)}",
    "data_version": f"the shapes data version whose held-out prompts are measured ({DATA_VERSION}); a checkpoint of another version is refused",
    "part": f"the held-out part measured: test (the table), val (tuning and selection) or all; one of {', '.join(HELDOUT_PARTS)}",
    "prompts_per_set": "at most this many prompts of each set (null: every held-out prompt of the part)",
    "seeds": "images per prompt, each with its own seed (4)",
    "num_samples": "instead of seeds: images per prompt set; seeds = ceil(num_samples / prompts of the largest set)",
    "batch_size": "prompts per generate call",
    "clip": "CLIP checkpoint for CLIP score, R-precision and fid_clip (null: no CLIP columns)",
    "extractors": "FID/KID feature extractors: clip, inception, {name, open_clip, weights} or {name, class_path, init_args}",
    "inception_weights": "local pt_inception-2015-12-05 weights for the inception extractor",
    "lpips": "local VGG weights for LPIPS diversity (null: pixel distance)",
    "r_precision": "{distractors: 99}",
    "paired": "claims to test: [[method a, method b], ...]: a - b per set on the same prompts and seeds, with intervals",
    "fid": "{bootstrap: 50 (rounds of FID's 95% interval over images; 0: none), infinity: false (FID extrapolated to N = infinity)}",
    "wandb": "{project: t2i, enabled: true}",
    "methods": "the list of methods: name, checkpoint or model, sampling, family, note, own_encoders (the method's "
               "own CLIP or DAMSM checkpoint: an R-precision under it beside the judge's)",
    "cache": "folder for the real images' features per dataset and extractor (null: no cache)",
    "train": "runs that --train makes first: {name: {config, max_steps | max_time, args}} (evaluation/retrain.py)",
    "train_root": "folder of the --train runs (default runs): <train_root>/<name>/checkpoints/last.ckpt",
}
METHOD_KEYS = {"name", "checkpoint", "config", "model", "sampling", "family", "note", "own_encoders"}
COLUMNS = [  # (key, header, format)
    ("method", "method", "{}"),
    ("family", "family", "{}"),
    *[(f"shapes_{s}", s, "{:.3f}") for s in PROMPT_SETS],
    ("shapes_overall", "overall", "{:.3f}"),
    *[(f"openmoji_{s}", f"{s} (reader)", "{:.3f}") for s in OM.ANALYTIC],
    ("openmoji_overall", "overall (reader)", "{:.3f}"),
    *[(f"r_precision_{s}", f"R-prec. {s}", "{:.3f}") for s in OM.SETS],
    ("fid_clip", "FID (CLIP)", "{:.3f}"),
    ("kid_clip", "KID (CLIP)", "{:.4f}"),
    ("fid_inception", "FID (Inception)", "{:.2f}"),
    ("fid_inf_clip", "FID∞ (CLIP)", "{:.3f}"),
    ("fid_inf_inception", "FID∞ (Inception)", "{:.2f}"),
    ("clip_score", "CLIP score", "{:.1f}"),
    ("r_precision", "R-prec.", "{:.3f}"),
    ("r_precision_own", "R-prec. (own encoders)", "{:.3f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("diversity_clip", "diversity (CLIP)", "{:.3f}"),
    ("sharpness", "sharpness", "{:.2f}"),
    ("images_per_sec", "img/s", "{:.1f}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("steps", "train steps", "{:,}"),
    ("samples_seen", "samples seen", "{:,}"),
    ("train_minutes", "train min", "{:.0f}"),
    ("note", "note", "{}"),
    ("error", "error", "{}"),
]


class ConfigProblem(ValueError):
    pass


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str, overrides: argparse.Namespace) -> dict:
    """The compare config with the command line's overrides, checked before any work."""
    if not os.path.isfile(path):
        raise ConfigProblem(f"--config {path!r} not found")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    for key in cfg:
        if key not in TOP_KEYS:
            raise ConfigProblem(
                f"{path}: unknown key {key!r}{_suggest(key, TOP_KEYS)}; the keys are {', '.join(TOP_KEYS)}"
            )
    cfg.setdefault("dataset", "shapes")
    if cfg["dataset"] not in ("shapes", "openmoji"):
        raise ConfigProblem(f"{path}: dataset {cfg['dataset']!r}: choose shapes or openmoji")
    if cfg["dataset"] == "openmoji":
        if not cfg.get("data_root"):
            raise ConfigProblem(f"{path}: dataset openmoji needs data_root, the folder of the methods' OpenMoji data")
        if "data_version" in cfg:
            raise ConfigProblem(f"{path}: data_version is the shapes data's; OpenMoji's prompts come from data_root")
    cfg.setdefault("prompt_sets", list(PROMPT_SETS) if cfg["dataset"] == "shapes" else list(OM.SETS))
    cfg.setdefault("prompts_per_set", None)
    cfg.setdefault("seeds", 4)
    cfg.setdefault("num_samples", None)
    cfg.setdefault("data_version", DATA_VERSION)
    cfg.setdefault("part", "test")
    cfg.setdefault("seed", 0)
    cfg.setdefault("resolution", 32)
    cfg.setdefault("batch_size", 32)
    cfg.setdefault("cache", os.path.join("runs", "compare", "cache"))
    cfg.setdefault("extractors", ["clip"] if cfg.get("clip") else [])
    cfg.setdefault("output", os.path.join("runs", "compare", os.path.splitext(os.path.basename(path))[0]))
    for key in ("output", "seed", "num_samples", "seeds", "part"):
        value = getattr(overrides, key, None)
        if value is not None:
            cfg[key] = value
    methods = cfg.get("methods") or []
    if not isinstance(methods, list) or not methods:
        raise ConfigProblem(
            f"{path}: methods must be a non-empty list of {{name, checkpoint | model, sampling}}"
        )
    names = []
    for i, m in enumerate(methods):
        if not isinstance(m, dict) or "name" not in m:
            raise ConfigProblem(f"{path}: methods[{i}] needs a name")
        for key in m:
            if key not in METHOD_KEYS:
                raise ConfigProblem(f"methods[{m['name']}]: unknown key {key!r}{_suggest(key, METHOD_KEYS)}")
        if ("checkpoint" in m) == ("model" in m):
            raise ConfigProblem(f"methods[{m['name']}]: give exactly one of checkpoint or model")
        if "config" in m and "checkpoint" not in m:
            raise ConfigProblem(
                f"methods[{m['name']}]: config goes with a checkpoint (it names the checkpoint's class)"
            )
        names.append(m["name"])
    if overrides.methods:
        wanted = [n.strip() for n in overrides.methods.split(",") if n.strip()]
        for n in wanted:
            if n not in names:
                raise ConfigProblem(
                    f"--methods: no method {n!r} in {path}{_suggest(n, names)}; it lists {', '.join(names)}"
                )
        cfg["methods"] = [m for m in methods if m["name"] in wanted]
    try:
        retrain.entries(cfg, path)
    except retrain.TrainProblem as err:
        raise ConfigProblem(str(err)) from None
    pairs = cfg.get("paired") or []
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ConfigProblem(f"{path}: paired must be a list of [method a, method b] pairs")
    for a, b in pairs:
        for n in (a, b):
            if n not in names:
                raise ConfigProblem(f"{path}: paired names {n!r}, not a method{_suggest(n, names)}; it lists {', '.join(names)}")
    chosen = {m["name"] for m in cfg["methods"]}
    cfg["paired"] = [[a, b] for a, b in pairs if a in chosen and b in chosen]  # --methods may leave some out
    for key in cfg.get("fid") or {}:
        if key not in ("bootstrap", "infinity"):
            raise ConfigProblem(f"{path}: fid.{key} is unknown{_suggest(key, ['bootstrap', 'infinity'])}; the keys are bootstrap, infinity")
    if "folds" in (cfg.get("r_precision") or {}):
        raise ConfigProblem(
            f"{path}: r_precision.folds is gone: R-precision's interval is now a bootstrap over prompts; remove it"
        )
    for ext in cfg["extractors"]:
        if ext == "clip" and not cfg.get("clip"):
            raise ConfigProblem("extractors: clip needs the clip option (a CLIP checkpoint)")
        if isinstance(ext, str) and ext not in ("clip", "inception"):
            raise ConfigProblem(
                f"extractors: {ext!r} is not clip, inception or {{name, class_path, init_args}}"
            )
    return cfg


def protocol_of(cfg: dict) -> Protocol:
    rp, fid = cfg.get("r_precision") or {}, cfg.get("fid") or {}
    prompts = None if cfg["prompts_per_set"] is None else int(cfg["prompts_per_set"])
    protocol = Protocol(prompt_sets=list(cfg["prompt_sets"]), prompts=prompts, seeds=int(cfg["seeds"]),
                        data_version=int(cfg["data_version"]), part=str(cfg["part"]),
                        seed=int(cfg["seed"]), resolution=int(cfg["resolution"]), batch_size=int(cfg["batch_size"]),
                        distractors=int(rp.get("distractors", 99)), fid_bootstrap=int(fid.get("bootstrap", 50)),
                        fid_infinity=bool(fid.get("infinity", False)), dataset=cfg.get("dataset", "shapes"),
                        data_root=cfg.get("data_root"))  # fmt: skip
    if cfg.get("num_samples") is not None:
        largest = max(len(v) for v in prompts_for(protocol).values())
        protocol.seeds = max(1, -(-int(cfg["num_samples"]) // largest))
    return protocol


def import_class(class_path: str, option: str):
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigProblem(f"{option} {class_path!r} cannot be imported ({err})") from err


def build_extractors(cfg: dict, clip) -> dict[str, torch.nn.Module]:
    """The feature networks, each under the name its metrics carry (fid_<name>)."""
    from evaluation.metrics import CLIPImageFeatures, InceptionFeatures, TowerFeatures

    out = {}
    for ext in cfg["extractors"]:
        if ext == "clip":
            out["clip"] = CLIPImageFeatures(clip)
        elif ext == "inception":
            out["inception"] = InceptionFeatures(cfg.get("inception_weights"))
        elif isinstance(ext, dict) and "open_clip" in ext:
            from networks.open_clip_towers import OpenCLIPImageTower

            tower = OpenCLIPImageTower(ext["open_clip"], ext.get("weights"), ext.get("overrides"),
                                       option=f"extractors[{ext.get('name')}]")  # fmt: skip
            out[ext.get("name")] = TowerFeatures(tower)
        else:
            cls = import_class(ext.get("class_path", ""), f"extractors[{ext.get('name')}]: class_path")
            out[ext.get("name")] = cls(**(ext.get("init_args") or {})).eval()
    return out


def extractor_identities(cfg: dict, extractors: dict) -> dict[str, str]:
    """What makes each extractor's features what they are, for the real-feature cache's key."""
    out = {}
    for ext in cfg["extractors"]:
        if ext == "clip":
            out["clip"] = sha256(cfg["clip"])
        elif ext == "inception":
            out["inception"] = sha256(cfg["inception_weights"])
        else:
            ident = dict(ext)
            if isinstance(ext.get("weights"), str) and os.path.isfile(ext["weights"]):
                ident["weights_sha256"] = sha256(ext["weights"])
            out[ext["name"]] = json.dumps(ident, sort_keys=True)
    return out


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_config(checkpoint: str) -> dict | None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def config_class(spec: dict, name: str) -> str | None:
    """The model class a method's training ``config`` names, for a checkpoint that does not record it."""
    if not spec.get("config"):
        return None
    if not os.path.isfile(spec["config"]):
        raise ConfigProblem(f"methods[{name}].config {spec['config']!r} not found")
    with open(spec["config"]) as f:
        model = (yaml.safe_load(f) or {}).get("model") or {}
    if not isinstance(model, dict) or not model.get("class_path"):
        raise ConfigProblem(f"methods[{name}].config {spec['config']!r} names no model.class_path")
    return model["class_path"]


def load(spec: dict):
    """``(module, provenance)`` of one method: from its checkpoint, or built from class_path."""
    from callbacks.dashboard import run_tags
    from lightning_modules.base import TextToImageModule, load_method

    name = spec["name"]
    if "checkpoint" in spec:
        path = spec["checkpoint"]
        model = load_method(path, option=f"methods[{name}].checkpoint", class_path=config_class(spec, name))
        ckpt = read_checkpoint(path)
        info = {"checkpoint": os.path.abspath(path), "sha256": sha256(path),
                **training_budget(ckpt, _run_config(path))}  # fmt: skip
        class_path = f"{type(model).__module__}.{type(model).__name__}"
    else:
        class_path = (spec["model"] or {}).get("class_path", "")
        cls = import_class(class_path, f"methods[{name}].model.class_path")
        if not (isinstance(cls, type) and issubclass(cls, TextToImageModule)):
            raise ConfigProblem(
                f"methods[{name}].model.class_path {class_path!r} is not a text-to-image method (no generate)"
            )
        model = cls(**(spec["model"].get("init_args") or {})).requires_grad_(False).eval()
        args = spec["model"].get("init_args") or {}
        files = {k: v for k, v in args.items() if isinstance(v, str) and os.path.isfile(v)}
        info = {"model": spec["model"], "sha256": {k: sha256(v) for k, v in files.items()},
                "steps": None, "samples_seen": None, "train_seconds": None}  # fmt: skip
    tags = run_tags(class_path)
    info["family"] = spec.get("family") or (tags[0] if tags else "")
    info["class_path"] = class_path
    return model, info


def _checkpoints_of(spec: dict) -> list[str]:
    """The checkpoint files a method names: its ``checkpoint``, and the ``.ckpt`` paths among its
    model's init_args (a reranked generator, a guided autoencoder), and its own encoders."""
    paths = [spec["checkpoint"]] if "checkpoint" in spec else []
    paths += [spec["own_encoders"]] if spec.get("own_encoders") else []
    args = (spec.get("model") or {}).get("init_args") or {}
    return paths + [v for v in args.values() if isinstance(v, str) and v.endswith(".ckpt")]


def selected_on(path: str) -> str | None:
    """What may have chosen this checkpoint file: ``None`` for a run's ``last.ckpt`` or a run with
    no ``val/shapes_*`` monitor, else the held-out part
    its run scored (``val``, or ``all`` / ``test`` / ``unknown`` where it saw the test prompts or
    predates the split)."""
    if os.path.basename(path) == "last.ckpt" or not os.path.isfile(path):
        return None
    try:
        ckpt = read_checkpoint(path)
    except Exception:  # noqa: BLE001 - an unreadable file is load()'s error, in its own row
        return None
    # decided by the run, not the file name: any checkpoint other than the run's last.ckpt, from a
    # run that kept checkpoints by a held-out score, may be one it picked (the best, a top-k, a copy)
    picked = any(str(key).startswith("ModelCheckpoint") and "val/shapes" in str(key) for key in ckpt.get("callbacks") or {})
    if not picked:
        return None
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(path)), "config.yaml")) as f:
            run = yaml.safe_load(f) or {}
    except OSError:
        return "unknown"
    for cb in (run.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ShapesScore"):
            return (cb.get("init_args") or {}).get("part", "unknown")  # runs before the split scored them all
    return "unknown"


def selection_problems(cfg: dict) -> list[str]:
    """One selection rule: a checkpoint picked by a held-out score must have been picked on the
    validation part; one picked on prompts the table reports (or that cannot tell) is refused."""
    errors = []
    for spec in cfg["methods"]:
        for path in _checkpoints_of(spec):
            part = selected_on(path)
            if part not in (None, "val"):
                errors.append(
                    f"methods[{spec['name']}]: {path} was selected by its run's held-out score on the "
                    f"{part!r} part of the held-out prompts, which includes the test prompts this table reports; "
                    "use the run's last.ckpt, or a checkpoint selected on the val part (ShapesScore part: val)"
                )
    return errors


def data_version_problems(cfg: dict) -> list[str]:
    """Every checkpoint (a method's, those it names, the judge) trained on the shapes data must be
    of the protocol's version: another version's held-out prompts are not this one's."""
    wanted, errors = int(cfg["data_version"]), []
    named = [(f"methods[{spec['name']}]", path) for spec in cfg["methods"] for path in _checkpoints_of(spec)]
    for who, path in [*named, *([("clip (the judge)", cfg["clip"])] if cfg.get("clip") else [])]:
        try:
            found = checkpoint_data_version(read_checkpoint(path)) if os.path.isfile(path) else None
        except Exception:  # noqa: BLE001 - an unreadable file is load()'s error, in its own row
            found = None
        if found is not None and found != wanted:
            errors.append(
                f"{who}: {path} was trained on shapes data version {found}, and this protocol measures version "
                f"{wanted} (whose held-out prompts may be in version {found}'s training data): retrain it on "
                f"version {wanted} (python evaluate.py --config ... --train), or set data_version: {found}"
            )
    return errors


def same_held_out(run_root: str, root: str) -> bool:
    """Whether a run's OpenMoji data holds out exactly the protocol data's designs at its resolution
    (e.g. a ``train_fraction`` of the same training designs): the same ``heldout.jsonl`` and, in the
    manifests, everything but the training share and the shard size."""

    def read(path: str) -> bytes | None:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    held = [read(os.path.join(r, "heldout.jsonl")) for r in (run_root, root)]
    manifests = [read(os.path.join(r, "manifest.json")) for r in (run_root, root)]
    if None in held or None in manifests or held[0] != held[1]:
        return False
    a, b = ({k: v for k, v in json.loads(m).items() if k not in ("train_fraction", "shard_size")} for m in manifests)
    return a == b


def openmoji_data_problems(cfg: dict) -> list[str]:
    """On OpenMoji, every method's checkpoint must come from a run on the protocol's data (its
    held-out designs are the prompts) with the designs held out; a run whose config says
    otherwise is refused by name. A checkpoint without its run's config.yaml cannot tell and passes."""
    if cfg.get("dataset") != "openmoji":
        return []
    errors, root = [], os.path.realpath(cfg["data_root"])
    for spec in cfg["methods"]:
        for path in _checkpoints_of(spec):
            run = _run_config(path) if os.path.isfile(path) else None
            data = (run or {}).get("data")
            if not isinstance(data, dict):
                continue
            args = data.get("init_args") or {}
            who = f"methods[{spec['name']}]: {path}"
            if not str(data.get("class_path", "")).endswith("OpenMojiDataModule"):
                errors.append(f"{who} was trained on {data.get('class_path')}, not on the OpenMoji data this protocol "
                              f"measures: train it with --data configs/data/openmoji32.yaml")  # fmt: skip
            elif args.get("hold_out") is False:
                errors.append(f"{who} was trained with hold_out: false, so on the held-out designs this table "
                              "reports: that data is for a judge, never for a method")  # fmt: skip
            elif os.path.realpath(str(args.get("root", ""))) != root and not same_held_out(str(args.get("root", "")), root):
                errors.append(f"{who} was trained on {args.get('root')!r}, and this protocol's prompts are the held-out "
                              f"designs of {cfg['data_root']!r}: set data_root to the run's data, or retrain on it")  # fmt: skip
    return errors


def judge_independence_problems(cfg: dict) -> tuple[list[str], list[str]]:
    """The judge's run must be its own: trained with a seed that no run of a method (or of a
    checkpoint a method names, its CLIP included) was trained with, and, on OpenMoji, on other
    drawings of the designs (``render_seed``) than the centred ones every method trains on.
    Errors name the fix; a judge or method without its run's config.yaml gives a note."""
    from evaluation.lineage import clips_used

    judge = cfg.get("clip")
    if not judge or not os.path.isfile(judge) or not is_clip(judge):
        return [], []  # no judge, or not a CLIP: load_clip names that problem
    run = _run_config(judge)
    if run is None:
        return [], [f"the judge {judge} has no run config.yaml beside it: its seed and data cannot be checked"]
    errors, notes, seed = [], [], run.get("seed_everything")
    if not isinstance(seed, int) or isinstance(seed, bool):  # absent, or true/false (a random seed)
        notes.append(f"the judge {judge}'s run config.yaml records no fixed seed_everything ({seed!r}): "
                     "its seed cannot be checked")  # fmt: skip
        seed = None
    for spec in cfg["methods"]:
        named = _checkpoints_of(spec) + list(clips_used(spec))
        named += [p for path in named for p in checkpoints_named(path)]  # an autoencoder a prior names
        for path in dict.fromkeys(named):
            theirs = _run_config(path) if os.path.isfile(path) else None
            if theirs is None:
                notes.append(f"methods[{spec['name']}]: {path} has no run config.yaml: its seed cannot be checked against the judge's")
            elif seed is not None and theirs.get("seed_everything") == seed:
                errors.append(f"the judge {judge} was trained with seed_everything {seed}, as methods[{spec['name']}]'s "
                              f"{path} was: a judge's seed must be one no method uses; retrain the judge with another")  # fmt: skip
    data = run.get("data") if isinstance(run.get("data"), dict) else {}
    if cfg.get("dataset") == "openmoji" and (data.get("init_args") or {}).get("render_seed") is None:
        errors.append(f"the judge {judge} was trained on the centred drawings the methods train on: train it on "
                      "other drawings of the designs (data.init_args.render_seed: N, renders: K; "
                      "configs/compare/openmoji.yaml's openmoji_clip_judge)")  # fmt: skip
    return errors, notes


def load_encoders(path: str, option: str):
    """A CLIP or a DAMSM checkpoint (by what its hyperparameters hold), frozen."""
    from lightning_modules.clip import load_clip
    from lightning_modules.damsm import load_damsm

    if not os.path.isfile(path):
        raise ConfigProblem(f"{option}: {path!r} not found: give the CLIP or DAMSM checkpoint the method used")
    hparams = read_checkpoint(path).get("hyper_parameters", {})  # read once per process (the judge check read it)
    return load_damsm(path, option=option) if "gamma3" in hparams else load_clip(path, option=option)


def judge_note(spec: dict) -> str | None:
    """The config's own note for a method."""
    return spec.get("note") or None


def _fmt(key: str, value, fmt: str, row: dict | None = None) -> str:
    if value is None or value == "":
        return "" if key in ("error", "note") else "–"
    if key.startswith("kid_") and row and row.get(f"{key}_std") is not None:
        return f"{fmt.format(value)} ± {fmt.format(row[f'{key}_std'])}"
    if row and row.get(f"{key}_low") is not None:  # a 95% interval: shapes cells, R-precision
        mark = " †" if row.get(f"{key}_under_floor") else ""  # the interval does not clear the set's floor
        return f"{value:.3f} [{row[f'{key}_low']:.3f}, {row[f'{key}_high']:.3f}]{mark}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def visible_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    return [c for c in COLUMNS if any(r.get(c[0]) not in (None, "") for r in rows)]


def markdown_table(rows: list[dict]) -> str:
    cols = visible_columns(rows)
    headers = []
    for key, header, _ in cols:  # FID and KID depend on N: the header says it
        n = next((r[f"fid_{key[4:]}_n"] for r in rows if key[:4] in ("fid_", "kid_") and f"fid_{key[4:]}_n" in r), None)
        headers.append(f"{header}, N={n}" if n else header)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k), f, r) for k, _, f in cols) + " |")
    return "\n".join(lines)


FLOOR_NOTE = (
    "Floors: the all-correct rate of a stand-in that renders each prompt but ignores one word, on "
    "the same prompts and seeds, computed exactly: every value of that word (for either of two objects; "
    "`binding`: the two colours swapped or not) rendered and scored, equally weighted. † marks a cell whose 95% interval does not clear its set's floor "
    "(the highest of its words): that cell cannot show that the method reads every word the set checks."
)

OPENMOJI_FLOOR_NOTE = (
    "Floors: the reader's rate for a stand-in that draws the prompt's design in a random variant (every "
    "skin tone, or every colour of the object, equally likely), computed exactly from the renders of every "
    "variant. † marks a cell whose 95% interval does not clear its set's floor: that cell cannot show that "
    "the method reads the tone or colour word."
)


def paired_table(differences: dict[str, dict], sets: list[str]) -> str:
    """``a - b`` per set and overall, with the 95% interval of the difference; ``*`` where the
    interval excludes 0 (the claim holds on these prompts)."""
    extra = ["diversity (CLIP)"] if any("diversity (CLIP)" in d for d in differences.values()) else []
    lines = ["Paired differences (the same prompts and seeds; a bootstrap 95% interval over prompts; * where "
             "the interval excludes 0):", "", "| a - b | " + " | ".join([*sets, "overall", *extra]) + " |",
             "|" + "---|" * (len(sets) + 2 + len(extra))]  # fmt: skip
    for pair, d in differences.items():
        cells = [f"{d[s][0]:+.3f} [{d[s][1]:+.3f}, {d[s][2]:+.3f}]{' *' if d[s][1] > 0 or d[s][2] < 0 else ''}"
                 if s in d else "–" for s in [*sets, "overall", *extra]]  # fmt: skip
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def analytic_sets(protocol: Protocol) -> list[str]:
    """The sets whose images something other than a learned model reads."""
    return [s for s in protocol.prompt_sets if protocol.dataset == "shapes" or s in OM.ANALYTIC]


def floors_table(set_floors: dict[str, dict[str, float]], dataset: str = "shapes") -> str:
    if not set_floors:
        return ""
    words = list(dict.fromkeys(w for rates in set_floors.values() for w in rates if w != "floor"))
    lines = ["| set | " + " | ".join(f"ignores {w}" for w in words) + " | floor |", "|" + "---|" * (len(words) + 2)]
    for name, rates in set_floors.items():
        cells = [f"{rates[w]:.3f}" if w in rates else "" for w in words]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{rates['floor']:.3f}** |")
    return (FLOOR_NOTE if dataset == "shapes" else OPENMOJI_FLOOR_NOTE) + "\n\n" + "\n".join(lines)


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "torchvision",
        "lightning",
        "torchmetrics",
        "numpy",
        "open_clip_torch",
        "wandb",
        "lpips",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        if r.get("images_per_sec") and r.get("shapes_overall") is not None:
            ax.scatter(r["images_per_sec"], r["shapes_overall"])
            ax.annotate(r["method"], (r["images_per_sec"], r["shapes_overall"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("images per second of generate (log)")
    ax.set_ylabel("analytic all-correct rate, mean over prompt sets")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


GRID_COLUMNS = 8


def write_grids(
    images: dict[str, dict[str, torch.Tensor]], prompts: dict, out: str, columns: int = GRID_COLUMNS
) -> dict[str, str]:
    """One PNG per prompt set: a row per method (the real renders first), the first ``columns``
    prompts at seed index 0, with ``grid_<set>.txt`` naming the rows and columns."""
    from torchvision.utils import save_image

    paths = {}
    for name, items in prompts.items():
        rows, labels = [], []
        for method, sets in images.items():
            if name in sets:
                rows.append(sets[name][:columns, 0])
                labels.append(method)
        if not rows:
            continue
        grid = torch.cat(rows)
        if grid.shape[-1] < 64:  # small images, shown larger (nearest: no smoothing added)
            grid = torch.nn.functional.interpolate(grid, scale_factor=64 // grid.shape[-1], mode="nearest")
        path = os.path.join(out, f"grid_{name}.png")
        save_image((grid + 1) / 2, path, nrow=min(columns, len(items)), padding=1)
        with open(os.path.join(out, f"grid_{name}.txt"), "w") as f:
            f.write(
                "rows: "
                + ", ".join(labels)
                + "\ncolumns: "
                + " | ".join(c for c, _ in items[:columns])
                + "\n"
            )
        paths[name] = path
    return paths


def log_wandb(cfg: dict, rows: list[dict], plot: str, grids: dict[str, str], out: str) -> str | None:
    """The table, the plot and the grids as one W&B run (offline without a key or network);
    never fails the evaluation."""
    opts = cfg.get("wandb") or {}
    if opts.get("enabled", True) is False:
        return None
    try:
        import wandb

        from callbacks.wandb_logger import wandb_reachable

        mode = "online" if wandb_reachable() else "offline"
        run = wandb.init(project=opts.get("project", "t2i"), dir=out, mode=mode, job_type="evaluate",
                         name=f"compare-{os.path.basename(os.path.normpath(out))}", config=cfg,
                         tags=["evaluation"])  # fmt: skip
        cols = visible_columns(rows)
        table = wandb.Table(
            columns=[h for _, h, _ in cols], data=[[r.get(k) for k, _, _ in cols] for r in rows]
        )
        run.log({"results": table, "quality_vs_speed": wandb.Image(plot),
                 **{f"grid/{n}": wandb.Image(p) for n, p in grids.items()}})  # fmt: skip
        run.finish()
        return mode
    except Exception as err:  # noqa: BLE001 - W&B must never lose the results written to disk
        warnings.warn(f"W&B logging failed ({err}); the results are in {out}", stacklevel=2)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a compare config (configs/compare/*.yaml)")
    p.add_argument("--methods", help="comma-separated names from the config's methods (default: all)")
    p.add_argument("--num-samples", dest="num_samples", type=int, help="images per prompt set (instead of --seeds)")
    p.add_argument("--seeds", type=int, help="images per prompt")
    p.add_argument("--part", choices=HELDOUT_PARTS, help="held-out part: test (the table) or val (tuning)")
    p.add_argument("--output", help="output folder (default: the config's output)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an output folder that has some")
    p.add_argument("--seed", type=int, help="protocol seed")
    p.add_argument("--train", action="store_true",
                   help="first train (or continue, or skip when done) every run of the config's train section")  # fmt: skip
    p.add_argument("--train-only", dest="train_only",
                   help="comma-separated runs of the train section: train (or continue) just these, then stop "
                        "without evaluating; run disjoint sets at once on two machines or cores")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    command = "python evaluate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args)
        if args.train_only:
            if not cfg.get("train"):
                raise ConfigProblem(f"--train-only: {args.config} has no train section (see evaluation/retrain.py)")
            retrain.train_all(cfg, log=lambda line: print(line, flush=True), only=args.train_only.split(","))
            return 0
        if os.path.isdir(cfg["output"]) and os.listdir(cfg["output"]) and not args.overwrite:
            raise ConfigProblem(
                f"the output folder {cfg['output']} already holds results; give a new one with --output, "
                "or replace them with --overwrite"
            )
        protocol = protocol_of(cfg)
        if args.train:
            if not cfg.get("train"):
                raise ConfigProblem(f"--train: {args.config} has no train section (see evaluation/retrain.py)")
            retrain.train_all(cfg, log=lambda line: print(line, flush=True))
        # what the config's files say (the judge's and the methods' runs), before any model is loaded
        errors, notes = judge_problems(cfg)
        own_errors, own_notes = judge_independence_problems(cfg)
        errors = errors + own_errors + selection_problems(cfg)
        errors += data_version_problems(cfg) if cfg["dataset"] == "shapes" else openmoji_data_problems(cfg)
        notes = notes + own_notes
        if errors:
            raise ConfigProblem("; ".join(errors))
        clip = None
        if cfg.get("clip"):
            from lightning_modules.clip import load_clip

            clip = load_clip(cfg["clip"], option="clip")
        extractors = build_extractors(cfg, clip)
        lpips = None
        if cfg.get("lpips"):
            from networks.perceptual import PerceptualLoss

            lpips = PerceptualLoss(cfg["lpips"], option="lpips")
        errors, sample_notes = sample_problems(protocol, extractors)
        notes = sample_notes + notes
        if errors:
            raise ConfigProblem("; ".join(errors))
        for note in notes:
            warnings.warn(note, stacklevel=1)
    except (ConfigProblem, ValueError, OSError) as err:  # retrain.TrainProblem is a ValueError
        sys.stderr.write(f"error: {err}\n")
        return 2
    from networks.errors import ConfigError

    out = cfg["output"]
    os.makedirs(out, exist_ok=True)
    prompts = prompts_for(protocol)
    total = protocol.seeds * sum(len(v) for v in prompts.values())
    real = render_real(prompts, protocol)
    identities = extractor_identities(cfg, extractors)
    features = RealFeatures(protocol, real, cfg["cache"], identities)
    again = RealFeatures(protocol, render_real(prompts, protocol, draw=1), cfg["cache"], identities, draw=1)
    reference = {"method": "real renders", "family": "reference",
                 **_scalars(quality(real, prompts, protocol, again, clip, extractors, lpips))}  # fmt: skip
    chance_row = {"method": "chance", "family": "reference", **chance(prompts, protocol, real, clip)}
    set_floors = floors(prompts, protocol)
    rows, details, images, hits, spread = [], {}, {"real renders": real}, {}, {}
    bar = tqdm(total=len(cfg["methods"]) * (total + 1), unit="img", desc="evaluate", file=sys.stderr)
    for spec in cfg["methods"]:
        name = spec["name"]
        row = {"method": name, "family": spec.get("family", "")}
        try:
            bar.set_description(f"{name}: load")
            model, info = load(spec)
            model.to(args.device)
            row["family"] = info["family"]
            row["note"] = judge_note(spec)
            own = load_encoders(spec["own_encoders"], f"methods[{name}].own_encoders") if spec.get("own_encoders") else None
            bar.set_description(f"{name}: generate")
            sets, seconds, n = generate_images(
                model.generate, prompts, protocol, spec.get("sampling"), bar.update
            )
            bar.set_description(f"{name}: score")
            q = quality(sets, prompts, protocol, features, clip, extractors, lpips,
                        status=lambda metric, name=name: bar.set_description(f"{name}: {metric}"))  # fmt: skip
            bar.update(1)
            row.update(_scalars(q))
            hits[name] = q["shapes_hits"]
            if own is not None:  # the method's own CLIP or DAMSM, beside the judge (on the judge's device)
                bar.set_description(f"{name}: own encoders")
                row.update(own_r_precision(own, sets, prompts, protocol))
            if "diversity_clip_per_prompt" in q:
                spread[name] = q["diversity_clip_per_prompt"]
            row.update(images_per_sec=n / max(seconds, 1e-9), params_m=parameter_count(model) / 1e6,
                       steps=info.get("steps"), samples_seen=info.get("samples_seen"),
                       train_minutes=(info["train_seconds"] / 60) if info.get("train_seconds") else None)  # fmt: skip
            details[name] = {"provenance": info, "shapes_detail": q["shapes_detail"],
                             "generate_seconds": seconds, "images": n, "sampling": spec.get("sampling") or {}}  # fmt: skip
            images[name] = {s: x[:GRID_COLUMNS, :1] for s, x in sets.items()}  # only what the grids show
            del model
        except (
            ConfigProblem,
            ConfigError,
            OSError,
            ValueError,
            RuntimeError,
            NotImplementedError,
            TypeError,
        ) as err:
            row["error"] = f"{type(err).__name__}: {err}".replace("\n", " ")
            details[name] = {"error": row["error"], "traceback": traceback.format_exc()}
            bar.update(total + 1)
        rows.append(row)
    bar.close()
    all_rows = [*rows, reference, chance_row]
    mark_floors(all_rows, set_floors, protocol.prefix)
    differences = {f"{a} - {b}": paired(hits[a], hits[b], protocol.seed) for a, b in cfg["paired"]
                   if hits.get(a) and hits.get(b)}  # fmt: skip
    for a, b in cfg["paired"]:  # and the judge's diversity, per prompt, on the same prompts and seeds
        if f"{a} - {b}" in differences and a in spread and b in spread:
            differences[f"{a} - {b}"]["diversity (CLIP)"] = paired_diversity(spread[a], spread[b], protocol.seed)
    plot = os.path.join(out, "quality_vs_speed.png")
    write_plot(rows, plot)
    grids = write_grids(images, prompts, out)
    write_files(out, cfg, protocol, command, all_rows, details, clip is not None, machine(args.device), set_floors,
                differences)  # fmt: skip
    mode = log_wandb(cfg, all_rows, plot, grids, out)
    print(markdown_table(all_rows) + "\n\n" + floors_table(set_floors, protocol.dataset))
    if differences:
        print("\n" + paired_table(differences, analytic_sets(protocol)))
    print(
        f"\nwritten to {out}/ (results.md, results.csv, results.json, quality_vs_speed.png, grid_*.png"
        + (f", W&B {mode} run)" if mode else ")")
    )
    return 1 if any("error" in r for r in rows) else 0


def _scalars(q: dict) -> dict:
    return {k: v for k, v in q.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def machine(device: str) -> str:
    """Where img/s was measured: the accelerator, or the CPU with its thread count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    return f"CPU, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} core(s), {platform.machine()}"


def write_files(out: str, cfg: dict, protocol: Protocol, command: str, rows: list[dict], details: dict,
                has_clip: bool, where: str, set_floors: dict | None = None,
                differences: dict | None = None) -> None:  # fmt: skip
    cols = visible_columns(rows)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _, _ in cols])
        for r in rows:
            w.writerow([r.get(k, "") for k, _, _ in cols])
    record = {"command": command, "config": cfg, "protocol": protocol.as_dict(), "image_seed": IMAGE_SEED_RULE, "scorer_version": SCORER_VERSION, "rows": rows,
              "methods": details, "floors": set_floors, "paired": differences, "packages": package_versions(), "machine": where, "platform": platform.platform(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    openmoji = protocol.dataset == "openmoji"
    lines = [
        f"# Comparison on the {protocol.dataset} prompt sets",
        "",
        f"Command: `{command}`",
        "",
        f"Protocol: the `{protocol.part}` part of the held-out "
        + (f"designs of the OpenMoji data in `{protocol.data_root}` (no training caption names them: `heldout.jsonl`)"
           if openmoji else f"prompts of shapes data version {protocol.data_version} (no training scene contains them)")
        + "; prompts per set: "
        + ", ".join(f"{n} {len(v)}" for n, v in prompts_for(protocol).items())
        + f"; {protocol.seeds} image(s) per prompt, each with its own seed, protocol seed {protocol.seed}, "
        f"compared at {protocol.resolution} px, {protocol.batch_size} prompts per `generate` call.",
        "",
        ("The `(reader)` columns are the variant reader's rate (no learned model: each image is compared with the "
         "renders of every skin tone or colour of its design, and the nearest names it) on the tone and colour sets; "
         "`overall (reader)` is their mean. The gender and design sets have no analytic reading: their column is the "
         "judge's R-precision among the names of every design in the prompt's language. " if openmoji else
        f"The shapes columns are the analytic scorer's (version {SCORER_VERSION}) all-correct rate per prompt set "
        "(no learned model judges them: the primary columns); `overall` is their mean. ")
        + (
            "CLIP score, R-precision and fid_clip/kid_clip use the CLIP "
            + f"`{cfg.get('clip')}`; R-precision "
            f"is AttnGAN's R@1 with up to {protocol.distractors} distractor captions of the same set (none that is "
            "true of the image; a tie counts 1/(k+1)), with its prompt-level bootstrap 95% interval. "
            if has_clip
            else ""
        )
        + ("The `real renders` row is each design's one drawing (the ceiling; a design has one image, so its FID "
           "against itself is 0 by construction), `chance` judges those renders against another prompt of their set. "
           if openmoji else
           "The `real renders` row is the renderer's own images of the same prompts (the ceiling; its FID is "
           "against a second independent draw), `chance` judges those renders against another prompt of their set. ")
        + f"img/s is measured on this machine ({where}) and varies between runs; every other number is fixed by "
        "the seed. "
        + (f"FID comes with its bootstrap 95% interval over images ({protocol.fid_bootstrap} rounds): the spread "
           "of FID at this N, not an interval for FID at infinite N; it does not rank methods whose intervals "
           "overlap. " if protocol.fid_bootstrap else "")
        + ("FID∞ is FID extrapolated to infinitely many generated images (a line in 1/N through N/2..N of "
           "them; the real set stays at N, so the part of FID's bias that comes from it remains). "
           if protocol.fid_infinity else ""),
        "",
        "Prompt sets: " + "; ".join(f"`{s}`: {(OM.SETS if openmoji else PROMPT_SETS)[s]}" for s in protocol.prompt_sets) + ".",
        "",
        f"Image seeds: {IMAGE_SEED_RULE}. Diversity: mean pairwise "
        + ("LPIPS (VGG)" if cfg.get("lpips") else "absolute pixel difference on a [0, 1] scale")
        + " between the images of one prompt.",
        "",
        markdown_table(rows),
        "",
        *([floors_table(set_floors, protocol.dataset), ""] if set_floors else []),
        *([paired_table(differences, analytic_sets(protocol)), ""] if differences else []),
        *(["Trained by `--train` (each run's budget as stated; the table's steps, samples seen and minutes are "
           "read from the checkpoints):", "", *retrain.budget_lines(cfg), ""] if cfg.get("train") else []),
        "Reproduce: the resolved config, the seeds, the package versions and each checkpoint's sha256 are in "
        "results.json.",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
