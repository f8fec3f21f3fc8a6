"""The comparison protocol: which prompts, which seeds, the real references, and every number of
one method's row. ``evaluate.py`` loads the methods and writes the files; this module sees only a
``generate`` callable, images and prompts.

Every image has its own seed (``image_seed``), so an image never depends on the batch it was made
in, and the same protocol seed gives the same images and the same quality numbers. Only the cost
columns (images per second) are measurements that vary between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.shapes import (
    DATA_VERSION,
    HELDOUT_PARTS,
    PROMPT_SETS,
    RELATIONS,
    caption,
    objects_for,
    prompt_set,
    render,
    scene_key,
    score,
    score_batch,
    single_attrs,
    vocabulary,
)
from evaluation.intervals import bootstrap_interval, bootstrap_mean_of_sets, paired_difference
from evaluation.metrics import (
    clip_score,
    diversity,
    embedding_diversity,
    fid_kid,
    image_features,
    r_precision_hits,
    sharpness,
)
from networks.noise import stream_seed

IMAGE_SEED_RULE = "stream_seed(protocol seed, 'image', prompt set index, prompt index, seed index): a 63-bit hash"


@dataclass
class Protocol:
    """What every method is measured on: the held-out prompts of ``part`` of shapes data
    ``data_version`` (at most ``prompts`` per set; None: all of them), ``seeds`` images each; or,
    with ``dataset="openmoji"``, the held-out designs of the OpenMoji data in ``data_root``
    (``evaluation/openmoji_protocol.py``)."""

    prompt_sets: list[str] = field(default_factory=lambda: list(PROMPT_SETS))
    prompts: int | None = None
    seeds: int = 4
    data_version: int = DATA_VERSION
    part: str = "test"
    seed: int = 0
    resolution: int = 32
    batch_size: int = 32
    distractors: int = 99
    fid_bootstrap: int = 50  # rounds of FID's bootstrap interval over images (0: none)
    fid_infinity: bool = False  # also FID extrapolated to infinitely many images
    dataset: str = "shapes"  # or "openmoji"
    data_root: str | None = None  # openmoji: the methods' data (its heldout.jsonl names the prompts)

    def __post_init__(self):
        if self.dataset == "openmoji":
            from evaluation import openmoji_protocol as OM

            if not self.data_root:
                raise ValueError("dataset openmoji needs data_root: the folder of the methods' OpenMoji data")
            unknown = [s for s in self.prompt_sets if s not in OM.SETS]
            if unknown:
                raise ValueError(f"prompt_sets: unknown {unknown}; the OpenMoji sets are {', '.join(OM.SETS)}")
            if self.part not in OM.PARTS:
                raise ValueError(f"part {self.part!r}: choose one of {', '.join(OM.PARTS)} (report on test, tune on val)")
            if (self.prompts is not None and self.prompts < 2) or self.seeds < 1:
                raise ValueError("prompts must be at least 2 (or None: all) and seeds at least 1")
            return
        if self.dataset != "shapes":
            raise ValueError(f"dataset {self.dataset!r}: choose shapes or openmoji")
        unknown = [s for s in self.prompt_sets if s not in PROMPT_SETS]
        if unknown:
            raise ValueError(f"prompt_sets: unknown {unknown}; the sets are {', '.join(PROMPT_SETS)}")
        if (self.prompts is not None and self.prompts < 2) or self.seeds < 1:
            raise ValueError("prompts must be at least 2 (or None: all) and seeds at least 1")
        if self.part not in HELDOUT_PARTS:
            raise ValueError(f"part {self.part!r}: choose one of {', '.join(HELDOUT_PARTS)} (report on test, tune on val)")
        vocabulary(self.data_version)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def prefix(self) -> str:
        """The analytic columns' prefix: ``shapes_<set>`` or ``openmoji_<set>``."""
        return self.dataset


