"""evaluate.py: the same numbers as toy/prepare.py's own MaskCLIP readout, class-free splits,
checkpoints."""
import json

import pytest

import evaluate
import train


def test_teacher_scores_match_toy_report_and_split(toy_world, tmp_path):
    root, result = toy_world
    out = tmp_path / "m.json"
    m = evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root), "--method",
                                         "maskclip", "--clip-config", str(root / "toyclip.json"),
                                         "--clip-pretrained", str(root / "toyclip.pt"), "--size",
                                         "64", "--unknown-classes", "ball", "star", "--json",
                                         str(out)]))
    assert m["mIoU"] == pytest.approx(result["maskclip"]["mIoU"], abs=1e-6)
    saved = json.loads(out.read_text())
    assert set(saved) >= {"mIoU", "pAcc", "mAcc", "per_class", "known", "unknown"}
    assert set(saved["unknown"]["per_class"]) == {"ball", "star"}
    assert len(saved["known"]["per_class"]) == 12


def test_checkpoint_evaluates_with_its_own_withheld_names(toy_world, tmp_path):
    root, _ = toy_world
    from test_train import args_for
    train.main(args_for(root, tmp_path / "run", "--iters", "2", "--unknown-classes", "kite"))
    m = evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root),
                                         "--checkpoint", str(tmp_path / "run" / "ckpt.pt"),
                                         "--size", "64", "--limit", "4"]))
    assert list(m["unknown"]["per_class"]) == ["kite"] and 0 <= m["mIoU"] <= 100
    # two runs (as the four fold runs): each row as alone, then their mean and std
    train.main(args_for(root, tmp_path / "run2", "--iters", "1", "--unknown-classes", "kite",
                        "--seed", "1"))
    m2 = evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root),
                                          "--checkpoint", str(tmp_path / "run2" / "ckpt.pt"),
                                          "--size", "64", "--limit", "4"]))
    both = evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root),
                                            "--checkpoint", str(tmp_path / "run" / "ckpt.pt"),
                                            str(tmp_path / "run2" / "ckpt.pt"), "--size", "64",
                                            "--limit", "4", "--json", str(tmp_path / "b.json")]))
    for part in (lambda r: r, lambda r: r["unknown"]):
        for k in ("mIoU", "pAcc", "mAcc"):
            assert part(both)[k] == pytest.approx((part(m)[k] + part(m2)[k]) / 2)
            assert part(both["std"])[k] == pytest.approx(abs(part(m)[k] - part(m2)[k]) / 2)
    assert len(json.loads((tmp_path / "b.json").read_text())["runs"]) == 2
    with pytest.raises(evaluate.UserError, match="either"):
        evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root)]))


def test_with_teacher_row_is_the_teacher_scored_alone(toy_world, tmp_path, capsys):
    root, _ = toy_world
    from test_train import args_for
    train.main(args_for(root, tmp_path / "run", "--iters", "2", "--unknown-classes", "kite"))
    common = ["--dataset", "toy", "--data-root", str(root), "--limit", "6"]
    both = evaluate.main(evaluate.get_args(common + ["--checkpoint",
                                                     str(tmp_path / "run" / "ckpt.pt"),
                                                     "--with-teacher"]))
    alone = evaluate.main(evaluate.get_args(common + ["--method", "maskclip", "--unknown-classes",
                                                      "kite"]))
    assert both["teacher"]["mIoU"] == pytest.approx(alone["mIoU"]) and "unknown" in both["teacher"]
    assert both["teacher"]["unknown"]["mIoU"] == pytest.approx(alone["unknown"]["mIoU"])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("MaskCLIP ")][-1]
    assert line.startswith(f"MaskCLIP {alone['mIoU']:.1f} -> CLIP-S4 {both['mIoU']:.1f} mIoU")
    # a checkpoint is scored at its own --eval-size (the toy preset's 96) unless told otherwise
    at96 = evaluate.main(evaluate.get_args(common + ["--checkpoint",
                                                     str(tmp_path / "run" / "ckpt.pt"),
                                                     "--size", "96"]))
    assert at96["mIoU"] == pytest.approx(both["mIoU"])


