"""The survey-claims table: each verdict follows its written rule from the numbers, and flips when
the numbers do."""

import copy

import pytest

import benchmarks.survey_claims as sc

SETS = ("single", "two_objects", "counting", "colour_binding", "position")


def row(method, rate=0.1, fid=0.1, div=0.1, sharp=0.3, ips=100.0, under=True):
    r = {"method": method, "fid_clip": fid, "fid_clip_low": fid - 0.01, "fid_clip_high": fid + 0.01, "kid_clip": 0.001,
         "diversity_clip": div, "diversity_clip_low": div - 0.01, "diversity_clip_high": div + 0.01,
         "sharpness": sharp, "images_per_sec": ips, "params_m": 10.0, "shapes_overall": rate,
         "shapes_overall_low": rate - 0.02, "shapes_overall_high": rate + 0.02}  # fmt: skip
    for s in SETS:
        r.update({f"shapes_{s}": rate, f"shapes_{s}_low": rate - 0.02, f"shapes_{s}_high": rate + 0.02,
                  f"shapes_{s}_under_floor": under})  # fmt: skip
    return r


def table():
    rows = [row("stackgan", fid=0.25, ips=400), row("diffusion", ips=3), row("latent diffusion", ips=13),
            row("vqgan+ar"), row("vqgan+maskgit"), row("cvae", rate=0.3, fid=0.04, ips=380),
            row("real renders", rate=1.0, fid=0.0, div=0.12, sharp=1.0)]  # fmt: skip
    paired = {"cvae - diffusion": {"diversity (CLIP)": [-0.01, -0.02, -0.001], "overall": [0.2, 0.1, 0.3]},
              "cvae - latent diffusion": {"diversity (CLIP)": [0.03, 0.02, 0.04], "overall": [0.02, -0.02, 0.06]}}  # fmt: skip
    return {"rows": rows, "paired": paired}


def survey(collapse=False, data_diff=(0.0, -0.01, 0.01), gan_fids=(0.25, 0.26), diff_fids=(0.1, 0.1)):
    rows = [row("stackgan seed 1", fid=gan_fids[0], ips=400), row("stackgan seed 2", fid=gan_fids[1], ips=400,
            div=0.001 if collapse else 0.1), row("stackgan data 25%", fid=0.3, ips=400),
            row("diffusion seed 1", fid=diff_fids[0], ips=3), row("diffusion seed 2", fid=diff_fids[1], ips=3)]  # fmt: skip
    return {"rows": rows, "paired": {"stackgan data 25% - stackgan seed 1": {"overall": list(data_diff)}}}


def verdict(claims, text):
    return next(c.verdict for c in claims if c.claim.startswith(text))


def test_photorealism_follows_fid():
    t = table()
    assert verdict(sc.claims(t, None, {}), "high image quality") == "contradicted"
    for r in t["rows"]:  # between the CVAE's 0.04 and the others' 0.1
        if r["method"] == "stackgan":
            r.update(fid_clip=0.07, fid_clip_low=0.06, fid_clip_high=0.08)
    assert verdict(sc.claims(t, None, {}), "high image quality") == "not separable"
    for r in t["rows"]:
        if r["method"] == "stackgan":
            r.update(fid_clip=0.01, fid_clip_low=0.005, fid_clip_high=0.015)
    assert verdict(sc.claims(t, None, {}), "high image quality") == "supported"
    assert verdict(sc.claims(t, None, {}), "photorealism: GAN") == "half supported"  # the CVAE, not a diffusion, is the most accurate


def test_hard_to_train_needs_every_seed_and_flips_on_collapse_spread_or_data():
    t = table()
    assert verdict(sc.claims(t, None, {}), "hard to train") == "not measured"
    # FID ranges over the 3 seeds: GAN 0.03, diffusion 0.02: neither over twice nor at most diffusion's
    assert verdict(sc.claims(t, survey(gan_fids=(0.25, 0.28), diff_fids=(0.1, 0.12)), {}), "hard to train") == "not separable"
    assert verdict(sc.claims(t, survey(gan_fids=(0.25, 0.25), diff_fids=(0.1, 0.2)), {}), "hard to train") == "contradicted"
    assert verdict(sc.claims(t, survey(collapse=True, gan_fids=(0.25, 0.25), diff_fids=(0.1, 0.2)), {}), "hard to train") == "supported"
    assert verdict(sc.claims(t, survey(data_diff=(-0.1, -0.2, -0.05), gan_fids=(0.25, 0.25), diff_fids=(0.1, 0.2)), {}),
                   "hard to train") == "supported"  # fmt: skip
    assert verdict(sc.claims(t, survey(gan_fids=(0.25, 0.5), diff_fids=(0.1, 0.2)), {}), "hard to train") == "supported"


