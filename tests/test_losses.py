"""Each loss against a slow, obviously-correct loop over pixels and segments, and its gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses as L


def toy_batch(seed=0, BV=4, D=6, h=5, w=6, n_regions=3):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(BV, D, h, w, generator=g, dtype=torch.float64), dim=1)
    regions = torch.randint(0, n_regions, (BV, h, w), generator=g)
    regions[:, 0, 0] = -1  # a pixel outside the image
    return z, regions


def segments_by_loop(z, regions, seg):
    """Rebuild per-segment pixel lists by looping over the id map."""
    pixels = {}
    BV, _, h, w = z.shape
    for b in range(BV):
        for i in range(h):
            for j in range(w):
                s = int(seg.ids[b, i, j])
                if s >= 0:
                    pixels.setdefault(s, []).append((b, i, j))
    return pixels


def test_kmeans_segments_structure_and_hand_case():
    z, regions = toy_batch()
    seg = L.kmeans_segments(z, regions, views=2, grid=(2, 2), iters=5)
    pixels = segments_by_loop(z, regions, seg)
    assert set(pixels) == set(range(seg.count))
    for s, px in pixels.items():
        assert len({b for b, _, _ in px}) == 1 and {b // 2 for b, _, _ in px} == {int(seg.image[s])}
        assert {int(regions[b, i, j]) for b, i, j in px} == {int(seg.region[s])}
    assert (seg.ids == -1).equal(regions == -1)
    # two flat halves of opposite embeddings, one region: two segments split at the middle column
    e = torch.zeros(2, 4, 4, 6)
    e[:, 0, :, :3], e[:, 1, :, 3:] = 1.0, 1.0
    seg = L.kmeans_segments(e, torch.zeros(2, 4, 6, dtype=torch.long), grid=(1, 2), iters=3)
    assert seg.count == 4 and (seg.ids[0, :, :3] == seg.ids[0, 0, 0]).all()
    assert (seg.ids[0, :, 3:] != seg.ids[0, 0, 0]).all()


def test_image_segments_position_weight():
    """knn.py --kmeans-lambda: with weight 0 the evaluation k-means sees the embeddings alone, so a
    map of two flat parts split along a diagonal gives exactly those two parts; with the default
    weight 1 the 36 segments are also compact in position, so they cut the parts into many."""
    z = torch.zeros(1, 4, 12, 12)
    # the upper right, off the grid lines
    part = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=3)
    z[0, 0][part], z[0, 1][~part] = 1.0, 1.0
    seg, emb = L.image_segments(z, 36, 20, lam=0.0)
    assert seg.count == 2 and len(emb) == 2
    assert (seg.ids[0][part] == seg.ids[0][part][0]).all() and (
        seg.ids[0][~part] != seg.ids[0][part][0]
    ).all()
    seg, _ = L.image_segments(z, 36, 20, lam=1.0)
    assert seg.count > 20
    for s in range(seg.count):  # still never a segment across the two parts
        assert len(set(part[seg.ids[0] == s].tolist())) == 1


def test_regions_on_grid_reads_cell_centres():
    """Cell i of a stride-8 grid takes the region at pixel 8i + 4, the middle of its block: a
    boundary at column 13 puts cell 1 (pixels 8-15, centre 12) left of it, at 12 right of it."""
    for edge, cell1 in ((13, 0), (12, 1)):
        r = torch.zeros(1, 16, 24, dtype=torch.long)
        r[..., edge:] = 1
        grid = L.regions_on_grid(r, (2, 3))
        assert grid.tolist() == [[[0, cell1, 1]] * 2], (edge, grid.tolist())
        # pixels 0, 8, 16
        assert L.regions_on_grid(r, (2, 3), "corner").tolist() == [[[0, 0, 1]] * 2]


def reference_contrast(z, regions, seg, pix, kappa, is_pos, extra=()):
    """mean_p -log(sum_pos e / sum_all e) by loops over pixels and segments. is_pos(b, i, j, s) for
    the batch's segments; extra: [(vec, positive(b, i, j))], more segments (a memory bank)."""
    BV, D, h, w = z.shape
    pixels = segments_by_loop(z, regions, seg)
    zs = {s: F.normalize(sum(z[b, :, i, j] for b, i, j in px), dim=0) for s, px in pixels.items()}
    total = 0.0
    for p in pix.tolist():
        b, rem = divmod(p, h * w)
        i, j = divmod(rem, w)
        zp = z[b, :, i, j]
        num = den = 0.0
        for s, vec in zs.items():
            e = math.exp(kappa * float(zp @ vec))
            den += e
            num += e if is_pos(b, i, j, s) else 0.0
        for vec, positive in extra:
            e = math.exp(kappa * float(zp @ vec))
            den += e
            num += e if positive(b, i, j) else 0.0
        total += -math.log(num / den)
    return total / len(pix)


