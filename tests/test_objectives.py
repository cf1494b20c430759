"""The objective objects a run holds (losses.ClipS4Objective and the baselines'): each one called
with tensors gives the weighted sum of its term functions, owns and moves its state as a loop
written here does by hand, and builds the map of what each pixel was taught from the same labels
the loss used."""
import copy

import pytest
import torch
import torch.nn.functional as F

import losses as L
from test_losses import toy_batch


def batch_with_teacher(seed=0, K=3):
    z, regions = toy_batch(seed, BV=4, D=6)
    z = z.float()  # the dtype of a run (class_balance's weights are fp32)
    g = torch.Generator().manual_seed(seed + 1)
    clip_map = F.normalize(torch.randn(z.shape, generator=g), dim=1)
    text = F.normalize(torch.randn(K, z.shape[1], generator=g), dim=1)
    seg = L.kmeans_segments(z, regions, views=2, grid=(2, 2), iters=3)
    return z, regions, clip_map, text, seg, L.pixel_sample(seg, 0)


def test_clip_s4_object_is_its_terms_then_one_prototype_update():
    z, regions, clip_map, text, seg, pix = batch_with_teacher()
    lambdas = {"c": 1.0, "e": 0.5, "s": 2.0}
    unknown = L.UnknownPrototypes(4, 6, tau=0.6, scale=10.0)
    by_hand = copy.deepcopy(unknown)
    objective = L.ClipS4Objective(text, unknown, lambdas, kappa=7.0, kappa_e=3.0, kappa_s=20.0,
                                  balance=1.0, keep_targets=True)
    for step in range(3):  # the prototypes start at the first step, then take part in L_s
        torch.manual_seed(step)  # the prototypes are seeded from the global generator
        out = objective(z, seg, regions, pix, clip_map, step)
        torch.manual_seed(step)
        cs = L.segment_means(clip_map, seg)
        y, is_unknown = by_hand.targets(cs, text)  # the labels before the update
        protos = torch.cat([text, by_hand.shifted(text)]) if by_hand.started else text
        terms = {"c": L.pixel_segment_contrastive(z, seg, regions, pix, 7.0),
                 "e": L.embedding_consistency(L.segment_means(z, seg), cs, 3.0),
                 "s": L.semantic_consistency(z, seg, pix, y, protos, 20.0, 1.0)}
        by_hand.update(cs, is_unknown)
        total = terms["c"] + 0.5 * terms["e"] + 2.0 * terms["s"]
        torch.testing.assert_close(out.total, total)
        assert out.terms.keys() == terms.keys()
        share = float(is_unknown.float().mean())
        assert float(out.stats["unknown_share"]) == pytest.approx(share)
        assert torch.equal(unknown.protos, by_hand.protos)
        assert torch.equal(unknown.img_mean, by_hand.img_mean)
        for b, i, j in [(0, 1, 1), (3, 4, 5), (2, 0, 0)]:  # a pixel takes its segment's label
            s = int(seg.ids[b, i, j])
            assert int(out.target[b, i, j]) == (int(y[s]) if s >= 0 else -1)
    assert bool(unknown.started) and objective.state() == {"unknown": unknown}
    assert objective.taught and objective.extra_parameters() == []


def test_clip_s4_object_pixel_targets_and_no_targets_unless_asked():
    z, regions, clip_map, text, seg, pix = batch_with_teacher(seed=3)
    unknown = L.UnknownPrototypes(0, 6, tau=0.4, scale=10.0)
    objective = L.ClipS4Objective(text, unknown, {"c": 0.0, "e": 0.0, "s": 1.0}, kappa_s=5.0,
                                  target_at="pixel", keep_targets=True)
    out = objective(z, seg, regions, pix, clip_map)
    b, i, j = 1, 2, 3
    prob = F.softmax(10.0 * text @ clip_map[b, :, i, j], dim=0)
    assert int(out.target[b, i, j]) == (int(prob.argmax()) if prob.max() >= 0.4 else -1)
    plain = L.ClipS4Objective(text, unknown, {"c": 1.0, "e": 1.0, "s": 1.0})
    assert plain(z, seg, regions, pix, clip_map).target is None


def test_maskclip_plus_object_self_trains_from_its_step():
    z, regions, clip_map, text, seg, pix = batch_with_teacher(seed=1)
    objective = L.MaskClipPlusObjective(text, kappa=30.0, self_train_from=5, keep_targets=True)
    before, after = objective(z, seg, regions, pix, clip_map, 4), objective(z, seg, regions, pix,
                                                                           clip_map, 5)
    teacher_loss = L.pseudo_label_loss(z, L.pseudo_labels(clip_map, text, regions), text, 30.0)
    own_loss = L.pseudo_label_loss(z, L.pseudo_labels(z, text, regions), text, 30.0)
    assert torch.equal(before.total, teacher_loss) and torch.equal(after.total, own_loss)
    assert torch.equal(before.target, L.pseudo_labels(clip_map, text, regions))
    assert torch.equal(after.target, L.pseudo_labels(z, text, regions))
    assert objective.state() == {} and objective.taught


def test_untaught_objects_ignore_the_teacher_and_concepts_fill_their_bank():
    z, regions, _, _, seg, pix = batch_with_teacher(seed=2)
    segsort = L.SegSortObjective(lambda_c=2.0, kappa=5.0, positives="own")
    out = segsort(z, seg, regions, pix, None)
    by_hand = L.pixel_segment_contrastive(z, seg, regions, pix, 5.0, 2, "own")
    assert torch.equal(out.total, 2.0 * by_hand) and not segsort.taught and out.target is None
    torch.manual_seed(0)
    concepts = L.Concepts(8, 6, bank=5)
    cc = L.ConceptContrastObjective(concepts, {"c": 1.0, "v": 1.0, "o": 1.0}, kappa=5.0)
    out = cc(z, seg, regions, pix, None)
    zs = F.normalize(L.segment_means(z, seg), dim=1)
    assert (concepts.bank_codes >= 0).sum() == min(5, seg.count)  # the step's last segments
    assert torch.allclose(concepts.bank[concepts.bank_codes >= 0][-1], zs[-1].detach())
    assert out.stats["codes_used"]() >= 1 and cc.extra_parameters() == [concepts.weight]
    assert cc.state() == {"concepts": concepts}


def test_restore_unknown_rebuilds_the_rule_or_none():
    u = L.UnknownPrototypes(3, 4, tau=0.3, scale=7.0)
    assert L.restore_unknown(u.state_dict(), 0.3, 7.0) is None  # never started
    u.update(F.normalize(torch.randn(6, 4), dim=1), torch.ones(6, dtype=torch.bool))
    back = L.restore_unknown(u.state_dict(), 0.3, 7.0)
    assert torch.equal(back.protos, u.protos) and (back.tau, back.scale) == (0.3, 7.0)
    assert L.restore_unknown(L.UnknownPrototypes(0, 4).state_dict(), 0.5, 1.0) is None
