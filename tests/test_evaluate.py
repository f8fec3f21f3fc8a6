"""The comparison command and its protocol: the GenEval-style prompt sets and their scorer checks,
R-precision against hand-computed and trained-CLIP values, and ``evaluate.py`` end to end on two
tiny methods of different families, with sockets blocked, a failing method in its own row, the
same table for the same seed, and clear errors for bad input."""

import glob
import hashlib
import json
import os
import socket
from importlib import metadata

import numpy as np
import pytest
import torch
import yaml
from conftest import BLOCK_CAPTIONS, block_images

import evaluate
from datamodules.shapes import PROMPT_SETS, objects_for, prompt_set, render, score
from evaluation.metrics import r_precision, r_precision_hits
from evaluation.wandb_records import history_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_wandb_left_behind():
    """evaluate.main runs W&B in this process: its service and the WANDB_* variables that
    wandb.init sets must not outlive the test, or the train.py runs of later tests inherit them
    and their own W&B start fails."""
    before = dict(os.environ)
    yield
    import wandb

    wandb.teardown()
    os.environ.clear()
    os.environ.update(before)


@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_each_prompt_set_scores_its_renders_right_and_noise_wrong(name):
    prompts = prompt_set(name, 20, seed=0)
    assert len({c for c, _ in prompts}) == len(prompts) == (20 if name != "single" else 20)
    rng = np.random.default_rng(0)
    renders, noise, others = [], [], []
    for i, (_, attrs) in enumerate(prompts):
        for _ in range(3):
            img = render(objects_for(attrs, rng), 32)
            renders.append(score(img, attrs)["all"])
            noise.append(score(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), attrs)["all"])
            others.append(score(img, prompts[(i + 1) % len(prompts)][1])["all"])  # another prompt's scene
    assert np.mean(renders) >= 0.97
    assert np.mean(noise) <= 0.05
    assert np.mean(others) <= (0.5 if name == "two_objects" else 0.1)  # two_objects ignores colour


def test_prompt_sets_are_fixed_by_their_seed_and_differ_across_seeds():
    assert prompt_set("position", 10, seed=3) == prompt_set("position", 10, seed=3)
    assert prompt_set("position", 10, seed=3) != prompt_set("position", 10, seed=4)
    with pytest.raises(ValueError, match="unknown prompt set 'colour'.*colour_binding"):
        prompt_set("colour", 4)


class TableCLIP(torch.nn.Module):
    """A fake CLIP with given embeddings: image i is row i of ``images``, caption c is ``texts[c]``."""

    def __init__(self, images, texts):
        super().__init__()
        self.images, self.texts = images, texts

    def encode_image(self, images):
        return self.images[: len(images)]

    def encode_text(self, prompts):
        return torch.stack([self.texts[p] for p in prompts])


def test_r_precision_with_a_fake_clip_equals_the_hand_computed_rate():
    e = torch.eye(5)
    texts = {f"p{i}": e[i] for i in range(5)}
    # image 0 is nearest its caption p0, image 1 nearer p3 than its own p1, image 2 nearest p2
    images = torch.stack([e[0], 0.4 * e[1] + 0.9 * e[3], e[2] + 0.1 * e[4]])
    clip = TableCLIP(images, texts)
    pool = list(texts)  # four distractors: every other caption, whatever the draw
    mean, low, high = r_precision(clip, torch.zeros(3, 3, 8, 8), ["p0", "p1", "p2"], pool, distractors=4)
    assert mean == pytest.approx(2 / 3) and low == 0.0 and high == 1.0  # three prompts: a wide interval
    # a tie with k distractors at the top counts 1 / (k + 1): image 0 as near p3 and p4 as its own p0
    tied = TableCLIP(torch.stack([e[0] + e[3] + e[4], e[1], e[2]]), texts)
    assert r_precision_hits(tied, torch.zeros(3, 3, 8, 8), ["p0", "p1", "p2"], pool, 4) == [1 / 3, 1.0, 1.0]
    # a caption true of the image (same(prompt, caption)) is never a distractor: p3 is p1's twin
    twins = lambda prompt, caption: {prompt, caption} == {"p1", "p3"}  # noqa: E731
    assert r_precision_hits(clip, torch.zeros(3, 3, 8, 8), ["p0", "p1", "p2"], pool, 4, same=twins) == [1.0] * 3