def reference_lc(z, regions, seg, pix, kappa, views=2):
    """L_c's positives: the segments of the pixel's image and superpixel."""
    same = lambda b, i, j, s: (int(seg.image[s]) == b // views
                               and int(seg.region[s]) == int(regions[b, i, j]))
    return reference_contrast(z, regions, seg, pix, kappa, same)


def test_pixel_segment_contrastive_matches_loop():
    z, regions = toy_batch()
    seg = L.kmeans_segments(z, regions, grid=(2, 2), iters=3)
    pix = L.pixel_sample(seg, 20, torch.Generator().manual_seed(1))
    assert len(pix) == 20 and (seg.ids.reshape(-1)[pix] >= 0).all()
    ours = L.pixel_segment_contrastive(z, seg, regions, pix, kappa=10.0)
    assert float(ours) == pytest.approx(reference_lc(z, regions, seg, pix, 10.0), rel=1e-9)


def test_embedding_consistency_matches_loop():
    g = torch.Generator().manual_seed(0)
    zs = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    cs = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    ref = (
        sum(
            -math.log(
                math.exp(3 * float(zs[s] @ cs[s]))
                / sum(math.exp(3 * float(zs[s] @ cs[t])) for t in range(5))
            )
            for s in range(5)
        )
        / 5
    )
    assert float(L.embedding_consistency(zs, cs, kappa=3.0)) == pytest.approx(ref, rel=1e-9)
    cos_ref = sum(1 - float(zs[s] @ cs[s]) for s in range(5)) / 5
    assert float(L.embedding_consistency(zs, cs, form="cos")) == pytest.approx(cos_ref, rel=1e-9)


def test_semantic_consistency_matches_loop():
    z, regions = toy_batch()
    seg = L.kmeans_segments(z, regions, grid=(2, 2), iters=3)
    pix = L.pixel_sample(seg, 0)
    g = torch.Generator().manual_seed(2)
    protos = F.normalize(torch.randn(5, z.shape[1], generator=g, dtype=torch.float64), dim=1)
    targets = torch.randint(0, 5, (seg.count,), generator=g)
    targets[0] = -1  # a segment without a label
    ours = L.semantic_consistency(z, seg, pix, targets, protos, kappa=7.0)
    h, w = z.shape[2:]
    terms = []
    for p in pix.tolist():
        b, rem = divmod(p, h * w)
        i, j = divmod(rem, w)
        y = int(targets[seg.ids[b, i, j]])
        if y < 0:
            continue
        logits = [7.0 * float(z[b, :, i, j] @ protos[k]) for k in range(5)]
        terms.append(-logits[y] + math.log(sum(math.exp(v) for v in logits)))
    assert float(ours) == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_gradients():
    z0, regions = toy_batch(BV=2, D=3, h=3, w=4)
    seg = L.kmeans_segments(z0, regions, grid=(1, 2), iters=2)
    pix = L.pixel_sample(seg, 0)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    protos = F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    targets = torch.arange(seg.count) % 4
    cs = F.normalize(torch.randn(seg.count, 3, dtype=torch.float64), dim=1)

    def total(x):
        z = F.normalize(x, dim=1)
        return (L.pixel_segment_contrastive(z, seg, regions, pix, kappa=2.0)
                + L.embedding_consistency(L.segment_means(z, seg), cs, kappa=2.0)
                + L.semantic_consistency(z, seg, pix, targets, protos, kappa=2.0))
    assert torch.autograd.gradcheck(total, (x,))


