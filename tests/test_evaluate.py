"""evaluate.py: the same numbers as toy.py's own MaskCLIP readout, class-free splits, checkpoints."""
import json

import pytest

import evaluate
import train


def test_teacher_scores_match_toy_report_and_split(toy_world, tmp_path):
    root, result = toy_world
    out = tmp_path / "m.json"
    m = evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root), "--method", "maskclip",
                                         "--clip-config", str(root / "toyclip.json"), "--clip-pretrained",
                                         str(root / "toyclip.pt"), "--size", "64", "--unknown-classes", "ball",
                                         "star", "--json", str(out)]))
    assert m["mIoU"] == pytest.approx(result["maskclip"]["mIoU"], abs=1e-6)
    saved = json.loads(out.read_text())
    assert set(saved) >= {"mIoU", "pAcc", "mAcc", "per_class", "known", "unknown"}
    assert set(saved["unknown"]["per_class"]) == {"ball", "star"}
    assert len(saved["known"]["per_class"]) == 12


def test_checkpoint_evaluates_with_its_own_withheld_names(toy_world, tmp_path):
    root, _ = toy_world
    from test_train import args_for
    train.main(args_for(root, tmp_path / "run", "--iters", "2", "--unknown-classes", "kite"))
    m = evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root), "--checkpoint",
                                         str(tmp_path / "run" / "ckpt.pt"), "--size", "64", "--limit", "4"]))
    assert list(m["unknown"]["per_class"]) == ["kite"] and 0 <= m["mIoU"] <= 100
    with pytest.raises(evaluate.UserError, match="either"):
        evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root)]))


def test_knn_vote_matches_sklearn():
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.neighbors import KNeighborsClassifier
    import data
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(300, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (300,), generator=g)
    queries = F.normalize(torch.randn(70, 8, generator=g, dtype=torch.float64), dim=1)
    ours = data.knn_vote(queries, memory, labels, k=7, num_classes=5, chunk=16)
    ref = KNeighborsClassifier(7, metric="cosine", algorithm="brute").fit(memory.numpy(), labels.numpy())
    np.testing.assert_array_equal(ours.numpy(), ref.predict(queries.numpy()))


def test_knn_protocol_runs_and_reuses_memory(toy_world, tmp_path, capsys):
    import knn
    root, _ = toy_world
    argv = ["--dataset", "toy", "--data-root", str(root), "--method", "maskclip", "--clip-config",
            str(root / "toyclip.json"), "--clip-pretrained", str(root / "toyclip.pt"), "--size", "64",
            "--limit-train", "24", "--segments", "16", "--k", "5", "--memory-dir", str(tmp_path / "mem")]
    first = knn.main(knn.get_args(argv))
    assert "written to" in capsys.readouterr().out and 0 < first["pAcc"] <= 100
    second = knn.main(knn.get_args(argv))
    assert "segments from" in capsys.readouterr().out and second == first