def image_seed(protocol: Protocol, set_index: int, prompt: int, seed_index: int) -> int:
    """The seed of one image (``IMAGE_SEED_RULE``): a hash of all four parts, so no two images of
    any protocol seed, set, prompt and seed index share one (an arithmetic rule collided from 100
    seeds per prompt on)."""
    return stream_seed(protocol.seed, "image", set_index, prompt, seed_index)


def prompts_for(protocol: Protocol) -> dict[str, list[tuple[str, dict]]]:
    """``{set name: [(caption, attrs), ...]}``: the held-out prompts of each set in the
    protocol's part (at most ``protocol.prompts``), in an order fixed by the protocol's seed."""
    p = protocol
    if p.dataset == "openmoji":
        from evaluation import openmoji_protocol as OM

        return OM.prompt_sets(p.data_root, p.prompt_sets, p.part, p.prompts, p.seed)
    return {name: prompt_set(name, p.prompts, p.seed, part=p.part, version=p.data_version) for name in p.prompt_sets}


def distractor_pool(name: str, seed: int, version: int = DATA_VERSION) -> list[tuple[str, dict]]:
    """Prompts of the same kind for R-precision's mismatched candidates, as ``(caption, attrs)``:
    every single-object prompt of the vocabulary for ``single``, else 200 fresh prompts of the set."""
    if name == "single":
        from datamodules.shapes import _single_combos

        return [(caption(a)[0], a) for a in (single_attrs(*c) for c in _single_combos(version))]
    return prompt_set(name, 200, seed + 1, part="any", version=version)


def same_scene(items: Sequence[tuple[str, dict]], pool: Sequence[tuple[str, dict]]) -> Callable[[str, str], bool]:
    """``same(prompt, candidate)``: the candidate caption is true of the prompt's images (the same
    ``scene_key``), so it cannot be one of R-precision's distractors."""
    keys = {c: scene_key(a) for c, a in [*pool, *items]}
    return lambda prompt, candidate: keys[prompt] == keys.get(candidate)


def _to_resolution(images: Tensor, resolution: int) -> Tensor:
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
    return images


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def generate_images(
    generate: Callable[..., Tensor],
    prompts: dict[str, list[tuple[str, dict]]],
    protocol: Protocol,
    sampling: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], float, int]:
    """Every set's images, ``{set: (prompts, seeds, 3, r, r)}`` in [-1, 1] at the protocol's
    resolution, the seconds spent in ``generate`` and the number of images. One untimed warm-up
    call at the measured batch size comes first (lazy initialisation, allocator, autotuning), and
    on a GPU each timed call is synchronised before and after (CUDA runs asynchronously)."""
    sampling = sampling or {}
    items = [(name, si, pi, s) for s in range(protocol.seeds) for si, name in enumerate(prompts)
             for pi in range(len(prompts[name]))]  # fmt: skip
    first = prompts[next(iter(prompts))][0][0]
    generate([first] * min(protocol.batch_size, len(items)), seed=list(range(min(protocol.batch_size, len(items)))),
             **sampling)  # fmt: skip
    out = {name: torch.zeros(len(p), protocol.seeds, 3, protocol.resolution, protocol.resolution)
           for name, p in prompts.items()}  # fmt: skip
    seconds = 0.0
    for start in range(0, len(items), protocol.batch_size):
        chunk = items[start : start + protocol.batch_size]
        _synchronize()
        t0 = time.perf_counter()
        images = generate([prompts[n][p][0] for n, _, p, _ in chunk],
                          seed=[image_seed(protocol, si, p, s) for _, si, p, s in chunk], **sampling)  # fmt: skip
        _synchronize()
        seconds += time.perf_counter() - t0
        if images.shape[0] != len(chunk) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"generate returned {tuple(images.shape)} for {len(chunk)} prompts, not (b, 3, h, w)"
            )
        for (name, _, p, s), image in zip(chunk, _to_resolution(images, protocol.resolution)):
            out[name][p, s] = image
        if progress:
            progress(len(chunk))
    return out, seconds, len(items)


