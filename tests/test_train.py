"""train.py on the micro toy world: every method runs, resume is exact (after Ctrl-C, a kill or a
damaged checkpoint), validation and the toy preset, bad input is one line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model as M
import train
from toy.world import WORLD_VERSION, world_state
from util.files import UserError

REPO = Path(__file__).resolve().parents[1]


def flags_for(root, out, *extra):
    """train.py's command line of a micro run on the micro toy world (the preset does the rest,
    but for its final scoring on the whole val split: --final-eval asks for it)."""
    return ["--dataset", "toy", "--data-root", str(root), "--teacher-size", "64",
            "--crop-size", "64", "--backbone", "resnet18", "--backbone-weights", "none",
            "--head-dim", "32", "--batch-size", "4", "--workers", "0", "--unknown-protos", "4",
            "--max-pixels", "512", "--warmup", "2", "--log-every", "5", "--save-every", "5",
            "--eval-images", "8", "--no-final-eval", "--out-dir", str(out), *extra]


def args_for(root, out, *extra):
    return train.get_args(flags_for(root, out, *extra))


def run_script(argv, **kw):
    """train.py in a child process, one thread, as a user would start it."""
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            **kw)


def same_weights(a, b):
    a, b = (torch.load(p, weights_only=False) for p in (a, b))
    assert a["step"] == b["step"]
    for part in ("model", "average"):  # f's last weights, and their average (the toy preset's)
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert int(a["average"]["n_averaged"]) > 0
    assert torch.equal(a["unknown"]["protos"], b["unknown"]["protos"])


@pytest.mark.parametrize("method", ["clip-s4", "maskclip+", "segsort", "conceptcontrast"])
def test_methods_run_and_checkpoint_loads(toy_world, tmp_path, method):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / method, "--method", method, "--iters", "5"))
    lines = [json.loads(ln) for ln in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 5] and "loss" in lines[0] and "eta_s" in lines[0]
    assert 0 <= lines[1]["val_mIoU"] <= 100 and 0 < lines[1]["teacher_mIoU"] <= 100
    f, teacher, ck = M.load_run(tmp_path / method / "ckpt.pt")
    assert ck["step"] == 5 and ck["method"] == method
    z = f(torch.rand(1, 3, 64, 64))
    assert z.shape == (1, 64, 8, 8) and torch.allclose(z.norm(dim=1), torch.ones(1, 8, 8),
                                                       atol=1e-5)


def test_aspp_rates_grid_and_trunk_travel_with_the_checkpoint(toy_world, tmp_path):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "r", "--iters", "1", "--aspp-rates", "1", "2", "3", "4"))
    f, _, _ = M.load_run(tmp_path / "r" / "ckpt.pt")
    assert [conv.dilation for conv in f.aspp] == [(r, r) for r in (1, 2, 3, 4)] and f.shift == 4
    assert isinstance(f.trunk.layer4, torch.nn.Identity) and f.aspp[0].in_channels == 256
    train.main(args_for(root, tmp_path / "s4", "--iters", "1", "--trunk-stages", "4"))
    f4, _, ck = M.load_run(tmp_path / "s4" / "ckpt.pt")  # the whole trunk, as the paper's f
    assert not isinstance(f4.trunk.layer4, torch.nn.Identity) and f4.aspp[0].in_channels == 512
    with pytest.raises(train.UserError, match="trunk-stages 4"):  # the toy recipe's 3 refused
        train.main(args_for(root, tmp_path / "s4", "--iters", "2", "--resume"))
    # same weight shapes, but another network
    with pytest.raises(train.UserError, match="aspp-rates"):
        train.main(args_for(root, tmp_path / "r", "--iters", "2", "--resume"))
    with pytest.raises(train.UserError, match="grid centre"):  # the run's grid, in its words
        train.main(args_for(root, tmp_path / "r", "--iters", "2", "--resume", "--aspp-rates", "1",
                            "2", "3", "4",
                            "--grid", "corner"))
    # a checkpoint from before the flags existed rebuilds f with DeepLab-v2's rates, no shift and
    # the whole trunk
    del ck["args"]["aspp_rates"], ck["args"]["grid"], ck["args"]["trunk_stages"]
    torch.save(ck, tmp_path / "old.pt")
    f, _, _ = M.load_run(tmp_path / "old.pt")
    assert [conv.dilation[0] for conv in f.aspp] == [6, 12, 18, 24] and f.shift == 0
    assert f.aspp[0].in_channels == 512  # the whole trunk


def test_small_image_recipe_by_hand():
    r = train.small_image_recipe(64, 8)  # the toy world: 64-px scenes, a patch-8 CLIP
    assert (r["teacher_size"], r["crop_size"], r["eval_size"]) == (64, 96, 96)
    assert r["aspp_rates"] == [2, 3, 5, 7]
    r = train.small_image_recipe(100, 16)  # 1.5 x 100 = 150 -> 152; grid 19: 6*19/42 = 2.7 -> 3
    assert (r["teacher_size"], r["crop_size"], r["aspp_rates"]) == (96, 152, [3, 5, 8, 11])
    assert (r["jitter"], r["grayscale"], r["view_scale"]) == (0.0, 0.0, [0.5, 1.0])
    assert r["balance"] == 1.0  # rare classes weigh as much as frequent ones
    assert r["trunk_stages"] == 3 and train.get_args([]).trunk_stages == 4  # the paper's: all 4
    assert train.small_image_recipe(10, 16)["teacher_size"] == 16  # never below one patch


def write_folder(root, side, n=3):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.zeros((side, side + 10, 3), np.uint8)).save(root / f"JPEGImages/{i}.png")
        Image.fromarray(np.zeros((side, side + 10), np.uint8)).save(
            root / f"SegmentationClass/{i}.png")
    for split in ("train", "val"):
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("0\n1\n2\n")
    (root / "classes.txt").write_text("a\nb\n")


def test_toy_world_made_on_first_use_and_remade_when_stale(tmp_path, monkeypatch):
    root = tmp_path / "toy"  # none yet: toy/prepare.py runs (a subprocess) before the preset
    argv = ["--dataset", "toy", "--data-root", str(root), "--toy-prepare=--tiny"]
    a = train.get_args(argv)
    assert world_state(root) == "ready" and json.loads((root / "world.json").read_text())["tiny"]
    assert a.clip_config == str((root / "toyclip.json").resolve())  # found: made absolute
    assert a.backbone_weights == f"{root}/resnet18_toy.pt" and Path(a.backbone_weights).exists()
    assert data.SegDataset("toy", root, "val").classes[:3] == ["sky", "grass", "water"]
    calls = []
    monkeypatch.setattr(train.subprocess, "run",
                        lambda cmd: calls.append(cmd) or SimpleNamespace(returncode=0))
    train.get_args(argv)
    assert calls == []  # a ready world is used as it is
    prepare = [sys.executable, str(Path(train.__file__).resolve().parent / "toy" / "prepare.py"),
               "--out-dir", str(root), "--tiny"]
    (root / "world.json").write_text(json.dumps({"version": WORLD_VERSION - 1}))
    assert world_state(root) == "stale"
    train.get_args(argv)
    assert calls == [prepare]  # another version's world is remade, not half-used
    (root / "world.json").unlink()  # cut short before its last step
    assert world_state(root) == "stale"
    monkeypatch.setattr(train.subprocess, "run", lambda cmd: SimpleNamespace(returncode=1))
    with pytest.raises(UserError, match="stopped before"):
        train.get_args(argv)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a toy world"):
        train.get_args(["--dataset", "toy", "--data-root", str(mine)])
    assert [f.name for f in mine.iterdir()] == ["notes.txt"]


def test_presets_follow_the_data_and_given_flags_win(tmp_path, tiny_configs, monkeypatch):
    monkeypatch.setattr(train, "prepare_toy_world", lambda root, flags: None)  # presets only
    none = str(tmp_path / "none")  # no world there yet: taken as 64 px, a patch-16 CLIP
    a = train.get_args(["--dataset", "toy", "--data-root", none])
    assert a.preset == {**train.small_image_recipe(64, 16), "out_dir": "runs/toy",
                        "final_eval": True,
                        "backbone_weights": f"{none}/resnet18_toy.pt"}  # printed, in args.json
    assert (a.clip_config, a.clip_pretrained) == (f"{none}/toyclip.json", f"{none}/toyclip.pt")
    b = train.get_args(["--dataset", "toy", "--iters", "7", "--data-root", "/w", "--jitter", "0.4"])
    assert b.iters == 7 and "iters" not in b.preset and b.backbone_weights == "/w/resnet18_toy.pt"
    assert b.jitter == 0.4 and "jitter" not in b.preset and b.clip_config == "/w/toyclip.json"
    write_folder(tmp_path / "small", 48)
    cfg = ["--clip-config", str(tiny_configs["vit"])]  # patch 8
    c = train.get_args(["--dataset", "folder", "--data-root", str(tmp_path / "small"), *cfg])
    assert c.preset == train.small_image_recipe(48, 8) and (c.teacher_size, c.crop_size) == (48, 72)
    write_folder(tmp_path / "large", 256, n=1)
    d = train.get_args(["--dataset", "folder", "--data-root", str(tmp_path / "large"), *cfg])
    assert d.preset == {} and (d.crop_size, d.jitter) == (336, 0.4)  # the paper's setting
    assert data.test_side(data.SegDataset("folder", tmp_path / "small", "val")) == 48
    assert data.test_side(data.SegDataset("folder", tmp_path / "large", "val")) == 512
    v = train.get_args(["--dataset", "voc"])  # the paper's setting: no preset, the flags' defaults
    assert v.preset == {} and (v.clip, v.clip_pretrained) == ("ViT-B-16", "openai")
    assert (v.iters, v.crop_size, v.teacher_size, v.backbone, v.lr) == (20000, 336, 448,
                                                                         "resnet101", 3e-3)


def test_vision_stride_read_from_the_config(tiny_configs):
    from util.clip_loading import vision_stride
    assert vision_stride(None, clip_config=str(tiny_configs["vit"])) == 8
    assert vision_stride(None, clip_config=str(tiny_configs["rn"])) == 32
    assert vision_stride("ViT-B-32") == 32
    assert vision_stride("no-such-clip") == 16


def test_validation_scores_equal_evaluate_py(toy_world, tmp_path, capsys):
    """The val line of a run is evaluate.py's score on the same images: f, and the teacher once;
    --final-eval's last line is evaluate.py --with-teacher's on the whole val split."""
    import evaluate
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "v", "--iters", "4", "--eval-every", "2", "--final-eval"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    log = [json.loads(ln) for ln in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_mIoU" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert json.loads((tmp_path / "v" / "args.json").read_text())["preset"]
    common = ["--dataset", "toy", "--data-root", str(root), "--limit", "8"]
    run = str(tmp_path / "v" / "ckpt.pt")
    student = evaluate.main(evaluate.get_args(common + ["--checkpoint", run]))
    teacher = evaluate.main(evaluate.get_args(common + ["--method", "maskclip"]))
    assert val[-1]["val_mIoU"] == pytest.approx(student["mIoU"])
    assert val[-1]["val_pAcc"] == pytest.approx(student["pAcc"])
    assert val[-1]["teacher_mIoU"] == pytest.approx(teacher["mIoU"])
    full = evaluate.main(evaluate.get_args(["--dataset", "toy", "--data-root", str(root),
                                            "--checkpoint", run, "--with-teacher"]))
    final = [r for r in log if "final_mIoU" in r]
    assert final[0]["final_mIoU"] == pytest.approx(full["mIoU"])
    assert final[0]["final_teacher_mIoU"] == pytest.approx(full["teacher"]["mIoU"])
    n = len(data.SegDataset("toy", root, "val"))
    assert last == (f"MaskCLIP {full['teacher']['mIoU']:.1f} -> CLIP-S4 {full['mIoU']:.1f} mIoU "
                    f"({full['mIoU'] - full['teacher']['mIoU']:+.1f}) on all {n} val images "
                    f"(f's last weights alone: {final[0]['final_last_mIoU']:.1f})")
    best = max(val, key=lambda r: r["val_mIoU"])
    assert torch.load(tmp_path / "v" / "ckpt.pt", weights_only=False)["best"] == {
        "step": best["step"],
        "mIoU": best["val_mIoU"],
    }


def test_resume_is_exact(toy_world, tmp_path):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "straight", "--iters", "10"))
    # 5 steps, stop, then resume for the other 5: the same weights as 10 straight steps
    train.main(args_for(root, tmp_path / "halves", "--iters", "10", "--stop-after", "5"))
    assert torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=False)["step"] == 5
    train.main(args_for(root, tmp_path / "halves", "--iters", "10", "--resume"))
    same_weights(tmp_path / "straight" / "ckpt.pt", tmp_path / "halves" / "ckpt.pt")


def test_weight_average_is_the_mean_of_the_last_steps():
    """util.loop.WeightAverage against a loop written here: after step `start`, the plain mean of
    every step's weights and BatchNorm statistics; before it, f itself is what is scored."""
    from util.loop import WeightAverage
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.Conv2d(4, 2, 1))
    opt = torch.optim.SGD(f.parameters(), lr=0.1, momentum=0.9)
    average, seen = WeightAverage(f, start=2), []
    for step in range(1, 6):
        opt.zero_grad()
        f(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
        average.update(f, step)
        if step <= 2:
            assert average.scored(f) is f
        else:
            seen.append({k: v.clone() for k, v in f.state_dict().items()})
    got = average.scored(f).state_dict()
    for k, v in got.items():
        if v.is_floating_point():  # weights, biases, running means and variances
            want = torch.stack([s[k] for s in seen]).mean(0)
            assert torch.allclose(v, want, atol=1e-6), k
    assert not torch.equal(got["0.weight"], f.state_dict()["0.weight"])


def test_checkpoint_scores_the_average(toy_world, tmp_path):
    """With --average-from (0.5 in the toy preset) every script scores the average of f's last
    steps (model.scored_weights); with 1 there is none and f's last weights are scored."""
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "avg", "--iters", "6"))
    f, _, ck = M.load_run(tmp_path / "avg" / "ckpt.pt")
    assert ck["args"]["average_from"] == 0.5 and int(ck["average"]["n_averaged"]) == 3
    for k, v in f.state_dict().items():
        assert torch.equal(v, ck["average"]["module." + k]), k
    assert not torch.equal(ck["model"]["head.0.weight"], ck["average"]["module.head.0.weight"])
    train.main(args_for(root, tmp_path / "last", "--iters", "6", "--average-from", "1"))
    f, _, ck = M.load_run(tmp_path / "last" / "ckpt.pt")
    assert "average" not in ck
    for k, v in f.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(toy_world, tmp_path):
    """SIGKILL as soon as step 5 is logged (the checkpoint of step 5 may be half written), then the
    same command with --resume: the final weights are those of a run that was never killed."""
    root, _ = toy_world
    flags = ["--iters", "8", "--save-every", "1", "--log-every", "1", "--eval-every", "0"]
    straight = run_script(flags_for(root, tmp_path / "straight", *flags))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()[-2000:]
    killed = run_script(flags_for(root, tmp_path / "killed", *flags))
    for line in killed.stdout:
        if line.startswith("step 5/8"):
            os.kill(killed.pid, signal.SIGKILL)
            break
    assert killed.wait(timeout=300) == -signal.SIGKILL
    newest = [
        p for p in (tmp_path / "killed" / n for n in ("ckpt.pt", "ckpt_prev.pt")) if p.exists()
    ][0]
    # only ckpt_prev.pt between the two renames
    step = torch.load(newest, weights_only=False)["step"]
    assert 3 <= step <= 5
    again = run_script(flags_for(root, tmp_path / "killed", *flags, "--resume"))
    out = again.stdout.read()
    assert again.wait(timeout=300) == 0, out[-2000:]
    assert f"resumed {tmp_path / 'killed'} at step {step}" in out
    same_weights(tmp_path / "straight" / "ckpt.pt", tmp_path / "killed" / "ckpt.pt")
    steps = [
        json.loads(ln)["step"]
        for ln in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 9))  # the lines a killed run wrote past its checkpoint are gone


