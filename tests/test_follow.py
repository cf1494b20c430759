"""Where each class's pixels go: the pixel-following diagnostic (loop.FollowPixels), the class
balance of the cross-entropies (losses.class_balance), the ground truth the views carry for the
diagnostic only, and the per-class validation line."""
import json

import pytest

import numpy as np
import torch
import torch.nn.functional as F

import data
import losses as L
import train
from util.loop import FollowPixels


def test_follow_pixels_counts_by_hand():
    # 3 classes; class "c" is withheld from training (not a known name)
    follow = FollowPixels(["a", "b;bee", "c"], known=["a", "b;bee"])
    gt = torch.tensor([[[0, 0, 1, 1], [1, 2, 2, 255]]])  # (1, 2, 4): a a b b / b c c ignore
    teacher = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 1]]])
    target = torch.tensor([[[0, 0, 1, -1], [1, 0, 2, 0]]])  # -1: no target, 2: an unknown proto
    pred = torch.tensor([[[1, 1, 1, 0], [1, 0, 0, 0]]])
    follow.add(gt, teacher, target, pred)
    out = follow.take()
    # ground truth: a 2, b 3, c 2 pixels (the ignored one left out)
    np.testing.assert_allclose(out["gt_share"], [100 * 2 / 7, 100 * 3 / 7, 100 * 2 / 7])
    # a: teacher 1/2, target 2/2, f 0/2; b: teacher 2/3, target 2/3, f 2/3; c withheld: 0
    np.testing.assert_allclose(out["teacher"], [50, 200 / 3, 0])
    np.testing.assert_allclose(out["target"], [100, 200 / 3, 0])
    np.testing.assert_allclose(out["f"], [0, 200 / 3, 0])
    # precision: of the (non-ignored) pixels each map calls a or b, the share that are; the
    # teacher calls a 3 times (1 right) and b 4 times (2 right); the target a 3 (2), b 2 (2), its
    # unknown prototype (2) is no known name; f a 3 (0), b 4 (2); nobody can call the withheld c
    assert out["teacher_precision"][:2] == pytest.approx([100 / 3, 50])
    assert out["target_precision"][:2] == pytest.approx([200 / 3, 100])
    assert out["f_precision"][:2] == pytest.approx([0, 50])
    assert out["teacher_precision"][2] is None and out["f_precision"][2] is None
    # no class holds under half of an even share (1/6 of 7 pixels): no small mean
    assert out["small_f"] is None
    follow.add(gt[:, :1, :2], teacher[:, :1, :2], target[:, :1, :2], pred[:, :1, :2])
    assert follow.take()["gt_share"] == [100.0, 0.0, 0.0]  # the counts started again


def test_follow_pixels_small_classes():
    follow = FollowPixels(["sky", "kite"], known=["sky", "kite"])
    gt = torch.zeros(1, 10, 10, dtype=torch.long)
    gt[0, 0, 0] = 1  # one kite pixel in 100: under half of an even share (25%)
    pred = gt.clone()
    pred[0, 0, 0] = 0  # f erases it
    follow.add(gt, gt, gt, pred)
    out = follow.take()
    assert out["small_teacher"] == 100 and out["small_target"] == 100 and out["small_f"] == 0
    # the teacher calls kite once, rightly; f never calls it: no precision to average
    assert out["small_teacher_precision"] == 100 and out["small_f_precision"] is None


def test_class_balance_by_hand():
    y = torch.tensor([0, 0, 0, 1, -1])
    torch.testing.assert_close(L.class_balance(y, 3, 1.0), torch.tensor([4 / 6, 2.0, 1.0]))
    torch.testing.assert_close(L.class_balance(y, 3, 0.5), torch.tensor([(4 / 6) ** 0.5,
                                                                          2 ** 0.5, 1.0]))
    assert L.class_balance(y, 3, 0.0) is None


