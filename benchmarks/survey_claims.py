"""The survey's claims about each family, one row each: what measures it, the result with its
interval, and a verdict by a rule written down here (supported, contradicted, or not separable),
from the family table's results, the extra runs of ``configs/compare/survey_shapes.yaml`` and the
held-out score curves the table's runs logged while training.

    python evaluate.py --config configs/compare/survey_shapes.yaml --train   # the extra runs, then their rows
    python benchmarks/survey_claims.py --table docs/compare_v2/results.json \\
        --survey runs/compare/survey_shapes/results.json --train-root runs/compare/train --out docs/survey_claims.md

Every verdict is about this dataset at this budget: the rule and the numbers are printed beside it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.wandb_records import history  # noqa: E402

COMPOSITIONAL = ("two_objects", "counting", "colour_binding", "position")
FAMILY_ROWS = {  # the table's row that stands for each family (its plain method, no reranking or guidance)
    "GAN": ["stackgan"],
    "diffusion": ["diffusion", "latent diffusion"],
    "transformer": ["vqgan+ar", "vqgan+maskgit"],
    "VAE": ["cvae"],
}
TRAIN_RUNS = {"stackgan": "stackgan", "diffusion": "diffusion", "latent diffusion": "ldm", "vqgan+ar": "ar",
              "vqgan+maskgit": "maskgit", "cvae": "cvae"}  # fmt: skip
SCORE_KEY = "val/shapes_all_correct"  # the in-training held-out score: the validation part's single objects
COLLAPSE = 0.2  # a run collapsed when its diversity (CLIP) is under this fraction of the renders'
BLUR = 0.5  # "blurry": under half the renders' high-frequency energy (sharpness 1.0 is the renders')


@dataclass
class Claim:
    family: str
    claim: str
    measure: str
    result: str
    verdict: str
    rule: str


def rows_by_method(results: dict) -> dict[str, dict]:
    return {r["method"]: r for r in results["rows"]}


def ci(row: dict, key: str, fmt: str = "{:.3f}") -> str:
    value, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if value is None:
        return "–"
    if low is None or high is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def cells(row: dict) -> str:
    """The compositional sets' rates with intervals; † where the interval does not clear the floor."""
    return ", ".join(
        f"{p} {ci(row, 'shapes_' + p)}{'' if clears_floor(row, p) else ' †'}" for p in COMPOSITIONAL
    )


def values(rows: list[dict], key: str) -> str:
    return ", ".join(f"{r[key]:.3f}" for r in rows)


def paired(results: dict, a: str, b: str, column: str):
    """``(difference, low, high)`` of a - b, or of b - a negated, or None when the pair is not there."""
    pairs = results.get("paired") or {}
    if f"{a} - {b}" in pairs and column in pairs[f"{a} - {b}"]:
        return tuple(pairs[f"{a} - {b}"][column])
    if f"{b} - {a}" in pairs and column in pairs[f"{b} - {a}"]:
        d, low, high = pairs[f"{b} - {a}"][column]
        return (-d, -high, -low)
    return None


def fmt_pair(p) -> str:
    return "not paired" if p is None else f"{p[0]:+.3f} [{p[1]:+.3f}, {p[2]:+.3f}]"


def sign(p) -> int:
    """+1 or -1 when the paired interval excludes 0, else 0."""
    return 0 if p is None or p[1] <= 0 <= p[2] else (1 if p[1] > 0 else -1)


def clears_floor(row: dict, prompt_set: str) -> bool:
    return f"shapes_{prompt_set}" in row and not row.get(f"shapes_{prompt_set}_under_floor", True)


def compositional_claim(family: str, claim: str, who: str, rows: list[dict]) -> Claim:
    """A claim of accuracy on complex descriptions: supported when one of ``rows`` clears the floor
    on at least two of the four compositional sets (two rows clearing one set each do not)."""
    best = max(sum(clears_floor(r, p) for p in COMPOSITIONAL) for r in rows)
    return Claim(
        family, claim, "the compositional sets' all-correct rates against their floors",
        "; ".join(f"{r['method']}: {cells(r)}" for r in rows),
        "supported" if best >= 2 else "contradicted",
        f"supported if {who} clears the floor on at least two of the four compositional sets",
    )  # fmt: skip


