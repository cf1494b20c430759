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
