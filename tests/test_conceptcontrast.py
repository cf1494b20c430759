"""ConceptContrast and SegSort's own positives: each term against a slow loop over pixels and
segments, the stop-gradient routing of L_v, hand-built co-occurrence masks, the memory bank, and
training with resume on the micro toy world."""
import pytest
import torch
import torch.nn.functional as F

import losses as L
from test_losses import reference_contrast, toy_batch
from test_train import args_for

import train


def batch(seed=0):
    z, regions = toy_batch(seed)
    seg = L.kmeans_segments(z, regions, grid=(2, 2), iters=3)
    return z, regions, seg, L.pixel_sample(seg, 20, torch.Generator().manual_seed(1))


def test_segsort_own_positives_match_loop():
    """--positives own: a pixel's only positive is the segment it belongs to, in its own view."""
    z, regions, seg, pix = batch()
    own = lambda b, i, j, s: int(seg.ids[b, i, j]) == s
    ours = L.pixel_segment_contrastive(z, seg, regions, pix, 10.0, positives="own")
    assert float(ours) == pytest.approx(reference_contrast(z, regions, seg, pix, 10.0, own),
                                        rel=1e-9)
    region = L.pixel_segment_contrastive(z, seg, regions, pix, 10.0)
    assert abs(float(region) - float(ours)) > 1e-3  # the other view's segment counts there
    # extra negatives (the memory bank) join the denominator only
    neg = F.normalize(torch.randn(3, z.shape[1], dtype=torch.float64), dim=1)
    ours = L.pixel_segment_contrastive(z, seg, regions, pix, 10.0, positives="own", negatives=neg)
    ref = reference_contrast(z, regions, seg, pix, 10.0, own, [(v, lambda *a: False) for v in neg])
    assert float(ours) == pytest.approx(ref, rel=1e-9)


def test_vector_quantization_routes_each_term_to_one_side():
    """The codebook term moves only the codes, the commitment term only f: with beta 0 the
    segments get no gradient; the codes' gradient does not depend on beta, the segments' is beta
    times one."""
    g = torch.Generator().manual_seed(0)
    concepts = L.Concepts(5, 4).double()
    with torch.no_grad():
        concepts.weight.copy_(torch.randn(5, 4, generator=g, dtype=torch.float64))
    base = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    grads = {}
    for beta in (0.0, 1.0, 3.0):
        zs = base.clone().requires_grad_()
        concepts.weight.grad = None
        loss, codes = L.vector_quantization(zs, concepts, beta)
        loss.backward()
        grads[beta] = (zs.grad.clone(), concepts.weight.grad.clone())
    e = F.normalize(concepts.weight.detach(), dim=1)
    assert codes.tolist() == (base @ e.T).argmax(1).tolist()  # the most cosine-similar code
    book = (1 - (base * e[codes]).sum(1)).mean()
    assert float(loss.detach()) == pytest.approx(float(4 * book), rel=1e-9)  # both terms equal
    assert torch.count_nonzero(grads[0.0][0]) == 0 and grads[0.0][1].abs().sum() > 0
    assert torch.allclose(grads[1.0][1], grads[0.0][1]) and torch.allclose(grads[3.0][1],
                                                                           grads[0.0][1])
    assert torch.allclose(grads[3.0][0], 3 * grads[1.0][0]) and grads[1.0][0].abs().sum() > 0
    unused = sorted(set(range(5)) - set(codes.tolist()))
    assert all(grads[0.0][1][k].abs().sum() == 0 for k in unused)  # no code moves unless chosen