def render_real(
    prompts: dict[str, list[tuple[str, dict]]],
    protocol: Protocol,
    draw: int = 0,
    sets: Sequence[str] | None = None,
    scene: Callable[[dict, np.random.Generator], dict] | None = None,
) -> dict[str, Tensor]:
    """The renderer's own images of the same prompts and seeds (``draw`` 1 gives an independent
    second set, for the real-against-real FID), for ``sets`` (default: all); ``scene`` changes
    each prompt's scene before it is drawn (a stand-in generator, ``render_ignoring``). OpenMoji:
    each design's one render, the same at every seed and draw."""
    if protocol.dataset == "openmoji":
        from evaluation import openmoji_protocol as OM

        return OM.render_real(prompts, protocol.seeds, protocol.resolution, sets)
    out = {}
    for si, (name, items) in enumerate(prompts.items()):
        if sets is not None and name not in sets:
            continue  # the set index stays the one of the whole protocol: the same image seeds
        images = torch.zeros(len(items), protocol.seeds, 3, protocol.resolution, protocol.resolution)
        for p, (_, attrs) in enumerate(items):
            for s in range(protocol.seeds):
                rng = np.random.default_rng([image_seed(protocol, si, p, s), draw])
                drawn = scene(attrs, rng) if scene else attrs
                img = np.asarray(render(objects_for(drawn, rng), protocol.resolution), dtype=np.float32)
                images[p, s] = torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1
        out[name] = images
    return out


def analytic_hits(images: dict[str, Tensor], prompts: dict[str, list[tuple[str, dict]]],
                  protocol: Protocol) -> dict[str, np.ndarray]:
    """The analytic verdict per image of every set that has one, ``{set: (prompts, seeds)}`` of 0/1:
    the shapes scorer's all-correct, or OpenMoji's variant reader (its tone and colour sets)."""
    if protocol.dataset == "openmoji":
        from evaluation import openmoji_protocol as OM

        out = {name: OM.hits(images[name], items, name) for name, items in prompts.items()}
        return {name: h for name, h in out.items() if h is not None}
    return {name: shapes_hits(images[name], items) for name, items in prompts.items()}


def r_precision_pool(name: str, items: Sequence[tuple[str, dict]],
                     protocol: Protocol) -> tuple[list[str], Callable[[str, str], bool] | None]:  # fmt: skip
    """R-precision's candidate captions for a set and the rule that keeps true ones out: shapes'
    ``distractor_pool`` and ``same_scene``; OpenMoji: the name of every design in the set's language
    (the prompt's own is never a distractor)."""
    if protocol.dataset == "openmoji":
        from evaluation import openmoji_protocol as OM

        return list(OM.name_pool(OM.language(name))), None
    pool = distractor_pool(name, protocol.seed, protocol.data_version)
    return [c for c, _ in pool], same_scene(items, pool)


def shapes_rates(images: Tensor, items: Sequence[tuple[str, dict]]) -> dict[str, float]:
    """The analytic scorer's rate of each attribute and of ``all`` over ``(prompts, seeds, ...)``."""
    return score_batch(images.flatten(0, 1), [attrs for _, attrs in items for _ in range(images.shape[1])])


def shapes_hits(images: Tensor, items: Sequence[tuple[str, dict]]) -> np.ndarray:
    """The scorer's all-correct verdict per image, ``(prompts, seeds)`` of 0/1."""
    return np.array([[score(x, attrs)["all"] for x in per_seed] for per_seed, (_, attrs) in zip(images, items)],
                    dtype=np.float64)  # fmt: skip


def _flat(images: dict[str, Tensor]) -> Tensor:
    return torch.cat([x.flatten(0, 1) for x in images.values()])


def _captions(prompts: dict[str, list[tuple[str, dict]]], seeds: int) -> list[str]:
    return [c for items in prompts.values() for c, _ in items for _ in range(seeds)]