def test_r_precision_of_a_perfect_judge_is_one_on_every_set_where_twins_are_true_too():
    """The "and" sets hold each prompt's twin with its objects swapped: a judge that reads the
    objects (and so cannot tell twins apart) scored 0.58 before twins left the distractors."""
    from datamodules.shapes import scene_key
    from evaluation.harness import Protocol, distractor_pool, prompts_for, same_scene

    protocol = Protocol(prompts=20, seeds=1)
    for name, items in prompts_for(protocol).items():
        pool = distractor_pool(name, 0)
        keys = sorted({scene_key(a) for _, a in [*pool, *items]})
        axis = {k: torch.nn.functional.one_hot(torch.tensor(i), len(keys)).float() for i, k in enumerate(keys)}
        texts = {c: axis[scene_key(a)] for c, a in [*pool, *items]}
        judge = TableCLIP(torch.stack([texts[c] for c, _ in items]), texts)
        hits = r_precision_hits(judge, torch.zeros(len(items), 3, 8, 8), [c for c, _ in items], [c for c, _ in pool],
                                99, torch.Generator().manual_seed(0), same_scene(items, pool))  # fmt: skip
        assert hits == [1.0] * len(items), name


def test_r_precision_of_a_trained_clip_is_near_one_on_real_images_and_chance_on_noise(tiny_methods):
    from lightning_modules.clip import load_clip

    clip = load_clip(tiny_methods["clip"])
    real, _, _ = r_precision(clip, block_images(), list(BLOCK_CAPTIONS), list(BLOCK_CAPTIONS), distractors=3)
    assert real == 1.0
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(200, 3, 16, 16, generator=g) * 2 - 1
    prompts = [BLOCK_CAPTIONS[i] for i in torch.randint(0, 4, (200,), generator=g).tolist()]
    rate, _, _ = r_precision(clip, noise, prompts, list(BLOCK_CAPTIONS), distractors=3)
    assert 0.1 < rate < 0.45  # chance is 1/4