def test_old_checkpoint_args_renamed_and_completed(tmp_path):
    old = tmp_path / "old.pt"  # a run saved before --teacher-size and --grid existed
    torch.save({"model": {}, "args": {"size": 64, "iters": 7}}, old)
    a = M.read_checkpoint(str(old))["args"]
    assert a["teacher_size"] == 64 and "size" not in a and a["iters"] == 7
    assert a["grid"] == "corner" and a["unknown_scale"] == 100.0  # what such runs were trained with
    assert a["average_from"] == 1.0  # f's last weights, as runs without the flag were scored
    new = tmp_path / "new.pt"
    torch.save({"model": {}, "args": {"teacher_size": 32, "grid": "centre"}}, new)
    assert {k: M.read_checkpoint(str(new))["args"][k] for k in ("teacher_size", "grid")} == {
        "teacher_size": 32, "grid": "centre"}


def test_damaged_checkpoint_falls_back_to_the_one_before(toy_world, tmp_path, capsys):
    root, _ = toy_world
    flags = ["--iters", "10", "--save-every", "2", "--eval-every", "0"]
    train.main(args_for(root, tmp_path / "straight", *flags))
    run = tmp_path / "cut"
    train.main(args_for(root, run, *flags, "--stop-after", "6"))
    assert torch.load(run / "ckpt_prev.pt", weights_only=False)["step"] == 4
    ckpt = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(ckpt[: len(ckpt) // 2])  # a copy cut short, a full disk
    capsys.readouterr()
    train.main(args_for(root, run, *flags, "--resume"))
    out = capsys.readouterr().out
    assert "ckpt.pt: cannot read it" in out and f"resumed {run} at step 4" in out
    same_weights(tmp_path / "straight" / "ckpt.pt", run / "ckpt.pt")
    # nothing readable left: one line, no traceback
    for p in (run / "ckpt.pt", run / "ckpt_prev.pt"):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(train.UserError, match="no readable checkpoint"):
        train.main(args_for(root, run, *flags, "--resume"))


def test_class_free_names_and_errors(toy_world, tmp_path):
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "cf", "--iters", "2", "--unknown-classes", "ball", "star"))
    ck = torch.load(tmp_path / "cf" / "ckpt.pt", weights_only=False)
    assert ck["withheld"] == ["ball",
                              "star"] and "ball" not in ck["known"] and len(ck["known"]) == 12
    with pytest.raises(train.UserError, match="not class names"):
        train.main(args_for(root, tmp_path / "bad", "--iters", "2", "--unknown-classes", "unicorn"))
    with pytest.raises(train.UserError, match="--resume"):
        train.main(args_for(root, tmp_path / "cf", "--iters", "2"))