class RealFeatures:
    """Features of the real renders under each extractor: computed once, and kept on disk per
    dataset (the protocol fields that fix the renders) and extractor (its name and an identity
    string, e.g. its weights' sha256) when ``directory`` is given."""

    def __init__(self, protocol: Protocol, real: dict[str, Tensor], directory: str | None = None,
                 identities: dict[str, str] | None = None, draw: int = 0):  # fmt: skip
        self.protocol, self.real, self.directory, self.draw = protocol, real, directory, draw
        self.identities = identities or {}
        self.memory: dict[str, Tensor] = {}
        self.hits = 0

    def path(self, name: str) -> str | None:
        if not self.directory:
            return None
        p = self.protocol
        dataset = {"renderer": "shapes", "sets": p.prompt_sets, "prompts": p.prompts, "seeds": p.seeds,
                   "seed": p.seed, "resolution": p.resolution, "draw": self.draw,
                   "data_version": p.data_version, "part": p.part}  # fmt: skip
        if p.dataset != "shapes":  # (the shapes key is unchanged: its cached features stay valid)
            dataset.update(renderer=p.dataset, data_root=os.path.abspath(p.data_root or ""))
        key = json.dumps([dataset, name, self.identities.get(name, "")], sort_keys=True)
        return os.path.join(self.directory, f"real_{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")

    def get(self, name: str, extractor: nn.Module) -> Tensor:
        if name not in self.memory:
            path = self.path(name)
            if path and os.path.isfile(path):
                self.memory[name] = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
            else:
                self.memory[name] = image_features(extractor, _flat(self.real))
                if path:
                    os.makedirs(self.directory, exist_ok=True)
                    partial = f"{path}.{os.getpid()}.partial"  # whole or absent: another evaluation may read it now
                    torch.save(self.memory[name], partial)
                    os.replace(partial, path)
        return self.memory[name]


def quality(
    images: dict[str, Tensor],
    prompts: dict[str, list[tuple[str, dict]]],
    protocol: Protocol,
    real: RealFeatures | None = None,
    clip: nn.Module | None = None,
    extractors: dict[str, nn.Module] | None = None,
    lpips: nn.Module | None = None,
    status: Callable[[str], None] = lambda metric: None,
) -> dict:
    """Every quality number of one row. ``real`` (the renders' features) is needed for FID and KID;
    ``status`` hears the name of each metric as it starts (for a progress bar)."""
    row: dict = {}
    detail: dict = {}
    status("shapes scorer" if protocol.dataset == "shapes" else "variant reader")
    hits = analytic_hits(images, prompts, protocol)
    pre = protocol.prefix
    for name, set_hits in hits.items():
        detail[name] = shapes_rates(images[name], prompts[name]) if pre == "shapes" else {"all": float(set_hits.mean())}
        row[f"{pre}_{name}"] = detail[name]["all"]  # with its prompt-level bootstrap 95% interval
        _, row[f"{pre}_{name}_low"], row[f"{pre}_{name}_high"] = bootstrap_interval(set_hits, seed=protocol.seed)
    if hits:
        row[f"{pre}_overall"] = float(np.mean([row[f"{pre}_{n}"] for n in hits]))
        _, row[f"{pre}_overall_low"], row[f"{pre}_overall_high"] = bootstrap_mean_of_sets(list(hits.values()),
                                                                                        seed=protocol.seed)  # fmt: skip
    row["shapes_detail"] = detail
    row["shapes_hits"] = hits  # (prompts, seeds) per set: for paired comparisons
    flat = _flat(images)
    if real is not None:  # the renders of the same prompts and seeds
        row["sharpness"] = sharpness(flat, _flat(real.real))
    for ext_name, extractor in (extractors or {}).items():
        status(f"fid_{ext_name}, kid_{ext_name}")
        if real is None:
            raise ValueError("FID and KID need the real images")
        row.update(fid_kid(None, flat, extractor, ext_name, real_features=real.get(ext_name, extractor),
                           bootstrap=protocol.fid_bootstrap, infinity=protocol.fid_infinity))  # fmt: skip
    if clip is not None:
        status("clip score, r-precision")
        row["clip_score"] = clip_score(clip, flat, _captions(prompts, protocol.seeds))
        hits = r_precision_by_set(clip, images, prompts, protocol)
        if protocol.dataset != "shapes":  # per set too: the judge is all that reads gender and design
            for name, set_hits in hits.items():
                key = f"r_precision_{name}"
                row[key], row[f"{key}_low"], row[f"{key}_high"] = bootstrap_interval(set_hits, seed=protocol.seed)
        mean, lo, hi = bootstrap_interval(np.concatenate(list(hits.values())), seed=protocol.seed)  # over prompts
        row["r_precision"], row["r_precision_low"], row["r_precision_high"] = mean, lo, hi
    if protocol.seeds >= 2:
        status("diversity")
        values = [diversity(images[n], lpips) for n in prompts]
        row["diversity"], row["diversity_distance"] = float(np.mean([v for v, _ in values])), values[0][1]
        if clip is not None:  # the judge's view: pairwise 1 - cos between seeds, per prompt
            per_prompt = {n: embedding_diversity(clip, images[n]) for n in prompts}
            mean, lo, hi = bootstrap_mean_of_sets([v[:, None] for v in per_prompt.values()], seed=protocol.seed)
            row["diversity_clip"], row["diversity_clip_low"], row["diversity_clip_high"] = mean, lo, hi
            row["diversity_clip_per_prompt"] = {n: v.tolist() for n, v in per_prompt.items()}
    return row