def photorealism(gan: dict, others: list[dict]) -> Claim:
    best_other = min(others, key=lambda r: r["fid_clip"])
    if gan["fid_clip_low"] > max(r["fid_clip_high"] for r in others):
        verdict = "contradicted"
    elif gan["fid_clip_high"] < best_other["fid_clip_low"]:
        verdict = "supported"
    else:
        verdict = "not separable"
    return Claim(
        "GAN", "high image quality and photorealism", "FID and KID in the judge CLIP's features (N images, bootstrap interval)",
        f"StackGAN {ci(gan, 'fid_clip')}, KID {gan['kid_clip']:.4f}; best other: {best_other['method']} "
        f"{ci(best_other, 'fid_clip')}; worst other {max(r['fid_clip'] for r in others):.3f}",
        verdict, "supported if the GAN's FID interval is below the best other family's; contradicted if above every other's",
    )  # fmt: skip


def diverse(table: dict, cvae: dict, renders: dict) -> Claim:
    diffs = {m: paired(table, "cvae", m, "diversity (CLIP)") for m in ("diffusion", "latent diffusion")}
    signs = [sign(p) for p in diffs.values() if p is not None]
    verdict = "contradicted" if -1 in signs else "supported" if signs and all(x > 0 for x in signs) else "not separable"
    return Claim(
        "VAE", "diverse results for one description", "diversity (CLIP): mean pairwise 1-cos of the judge's embeddings between seeds of one prompt",
        f"CVAE {ci(cvae, 'diversity_clip')}, renders {ci(renders, 'diversity_clip')}; paired CVAE minus "
        + ", ".join(f"{m} {fmt_pair(p)}" for m, p in diffs.items()),
        verdict, "supported if the CVAE is more diverse than both diffusion rows (paired); contradicted if less than either",
    )  # fmt: skip


def minutes_to(curve: list[tuple[float, float]], threshold: float) -> float | None:
    """The first logged minute at which the held-out score reached ``threshold`` (None: never)."""
    return next((minute for minute, score in curve if score >= threshold), None)