def test_segment_with_a_checkpoint(toy_world, tmp_path):
    import segment
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "run", "--iters", "2"))
    segment.main(segment.get_args([str(root / "JPEGImages" / "val_0001.png"), "--classes", "sky",
                                   "ball", "--checkpoint", str(tmp_path / "run" / "ckpt.pt"),
                                   "--size", "64", "--out-dir", str(tmp_path / "seg"),
                                   "--cache-dir", ""]))
    labels = np.asarray(Image.open(tmp_path / "seg" / "val_0001_labels.png"))
    image = np.asarray(Image.open(root / "JPEGImages" / "val_0001.png"))
    assert labels.shape == image.shape[:2] and set(np.unique(labels)) <= {0, 1}


@pytest.mark.parametrize("method", ["clip-s4", "conceptcontrast"])
def test_two_processes_with_torchrun(toy_world, tmp_path, method):
    """DistributedDataParallel over 2 CPU processes (gloo): runs, validates and writes once (with
    ConceptContrast's codebook, which is outside DDP's module, seeded and averaged by hand)."""
    root, _ = toy_world
    argv = flags_for(root, tmp_path / "ddp", "--iters", "4", "--batch-size", "2", "--eval-every",
                     "2", "--method", method)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "train.py", *argv],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done:") == 1 and r.stdout.count("| val mIoU") == 2
    f, _, ck = M.load_run(tmp_path / "ddp" / "ckpt.pt")
    assert ck["step"] == 4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy_world, tmp_path, monkeypatch):
    root, _ = toy_world
    import losses
    real, calls = losses.embedding_consistency, []

    def poisoned(*a, **k):  # finite for 4 steps, then NaN
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) > 4 else out
    monkeypatch.setattr(losses, "embedding_consistency", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(args_for(root, tmp_path / "nan", "--iters", "10", "--save-every", "2"))
    assert "non-finite loss" in str(e.value.code)  # a message on stderr, exit status 1
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=False)["step"] == 4