def test_unknown_prototypes_labels_update_and_shift():
    text = torch.eye(5)[:3]  # three known classes along axes 0, 1, 2
    up = L.UnknownPrototypes(num=2, dim=5, momentum=0.5, tau=0.5, dead_after=2)
    cs = F.normalize(
        torch.tensor([[0, 1.0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0.9, 0.1], [0, 0, 0, 0.1, 1]]),
        dim=1,
    )
    y, unknown = up.targets(cs, text)
    assert unknown.tolist() == [False, True, True, True] and int(y[0]) == 1
    up.update(cs, unknown, torch.Generator().manual_seed(0))
    assert bool(up.started) and torch.allclose(up.img_mean, cs.mean(0))
    y, _ = up.targets(cs, text)
    assert set(y[1:].tolist()) <= {3, 4}  # unknown segments point at the unknown prototypes
    before = up.protos.clone()
    up.update(cs, unknown)
    assert torch.allclose(up.protos.norm(dim=1), torch.ones(2))
    moved = ~torch.isclose(before, up.protos).all(dim=1)
    assert moved.any() or torch.equal(up.idle, torch.zeros(2, dtype=torch.long))
    shifted = up.shifted(text)
    torch.testing.assert_close(shifted, F.normalize(up.protos - up.img_mean + text.mean(0), dim=1))


def test_pseudo_label_loss_is_cross_entropy():
    z, _ = toy_batch()
    text = F.normalize(torch.randn(3, z.shape[1], dtype=torch.float64), dim=1)
    labels = torch.randint(-1, 3, (z.shape[0], z.shape[2], z.shape[3]))
    logits = 5.0 * torch.einsum("bdhw,kd->bkhw", z, text)
    keep = labels >= 0
    ref = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], labels[keep])
    torch.testing.assert_close(L.pseudo_label_loss(z, labels, text, 5.0), ref)


def test_clip_s4_objective_is_the_weighted_sum_of_its_terms():
    """ClipS4Objective: L = lambda_c L_c + lambda_e L_e + lambda_s L_s, each term the function
    tested above against a loop; a weight of 0 leaves its term out."""
    z, regions = toy_batch()
    clip_map = F.normalize(torch.randn(z.shape, generator=torch.Generator().manual_seed(3),
                                       dtype=torch.float64), dim=1)
    seg = L.kmeans_segments(z, regions, grid=(2, 2), iters=3)
    pix = L.pixel_sample(seg, 20, torch.Generator().manual_seed(1))
    text = F.normalize(torch.randn(3, z.shape[1], generator=torch.Generator().manual_seed(4),
                                   dtype=torch.float64), dim=1)
    unknown = L.UnknownPrototypes(0, z.shape[1], tau=0.0).double()  # every segment known
    lam = {"c": 0.5, "e": 2.0, "s": 3.0}
    out = L.ClipS4Objective(text, unknown, lam, 10.0, 7.0, 20.0, "nce")(z, seg, regions, pix,
                                                                        clip_map)
    ref_cs = L.segment_means(clip_map, seg)
    targets, _ = unknown.targets(ref_cs, text)
    ref = {"c": L.pixel_segment_contrastive(z, seg, regions, pix, 10.0, 2),
           "e": L.embedding_consistency(L.segment_means(z, seg), ref_cs, 7.0, "nce"),
           "s": L.semantic_consistency(z, seg, pix, targets, text, 20.0)}
    for k in ref:
        torch.testing.assert_close(out.terms[k], ref[k])
    torch.testing.assert_close(out.total, 0.5 * ref["c"] + 2.0 * ref["e"] + 3.0 * ref["s"])
    assert float(out.stats["unknown_share"]) == 0.0
    out = L.ClipS4Objective(text, unknown, {"c": 1.0, "e": 1.0, "s": 0.0})(z, seg, regions, pix,
                                                                            clip_map)
    assert set(out.terms) == {"c", "e"}


def test_maskclip_plus_objective_labels_from_teacher_then_self():
    z, regions = toy_batch()
    clip_map = F.normalize(torch.randn(z.shape, generator=torch.Generator().manual_seed(5),
                                       dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(3, z.shape[1], dtype=torch.float64), dim=1)
    objective = L.MaskClipPlusObjective(text, 5.0, self_train_from=1)
    for source, step in ((clip_map, 0), (z, 1)):  # the teacher's labels, then f's own
        labels = torch.einsum("bdhw,kd->bkhw", source, text).argmax(1)
        labels[regions < 0] = -1  # padding is never a target
        out = objective(z, None, regions, None, clip_map, step)
        torch.testing.assert_close(out.total, L.pseudo_label_loss(z, labels, text, 5.0))
        assert set(out.terms) == {"p"}