def curves(train_root: str) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(wall minutes since the run started, held-out score), ...]}`` from each table run's
    offline W&B file (validation time included in the minutes)."""
    out = {}
    for method, run in TRAIN_RUNS.items():
        files = sorted(glob.glob(os.path.join(train_root, run, "wandb", "offline-run-*", "run-*.wandb")))
        points = [
            (row["_runtime"] / 60, row[SCORE_KEY])
            for path in files
            for row in history(path)
            if SCORE_KEY in row and "_runtime" in row
        ]
        if points:
            out[method] = points
    return out


def time_line(method: str, curve: list[tuple[float, float]] | None, threshold: float) -> str:
    if not curve:
        return f"{method}: no curve"
    reached = minutes_to(curve, threshold)
    if reached is not None and reached == curve[0][0]:  # no earlier score to say when it got there
        return f"{method} by {reached:.0f} min (its first score)"
    if reached is not None:
        return f"{method} {reached:.0f} min"
    return f"{method} not in {curve[-1][0]:.0f} min (ends at {curve[-1][1]:.2f})"


def claims(table: dict, survey: dict | None, score_curves: dict, threshold: float = 0.25) -> list[Claim]:
    t = rows_by_method(table)
    s = rows_by_method(survey) if survey else {}
    renders = t["real renders"]
    out = []

    # GANs
    gan, others = t["stackgan"], [t[m] for fam, ms in FAMILY_ROWS.items() if fam != "GAN" for m in ms]
    out.append(photorealism(gan, others))

    seeds = [gan] + [s[m] for m in ("stackgan seed 1", "stackgan seed 2") if m in s]
    diff_seeds = [t["diffusion"]] + [s[m] for m in ("diffusion seed 1", "diffusion seed 2") if m in s]
    collapsed = [r for r in seeds if r["diversity_clip"] < COLLAPSE * renders["diversity_clip"]]
    data = paired(survey, "stackgan data 25%", "stackgan seed 1", "overall") if survey else None

    def spread(rows, key):
        values = [r[key] for r in rows]
        return max(values) - min(values) if len(values) > 1 else float("nan")

    if len(seeds) < 3:
        verdict, result = "not measured", "the extra seeds of configs/compare/survey_shapes.yaml are not evaluated yet"
    else:
        gan_fid, diff_fid = spread(seeds, "fid_clip"), spread(diff_seeds, "fid_clip")
        harder = collapsed or (len(diff_seeds) == 3 and gan_fid > 2 * diff_fid) or sign(data) < 0
        easier = not collapsed and len(diff_seeds) == 3 and gan_fid <= diff_fid and sign(data) >= 0
        verdict = "supported" if harder else "contradicted" if easier else "not separable"
        result = (
            f"3 StackGAN seeds: overall {values(seeds, 'shapes_overall')}, FID "
            f"{values(seeds, 'fid_clip')} (range {gan_fid:.3f}); pixel diffusion's "
            f"{len(diff_seeds)} seeds: overall {values(diff_seeds, 'shapes_overall')}, FID range "
            f"{diff_fid:.3f}; collapsed GAN runs {len(collapsed)} of {len(seeds)}; 25% of the scenes minus all "
            f"(seed 1): overall {fmt_pair(data)}"
            + (f", FID {s['stackgan data 25%']['fid_clip']:.3f} vs {s['stackgan seed 1']['fid_clip']:.3f}"
               if 'stackgan data 25%' in s and 'stackgan seed 1' in s else "")
        )  # fmt: skip
    out.append(Claim(
        "GAN", "hard to train, needs much data and compute",
        "spread over 3 seeds (the GAN's against pixel diffusion's), collapsed runs, the score on 25% and 100% of the data",
        result, verdict,
        f"supported if a GAN run collapses (diversity under {COLLAPSE:g} of the renders'), its FID range is over twice "
        "diffusion's, or 25% of the data scores lower (paired); contradicted if none and its range is at most diffusion's",
    ))  # fmt: skip

    under = [p for p in COMPOSITIONAL if not clears_floor(gan, p)]
    anyone = [(r["method"], p) for r in others for p in COMPOSITIONAL if clears_floor(r, p)]
    verdict = "supported" if len(under) == len(COMPOSITIONAL) else "contradicted"
    out.append(Claim(
        "GAN", "text mismatch on complex descriptions", "the compositional sets' all-correct rates against their floors",
        f"StackGAN: {cells(gan)}; single {ci(gan, 'shapes_single')}; "
        + (f"other families clearing a floor: {anyone}" if anyone else "no other family clears a compositional floor either"),
        verdict + ("" if anyone else " (not specific to GANs)"),
        "supported if none of the GAN's compositional cells clears its floor",
    ))  # fmt: skip

    # diffusion
    diffusions = [t[m] for m in FAMILY_ROWS["diffusion"]]
    out.append(compositional_claim("diffusion", "accurate on complex descriptions", "a diffusion row", diffusions))

    fastest = max((r for r in others + [gan] if r.get("images_per_sec")), key=lambda r: r["images_per_sec"])
    slow = max(diffusions, key=lambda r: r["images_per_sec"])
    ratio = fastest["images_per_sec"] / slow["images_per_sec"]
    out.append(Claim(
        "diffusion", "costly generation", "seconds per image (this machine's CPU, 20 DPM-Solver++ steps), training minutes to a held-out score",
        f"pixel {1 / t['diffusion']['images_per_sec']:.2f} s, latent {1 / t['latent diffusion']['images_per_sec']:.3f} s; "
        f"{fastest['method']} {1 / fastest['images_per_sec']:.4f} s ({ratio:.0f}x faster than the faster diffusion); "
        f"to {threshold:g} held-out: " + "; ".join(time_line(m, score_curves.get(m), threshold) for m in TRAIN_RUNS),
        "supported" if ratio >= 10 else "contradicted",
        "supported if another family generates at least 10x faster than the faster diffusion row",
    ))  # fmt: skip

    # transformers
    priors = [t[m] for m in FAMILY_ROWS["transformer"]]
    out.append(compositional_claim("transformer", "excellent on complex, multi-part descriptions", "a token-prior row",
                                   priors))  # fmt: skip
    out.append(Claim(
        "transformer", "details blurry without extra stages",
        "sharpness: high-frequency energy relative to the renders of the same prompts (renders 1.0)",
        ", ".join(f"{r['method']} {r['sharpness']:.2f}" for r in priors) + f"; pixel diffusion {t['diffusion']['sharpness']:.2f}",
        "supported" if all(r["sharpness"] < BLUR for r in priors) else "contradicted",
        f"supported if every token-prior row is under {BLUR:g} of the renders' sharpness",
    ))  # fmt: skip

    # VAEs
    cvae = t["cvae"]
    mine = minutes_to(score_curves.get("cvae", []), threshold)
    rivals = {m: minutes_to(score_curves.get(m, []), threshold) for m in ("stackgan", "vqgan+ar", "vqgan+maskgit")}
    if mine is None:
        verdict = "contradicted" if any(v is not None for v in rivals.values()) else "not separable"
    else:
        verdict = "supported" if all(v is None or v > mine for v in rivals.values()) else "contradicted"
    out.append(Claim(
        "VAE", "less compute than GANs and transformers",
        f"wall minutes of one core to the held-out score {threshold:g} (validation part, single objects; from the runs' logs)",
        "; ".join(time_line(m, score_curves.get(m), threshold) for m in ("cvae", "stackgan", "vqgan+ar", "vqgan+maskgit"))
        + f"; parameters: CVAE {cvae['params_m']:.1f} M, StackGAN {gan['params_m']:.1f} M, AR {t['vqgan+ar']['params_m']:.1f} M",
        verdict, "supported if the CVAE reaches the score before the GAN and both token priors (never reaching counts as later)",
    ))  # fmt: skip

    out.append(diverse(table, cvae, renders))
    out.append(Claim(
        "VAE", "blurry, with low detail", "sharpness (renders 1.0)",
        f"CVAE {cvae['sharpness']:.2f}; StackGAN {gan['sharpness']:.2f}, pixel diffusion {t['diffusion']['sharpness']:.2f}",
        "supported" if cvae["sharpness"] < BLUR else "contradicted", f"supported if under {BLUR:g} of the renders' sharpness",
    ))  # fmt: skip

    # the survey's conclusion
    families = {fam: [t[m] for m in ms] for fam, ms in FAMILY_ROWS.items()}
    best_fid = min((r for rs in families.values() for r in rs), key=lambda r: r["fid_clip"])
    best_overall = max((r for rs in families.values() for r in rs), key=lambda r: r["shapes_overall"])
    tie = [m for m in ("cvae", "latent diffusion", "diffusion") if m != best_overall["method"]
           and sign(paired(table, best_overall["method"], m, "overall")) == 0]  # fmt: skip
    out.append(conclusion(best_fid, gan, best_overall, "shapes_overall", tie, "the highest overall all-correct rate",
                          "overall rate", "tied (paired) with", "with no paired tie"))  # fmt: skip
    return out


def conclusion(best_fid: dict, gan: dict, best: dict, key: str, tie: list[str], measure: str, name: str,
               tie_words: str, tie_rule: str) -> Claim:  # fmt: skip
    """"Photorealism: GAN; accuracy: diffusion", each half on its own."""
    realism = best_fid["method"] in FAMILY_ROWS["GAN"]
    accuracy = best["method"] in FAMILY_ROWS["diffusion"] and not tie
    return Claim(
        "all", "photorealism: GAN; accuracy: diffusion", f"the lowest FID (CLIP) and {measure}",
        f"lowest FID {best_fid['method']} {ci(best_fid, 'fid_clip')} (StackGAN {gan['fid_clip']:.3f}); highest {name} "
        f"{best['method']} {ci(best, key)}" + (f", {tie_words} {', '.join(tie)}" if tie else ""),
        "supported" if realism and accuracy else "contradicted" if not realism and not accuracy else "half supported",
        f"each half: the GAN has the lowest FID; a diffusion row has the highest {name}, {tie_rule}",
    )  # fmt: skip


OM_COMPOSITIONAL = ("tone", "colour", "gender")  # OpenMoji's held-out combinations (English names)
OM_ROWS = {"GAN": ["stackgan"], "diffusion": ["diffusion", "latent diffusion"], "transformer": ["vqgan+ar", "vqgan+maskgit"],
           "VAE": ["cvae"]}  # fmt: skip


def om_clears(row: dict, prompt_set: str, chance: float) -> bool:
    """An OpenMoji cell clears its floor: the reader's interval above the random-variant floor (tone,
    colour), or, for a set only the judge reads (gender), R-precision's interval above chance."""
    if f"openmoji_{prompt_set}" in row:
        return not row.get(f"openmoji_{prompt_set}_under_floor", True)
    low = row.get(f"r_precision_{prompt_set}_low")
    return low is not None and low > chance


