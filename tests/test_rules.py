"""The rules beside the paper's reading that issue-style ablations switch (docs/method.md): L_c
without the pixel's own segment and with per-image negatives, the unknown rules, the pooled class
balance; each against a loop or a hand case. And tools/ablate.py on the micro toy world."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import losses as L
from test_losses import reference_contrast, toy_batch

REPO = Path(__file__).resolve().parents[1]


def reference_lc_rule(z, regions, seg, pix, kappa, rule, among, views=2):
    """L_c by loops: positives the segments of p's image and superpixel; rule "others" takes p's
    own segment out of both sums when another positive exists; among "image" keeps only the
    segments of p's image in the denominator."""
    BV, D, h, w = z.shape
    total = 0.0
    for p in pix.tolist():
        b, rem = divmod(p, h * w)
        i, j = divmod(rem, w)
        own = int(seg.ids[b, i, j])
        pos = [s for s in range(seg.count) if int(seg.image[s]) == b // views
               and int(seg.region[s]) == int(regions[b, i, j])]
        cand = list(range(seg.count))
        if rule == "others" and any(s != own for s in pos):
            pos, cand = [s for s in pos if s != own], [s for s in cand if s != own]
        if among == "image":
            cand = [s for s in cand if int(seg.image[s]) == b // views]
        pix_px = [(bb, ii, jj) for bb in range(BV) for ii in range(h) for jj in range(w)]
        vec = {s: F.normalize(sum(z[bb, :, ii, jj] for bb, ii, jj in pix_px
                                  if int(seg.ids[bb, ii, jj]) == s), dim=0) for s in cand}
        e = {s: math.exp(kappa * float(z[b, :, i, j] @ vec[s])) for s in cand}
        total += -math.log(sum(e[s] for s in pos) / sum(e.values()))
    return total / len(pix)


@pytest.mark.parametrize("rule,among", [("others", "batch"), ("region", "image"),
                                        ("others", "image")])
def test_pixel_segment_contrastive_rules_match_loop(rule, among):
    z, regions = toy_batch(seed=3, n_regions=2)
    seg = L.kmeans_segments(z, regions, grid=(2, 2), iters=3)
    pix = L.pixel_sample(seg, 12, torch.Generator().manual_seed(2))
    ours = L.pixel_segment_contrastive(z, seg, regions, pix, 10.0, positives=rule, among=among)
    ref = reference_lc_rule(z, regions, seg, pix, 10.0, rule, among)
    assert float(ours) == pytest.approx(ref, rel=1e-9)
    # and the paper's rule is still the loop of test_losses (its own segment kept, whole batch)
    same = lambda b, i, j, s: (int(seg.image[s]) == b // 2
                               and int(seg.region[s]) == int(regions[b, i, j]))
    paper = L.pixel_segment_contrastive(z, seg, regions, pix, 10.0)
    assert float(paper) == pytest.approx(reference_contrast(z, regions, seg, pix, 10.0, same))
    assert float(ours) != pytest.approx(float(paper))  # the rule changes something


def unknown_with(rule, protos=None, tau=0.6):
    u = L.UnknownPrototypes(2, 3, tau=tau, scale=10.0, rule=rule).double()
    if protos is not None:
        u.protos.copy_(protos)
        u.started.fill_(True)
    return u


def test_unknown_rules_by_hand():
    text = torch.eye(3, dtype=torch.float64)[:2]  # two known names: x and y
    cs = F.normalize(torch.tensor([[1.0, 0.0, 0.0],  # clearly x
                                   [0.52, 0.5, 0.0],  # x a little more than y: unsure
                                   [0.0, 0.1, 1.0]],  # neither: near the third axis
                                  dtype=torch.float64), dim=1)
    protos = F.normalize(torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]], dtype=torch.float64),
                         dim=1)
    prob = F.softmax(10.0 * cs @ text.T, dim=1)
    # the softmax over the known names alone is sure of the third segment (y): overconfidence
    assert prob[0].max() > 0.6 and prob[1].max() < 0.6 and prob[2, 1] > 0.6
    y, unk = unknown_with("confidence", protos).targets(cs, text)
    assert y.tolist() == [0, 2, 1] and unk.tolist() == [False, True, False]  # 2 = K + proto 0
    y, unk = unknown_with("ignore", protos).targets(cs, text)
    assert y.tolist() == [0, -1, 1] and unk.tolist() == [False, True, False]
    y, unk = unknown_with("none", protos).targets(cs, text)
    assert y.tolist() == [0, 0, 1] and not unk.any()
    # argmax over [T; U']: img_mean is 0, so the shift moves the prototypes by the text mean
    shifted = F.normalize(protos + text.mean(0), dim=1)
    ref = (cs @ torch.cat([text, shifted]).T).argmax(dim=1)
    y, unk = unknown_with("argmax", protos).targets(cs, text)
    assert y.tolist() == ref.tolist() == [0, 0, 2] and unk.tolist() == [False, False, True]
    y, unk = unknown_with("argmax").targets(cs, text)  # no prototypes yet: under tau, no target
    assert y.tolist() == [0, -1, 1] and unk.tolist() == [False, True, False]