@pytest.fixture
def no_network(monkeypatch):
    """Sockets may reach only this machine (W&B's own service talks to it over localhost)."""
    real_connect = socket.socket.connect
    attempts = []

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family != socket.AF_UNIX and host not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(address)
            raise OSError(f"network blocked in this test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def _config(tmp_path, tiny_methods, **changes) -> str:
    cfg = {
        "seed": 0, "resolution": 32, "prompt_sets": ["single", "counting"], "prompts_per_set": 4,
        "num_samples": 8, "batch_size": 8, "clip": tiny_methods["clip"], "cache": str(tmp_path / "cache"),
        "extractors": ["clip", {"name": "colour", "class_path": "tiny_module.ColourStats"}],
        "methods": [
            {"name": "cvae", "checkpoint": tiny_methods["cvae"]},
            {"name": "gan", "checkpoint": tiny_methods["gan"]},
            {"name": "missing", "checkpoint": str(tmp_path / "nowhere.ckpt")},
            {"name": "clip-as-method", "checkpoint": tiny_methods["clip"]},
            {"name": "not-a-method", "model": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 2}}},
        ],
    }  # fmt: skip
    cfg.update(changes)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_evaluate_writes_the_table_files_plot_grids_and_wandb_run_offline(tiny_methods, tmp_path, no_network):
    bare = torch.load(tiny_methods["cvae"], weights_only=False)  # as if saved without the CLI: no class recorded
    del bare["hyper_parameters"]["_class_path"]
    torch.save(bare, tmp_path / "bare.ckpt")
    (tmp_path / "cvae.yaml").write_text("model:\n  class_path: lightning_modules.cvae.ConditionalVAE\n")
    config = _config(tmp_path, tiny_methods)
    cfg = yaml.safe_load(open(config))
    cfg["methods"].insert(1, {"name": "cvae-by-config", "checkpoint": str(tmp_path / "bare.ckpt"),
                              "config": str(tmp_path / "cvae.yaml")})  # fmt: skip
    cfg["paired"] = [["gan", "cvae"]]
    open(config, "w").write(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert evaluate.main(["--config", config, "--output", str(out)]) == 1  # two methods fail, in their rows
    assert not no_network
    record = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in record["rows"]}
    assert list(rows) == [
        "cvae",
        "cvae-by-config",
        "gan",
        "missing",
        "clip-as-method",
        "not-a-method",
        "real renders",
        "chance",
    ]
    same = {k: v for k, v in rows["cvae"].items() if k not in ("method", "images_per_sec")}
    assert {k: v for k, v in rows["cvae-by-config"].items() if k not in ("method", "images_per_sec")} == same
    assert "methods[clip-as-method].checkpoint" in rows["clip-as-method"]["error"]
    assert "is not a text-to-image method's checkpoint" in rows["clip-as-method"]["error"]
    assert (
        "methods[missing].checkpoint" in rows["missing"]["error"] and "not found" in rows["missing"]["error"]
    )
    assert "methods[not-a-method].model.class_path" in rows["not-a-method"]["error"]
    assert "no generate" in rows["not-a-method"]["error"]
    for name, family in (("cvae", "vae"), ("gan", "gan")):
        r = rows[name]
        assert r["family"] == family and "error" not in r
        for key in ("shapes_single", "shapes_counting", "shapes_overall", "fid_clip", "kid_clip", "fid_colour",
                    "kid_colour", "clip_score", "r_precision", "diversity", "images_per_sec", "params_m"):  # fmt: skip
            assert isinstance(r[key], float), (name, key)
        assert r["steps"] > 0
        provenance = record["methods"][name]["provenance"]
        assert provenance["sha256"] == hashlib.sha256(open(tiny_methods[name], "rb").read()).hexdigest()
    assert rows["real renders"]["shapes_overall"] == 1.0  # the scorer on the renderer's own images
    assert rows["real renders"]["fid_colour"] < rows["gan"]["fid_colour"]
    assert rows["chance"]["r_precision"] == pytest.approx(np.mean([1 / 100, 1 / 96]))  # pools of 432 and 96
    assert rows["chance"]["shapes_overall"] < 0.2  # the renders judged against another prompt of their set
    assert record["protocol"]["seeds"] == 2 and record["packages"]["torch"] == metadata.version("torch")
    assert record["config"]["methods"][0]["checkpoint"] == tiny_methods["cvae"]
    md = (out / "results.md").read_text()
    assert "python evaluate.py --config" in md and "| cvae | vae |" in md and "MissingFileError" in md
    for r in (rows["gan"], rows["real renders"]):  # every scorer cell with its prompt-level interval
        for key in ("shapes_single", "shapes_counting", "shapes_overall"):
            assert r[f"{key}_low"] <= r[key] <= r[f"{key}_high"], key
    assert f"| {rows['gan']['shapes_single']:.3f} [{rows['gan']['shapes_single_low']:.3f}," in md
    n = 2 * 2 * 4  # sets x prompts x seeds: FID and KID say on how many images they stand
    assert f"FID (CLIP), N={n}" in md and f"KID (CLIP), N={n}" in md and rows["gan"]["fid_clip_n"] == n
    gan_line = next(line for line in md.splitlines() if line.startswith("| gan |"))
    assert f"{rows['gan']['kid_clip']:.4f} ± {rows['gan']['kid_clip_std']:.4f}" in gan_line
    assert set(record["floors"]) == {"single", "counting"} and 0 < record["floors"]["counting"]["floor"] < 1
    assert "ignores count" in md and "| counting |" in md  # the floors under the table
    diff = record["paired"]["gan - cvae"]  # a claim, paired: the same prompts and seeds
    for key in ("single", "counting", "overall"):
        assert diff[key][0] == pytest.approx(rows["gan"][f"shapes_{key}"] - rows["cvae"][f"shapes_{key}"])
        assert diff[key][1] <= diff[key][0] <= diff[key][2]
    assert "| gan - cvae |" in md
    for r in (rows["gan"], rows["cvae"], rows["real renders"]):  # the judge's diversity between seeds
        assert r["diversity_clip_low"] <= r["diversity_clip"] <= r["diversity_clip_high"]
    assert diff["diversity (CLIP)"][0] == pytest.approx(rows["gan"]["diversity_clip"] - rows["cvae"]["diversity_clip"])
    assert "diversity (CLIP)" in md.split("| gan - cvae |")[0].splitlines()[-2]  # a column of the paired table
    real = rows["real renders"]  # right on every image of 4 prompts: the exact bound, too wide to clear a floor
    assert real["shapes_single_low"] == pytest.approx(0.025 ** (1 / 4)) and real["shapes_single_high"] == 1.0
    for key in ("single", "counting"):
        assert real[f"shapes_{key}_under_floor"] == (real[f"shapes_{key}_low"] <= record["floors"][key]["floor"])
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["method", "family", "shapes_single", "shapes_counting"]
    assert (out / "quality_vs_speed.png").stat().st_size > 1000
    assert (out / "grid_single.png").exists()
    assert "rows: real renders, cvae, cvae-by-config, gan" in (out / "grid_single.txt").read_text()
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))
    keys = history_keys(run_file)
    assert {"results/_type", "results/nrows", "quality_vs_speed/_type", "grid/single/_type"} <= keys