def test_knn_vote_matches_sklearn():
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.neighbors import KNeighborsClassifier
    from util import metrics
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(300, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (300,), generator=g)
    queries = F.normalize(torch.randn(70, 8, generator=g, dtype=torch.float64), dim=1)
    ours = metrics.knn_vote(queries, memory, labels, k=7, num_classes=5, chunk=16)
    ref = KNeighborsClassifier(7, metric="cosine", algorithm="brute").fit(
        memory.numpy(), labels.numpy()
    )
    np.testing.assert_array_equal(ours.numpy(), ref.predict(queries.numpy()))


def test_knn_protocol_runs_and_reuses_memory(toy_world, tmp_path, capsys, monkeypatch):
    import numpy as np
    import knn
    root, _ = toy_world
    argv = ["--dataset", "toy", "--data-root", str(root), "--method", "maskclip", "--clip-config",
            str(root / "toyclip.json"), "--clip-pretrained", str(root / "toyclip.pt"), "--size",
            "64", "--limit-train", "24", "--segments", "16", "--k", "5", "--memory-dir",
            str(tmp_path / "mem")]
    first = knn.main(knn.get_args(argv))
    assert "written to" in capsys.readouterr().out and 0 < first["pAcc"] <= 100
    seen = []  # the second run reads its memory, so it cuts only the validation images: keep them
    cut = knn.segments_and_labels

    def keep(embed, item, *rest):
        out = cut(embed, item, *rest)
        seen.append((out[2].numpy(), item["label"].numpy()))
        return out
    monkeypatch.setattr(knn, "segments_and_labels", keep)
    second = knn.main(knn.get_args(argv))
    assert "segments from" in capsys.readouterr().out and second == first
    # The segment ceiling by hand: every segment keeps the count of its most common labelled class.
    right = sum(np.bincount(gt[(ids == s) & (gt != 255)]).max(initial=0)
                for ids, gt in seen for s in np.unique(ids))
    labelled = sum((gt != 255).sum() for _, gt in seen)
    assert first["segment_ceiling"]["pAcc"] == pytest.approx(100 * right / labelled)
    # a vote paints whole segments too
    assert first["pAcc"] <= first["segment_ceiling"]["pAcc"] < 100
    knn.main(knn.get_args(argv + ["--kmeans-at", "labels"]))  # another protocol: its own memory
    assert "written to" in capsys.readouterr().out
    for mem in (tmp_path / "mem").glob("*.pt"):  # a memory cut short is computed again, same scores
        mem.write_bytes(mem.read_bytes()[:100])
    monkeypatch.setattr(knn, "segments_and_labels", cut)
    assert knn.main(knn.get_args(argv)) == first
    assert "unreadable" in capsys.readouterr().out


def test_knn_segments_at_label_size_follow_an_edge_inside_a_cell():
    import knn
    import torch
    import torch.nn.functional as F
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:, 40:] = 1  # the edge halves the third of four 16-px cells
    item = {"image": F.one_hot(label, 2).permute(2, 0, 1).float(), "label": label}
    # stride 16, that cell a 50/50 mix
    embed = lambda x: F.normalize(F.avg_pool2d(x, 16), dim=1)

    def right(at):
        # a small position weight: the image is constant down its columns, so without it the
        # 2 x 2 start has two pairs of identical centres, and which of a tied pair wins is left
        # to the CPU's last bits (seen: 3 segments on one machine, 2 on another)
        _, own, ids = knn.segments_and_labels(embed, item, 4, 20, 2, 0.05, at)
        return (own[ids] == label).float().mean().item()
    # the mixed cell is one segment: 8 of its 16 columns wrong
    assert right("features") == 1 - 8 / 64
    assert right("labels") >= 1 - 2 / 64  # bilinear embeddings put the segments' edge within 2 px


def test_slide_equals_whole_image_for_a_pointwise_scorer():
    import torch
    import torch.nn.functional as F
    x = torch.rand(1, 3, 40, 56)
    # per 8x8 cell: windows agree where they overlap
    score = lambda crop: F.avg_pool2d(crop, 8)
    for window, step in ((24, 16), (16, 8), (64, 64)):
        torch.testing.assert_close(evaluate.slide_scores(score, x, window, step, 8), score(x))