def test_accuracy_claims_follow_the_floors():
    t = table()
    assert verdict(sc.claims(t, None, {}), "accurate on complex") == "contradicted"
    assert verdict(sc.claims(t, None, {}), "text mismatch") == "supported (not specific to GANs)"
    for r in t["rows"]:
        if r["method"] == "latent diffusion":
            r["shapes_two_objects_under_floor"] = r["shapes_position_under_floor"] = False
    claims = sc.claims(t, None, {})
    assert verdict(claims, "accurate on complex") == "supported"
    assert verdict(claims, "text mismatch") == "supported"
    mismatch = next(c for c in claims if c.claim.startswith("text mismatch"))
    assert "('latent diffusion', 'two_objects')" in mismatch.result
    t = table()  # two diffusion rows clearing one set each: no row is accurate on two
    for r in t["rows"]:
        if r["method"] in ("diffusion", "latent diffusion"):
            r[f"shapes_{'two_objects' if r['method'] == 'diffusion' else 'position'}_under_floor"] = False
    assert verdict(sc.claims(t, None, {}), "accurate on complex") == "contradicted"


def test_vae_claims():
    t = table()
    claims = sc.claims(t, None, {"cvae": [(4.0, 0.1), (8.0, 0.3)], "stackgan": [(20.0, 0.0)], "vqgan+maskgit": [(16.0, 0.25)]})
    assert verdict(claims, "less compute") == "supported"
    assert verdict(claims, "diverse results") == "contradicted"  # less diverse than pixel diffusion (paired)
    assert verdict(claims, "blurry, with low detail") == "supported"
    claims = sc.claims(t, None, {"cvae": [(4.0, 0.1), (18.0, 0.3)], "vqgan+maskgit": [(16.0, 0.25)]})
    assert verdict(claims, "less compute") == "contradicted"
    t["paired"]["cvae - diffusion"]["diversity (CLIP)"] = [0.01, 0.005, 0.02]
    assert verdict(sc.claims(t, None, {}), "diverse results") == "supported"


def test_minutes_to_a_score_and_first_point():
    curve = [(2.0, 0.0), (4.0, 0.3), (6.0, 0.2)]
    assert sc.minutes_to(curve, 0.25) == 4.0
    assert sc.minutes_to(curve, 0.5) is None
    assert sc.time_line("m", [(20.0, 0.4)], 0.25) == "m by 20 min (its first score)"
    assert sc.time_line("m", curve, 0.5) == "m not in 6 min (ends at 0.20)"


@pytest.mark.parametrize("ips, expected", [(3.0, "supported"), (300.0, "contradicted")])
def test_costly_generation(ips, expected):
    t = copy.deepcopy(table())
    for r in t["rows"]:
        if r["method"] in ("diffusion", "latent diffusion"):
            r["images_per_sec"] = ips
    assert verdict(sc.claims(t, None, {}), "costly generation") == expected


def om_row(method, rp=0.05, fid=0.1, sharp=0.3, ips=100.0, div=0.1, tone_under=True, gender_low=0.0):
    r = {"method": method, "fid_clip": fid, "fid_clip_low": fid - 0.01, "fid_clip_high": fid + 0.01, "kid_clip": 0.001,
         "sharpness": sharp, "images_per_sec": ips, "params_m": 10.0, "diversity_clip": div,
         "r_precision": rp, "r_precision_low": rp - 0.01, "r_precision_high": rp + 0.01,
         "r_precision_gender": gender_low + 0.01, "r_precision_gender_low": gender_low, "r_precision_gender_high": gender_low + 0.02}  # fmt: skip
    for s in ("tone", "colour"):
        r.update({f"openmoji_{s}": 0.3, f"openmoji_{s}_low": 0.2, f"openmoji_{s}_high": 0.4,
                  f"openmoji_{s}_under_floor": tone_under})  # fmt: skip
    return r