def test_the_same_seed_gives_the_same_table_and_real_features_come_from_the_cache(tiny_methods, tmp_path):
    config = _config(tmp_path, tiny_methods, methods=[{"name": "cvae", "checkpoint": tiny_methods["cvae"]}],
                     extractors=["clip"], wandb={"enabled": False})  # fmt: skip
    tables = []
    for run in ("a", "b", "c"):
        seed = ["--seed", "1"] if run == "c" else []
        assert evaluate.main(["--config", config, "--output", str(tmp_path / run), *seed]) == 0
        rows = json.loads((tmp_path / run / "results.json").read_text())["rows"]
        tables.append([{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows])
    assert tables[0] == tables[1]
    assert tables[0] != tables[2]
    cached = sorted(glob.glob(str(tmp_path / "cache" / "real_clip_*.pt")))
    assert len(cached) == 4  # two seeds x (the renders, the second draw for the real row)
    for path in cached:  # the next run reads the real features from here
        torch.save(torch.zeros_like(torch.load(path)), path)
    assert evaluate.main(["--config", config, "--output", str(tmp_path / "d")]) == 0
    row = json.loads((tmp_path / "d" / "results.json").read_text())["rows"][0]
    assert row["fid_clip"] != tables[0][0]["fid_clip"] and row["shapes_overall"] == tables[0][0]["shapes_overall"]


def test_bad_input_is_a_clear_error_before_any_work(tiny_methods, tmp_path, capsys):
    def error(**changes) -> str:
        out = tmp_path / "never"
        args = changes.pop("args", [])
        assert (
            evaluate.main(
                ["--config", _config(tmp_path, tiny_methods, **changes), "--output", str(out), *args]
            )
            == 2
        )
        assert not out.exists()
        return capsys.readouterr().err

    assert "unknown key 'prompt_set' (did you mean 'prompt_sets'?)" in error(prompt_set=["single"])
    assert "Inception weights" in error(extractors=["inception"], inception_weights=str(tmp_path / "no.pth"))
    assert "--methods: no method 'difusion'" in error(args=["--methods", "difusion"])
    assert "extractors[mine]: class_path 'nowhere.Net' cannot be imported" in error(
        extractors=[{"name": "mine", "class_path": "nowhere.Net"}])  # fmt: skip
    assert "prompt_sets: unknown ['colours']" in error(prompt_sets=["colours"])
    missing = error(extractors=[{"name": "oc", "open_clip": "ViT-B-32", "weights": str(tmp_path / "no.bin")}])
    assert "extractors[oc].weights: open_clip weights file" in missing and "Nothing is downloaded" in missing
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    config = _config(tmp_path, tiny_methods)
    assert evaluate.main(["--config", config, "--output", str(earlier)]) == 2
    assert "already holds results" in capsys.readouterr().err and (earlier / "results.json").read_text() == "{}"


def test_too_few_samples_for_a_metric_warn_and_name_the_option(tiny_methods, tmp_path):
    config = _config(tmp_path, tiny_methods, methods=[{"name": "cvae", "checkpoint": tiny_methods["cvae"]}],
                     num_samples=4, wandb={"enabled": False})  # fmt: skip
    with pytest.warns(UserWarning, match="diversity needs at least 2 images per prompt.*raise seeds"):
        with pytest.warns(
            UserWarning, match="fid_clip: 8 images are not more than its 16 features.*raise seeds"
        ):
            assert evaluate.main(["--config", config, "--output", str(tmp_path / "o")]) == 0
    row = json.loads((tmp_path / "o" / "results.json").read_text())["rows"][0]
    assert "diversity" not in row and isinstance(row["kid_clip"], float)


def test_the_metrics_import_neither_lightning_nor_the_methods():
    import subprocess
    import sys

    code = ("import sys, evaluation.harness, evaluation.metrics; "
            "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_modules')])")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=evaluate.__file__.rsplit("/", 1)[0]
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(evaluate.__file__), "configs", "compare", "*.yaml"))),
                         ids=os.path.basename)  # fmt: skip