def om_cells(row: dict, chance: float) -> str:
    out = []
    for p in OM_COMPOSITIONAL:
        key = f"openmoji_{p}" if f"openmoji_{p}" in row else f"r_precision_{p}"
        out.append(f"{p} {ci(row, key)}{'' if om_clears(row, p, chance) else ' †'}")
    return ", ".join(out)


def om_hard_to_train(gan: dict, t: dict, s: dict, survey: dict | None) -> Claim:
    """OpenMoji has one render per design, so a collapse is measured against pixel diffusion's
    diversity, not the renders'; with no diffusion seeds, a seed spread cannot contradict."""
    seeds = [gan] + [s[m] for m in ("stackgan seed 1", "stackgan seed 2") if m in s]
    rule = (f"supported if a GAN run collapses (diversity (CLIP) under {COLLAPSE:g} of pixel diffusion's) or 25% of "
            "the training designs reads fewer tones and colours (paired); else not separable (no diffusion seeds here "
            "to set a seed spread against)")  # fmt: skip
    if len(seeds) < 3 or "stackgan data 25%" not in s:
        return Claim("GAN", "hard to train, needs much data and compute", "", "the runs of configs/compare/"
                     "survey_openmoji.yaml are not evaluated", "not measured", rule)  # fmt: skip
    reference = t["diffusion"]["diversity_clip"]
    collapsed = [r for r in seeds if r["diversity_clip"] < COLLAPSE * reference]
    data = paired(survey, "stackgan data 25%", "stackgan seed 1", "overall")
    quarter = s["stackgan data 25%"]
    result = (f"3 StackGAN seeds: R-precision {values(seeds, 'r_precision')}, reader overall "
              f"{values(seeds, 'openmoji_overall')}, FID {values(seeds, 'fid_clip')}; diversity (CLIP) "
              f"{values(seeds, 'diversity_clip')} (pixel diffusion {reference:.3f}); collapsed {len(collapsed)} of 3; 25% of "
              f"the training designs minus all (seed 1): reader overall {fmt_pair(data)}, R-precision "
              f"{quarter['r_precision']:.3f} vs {s['stackgan seed 1']['r_precision']:.3f}, FID {quarter['fid_clip']:.3f} vs "
              f"{s['stackgan seed 1']['fid_clip']:.3f}")  # fmt: skip
    verdict = "supported" if collapsed or sign(data) < 0 else "not separable"
    return Claim("GAN", "hard to train, needs much data and compute", "", result, verdict, rule)