def test_balanced_pseudo_label_loss_is_the_mean_over_classes():
    """With power 1, every class present weighs the same: the loss is the mean over the classes
    of each class's mean cross-entropy (a loop over classes)."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(2, 8, 5, 5, generator=g), dim=1)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (2, 5, 5), generator=g)
    labels[0, 0, :3] = -1
    labels[1, 2, 2] = 3  # a rare class: one pixel
    logits = 5.0 * torch.einsum("bdhw,kd->bkhw", z, text)
    per_pixel = F.cross_entropy(logits, labels, ignore_index=-1, reduction="none")
    ref = torch.stack([per_pixel[labels == c].mean() for c in range(4)]).mean()
    torch.testing.assert_close(L.pseudo_label_loss(z, labels, text, 5.0, balance=1.0), ref)
    plain = per_pixel[labels >= 0].mean()
    torch.testing.assert_close(L.pseudo_label_loss(z, labels, text, 5.0, balance=0.0), plain)


def test_views_carry_the_ground_truth_warped_like_the_image(toy_world):
    root, _ = toy_world
    base = data.SegDataset("toy", root, "train")
    views = data.TwoViews(base, crop_size=64, teacher_side=64, stride=8, scale=(1.0, 1.0),
                          jitter=0.0, gray=0.0)
    for i in range(4):
        item, gt = views[i], torch.from_numpy(base[i]["label"]).long()
        for v in range(2):
            expect = gt.flip(-1) if item["flips"][v] else gt
            # the whole image at its own size: the ground truth itself, mirrored with the view
            assert torch.equal(item["labels"][v], expect)


def test_training_logs_where_pixels_go(toy_world, tmp_path):
    root, _ = toy_world
    flags = ["--dataset", "toy", "--data-root", str(root), "--teacher-size", "64",
             "--crop-size", "64",
             "--backbone", "resnet18", "--backbone-weights", "none", "--head-dim", "32",
             "--batch-size", "4", "--workers", "0", "--max-pixels", "512", "--warmup", "2",
             "--log-every", "5", "--eval-images", "8", "--iters", "5", "--balance", "1",
             "--out-dir", str(tmp_path / "r")]
    train.main(train.get_args(flags))
    lines = [json.loads(ln) for ln in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    follow, val = lines[0]["follow"], lines[1]
    K = len(base_classes(root))
    assert len(follow["f"]) == K and abs(sum(follow["gt_share"]) - 100) < 1e-6
    assert len(val["val_per_class"]) == K and len(val["teacher_per_class"]) == K
    train.main(train.get_args(flags[:-1] + [str(tmp_path / "q"), "--no-follow-pixels"]))
    first = json.loads((tmp_path / "q" / "log.jsonl").read_text().splitlines()[0])
    assert "follow" not in first


def base_classes(root):
    return data.SegDataset("toy", root, "val").classes


def test_pixel_targets_label_each_pixel_by_its_own_clip_embedding():
    """--target-at pixel: L_s's label of a scored pixel is CLIP's label of the pixel's own
    embedding, not of its segment's mean; a loop over the pixels gives the same loss."""
    import math
    g = torch.Generator().manual_seed(3)
    BV, D, h, w = 2, 6, 4, 4
    z = F.normalize(torch.randn(BV, D, h, w, generator=g, dtype=torch.float64), dim=1)
    clip_map = F.normalize(torch.randn(BV, D, h, w, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(3, D, generator=g, dtype=torch.float64), dim=1)
    regions = torch.zeros(BV, h, w, dtype=torch.long)
    seg = L.kmeans_segments(z, regions, grid=(1, 1), iters=1)  # one segment per view
    pix = L.pixel_sample(seg, 0)
    unknown = L.UnknownPrototypes(0, D, tau=0.4, scale=10.0).double()
    lambdas = {"c": 0.0, "e": 0.0, "s": 1.0}
    terms = L.ClipS4Objective(text, unknown, lambdas, kappa_s=5.0, target_at="pixel")(
        z, seg, regions, pix, clip_map).terms
    losses_ = []
    for p in pix.tolist():
        b, rem = divmod(p, h * w)
        i, j = divmod(rem, w)
        prob = F.softmax(10.0 * text @ clip_map[b, :, i, j], dim=0)
        if prob.max() < 0.4:  # CLIP unsure and no unknown prototypes: no target
            continue
        y = int(prob.argmax())
        logits = [5.0 * float(z[b, :, i, j] @ text[k]) for k in range(3)]
        losses_.append(-logits[y] + math.log(sum(math.exp(v) for v in logits)))
    assert float(terms["s"]) == pytest.approx(sum(losses_) / len(losses_), rel=1e-6)
    seg_terms = L.ClipS4Objective(text, unknown, lambdas, kappa_s=5.0)(z, seg, regions, pix,
                                                                       clip_map).terms
    assert float(seg_terms["s"]) != pytest.approx(float(terms["s"]))  # one label per view there