def test_teacher_choice_travels_with_the_checkpoint(toy_world, tmp_path):
    """--teacher clearclip trains from ClearCLIP's map; load_run and evaluate.py's teacher row
    rebuild that teacher, not MaskCLIP."""
    import evaluate
    root, _ = toy_world
    train.main(args_for(root, tmp_path / "cc", "--iters", "1", "--teacher", "clearclip"))
    _, teacher, ck = M.load_run(tmp_path / "cc" / "ckpt.pt")
    assert teacher.info["teacher"] == "clearclip" and ck["args"]["teacher"] == "clearclip"
    common = ["--dataset", "toy", "--data-root", str(root), "--limit", "4"]
    run = str(tmp_path / "cc" / "ckpt.pt")
    both = evaluate.main(evaluate.get_args(common + ["--checkpoint", run, "--with-teacher"]))
    alone = evaluate.main(evaluate.get_args(common + ["--method", "maskclip", "--teacher",
                                                      "clearclip"]))
    plain = evaluate.main(evaluate.get_args(common + ["--method", "maskclip"]))
    assert both["teacher"]["mIoU"] == pytest.approx(alone["mIoU"])
    assert abs(alone["mIoU"] - plain["mIoU"]) > 1e-3  # ClearCLIP's map is not MaskCLIP's