def openmoji_claims(table: dict, survey: dict | None = None) -> list[Claim]:
    """The same claims on the OpenMoji table (``configs/compare/openmoji.yaml``) and, for "hard to
    train", the StackGAN seeds and data fraction of ``configs/compare/survey_openmoji.yaml``; the
    compositional sets are the held-out tone, colour (the variant reader against its floor) and
    gender (the judge's R-precision against chance) splits."""
    t = rows_by_method(table)
    have = {fam: [t[m] for m in ms if m in t and "error" not in t[m]] for fam, ms in OM_ROWS.items()}
    chance = t["chance"]["r_precision"] if "chance" in t else 0.01
    gan, others = have["GAN"][0], [r for fam, rs in have.items() if fam != "GAN" for r in rs]
    out = [photorealism(gan, others)]
    out.append(om_hard_to_train(gan, t, rows_by_method(survey) if survey else {}, survey))
    under = [p for p in OM_COMPOSITIONAL if not om_clears(gan, p, chance)]
    anyone = [(r["method"], p) for r in others for p in OM_COMPOSITIONAL if om_clears(r, p, chance)]
    out.append(Claim(
        "GAN", "text mismatch on complex descriptions", "", f"StackGAN: {om_cells(gan, chance)}; "
        + (f"other families clearing a floor: {anyone}" if anyone else "no other family clears one either"),
        ("supported" if len(under) == len(OM_COMPOSITIONAL) else "contradicted") + ("" if anyone else " (not specific to GANs)"),
        "supported if none of the GAN's held-out tone, colour and gender cells clears its floor",
    ))  # fmt: skip

    def accurate(family: str, claim: str) -> Claim:
        rows = have[family]
        best = max(sum(om_clears(r, p, chance) for p in OM_COMPOSITIONAL) for r in rows)
        return Claim(family, claim, "", "; ".join(f"{r['method']}: {om_cells(r, chance)}" for r in rows),
                     "supported" if best >= 2 else "contradicted",
                     "supported if one row clears the floor on at least two of tone, colour and gender")  # fmt: skip

    out.append(accurate("diffusion", "accurate on complex descriptions"))
    fastest = max((r for r in others + [gan] if r.get("images_per_sec")), key=lambda r: r["images_per_sec"])
    slow = max(have["diffusion"], key=lambda r: r["images_per_sec"])
    ratio = fastest["images_per_sec"] / slow["images_per_sec"]
    out.append(Claim(
        "diffusion", "costly generation", "", ", ".join(f"{r['method']} {1 / r['images_per_sec']:.3f} s" for r in have["diffusion"])
        + f"; {fastest['method']} {1 / fastest['images_per_sec']:.4f} s ({ratio:.0f}x faster than the faster diffusion)",
        "supported" if ratio >= 10 else "contradicted", "supported if another family generates at least 10x faster",
    ))  # fmt: skip
    out.append(accurate("transformer", "excellent on complex, multi-part descriptions"))
    priors = have["transformer"]
    out.append(Claim(
        "transformer", "details blurry without extra stages", "",
        ", ".join(f"{r['method']} {r['sharpness']:.2f}" for r in priors) + f"; pixel diffusion {t['diffusion']['sharpness']:.2f}",
        "supported" if all(r["sharpness"] < BLUR for r in priors) else "contradicted", f"every token-prior row under {BLUR:g}",
    ))  # fmt: skip
    cvae = have["VAE"][0]
    rivals = [gan, *priors]
    above = all(cvae["r_precision_low"] > r["r_precision_high"] for r in rivals)
    below = any(cvae["r_precision_high"] < r["r_precision_low"] for r in rivals)
    out.append(Claim(
        "VAE", "less compute than GANs and transformers", "",
        "R-precision (all sets) after the same 10 minutes of one core: "
        + ", ".join(f"{r['method']} {ci(r, 'r_precision')}" for r in [cvae, *rivals])
        + "; parameters: " + ", ".join(f"{r['method']} {r['params_m']:.1f} M" for r in [cvae, *rivals]),
        "supported" if above else "contradicted" if below else "not separable",
        "at equal training time: supported if the CVAE's R-precision interval is above the GAN's and the token "
        "prior's, contradicted if below either (no held-out curve is logged on OpenMoji)",
    ))  # fmt: skip
    out.append(diverse(table, cvae, t.get("real renders", {})))
    out.append(Claim("VAE", "blurry, with low detail", "",
                     f"CVAE {cvae['sharpness']:.2f}; StackGAN {gan['sharpness']:.2f}, pixel diffusion {t['diffusion']['sharpness']:.2f}",
                     "supported" if cvae["sharpness"] < BLUR else "contradicted", f"under {BLUR:g}"))  # fmt: skip
    rows = [r for rs in have.values() for r in rs]
    best_fid = min(rows, key=lambda r: r["fid_clip"])
    best = max(rows, key=lambda r: r["r_precision"])
    tie = [r["method"] for r in rows if r is not best and r["r_precision_high"] >= best["r_precision_low"]]
    out.append(conclusion(best_fid, gan, best, "r_precision", tie, "the highest R-precision", "R-precision",
                          "intervals overlapping", "its interval clear of every other's"))  # fmt: skip
    return out