def test_paper_columns_and_mean_std():
    from data import CONTEXT_FOLDS
    assert evaluate.paper_numbers("cocostuff", "clip-s4", "ViT-B-16", []) == ("36.8", "43.6")
    assert evaluate.paper_numbers("context", "maskclip+", "RN50",
                                  list(reversed(CONTEXT_FOLDS[2]))) == \
        ("43.1±4.3", "40.3±2.0")
    assert evaluate.paper_numbers("context", "clip-s4", "ViT-B-16", ["sky"]) == ("", "")
    runs = [
        {"mIoU": 10.0, "per_class": {"a": 20.0, "b": None}},
        {"mIoU": 30.0, "per_class": {"a": 40.0, "b": 5.0}},
    ]
    mean, std = evaluate.mean_std(runs)
    assert mean == {"mIoU": 20.0, "per_class": {"a": 30.0, "b": 5.0}}
    assert std == {"mIoU": 10.0, "per_class": {"a": 10.0, "b": 0.0}}


def test_linear_probe_learns_and_resumes_exactly(toy_world, tmp_path):
    import knn
    import torch
    root, _ = toy_world
    argv = ["--dataset", "toy", "--data-root", str(root), "--method", "maskclip", "--clip-config",
            str(root / "toyclip.json"), "--clip-pretrained", str(root / "toyclip.pt"), "--size",
            "64", "--probe", "--probe-iters", "8", "--crop-size", "48", "--batch-size", "4",
            "--workers", "0", "--save-every", "2"]
    straight = knn.main(knn.get_args(argv + ["--memory-dir", str(tmp_path / "a")]))
    assert 0 < straight["pAcc"] <= 100
    # save and stop at step 3, then the same command continues
    with pytest.raises(SystemExit) as stop:
        knn.main(knn.get_args(argv + ["--memory-dir", str(tmp_path / "b"), "--stop-after", "3"]))
    assert stop.value.code == 0
    halves = knn.main(knn.get_args(argv + ["--memory-dir", str(tmp_path / "b")]))
    (a,), (b,) = (list((tmp_path / d).glob("probe_*.pt")) for d in "ab")
    wa, wb = (torch.load(p, weights_only=True)["classifier"] for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and halves == straight
    # no --size: the probe's crops are cut at the dataset's test side (64 on toy), as --size 64
    unsized = [v for v in argv if v not in ("--size", "64")]
    assert knn.main(knn.get_args(unsized + ["--memory-dir", str(tmp_path / "c")])) == straight


def test_refine_pamr_runs_on_the_input_image(toy_world, tmp_path):
    """--refine pamr: the teacher's scores upsampled to its input image, refined there
    (model.pamr), then to the label: the same confusion as that loop written out here."""
    import numpy as np
    import torch.nn.functional as F
    from util.clip_loading import load_clip
    from data import EvalImages, SegDataset, UserError
    from util.metrics import confusion_matrix, segmentation_metrics
    from model import ClipTeacher, class_scores, pamr
    root, _ = toy_world
    common = ["--dataset", "toy", "--data-root", str(root), "--method", "maskclip", "--limit", "4"]
    out = tmp_path / "r.json"
    m = evaluate.main(evaluate.get_args(common + ["--refine", "pamr", "--pamr-iters", "3",
                                                  "--pamr-dilations", "1", "2", "--json",
                                                  str(out)]))
    teacher = ClipTeacher(*load_clip("toyclip", str(root / "toyclip.pt"),
                                    str(root / "toyclip.json")))
    base = SegDataset("toy", root, "val")
    data, K = EvalImages(base, 64, teacher.stride), len(base.classes)
    protos, owner = teacher.text_prototypes(base.classes)
    cm = np.zeros((K, K), np.int64)
    for i in range(4):
        x, label = data[i]["image"][None], data[i]["label"]
        s = class_scores(teacher.dense(x)[0], protos, owner, K)
        s = pamr(x, F.interpolate(s, size=x.shape[2:], mode="bilinear"), 3, (1, 2))
        s = F.interpolate(s, size=label.shape, mode="bilinear")
        cm += confusion_matrix(s[0].argmax(0).numpy(), label.numpy(), K)
    assert m["mIoU"] == pytest.approx(segmentation_metrics(cm, base.classes)["mIoU"])
    assert json.loads(out.read_text())["refine"] == "pamr"
    with pytest.raises(UserError, match="dilations >= 1"):
        evaluate.main(evaluate.get_args(common + ["--refine", "pamr", "--pamr-dilations", "0"]))
