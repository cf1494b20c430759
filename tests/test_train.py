"""train.py on the micro toy world: every method runs, resume is exact, bad input is one line."""
import pytest
import torch

import model as M
import train


def args_for(root, out, *extra):
    return train.get_args(["--dataset", "toy", "--data-root", str(root), "--clip-config", str(root / "toyclip.json"),
                           "--clip-pretrained", str(root / "toyclip.pt"), "--size", "64", "--crop-size", "64",
                           "--backbone", "resnet18", "--backbone-weights", "none", "--head-dim", "32",
                           "--batch-size", "4", "--workers", "0", "--unknown-protos", "4", "--max-pixels", "512",
                           "--warmup", "2", "--log-every", "5", "--save-every", "5", "--out-dir", str(out), *extra])


@pytest.mark.parametrize("method", ["clip-s4", "maskclip+", "segsort"])
def test_methods_run_and_checkpoint_loads(toy_world, tmp_path, method):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / method, "--method", method, "--iters", "5"))
    lines = (tmp_path / method / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 5' in lines[0]
    f, teacher, ck = M.load_run(tmp_path / method / "ckpt.pt")
    assert ck["step"] == 5 and ck["method"] == method
    z = f(torch.rand(1, 3, 64, 64))
    assert z.shape == (1, 64, 8, 8) and torch.allclose(z.norm(dim=1), torch.ones(1, 8, 8), atol=1e-5)


def test_aspp_rates_and_grid_travel_with_the_checkpoint(toy_world, tmp_path):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "r", "--iters", "1", "--aspp-rates", "1", "2", "3", "4"))
    f, _, ck = M.load_run(tmp_path / "r" / "ckpt.pt")
    assert [conv.dilation for conv in f.aspp] == [(r, r) for r in (1, 2, 3, 4)] and f.shift == 4
    with pytest.raises(train.UserError, match="aspp-rates"):  # same weight shapes, but another network
        train.main(args_for(root, tmp_path / "r", "--iters", "2", "--resume"))
    with pytest.raises(train.UserError, match="grid centre"):
        train.main(args_for(root, tmp_path / "r", "--iters", "2", "--resume", "--aspp-rates", "1", "2", "3", "4",
                            "--grid", "corner"))
    # a checkpoint from before the flags existed rebuilds f with DeepLab-v2's rates and no shift
    del ck["args"]["aspp_rates"], ck["args"]["grid"]
    torch.save(ck, tmp_path / "old.pt")
    f, _, _ = M.load_run(tmp_path / "old.pt")
    assert [conv.dilation[0] for conv in f.aspp] == [6, 12, 18, 24] and f.shift == 0


def test_resume_is_exact(toy_world, tmp_path):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "straight", "--iters", "10"))
    # 5 steps, stop, then resume for the other 5: the same weights as 10 straight steps
    train.main(args_for(root, tmp_path / "halves", "--iters", "10", "--stop-after", "5"))
    assert torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=False)["step"] == 5
    train.main(args_for(root, tmp_path / "halves", "--iters", "10", "--resume"))
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["unknown"]["protos"], b["unknown"]["protos"])


def test_class_free_names_and_errors(toy_world, tmp_path):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "cf", "--iters", "2", "--unknown-classes", "ball", "star"))
    ck = torch.load(tmp_path / "cf" / "ckpt.pt", weights_only=False)
    assert ck["withheld"] == ["ball", "star"] and "ball" not in ck["known"] and len(ck["known"]) == 12
    with pytest.raises(train.UserError, match="not class names"):
        train.main(args_for(root, tmp_path / "bad", "--iters", "2", "--unknown-classes", "unicorn"))
    with pytest.raises(train.UserError, match="--resume"):
        train.main(args_for(root, tmp_path / "cf", "--iters", "2"))


def test_segment_with_a_checkpoint(toy_world, tmp_path):
    import segment
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "run", "--iters", "2"))
    segment.main(segment.get_args([str(root / "JPEGImages" / "val_0001.png"), "--classes", "sky", "ball",
                                   "--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--size", "64",
                                   "--out-dir", str(tmp_path / "seg"), "--cache-dir", ""]))
    assert (tmp_path / "seg" / "val_0001_labels.png").is_file()


def test_two_processes_with_torchrun(toy_world, tmp_path):
    """DistributedDataParallel over 2 CPU processes (gloo): runs, writes once, the checkpoint loads."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root, _ = toy_world
    a = args_for(root, tmp_path / "ddp", "--iters", "4", "--batch-size", "2")
    argv = []
    for k, v in vars(a).items():
        if v not in (None, False, [], "") and not isinstance(v, bool):
            flag = "--" + k.replace("_", "-")
            argv += [flag, *map(str, v)] if isinstance(v, list) else [f"{flag}={v}"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *argv],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done:") == 1
    f, _, ck = M.load_run(tmp_path / "ddp" / "ckpt.pt")
    assert ck["step"] == 4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy_world, tmp_path, monkeypatch):
    root, _ = toy_world
    real, calls = train.embedding_consistency, []

    def poisoned(*a, **k):  # finite for 4 steps, then NaN
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) > 4 else out
    monkeypatch.setattr(train, "embedding_consistency", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(args_for(root, tmp_path / "nan", "--iters", "10", "--save-every", "2"))
    assert e.value.code == 1
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=False)["step"] == 4
