"""visualize.py on micro toy checkpoints: each figure is drawn and holds what it should (panels,
legend entries, labels, frame colours), the class means match a pixel loop, a seed gives the same
pictures."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from util import figures
import visualize as V
from data import SegDataset, UserError
from util.clip_loading import load_clip
from model import ClipTeacher

from test_train import args_for

WITHHELD = ["ball", "star"]


@pytest.fixture(scope="module")
def runs(toy_world, tmp_path_factory):
    """A class-free CLIP-S4 run (ball and star withheld) and a MaskCLIP+ run, a few steps each."""
    root, _ = toy_world
    out = tmp_path_factory.mktemp("vis_runs")
    train.main(args_for(root, out / "s4", "--iters", "4", "--unknown-classes", *WITHHELD,
                        "--unknown-tau", "0.9"))
    train.main(args_for(root, out / "mcp", "--iters", "2", "--method", "maskclip+",
                        "--unknown-classes", *WITHHELD))
    return root, out / "s4" / "ckpt.pt", out / "mcp" / "ckpt.pt"


def vis_args(root, out, *extra):
    return V.get_args(["--dataset", "toy", "--data-root", str(root), "--clip-config",
                       str(root / "toyclip.json"), "--clip-pretrained", str(root / "toyclip.pt"),
                       "--size", "64", "--images", "2", "--pass-images", "10", "--segments", "9",
                       "--strip", "3", "--map-cells", "6", "--out-dir", str(out), *extra])


@pytest.fixture(scope="module")
def drawn(runs, tmp_path_factory):
    root, s4, mcp = runs
    out = tmp_path_factory.mktemp("figures")
    facts = V.main(vis_args(root, out, "--method", "maskclip", "--checkpoint", str(mcp), str(s4)))
    return root, out, facts


def test_all_four_figures_are_written(drawn):
    _, out, facts = drawn
    assert sorted(facts) == ["embeddings_umap.png", "qualitative.png", "segment_map.png",
                             "unknown_classes.png"]
    for name in facts:
        w, h = Image.open(out / name).size
        assert min(w, h) >= 300, name  # readable on a screen


def test_qualitative_panels_and_known_marks(drawn):
    root, _, facts = drawn
    f = facts["qualitative.png"]
    assert f["panels"] == 2 * 5  # 2 images x (image, ground truth, MaskCLIP, MaskCLIP+, CLIP-S4)
    assert [t for t in f["titles"] if t] == ["image", "ground truth", "MaskCLIP", "MaskCLIP+",
                                             "CLIP-S4"]
    names = SegDataset("toy", root, "val").classes
    expected = [n + " (unknown)" if n in WITHHELD else n for n in names]
    assert f["legend"] == expected


def test_umap_has_every_method_and_class(drawn):
    root, _, facts = drawn
    f = facts["embeddings_umap.png"]
    assert [lg.split(" pixel mean")[0] for lg in f["legend"][:3]] == [
        "MaskCLIP",
        "MaskCLIP+",
        "CLIP-S4",
    ]
    assert f["legend"][3] == "CLIP text embedding"
    names = SegDataset("toy", root, "val").classes
    assert f["texts"] and set(f["texts"]) <= set(names)  # class labels, one per class present


def test_unknown_strips_and_segment_map(drawn):
    _, _, facts = drawn
    f = facts["unknown_classes.png"]
    rows = [t for t in f["texts"] if t.startswith("u")]
    assert rows and all("segment" in t and "most:" in t for t in rows)
    held = [int(t.split(": ")[1].split()[0]) for t in rows]
    assert held == sorted(held, reverse=True)  # the prototypes holding the most segments first
    assert 0 < f["panels"] <= 3 * len(rows)  # at most --strip patches per prototype row
    m = facts["segment_map.png"]
    assert m["frames"] and set(m["frames"]) <= {figures.GREEN, figures.ORANGE}
    known_n, unknown_n = (int(t.split("(")[1].split()[0]) for t in m["legend"])
    assert known_n + unknown_n >= len(m["frames"])


def test_same_seed_same_pictures(drawn, runs, tmp_path):
    root, out, _ = drawn
    _, s4, mcp = runs
    V.main(vis_args(root, tmp_path, "--method", "maskclip", "--checkpoint", str(mcp), str(s4),
                    "--figures", "1", "4"))
    for name in ("qualitative.png", "segment_map.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)),
                              np.asarray(Image.open(tmp_path / name))), name


def test_class_means_match_a_pixel_loop(toy_world):
    root, _ = toy_world
    teacher = ClipTeacher(*load_clip("toyclip", str(root / "toyclip.pt"),
                                    str(root / "toyclip.json")))
    base = SegDataset("toy", root, "val")
    names = base.classes
    m = V.Method(label="MaskCLIP", embed=V.teacher_features(teacher), stride=teacher.stride,
                 size=64, teacher=teacher, text=torch.zeros(len(names), 64), known=names,
                 trained=False)
    p = V.embedding_pass([m], base, [0, 1], len(names), segments=4, teacher_side=64)[0]
    sums = torch.zeros(len(names), 64)
    for i in (0, 1):
        item = base[i]
        feats = V.features(m, item["image"])
        lab = F.interpolate(torch.from_numpy(item["label"])[None, None].float(),
                            size=feats.shape[1:], mode="nearest")[0, 0].long()
        for y in range(lab.shape[0]):
            for x in range(lab.shape[1]):
                if lab[y, x] != 255:
                    sums[lab[y, x]] += feats[:, y, x]
    present = sums.norm(dim=1) > 0
    assert torch.allclose(p.means[present], F.normalize(sums[present], dim=1), atol=1e-5)
    assert p.patches.shape[1:] == (48, 48, 3) and len(p.patches) == len(p.emb) == len(p.gt)


def test_bad_input_is_one_line(runs, tmp_path):
    root, s4, _ = runs
    with pytest.raises(UserError, match="--method maskclip and/or --checkpoint"):
        V.main(vis_args(root, tmp_path))
    with pytest.raises(UserError, match="at most three"):
        V.main(vis_args(root, tmp_path, "--checkpoint", *[str(s4)] * 4))
    with pytest.raises(UserError, match="--labels"):
        V.main(vis_args(root, tmp_path, "--checkpoint", str(s4), "--labels", "a", "b"))
    with pytest.raises(UserError, match="not in toy val"):
        V.main(vis_args(root, tmp_path, "--checkpoint", str(s4), "--figures", "1", "--image-ids",
                        "nope"))