def test_class_balance_pooled_unknown_by_hand():
    # 2 known names, 3 unknown prototypes (2, 3, 4): x 4 targets, y 2, prototypes 1 + 1
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 4, -1])
    each = L.class_balance(y, 5, 1.0)
    torch.testing.assert_close(each, torch.tensor([8 / 16, 8 / 8, 8 / 4, 1.0, 8 / 4]))
    pooled = L.class_balance(y, 5, 1.0, pool_from=2)  # three groups: x 4, y 2, unknown 2
    torch.testing.assert_close(pooled, torch.tensor([8 / 12, 8 / 6, 8 / 6, 8 / 6, 8 / 6]))
    # every group the same share of the weighted mean: x 4 * 2/3 = y 2 * 4/3 = unknown 2 * 4/3
    w = pooled[y[y >= 0]]
    assert float(w[:4].sum()) == pytest.approx(float(w[4:6].sum())) == pytest.approx(
        float(w[6:].sum()))


def test_ablate_harness_trains_scores_and_resumes(toy_world, tmp_path):
    root, _ = toy_world
    extra = ("--teacher-size 64 --crop-size 64 --eval-size 64 --backbone-weights none "
             "--head-dim 32 --batch-size 4 --workers 0 --unknown-protos 4 --max-pixels 512 "
             "--iters 3 --warmup 1 --log-every 1 --eval-every 0")
    cmd = [sys.executable, "tools/ablate.py", "--worlds", f"0={root}", "--variants",
           "no-Lc=--lambda-c 0", "recipe+cf", "--results", str(tmp_path / "rows.jsonl"),
           "--runs", str(tmp_path / "runs"), "--train-extra", extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["no-Lc", "recipe+cf"]
    # each row's scores are the run's own evaluate.py json; the class-free one withheld 4 names
    ev = json.loads((tmp_path / "runs/w0/no-Lc_s0/eval.json").read_text())
    assert rows[0]["lang"]["mIoU"] == ev["mIoU"]
    assert rows[0]["teacher"]["mIoU"] == ev["teacher"]["mIoU"]
    things = [ev["per_class"][t] for t in ("ball", "box", "tree", "car", "kite", "star")
              if ev["per_class"][t] is not None]
    assert rows[0]["lang"]["things"] == pytest.approx(sum(things) / len(things))
    args = json.loads((tmp_path / "runs/w0/no-Lc_s0/args.json").read_text())
    assert args["lambda_c"] == 0 and args["iters"] == 3
    assert rows[1]["withheld"]["names"] == ["water", "road", "ball", "car"]
    assert json.loads((tmp_path / "runs/w0/recipe+cf_s0/args.json").read_text())[
        "unknown_classes"] == ["water", "road", "ball", "car"]
    assert rows[0]["extra"] == extra.split()  # in the key, and beside the variant's name
    assert f"| 0 | no-Lc ({extra}) | 0 |" in out.stdout and "teacher (MaskCLIP)" in out.stdout
    # the same command again: every row found done, nothing trained
    before = (tmp_path / "runs/w0/no-Lc_s0/train.out").stat().st_mtime
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2
    assert (tmp_path / "runs/w0/no-Lc_s0/train.out").stat().st_mtime == before
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2


def test_relational_consistency_matches_loop_and_is_zero_on_a_copy():
    g = torch.Generator().manual_seed(5)
    zs = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    cs = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    t = 0.2
    ref = 0.0
    for s in range(6):
        others = [o for o in range(6) if o != s]
        p = torch.softmax(torch.stack([cs[s] @ cs[o] / t for o in others]), 0)
        q = torch.softmax(torch.stack([zs[s] @ zs[o] / t for o in others]), 0)
        ref += float((p * (p.log() - q.log())).sum())
    assert float(L.relational_consistency(zs, cs, t)) == pytest.approx(ref / 6, rel=1e-9)
    assert float(L.relational_consistency(cs, cs, t)) == pytest.approx(0.0, abs=1e-12)
    zs.requires_grad_(True)
    L.relational_consistency(zs, cs, t).backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