def om_table():
    rows = [om_row("stackgan", fid=0.3, ips=400), om_row("diffusion", ips=3), om_row("latent diffusion", ips=12),
            om_row("vqgan+maskgit", sharp=0.2), om_row("cvae", rp=0.2, ips=380, sharp=0.6),
            om_row("real renders", rp=1.0, fid=0.0, sharp=1.0), {"method": "chance", "r_precision": 0.01}]  # fmt: skip
    return {"rows": rows, "paired": {"cvae - diffusion": {"diversity (CLIP)": [0.01, 0.005, 0.02]},
                                     "cvae - latent diffusion": {"diversity (CLIP)": [0.01, 0.005, 0.02]}}}


def test_openmoji_claims_follow_their_rules_and_sit_beside_the_shapes_ones():
    t = om_table()
    claims = sc.openmoji_claims(t)
    assert verdict(claims, "high image quality") == "contradicted"
    assert verdict(claims, "hard to train") == "not measured"
    quarter = [dict(om_row("stackgan seed 1", fid=0.3), openmoji_overall=0.1), dict(om_row("stackgan seed 2", fid=0.4),
               openmoji_overall=0.1), dict(om_row("stackgan data 25%", fid=0.3), openmoji_overall=0.1)]  # fmt: skip
    survey = {"rows": quarter, "paired": {"stackgan data 25% - stackgan seed 1": {"overall": [0.0, -0.02, 0.02]}}}
    for r in t["rows"]:
        r.setdefault("openmoji_overall", 0.1)
    assert verdict(sc.openmoji_claims(t, survey), "hard to train") == "not separable"
    survey["paired"]["stackgan data 25% - stackgan seed 1"]["overall"] = [-0.05, -0.08, -0.02]  # less data, fewer right
    assert verdict(sc.openmoji_claims(t, survey), "hard to train") == "supported"
    survey["paired"]["stackgan data 25% - stackgan seed 1"]["overall"] = [0.0, -0.02, 0.02]
    quarter[1]["diversity_clip"] = 0.001  # a collapsed seed (pixel diffusion's diversity is 0.1)
    assert verdict(sc.openmoji_claims(t, survey), "hard to train") == "supported"
    assert verdict(claims, "text mismatch") == "supported (not specific to GANs)"
    assert verdict(claims, "accurate on complex") == "contradicted"
    assert verdict(claims, "costly generation") == "supported"
    assert verdict(claims, "details blurry") == "supported"
    assert verdict(claims, "less compute") == "supported"  # the CVAE's R-precision above the GAN's and the prior's
    assert verdict(claims, "diverse results") == "supported"
    assert verdict(claims, "blurry, with low detail") == "contradicted"
    assert verdict(claims, "photorealism: GAN") == "contradicted"
    # a diffusion row that clears the tone and colour floors and beats chance on gender is accurate
    for r in t["rows"]:
        if r["method"] == "latent diffusion":
            r.update(openmoji_tone_under_floor=False, r_precision_gender_low=0.05)
    claims = sc.openmoji_claims(t)
    assert verdict(claims, "accurate on complex") == "supported"
    assert verdict(claims, "text mismatch") == "supported"
    text = sc.markdown(sc.claims(table(), None, {}), "shapes", claims, "OpenMoji")
    header, _, *lines = text.splitlines()
    assert header.count("verdict") == 2 and len(lines) == len(sc.claims(table(), None, {}))
    assert all(line.count("**") == 4 for line in lines)  # a verdict in both columns of every claim


def test_openmoji_claims_alone_keep_each_rule_and_verdict():
    claims = sc.openmoji_claims(om_table())
    header, _, *lines = sc.openmoji_markdown(claims).splitlines()
    assert header.count("verdict") == 1 and len(lines) == len(claims)
    for c, line in zip(claims, lines, strict=True):
        assert f"**{c.verdict}**" in line and line.rstrip(" |").endswith(c.rule.rstrip())