def r_precision_by_set(encoders: nn.Module, images: dict[str, Tensor], prompts: dict[str, list[tuple[str, dict]]],
                       protocol: Protocol) -> dict[str, np.ndarray]:
    """R-precision hits, (prompts, seeds) per set, under any pair of encoders with CLIP's
    ``encode_image`` and ``encode_text`` (the judge, or a method's own CLIP or DAMSM)."""
    hits = {}
    for name, items in prompts.items():
        pool, same = r_precision_pool(name, items, protocol)
        g = torch.Generator().manual_seed(protocol.seed)
        set_hits = r_precision_hits(encoders, images[name].flatten(0, 1), _captions({name: items}, protocol.seeds),
                                    pool, protocol.distractors, g, same)  # fmt: skip
        hits[name] = np.asarray(set_hits).reshape(len(items), protocol.seeds)
    return hits


def own_r_precision(encoders: nn.Module, images: dict[str, Tensor], prompts: dict[str, list[tuple[str, dict]]],
                    protocol: Protocol) -> dict:
    """A method's own view: R-precision under the encoders it trained against or was guided by
    (``r_precision_own`` with its interval), reported beside the independent judge's."""
    hits = r_precision_by_set(encoders, images, prompts, protocol)
    mean, lo, hi = bootstrap_interval(np.concatenate(list(hits.values())), seed=protocol.seed)
    return {"r_precision_own": mean, "r_precision_own_low": lo, "r_precision_own_high": hi}


def chance(prompts: dict[str, list[tuple[str, dict]]], protocol: Protocol, real: dict[str, Tensor],
           clip: nn.Module | None = None) -> dict:  # fmt: skip
    """The chance references: the renders judged against another prompt of their set (each set's
    prompts shifted by one), and R-precision's 1 / (distractors + 1)."""
    shifted = {n: items[1:] + items[:1] for n, items in prompts.items()}
    row: dict = {}
    if protocol.dataset == "shapes":  # (OpenMoji's analytic reference is its floor: a design in a random variant)
        for name in prompts:
            row[f"shapes_{name}"] = shapes_rates(real[name], shifted[name])["all"]
        row["shapes_overall"] = float(np.mean([row[f"shapes_{n}"] for n in prompts]))
    if clip is not None:
        row["clip_score"] = clip_score(clip, _flat(real), _captions(shifted, protocol.seeds))
        pools = [r_precision_pool(n, items, protocol)[0] for n, items in prompts.items()]
        row["r_precision"] = float(np.mean([1 / (min(protocol.distractors, len(p) - 1) + 1) for p in pools]))
    return row