def markdown(rows: list[Claim], dataset: str, second: list[Claim] | None = None, second_name: str = "") -> str:
    """The claims table; with ``second``, a result and a verdict column for the second dataset too
    (matched by family and claim)."""
    if second is None:
        lines = [f"| family | claim | measured by | {dataset} | verdict | rule |", "|---|---|---|---|---|---|"]
        lines += [f"| {c.family} | {c.claim} | {c.measure} | {c.result} | **{c.verdict}** | {c.rule} |" for c in rows]
        return "\n".join(lines)
    other = {(c.family, c.claim): c for c in second}
    lines = [f"| family | claim | measured by | {dataset} | verdict | {second_name} | verdict |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in rows:
        o = other.get((c.family, c.claim))
        tail = f"{o.result} | **{o.verdict}**" + (f" ({o.rule})" if o.rule and o.rule != c.rule else "") if o else "– | –"
        lines.append(f"| {c.family} | {c.claim} | {c.measure}; rule: {c.rule} | {c.result} | **{c.verdict}** | {tail} |")
    return "\n".join(lines)


def openmoji_markdown(rows: list[Claim]) -> str:
    """The OpenMoji claims as a table of their own (each with its rule: several differ from shapes')."""
    lines = ["| family | claim | OpenMoji 32 px (test part) | verdict | rule |", "|---|---|---|---|---|"]
    lines += [f"| {c.family} | {c.claim} | {c.result} | **{c.verdict}** | {c.rule} |" for c in rows]
    return "\n".join(lines)


def load_openmoji(table_path: str, survey_path: str) -> list[Claim]:
    """The OpenMoji claims from the table's results.json and, where it exists, the survey runs'."""
    with open(table_path) as f:
        table = json.load(f)
    survey = None
    if os.path.isfile(survey_path):
        with open(survey_path) as f:
            survey = json.load(f)
    return openmoji_claims(table, survey)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="docs/compare_v2/results.json", help="the family table's results.json")
    p.add_argument("--survey", default="runs/compare/survey_shapes/results.json",
                   help="results.json of configs/compare/survey_shapes.yaml (seeds and data fraction)")  # fmt: skip
    p.add_argument("--train-root", default="runs/compare/train", help="the table's runs (their W&B files)")
    p.add_argument("--threshold", type=float, default=0.25, help="the held-out score for 'minutes to a score'")
    p.add_argument("--openmoji", default="runs/compare/openmoji/results.json",
                   help="results.json of configs/compare/openmoji.yaml: the OpenMoji columns (left out when absent)")  # fmt: skip
    p.add_argument("--survey-openmoji", dest="survey_openmoji", default="runs/compare/survey_openmoji/results.json",
                   help="results.json of configs/compare/survey_openmoji.yaml (StackGAN seeds and data fraction)")  # fmt: skip
    p.add_argument("--out", help="also write the table here (markdown)")
    p.add_argument("--openmoji-only", dest="openmoji_only", action="store_true",
                   help="the OpenMoji claims alone (family, claim, result, verdict, rule): for when the shapes "
                        "survey runs and their W&B curves are not on this machine")  # fmt: skip
    a = p.parse_args()
    if a.openmoji_only:
        if not os.path.isfile(a.openmoji):
            sys.exit(f"error: {a.openmoji} not found; make it with python evaluate.py --config configs/compare/openmoji.yaml --train")
        text = openmoji_markdown(load_openmoji(a.openmoji, a.survey_openmoji))
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
        return
    for path in (a.table,):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found; make it with python evaluate.py --config configs/compare/shapes.yaml")
    with open(a.table) as f:
        table = json.load(f)
    survey = None
    if os.path.isfile(a.survey):
        with open(a.survey) as f:
            survey = json.load(f)
    else:
        print(f"note: {a.survey} not found: the seed and data claims read 'not measured' "
              "(python evaluate.py --config configs/compare/survey_shapes.yaml --train)")  # fmt: skip
    found = curves(a.train_root)
    second = None
    if os.path.isfile(a.openmoji):
        second = load_openmoji(a.openmoji, a.survey_openmoji)
    else:
        print(f"note: {a.openmoji} not found: no OpenMoji columns (python evaluate.py --config configs/compare/openmoji.yaml --train)")
    text = markdown(claims(table, survey, found, a.threshold), "shapes 32 px (test part)", second, "OpenMoji 32 px (test part)")
    print(text)
    if found:
        print("\nheld-out score curves read: " + ", ".join(f"{m} ({len(c)} points)" for m, c in found.items()))
    print(f"rules: a run collapsed under {COLLAPSE:g} x the renders' diversity (CLIP); blurry under {BLUR:g} of the renders' sharpness")
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