def test_every_compare_config_is_valid(path):
    import argparse

    cfg = evaluate.load_config(path, argparse.Namespace(methods=None, output=None, seed=None, num_samples=None))
    protocol = evaluate.protocol_of(cfg)
    assert protocol.prompt_sets and cfg["methods"]
    assert cfg["clip"] or cfg["part"] == "val"  # a table is judged; a sweep on val may read the analytic columns alone
    for spec in cfg["methods"]:
        if "model" in spec:
            evaluate.import_class(spec["model"]["class_path"], spec["name"])


def test_an_open_clip_model_is_an_extractor_of_unit_features():
    from test_clip import TINY_OPEN_CLIP

    cfg = {"extractors": [{"name": "oc", "open_clip": "ViT-B-32", "overrides": TINY_OPEN_CLIP}]}
    (features,) = evaluate.build_extractors(cfg, None).values()
    out = features(torch.rand(5, 3, 32, 32))
    assert out.shape == (5, features.num_features) and torch.allclose(out.norm(dim=-1), torch.ones(5))


def test_no_two_images_share_a_seed_across_protocol_seeds_sets_prompts_and_seed_indices():
    from evaluation.harness import Protocol, image_seed

    seeds = [image_seed(Protocol(seed=ps), si, p, s) for ps in range(3) for si in range(5) for p in range(30)
             for s in range(150)]  # fmt: skip
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2**63