# The words a prompt set's scorer checks, each of which a generator could ignore: a stand-in that
# renders the prompt but draws one of these words at random scores the set's conditional floor.
IGNORABLE = {
    "single": ("colour", "shape", "size", "position"),
    "two_objects": ("shape",),
    "counting": ("colour", "shape", "count"),
    "colour_binding": ("colour", "binding"),
    "position": ("colour", "shape", "relation"),
}
_WORDS = {"colour": "colours", "shape": "shapes", "size": "sizes", "position": "positions"}


def ignore_word(attrs: dict, word: str, rng: np.random.Generator, version: int = DATA_VERSION) -> dict:
    """One scene a generator draws for ``attrs`` when it ignores one ``word`` of the prompt (a
    random stand-in's image): one of ``ignore_word_outcomes``, drawn uniformly."""
    outcomes = ignore_word_outcomes(attrs, word, version)
    return outcomes[int(rng.integers(len(outcomes)))]


def render_ignoring(
    prompts: dict[str, list[tuple[str, dict]]], protocol: Protocol, word: str, sets: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """The renders of a stand-in generator that ignores ``word`` (see ``ignore_word``), with the
    protocol's image seeds; for the sets in ``sets`` (default: every set that checks the word)."""
    names = list(sets) if sets is not None else [n for n in prompts if word in IGNORABLE[n]]
    return render_real(prompts, protocol, draw=2, sets=names,
                       scene=lambda attrs, rng: ignore_word(attrs, word, rng, protocol.data_version))  # fmt: skip


def ignore_word_outcomes(attrs: dict, word: str, version: int = DATA_VERSION) -> list[dict]:
    """Every scene a generator that ignores one ``word`` of the prompt can draw for ``attrs``, all
    equally likely: that word's every value (the true one included) for each object the prompt
    names; ``binding``: the two objects' colours as they are and swapped (it reads every word but
    not which colour goes with which shape; a one-object scene stays as it is)."""
    v, n = vocabulary(version), len(attrs["objects"])

    def changed(**edit) -> dict:
        out = {**attrs, "objects": [dict(o) for o in attrs["objects"]]}
        if "index" in edit:
            out["objects"][edit.pop("index")].update(edit)
        else:
            out.update(edit)
        return out

    if word in _WORDS:
        return [changed(index=i, **{word: x}) for i in range(n) for x in getattr(v, _WORDS[word])]
    if word == "count":
        return [changed(count=c) for c in v.counts]
    if word == "relation":
        return [changed(relation=r) for r in RELATIONS]
    if word == "binding":
        if n != 2:
            return [attrs]
        swapped = changed()
        a, b = swapped["objects"]
        a["colour"], b["colour"] = b["colour"], a["colour"]
        return [attrs, swapped]
    raise ValueError(f"unknown word {word!r}; the words are {', '.join([*_WORDS, 'count', 'relation', 'binding'])}")


def floor_rate(prompts: dict[str, list[tuple[str, dict]]], protocol: Protocol, name: str, word: str) -> float:
    """The exact all-correct rate on set ``name`` of the stand-in that ignores ``word``: every scene
    it can draw for an image (``ignore_word_outcomes``, equally likely) rendered with that image's
    seed (``render_real``) and scored; their mean."""
    items, version = prompts[name], protocol.data_version
    (count,) = {len(ignore_word_outcomes(attrs, word, version)) for _, attrs in items}  # one per set's kind of scene
    rates = []
    for k in range(count):
        images = render_real(prompts, protocol, draw=2, sets=[name],
                             scene=lambda attrs, rng, k=k: ignore_word_outcomes(attrs, word, version)[k])  # fmt: skip
        rates.append(shapes_rates(images[name], items)["all"])
    return float(np.mean(rates))


def floors(prompts: dict[str, list[tuple[str, dict]]], protocol: Protocol) -> dict[str, dict[str, float]]:
    """Each set's conditional floors, from renders: ``{set: {word: the exact all-correct rate of a
    stand-in that ignores the word, ..., "floor": the highest}}``. A cell that does not clear its
    set's floor cannot show that the method reads every word the set checks. OpenMoji: its tone and
    colour sets, a stand-in that draws the design in a random variant."""
    if protocol.dataset == "openmoji":
        from evaluation import openmoji_protocol as OM

        return OM.floors(prompts, protocol.resolution)
    out: dict[str, dict[str, float]] = {name: {} for name in prompts}
    for name in prompts:
        for word in IGNORABLE[name]:
            out[name][word] = floor_rate(prompts, protocol, name, word)
        out[name]["floor"] = max(out[name].values())
    return out


def mark_floors(rows: list[dict], set_floors: dict[str, dict[str, float]], prefix: str = "shapes") -> None:
    """Set ``<prefix>_<set>_under_floor`` on every row: whether the cell's 95% interval fails to
    clear its set's floor (its low end at or under the floor; the value itself without one)."""
    for row in rows:
        for name, rates in set_floors.items():
            low = row.get(f"{prefix}_{name}_low", row.get(f"{prefix}_{name}"))
            if low is not None:
                row[f"{prefix}_{name}_under_floor"] = bool(low <= rates["floor"])


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Two methods' all-correct verdicts on the same prompts and seeds (``{set: (prompts, seeds)}``)
    -> ``{set: (a - b, low, high)}`` with the bootstrap 95% interval of the difference over prompts,
    and ``overall``: the mean of the sets' differences, each set's prompts resampled on its own."""
    out = {name: paired_difference(a[name], b[name], seed=seed) for name in a}
    out["overall"] = bootstrap_mean_of_sets([a[n] - b[n] for n in a], seed=seed)
    return out


def paired_diversity(a: dict[str, list[float]], b: dict[str, list[float]], seed: int = 0) -> tuple[float, float, float]:
    """Two methods' per-prompt diversity on the same prompts and seeds (``{set: [per prompt]}``) ->
    the mean over sets of ``a - b`` with its bootstrap 95% interval (each set resampled on its own)."""
    return bootstrap_mean_of_sets([np.subtract(a[n], b[n])[:, None] for n in a], seed=seed)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_budget(checkpoint: dict, run_config: dict | None = None) -> dict:
    """Steps, samples seen, training time and (``TrainingTimer`` runs) the validation time that was
    not charged to it, as the checkpoint and its run's config record them (None where they do not)."""
    steps = int(checkpoint.get("global_step", 0))
    batches = (checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
               .get("total", {}).get("completed"))  # fmt: skip
    seconds = validation = None  # TrainingTimer: training alone; Lightning's Timer: validation included
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith(("Timer", "TrainingTimer")) and isinstance(state, dict):
            seconds = float(state.get("time_elapsed", {}).get("train", 0.0)) or None
            validation = state.get("validation_seconds")
    samples = None
    if run_config and batches is not None:
        data = (run_config.get("data") or {}).get("init_args", run_config.get("data") or {})
        trainer = run_config.get("trainer") or {}
        devices = trainer.get("devices", 1)
        devices = devices if isinstance(devices, int) else 1
        if isinstance(data, dict) and isinstance(data.get("batch_size"), int):
            samples = int(batches) * data["batch_size"] * devices * int(trainer.get("num_nodes") or 1)
    return {"steps": steps, "samples_seen": samples, "train_seconds": seconds, "validation_seconds": validation}


def sample_problems(protocol: Protocol, extractors: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """What the protocol's sample count cannot measure: ``(errors, warnings)`` in plain words,
    each naming the option to change."""
    n = protocol.seeds * sum(len(items) for items in prompts_for(protocol).values())
    errors, notes = [], []
    if extractors and n < 2:
        errors.append(f"FID and KID need at least 2 images and the protocol gives {n}: raise seeds")
    if protocol.seeds < 2:
        notes.append("diversity needs at least 2 images per prompt: seeds is 1, so it is left out; raise seeds")
    for name, extractor in extractors.items():
        dim = int(getattr(extractor, "num_features", 0) or 0)
        if dim and n <= dim:
            notes.append(f"fid_{name}: {n} images are not more than its {dim} features, so FID is unreliable "
                         f"(KID is not); raise seeds")  # fmt: skip
    return errors, notes