def test_codebook_gradient_is_the_same_every_time_on_several_threads():
    """Many segments on few codes, as in a run: the codes' gradient sums each code's segments, and
    that sum is taken in the same order every time, however many CPU threads torch uses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(0)
        zs = F.normalize(torch.randn(2000, 64, generator=g), dim=1)
        concepts = L.Concepts(256, 64)
        with torch.no_grad():
            concepts.weight.copy_(torch.randn(256, 64, generator=g))
            concepts.weight[40:] = -10 * zs[0]  # far from every segment: 40 codes take them all
        grads = []
        for _ in range(20):
            concepts.weight.grad = None
            L.vector_quantization(zs, concepts)[0].backward()
            grads.append(concepts.weight.grad.clone())
        assert all(torch.equal(x, grads[0]) for x in grads)
    finally:
        torch.set_num_threads(threads)


def test_cooccurrence_positives_by_hand():
    # image 0 has codes {0, 1}, image 1 {1}, image 2 {2}
    codes = torch.tensor([0, 1, 1, 1, 2])
    image = torch.tensor([0, 0, 1, 1, 2])
    pos = L.cooccurrence_positives(codes, image, 4, "image")
    assert pos.tolist() == [[True, True, True, True, False],   # codes 0 and 1 occur in image 0
                            [False, True, True, True, False],  # only code 1 in image 1
                            [False, False, False, False, True]]
    pos = L.cooccurrence_positives(codes, image, 4, "overlap")
    assert pos.tolist() == [[True, True, True, True, False],   # images 0 and 1 share code 1
                            [True, True, True, True, False],
                            [False, False, False, False, True]]


@pytest.mark.parametrize("rule", ["image", "overlap"])
def test_concept_cooccurrence_matches_loop(rule):
    z, regions, seg, pix = batch(2)
    concepts = L.Concepts(3, z.shape[1], bank=4).double()
    zs = L.segment_means(z, seg)
    concepts.start(zs)
    _, codes = L.vector_quantization(zs, concepts)
    img_codes = {b: set(codes[seg.image == b].tolist()) for b in seg.image.tolist()}
    if rule == "image":
        is_pos = lambda b, i, j, s: int(codes[s]) in img_codes[b // 2]
    else:
        is_pos = lambda b, i, j, s: bool(img_codes[int(seg.image[s])] & img_codes[b // 2])
    ours = L.concept_cooccurrence(z, seg, pix, codes, concepts, 10.0, rule=rule)
    assert float(ours) == pytest.approx(reference_contrast(z, regions, seg, pix, 10.0, is_pos),
                                        rel=1e-9)
    # two banked segments: positive when their code occurs in the pixel's image
    bank = F.normalize(torch.randn(2, z.shape[1], dtype=torch.float64), dim=1)
    bank_codes = torch.tensor([int(codes[0]), 2])
    concepts.remember(bank, bank_codes)
    extra = [(v, lambda b, i, j, c=int(c): c in img_codes[b // 2]) for v, c in zip(bank,
                                                                                   bank_codes)]
    ours = L.concept_cooccurrence(z, seg, pix, codes, concepts, 10.0, rule=rule)
    ref = reference_contrast(z, regions, seg, pix, 10.0, is_pos, extra)
    assert float(ours) == pytest.approx(ref, rel=1e-9)


def test_memory_bank_keeps_the_newest_segments():
    c = L.Concepts(2, 3, bank=4)
    assert len(c.memory()[0]) == 0
    c.remember(torch.ones(3, 3), torch.tensor([0, 1, 0]))
    c.remember(2 * torch.ones(3, 3), torch.tensor([1, 1, 1]))  # 6 written, 4 kept
    feats, codes = c.memory()
    assert sorted(feats[:, 0].tolist()) == [1.0, 2.0, 2.0, 2.0] and len(codes) == 4
    c.remember(3 * torch.ones(5, 3), torch.arange(5) % 2)  # more than the bank: the last 4
    assert c.memory()[0][:, 0].tolist() == [3.0] * 4


def test_objective_is_the_weighted_sum_of_its_terms():
    z, regions, seg, pix = batch(3)
    concepts = L.Concepts(4, z.shape[1]).double()
    lambdas = {"c": 1.0, "v": 2.0, "o": 0.5}
    out = L.ConceptContrastObjective(concepts, lambdas)(z, seg, regions, pix)
    total, terms = out.total, out.terms
    assert set(terms) == {"c", "v", "o"} and bool(concepts.started)
    assert float(total.detach()) == pytest.approx(sum(lambdas[k] * float(v.detach())
                                                      for k, v in terms.items()))
    lc = L.pixel_segment_contrastive(z, seg, regions, pix)
    assert float(terms["c"].detach()) == pytest.approx(float(lc))
    out = L.ConceptContrastObjective(concepts, {"c": 1.0, "v": 1.0, "o": 0.0})(z, seg, regions, pix)
    assert set(out.terms) == {"c", "v"}


def test_conceptcontrast_trains_resumes_exactly_and_runs_no_teacher(toy_world, tmp_path,
                                                                     monkeypatch):
    import model as M
    root, _ = toy_world
    calls = []
    real = M.ClipTeacher.dense
    monkeypatch.setattr(M.ClipTeacher, "dense", lambda self, *a, **k: calls.append(1) or real(
        self, *a, **k))
    flags = ["--method", "conceptcontrast", "--codebook", "16", "--memory-bank", "32", "--iters",
             "8", "--eval-every", "0"]
    train.main(args_for(root, tmp_path / "straight", *flags))
    assert calls == []  # no teacher in training
    train.main(args_for(root, tmp_path / "halves", *flags, "--stop-after", "4"))
    train.main(args_for(root, tmp_path / "halves", *flags, "--resume"))
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=False) for r in ("straight",
                                                                              "halves"))
    assert a["method"] == "conceptcontrast" and a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("weight", "bank", "bank_codes", "bank_next"):
        assert torch.equal(a["concepts"][k], b["concepts"][k]), k
    assert (a["concepts"]["bank_codes"] >= 0).all()  # 8 steps filled the bank
    log = (tmp_path / "straight" / "log.jsonl").read_text()
    assert '"L_v"' in log and '"L_o"' in log and '"codes_used"' in log