def test_a_judge_that_shares_ancestry_with_a_methods_clip_is_refused_by_name(tiny_methods, tmp_path, capsys):
    """A reranker's CLIP resumed from the judge (the same origin) once judged its own choices."""
    checkpoint = torch.load(tiny_methods["clip"], weights_only=False)
    origin = checkpoint["clip_lineage"]["origin"]
    assert isinstance(origin, str) and len(origin) == 32  # drawn at the fresh start of the fixture's fit
    torch.save(checkpoint, tmp_path / "resumed.ckpt")  # same origin, another file
    checkpoint["clip_lineage"] = {"origin": "f" * 32, "resumed": []}
    torch.save(checkpoint, tmp_path / "independent.ckpt")
    del checkpoint["clip_lineage"]
    torch.save(checkpoint, tmp_path / "old.ckpt")

    def rerank(clip):
        init = {"generator": tiny_methods["cvae"], "clip": str(clip), "candidates": 2}
        return [{"name": "rerank", "model": {"class_path": "lightning_modules.clip_guided.CLIPRerank", "init_args": init}}]

    out = tmp_path / "never"
    config = _config(tmp_path, tiny_methods, methods=rerank(tmp_path / "resumed.ckpt"))
    assert evaluate.main(["--config", config, "--output", str(out)]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"methods[rerank] uses the CLIP {tmp_path / 'resumed.ckpt'}" in err and "shares its ancestry" in err
    cfg = {"clip": tiny_methods["clip"]}
    assert evaluate.judge_problems({**cfg, "methods": rerank(tiny_methods["clip"])})[0]  # the judge itself
    assert evaluate.judge_problems({**cfg, "methods": rerank(tmp_path / "independent.ckpt")}) == ([], [])
    errors, notes = evaluate.judge_problems({**cfg, "methods": rerank(tmp_path / "old.ckpt")})
    assert not errors and "before lineage was recorded" in notes[0]


def test_floors_come_from_renders_and_a_generator_that_ignores_colour_does_not_clear_the_binding_floor():
    from datamodules.shapes import vocabulary
    from evaluation.harness import (
        Protocol,
        floors,
        mark_floors,
        prompts_for,
        quality,
        render_ignoring,
        render_real,
    )

    protocol = Protocol(prompt_sets=["single", "colour_binding"], prompts=16, seeds=4)
    prompts = prompts_for(protocol)
    set_floors = floors(prompts, protocol)
    single, binding = set_floors["single"], set_floors["colour_binding"]
    # exact expectations, no draw's luck: a colour of 9 right 1/9 of the time, a size of 3 1/3, binding 1/2
    v = vocabulary()
    assert single["colour"] == pytest.approx(1 / len(v.colours)) and single["size"] == pytest.approx(1 / len(v.sizes))
    assert binding["binding"] == pytest.approx(0.5) and binding["colour"] == pytest.approx(1 / len(v.colours))
    two = floors(prompts_for(Protocol(prompt_sets=["two_objects"], prompts=8, seeds=2)),
                 Protocol(prompt_sets=["two_objects"], prompts=8, seeds=2))["two_objects"]  # fmt: skip
    assert two["shape"] == pytest.approx(1 / len(v.shapes))  # one object's shape of 3: 1/3, as the review said
    assert single["floor"] == max(single[w] for w in ("colour", "shape", "size", "position"))
    rows = {}
    for name, images in {"renders": render_real(prompts, protocol),
                         "ignores colour": render_ignoring(prompts, protocol, "colour", sets=list(prompts)),
                         "ignores binding": render_ignoring(prompts, protocol, "binding", sets=list(prompts))}.items():
        rows[name] = quality(images, prompts, protocol)
    mark_floors(list(rows.values()), set_floors)
    assert not rows["renders"]["shapes_colour_binding_under_floor"] and not rows["renders"]["shapes_single_under_floor"]
    assert rows["ignores colour"]["shapes_colour_binding_under_floor"]  # ~0.2 against a floor of ~0.5
    assert rows["ignores binding"]["shapes_colour_binding_under_floor"]
    assert rows["ignores colour"]["shapes_single_under_floor"]
    cell = evaluate._fmt("shapes_colour_binding", rows["ignores colour"]["shapes_colour_binding"], "{:.3f}",
                         rows["ignores colour"])  # fmt: skip
    assert cell.endswith(" †") and "†" not in evaluate._fmt("shapes_colour_binding", 1.0, "{:.3f}", rows["renders"])


def _train_config(tmp_path, cvae_steps: int, output: str) -> str:
    data = {"data.init_args.num_train": 48, "data.init_args.num_val": 8, "data.init_args.shard_size": 24,
            "data.init_args.batch_size": 8, "data.init_args.num_workers": 0,
            "trainer.enable_progress_bar": False, "trainer.val_check_interval": None}  # fmt: skip
    runs = tmp_path / "runs"
    cfg = {
        "output": str(tmp_path / output), "prompt_sets": ["single"], "prompts_per_set": 2, "num_samples": 4,
        "resolution": 16, "wandb": {"enabled": False}, "cache": None, "train_root": str(runs),
        "train": {
            "cvae": {"config": os.path.join(REPO, "configs", "vae", "cvae_shapes.yaml"), "max_steps": cvae_steps,
                     "args": {**data, "data.init_args.root": str(tmp_path / "shapes32")}},
            "gan": {"config": os.path.join(REPO, "configs", "gan", "stackgan1_shapes.yaml"), "max_steps": 2,
                    "args": {**data, "data.init_args.root": str(tmp_path / "shapes16")}},
        },
        "methods": [{"name": "cvae", "checkpoint": str(runs / "cvae" / "checkpoints" / "last.ckpt")},
                    {"name": "gan", "checkpoint": str(runs / "gan" / "checkpoints" / "last.ckpt")}],
    }  # fmt: skip
    path = tmp_path / f"{output}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow  # four train.py runs and two evaluations (about a minute)
def test_train_makes_every_row_then_evaluates_and_a_second_call_continues_only_what_is_short(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # --train-only: just the runs named (as a second machine or core would), and no evaluation
    assert evaluate.main(["--config", _train_config(tmp_path, 3, "first"), "--train-only", "gan"]) == 0
    assert (tmp_path / "runs" / "gan" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs" / "cvae").exists() and not (tmp_path / "first").exists()
    assert evaluate.main(["--config", _train_config(tmp_path, 3, "first"), "--train"]) == 0
    record = json.loads((tmp_path / "first" / "results.json").read_text())
    rows = {r["method"]: r for r in record["rows"]}
    assert rows["cvae"]["steps"] == 3 and rows["gan"]["steps"] == 2 and "error" not in rows["gan"]
    assert "`cvae`: `" in (tmp_path / "first" / "results.md").read_text()  # each run's budget, as stated
    gan_ckpt = tmp_path / "runs" / "gan" / "checkpoints" / "last.ckpt"
    before = gan_ckpt.stat().st_mtime_ns
    # a longer budget for one run: the same command continues it from last.ckpt and leaves the other
    assert evaluate.main(["--config", _train_config(tmp_path, 5, "second"), "--train"]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "second" / "results.json").read_text())["rows"]}
    assert rows["cvae"]["steps"] == 5 and gan_ckpt.stat().st_mtime_ns == before


def test_train_only_a_run_the_config_does_not_have_fails_naming_the_runs(tmp_path, capsys):
    path = _train_config(tmp_path, 3, "out")
    assert evaluate.main(["--config", path, "--train-only", "gan,cvea"]) == 2
    err = capsys.readouterr().err
    assert "no run 'cvea'" in err and "the runs are cvae, gan" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_a_train_section_without_a_budget_fails_before_any_work(tmp_path, capsys):
    path = _train_config(tmp_path, 3, "out")
    cfg = yaml.safe_load(open(path))
    del cfg["train"]["gan"]["max_steps"]
    cfg["train"]["cvae"]["max_step"] = cfg["train"]["cvae"].pop("max_steps")
    for broken, message in ((cfg["train"]["gan"], "train.gan states no budget"), (None, "did you mean 'max_steps'")):
        one = {**cfg, "train": {"cvae": cfg["train"]["cvae"]} if broken is None else {"gan": broken}}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(one))
        assert evaluate.main(["--config", str(tmp_path / "bad.yaml"), "--train"]) == 2
        assert message in capsys.readouterr().err
    # a train.py option typo in the second run: found before the first run trains
    cfg = yaml.safe_load(open(path))
    cfg["train"]["gan"]["args"]["model.init_args.generator.init_args.chanels"] = 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate.main(["--config", str(tmp_path / "bad.yaml"), "--train"]) == 2
    err = capsys.readouterr().err
    assert "train.gan" in err and "chanels" in err and "nothing was trained" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_selected_on_held_out_prompts_the_table_reports_is_refused_by_name(tmp_path, capsys):
    def run(part):
        ckpts = tmp_path / f"run_{part}" / "checkpoints"
        ckpts.mkdir(parents=True)
        best = ckpts / "best-step=3.ckpt"
        monitor = "ModelCheckpoint{'monitor': 'val/shapes_all_correct', 'mode': 'max'}"
        torch.save({"callbacks": {monitor: {"best_model_path": str(best)}}}, best)
        torch.save({"callbacks": {monitor: {"best_model_path": str(best)}}}, ckpts / "last.ckpt")
        score = {"class_path": "callbacks.ShapesScore", "init_args": {"seeds": 4, **({"part": part} if part else {})}}
        (ckpts.parent / "config.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [score]}}))
        return str(best)

    val, test, before_split = run("val"), run("test"), run(None)
    assert evaluate.selected_on(val) == "val" and evaluate.selected_on(test) == "test"
    assert evaluate.selected_on(before_split) == "unknown"
    assert evaluate.selected_on(str(tmp_path / "run_test" / "checkpoints" / "last.ckpt")) is None
    cfg = {"output": str(tmp_path / "out"), "prompt_sets": ["single"], "prompts_per_set": 2, "num_samples": 2,
           "wandb": {"enabled": False}, "cache": None,
           "methods": [{"name": "picked on val", "checkpoint": val}, {"name": "picked on test", "checkpoint": test},
                       {"name": "rerank", "model": {"class_path": "lightning_modules.clip_guided.CLIPRerank",
                                                    "init_args": {"generator": before_split, "clip": "x.ckpt"}}}]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate.main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "methods[picked on test]" in err and "'test' part" in err and "last.ckpt" in err
    assert "methods[rerank]" in err and "'unknown' part" in err and "methods[picked on val]" not in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_shapes_version_is_refused_by_name(tiny_methods, tmp_path, capsys):
    """Version 2's held-out prompts are in version 1's training data: a v1 checkpoint is refused."""
    checkpoint = torch.load(tiny_methods["cvae"], weights_only=False)
    checkpoint["ShapesDataModule"] = {"skipped_train": {}}  # saved before the version field: version 1
    torch.save(checkpoint, tmp_path / "v1.ckpt")
    checkpoint["ShapesDataModule"] = {"skipped_train": {}, "shapes_version": 2}
    torch.save(checkpoint, tmp_path / "v2.ckpt")
    out = tmp_path / "never"
    config = _config(tmp_path, tiny_methods, methods=[{"name": "old cvae", "checkpoint": str(tmp_path / "v1.ckpt")}])
    assert evaluate.main(["--config", config, "--output", str(out)]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"methods[old cvae]: {tmp_path / 'v1.ckpt'} was trained on shapes data version 1" in err
    assert "retrain it on version 2" in err and "data_version: 1" in err
    cfg = {"data_version": 2, "methods": [{"name": "cvae", "checkpoint": str(tmp_path / "v2.ckpt")}]}
    assert evaluate.data_version_problems(cfg) == []
    assert evaluate.data_version_problems({**cfg, "data_version": 1})  # and the reverse
    assert evaluate.data_version_problems({"data_version": 1, "methods": [{"name": "a", "checkpoint": str(tmp_path / "v1.ckpt")}]}) == []
    plain = {"data_version": 2, "methods": [{"name": "cvae", "checkpoint": tiny_methods["cvae"]}]}
    assert evaluate.data_version_problems(plain) == []  # not trained on the shapes datamodule: nothing to check


def test_the_protocol_reports_the_test_part_and_tunes_on_the_val_part():
    from evaluation.harness import Protocol, prompts_for

    test, val = (prompts_for(Protocol(part=part)) for part in ("test", "val"))
    assert Protocol().part == "test" and Protocol().data_version == 2
    for name in PROMPT_SETS:
        assert test[name] and val[name] and not {c for c, _ in test[name]} & {c for c, _ in val[name]}
    assert len(test["single"]) >= 100
    with pytest.raises(ValueError, match="part 'train'"):
        Protocol(part="train")
    v1 = prompts_for(Protocol(data_version=1, part="all", prompts=26))
    assert len(v1["single"]) == 26 and all("orange" not in c and "cyan" not in c for c, _ in v1["counting"])


def test_a_cached_real_feature_file_is_whole_or_absent_when_its_writer_dies(tmp_path, monkeypatch):
    from evaluation import harness
    from evaluation.harness import Protocol

    protocol = Protocol(prompt_sets=["single"], prompts=2, seeds=1, resolution=16)
    real = {"single": torch.rand(2, 1, 3, 16, 16)}
    cache = harness.RealFeatures(protocol, real, str(tmp_path))
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))

    def dies_half_way(obj, path):  # the process is killed while it writes
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.get("clip", extractor)
    assert not os.path.exists(cache.path("clip"))  # the next evaluation computes it again, not reads half a file


def test_a_methods_own_encoders_give_an_r_precision_column_beside_the_judges(tiny_methods, tmp_path):
    from conftest import BLOCK_CAPTIONS, block_images, fit_and_save
    from torch.utils.data import DataLoader

    from lightning_modules.damsm import DAMSM
    from networks.attngan import DAMSMImageEncoder
    from networks.text_encoders import TransformerTextEncoder

    checkpoint = torch.load(tiny_methods["clip"], weights_only=False)  # the judge's weights, another lineage
    checkpoint["clip_lineage"] = {"origin": "e" * 32, "resumed": []}
    torch.save(checkpoint, tmp_path / "twin.ckpt")
    torch.manual_seed(0)
    damsm = DAMSM(DAMSMImageEncoder(image_size=16, dim=16, channels=8),
                  TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte"))  # fmt: skip
    loader = DataLoader([{"image": block_images(), "caption": list(BLOCK_CAPTIONS)}] * 3, batch_size=None)
    damsm_path = fit_and_save(damsm, loader, 3, str(tmp_path / "damsm.ckpt"))
    methods = [{"name": "twin", "checkpoint": tiny_methods["gan"], "own_encoders": str(tmp_path / "twin.ckpt")},
               {"name": "damsm", "checkpoint": tiny_methods["gan"], "own_encoders": damsm_path},
               {"name": "plain", "checkpoint": tiny_methods["gan"]}]  # fmt: skip
    config = _config(tmp_path, tiny_methods, methods=methods, extractors=[], wandb={"enabled": False})
    assert evaluate.main(["--config", config, "--output", str(tmp_path / "out")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert rows["twin"]["r_precision_own"] == pytest.approx(rows["twin"]["r_precision"])  # same encoders, same number
    assert 0 <= rows["damsm"]["r_precision_own"] <= 1 and rows["damsm"]["r_precision_own_low"] is not None
    assert rows["plain"].get("r_precision_own") is None
    assert "R-prec. (own encoders)" in (tmp_path / "out" / "results.md").read_text()
    missing = _config(tmp_path, tiny_methods, methods=[{**methods[0], "own_encoders": str(tmp_path / "no.ckpt")}],
                      extractors=[], wandb={"enabled": False})  # fmt: skip
    evaluate.main(["--config", missing, "--output", str(tmp_path / "bad")])
    row = json.loads((tmp_path / "bad" / "results.json").read_text())["rows"][0]
    assert "own_encoders" in row["error"] and "not found" in row["error"]