def test_teacher_cache_batches_by_size_and_keeps_each_map(tiny_configs):
    """Sources of two sizes in one batch: each map is the teacher's own map of that image alone,
    rounded to fp16; the second time the same images come, the teacher does not run."""
    from util.clip_loading import load_clip
    from util.loop import TeacherCache
    teacher = M.ClipTeacher(*load_clip(pretrained="none", config=tiny_configs["vit"]))
    g = torch.Generator().manual_seed(0)
    sources = [torch.rand(3, 32, 48, generator=g), torch.rand(3, 40, 32, generator=g),
               torch.rand(3, 32, 48, generator=g)]
    batch = {"id": ["a", "b", "c"], "source": sources}
    cache = TeacherCache(teacher, max_mib=1)
    maps = cache.source_maps(batch)
    for src, m in zip(sources, maps):
        alone = teacher.dense(src[None])[0][0]
        assert m.dtype == torch.float16 and m.shape == alone.shape
        assert torch.allclose(m.float(), alone, atol=2e-3)
    calls = []
    real = teacher.dense
    teacher.dense = lambda x: calls.append(len(x)) or real(x)
    again = cache.source_maps({"id": ["c", "a", "d"], "source": [sources[2], sources[0],
                                                                 sources[1]]})
    assert calls == [1] and torch.equal(again[0], maps[2]) and torch.equal(again[1], maps[0])
    assert (cache.hits, cache.misses) == (2, 4)
    none = TeacherCache(teacher, max_mib=0)  # off: computed every time, rounded the same way
    assert torch.equal(none.source_maps(batch)[1], maps[1]) and none.maps == {}


def test_teacher_cache_gives_the_same_run(toy_world, tmp_path):
    """96 scenes, 8 a step: from step 13 on every map comes from the cache; the weights are those of
    a run that computes every map."""
    root, _ = toy_world
    flags = ["--iters", "14", "--batch-size", "8", "--eval-every", "0", "--log-every", "14"]
    train.main(args_for(root, tmp_path / "cached", *flags))
    train.main(args_for(root, tmp_path / "uncached", *flags, "--teacher-cache", "0"))
    same_weights(tmp_path / "cached" / "ckpt.pt", tmp_path / "uncached" / "ckpt.pt")
    logs = [json.loads((tmp_path / r / "log.jsonl").read_text()) for r in ("cached", "uncached")]
    assert logs[0]["teacher_cached"] == pytest.approx(16 / 112) and logs[1]["teacher_cached"] == 0
