"""The field's eight benchmarks: readers on fixture folders in each layout, COCO-Object's and
ADE20K's label maps against hand-written tables, the background rule against a hand computation,
the peers' protocol flags and the one-command suite."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import data
import evaluate
import model
from conftest import TINY_VIT, write_config

REPO = Path(__file__).resolve().parents[1]


def write_pair(image_path, label_path, label, size=None):
    """An image of noise and its label PNG; size (H, W) of the image (default: the label's)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size or label.shape
    rng = np.random.default_rng(len(str(image_path)))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(np.asarray(label, np.uint8)).save(label_path)


def item_paths(root, name, sid):
    """(image, label) paths of item `sid` of the val split in `name`'s layout under root."""
    if name in ("voc", "voc21"):
        b = root / "VOCdevkit/VOC2012"
        return b / f"JPEGImages/{sid}.jpg", b / f"SegmentationClass/{sid}.png"
    if name in ("context", "context60"):
        b = root / "VOCdevkit/VOC2010"
        return b / f"JPEGImages/{sid}.jpg", b / f"SegmentationClassContext/{sid}.png"
    if name in ("cocostuff", "coco-object"):
        b = root / "coco_stuff164k"
        return b / f"images/val2017/{sid}.jpg", b / f"annotations/val2017/{sid}_labelTrainIds.png"
    if name == "cityscapes":
        b = root / "cityscapes"
        return (b / f"leftImg8bit/val/aachen/{sid}_leftImg8bit.png",
                b / f"gtFine/val/aachen/{sid}_gtFine_labelTrainIds.png")
    if name == "ade20k":
        b = root / "ADEChallengeData2016"
        return b / f"images/validation/{sid}.jpg", b / f"annotations/validation/{sid}.png"
    return root / f"JPEGImages/{sid}.png", root / f"SegmentationClass/{sid}.png"  # folder


def write_split(root, name, labels, sizes=None):
    """Items im0, im1, ... of `name`'s val split with these labels (and the split list)."""
    ids = [f"im{i}" for i in range(len(labels))]
    for i, (sid, lab) in enumerate(zip(ids, labels)):
        write_pair(*item_paths(root, name, sid), lab, (sizes or {}).get(i))
    lists = {"voc": "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
             "context": "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt",
             "folder": "ImageSets/Segmentation/val.txt"}
    lst = lists.get({"voc21": "voc", "context60": "context"}.get(name, name))
    if lst:
        (root / lst).parent.mkdir(parents=True, exist_ok=True)
        (root / lst).write_text("\n".join(ids) + "\n")
    if name == "folder":
        (root / "classes.txt").write_text("sky\ngrass, lawn\n")
    return ids


# A label in each layout's raw values: (raw label, the class indices the reader must give)
HAND = {
    "voc21": ([[0, 1, 255], [20, 15, 0]], [[0, 1, 255], [20, 15, 0]]),
    "voc": ([[0, 1, 255], [20, 15, 0]], [[255, 0, 255], [19, 14, 255]]),
    "context60": ([[0, 1, 255], [59, 30, 0]], [[0, 1, 255], [59, 30, 0]]),
    "context": ([[0, 1, 255], [59, 30, 0]], [[255, 0, 255], [58, 29, 255]]),
    "coco-object": ([[0, 79, 80], [170, 255, 7]], [[1, 80, 0], [0, 0, 8]]),
    "cocostuff": ([[0, 79, 80], [170, 255, 7]], [[0, 79, 80], [170, 255, 7]]),
    "cityscapes": ([[0, 18, 255], [7, 11, 0]], [[0, 18, 255], [7, 11, 0]]),
    "ade20k": ([[0, 1, 150], [255, 13, 2]], [[255, 0, 149], [255, 12, 1]]),
}
CLASS_COUNTS = {"voc21": 21, "voc": 20, "context60": 60, "context": 59, "coco-object": 81,
                "cocostuff": 171, "cityscapes": 19, "ade20k": 150}


@pytest.mark.parametrize("name", list(HAND))
def test_readers_give_the_hand_written_labels(tmp_path, name):
    raw, expected = HAND[name]
    write_split(tmp_path, name, [np.array(raw), np.array(raw)])
    ds = data.SegDataset(name, tmp_path, "val")
    assert len(ds) == 2 and len(ds.classes) == CLASS_COUNTS[name]
    np.testing.assert_array_equal(ds[1]["label"], expected)
    assert ds[0]["image"].shape == (2, 3, 3) and ds[1]["id"] == "im1"
    assert ds.background == (0 if name in ("voc21", "context60", "coco-object") else None)


def test_coco_object_is_the_converters_table_and_ade20k_shifts(tmp_path):
    # cvt_coco_object.py on COCO-Stuff: thing trainId t -> t + 1, stuff -> 0, 255 -> 256 = 0 (uint8)
    table = {0: 1, 1: 2, 39: 40, 79: 80, 80: 0, 100: 0, 170: 0, 255: 0}
    write_split(tmp_path, "coco-object", [np.array([list(table)])])
    ds = data.SegDataset("coco-object", tmp_path, "val")
    np.testing.assert_array_equal(ds[0]["label"], [list(table.values())])
    assert ds.classes[:3] == ["background", "person", "bicycle"] and ds.classes[80] == "toothbrush"
    write_split(tmp_path, "ade20k", [np.array([[0, 1, 2], [150, 149, 255]])])
    ade = data.SegDataset("ade20k", tmp_path, "val")
    np.testing.assert_array_equal(ade[0]["label"], [[255, 0, 1], [149, 148, 255]])
    assert ade.classes[0] == "wall" and ade.classes[149] == "flag"
    write_split(tmp_path, "cityscapes", [np.zeros((2, 2))])
    city = data.SegDataset("cityscapes", tmp_path, "val")
    assert city.classes[6] == "traffic light" and city.items[0][1].name == "im0_leftImg8bit.png"


def test_class_files_read_commas_and_semicolons(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("sky, cloud\ntv monitor;television\n\nperson, person in shirt,body\n")
    assert data.read_class_file(f) == ["sky;cloud", "tv monitor;television",
                                       "person;person in shirt;body"]
    peers = data.read_class_file(REPO / "classnames/peers_voc21.txt")
    assert len(peers) == 21 and len(peers[0].split(";")) == 26 and peers[1] == "aeroplane"
    assert peers[20].split(";")[1] == "tv monitor"
    for name, k in CLASS_COUNTS.items():
        assert len(data.read_class_file(REPO / f"classnames/peers_{name}.txt")) == k
    assert len(model.read_templates("openai80")) == 80 and len(model.read_templates()) == 85


def test_background_rule_against_a_hand_computation():
    owner = torch.tensor([0, 1, 1])  # background, and class 1 named by two synonyms
    # pixel a: rows 0.2, 0.5, 0.1 at scale 10 -> softmax(2, 5, 1)
    # pixel b: row 0 never wins (exp underflows to 0), two equal synonyms -> class 1 has p = 0.5
    rows = torch.tensor([[0.2, -1e4], [0.5, 0.0], [0.1, 0.0]]).view(1, 3, 1, 2)
    e = [math.exp(2), math.exp(5), math.exp(1)]
    p_a = e[1] / sum(e)  # 0.936
    for thr, expected in [(0.0, [1, 1]), (0.5, [1, 1]), (0.5001, [1, 0]), (p_a + 1e-4, [0, 0]),
                          (p_a - 1e-4, [1, 0])]:
        got = model.background_rule(rows, owner, 2, 10.0, thr)
        assert got.tolist() == [[expected]], thr  # 0.5: exactly at the threshold keeps class 1
    # with one synonym per class the rule's argmax is class_scores' argmax
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(2, 5, 4, 4, generator=g)
    assert torch.equal(model.background_rule(cos, torch.arange(5), 5, 40.0, 0.0),
                       cos.argmax(1))


def test_bg_threshold_on_a_dataset_without_background_is_one_line(tmp_path):
    cmd = [sys.executable, "evaluate.py", "--dataset", "cityscapes", "--method", "maskclip",
           "--bg-threshold", "0.2", "--data-root", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: --bg-threshold: cityscapes has no background class (the rule applies to voc21, "
        "context60, coco-object)"]
    with pytest.raises(data.UserError, match="peers has presets"):
        evaluate.main(evaluate.get_args(["--dataset", "toy", "--method", "maskclip",
                                         "--protocol", "peers"]))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny ViT CLIP built from a config, its random weights saved as a local file."""
    d = tmp_path_factory.mktemp("clip")
    cfg = write_config(d, "tiny-eight", TINY_VIT)
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-eight")
    torch.save(clip.state_dict(), d / "tiny-eight.pt")
    return ["--clip", "tiny-eight", "--clip-config", str(cfg), "--clip-pretrained",
            str(d / "tiny-eight.pt")]


def eight(root, skip=()):
    """All eight layouts under root (two 20 x 28 images each), but the ones in `skip`."""
    rng = np.random.default_rng(0)
    for name, (raw, _) in HAND.items():
        if name not in skip and name not in ("voc", "context", "cocostuff"):
            top = {"voc21": 21, "context60": 60, "coco-object": 171, "cityscapes": 19,
                   "ade20k": 151}[name]
            write_split(root, name, [rng.integers(0, top, (20, 28)) for _ in range(2)])


def test_peers_preset_per_dataset():
    """Each benchmark's preset reads a class-name file that is in the repo and names as many
    classes as the dataset has; the background rule only where there is a background class."""
    args = evaluate.get_args(["--method", "maskclip", "--protocol", "peers"])
    got = {d: evaluate.protocol(args, d) for d in evaluate.SUITE}
    for d in evaluate.SUITE:
        names = data.read_class_file(got[d]["class_names"])  # a missing file raises
        assert len(names) == len(data.class_map(d, None)[2])
        assert (got[d]["threshold"] is not None) == (d in data.WITH_BACKGROUND)
    ours = evaluate.protocol(evaluate.get_args(["--method", "maskclip"]), "voc21")
    assert ours == {"size": None, "window": None, "step": None, "templates": "maskclip85",
                    "class_names": None, "threshold": 0.1}
    mixed = evaluate.get_args(["--method", "maskclip", "--protocol", "peers", "--size", "100",
                               "--templates", "maskclip85", "--bg-threshold", "0.3"])
    assert evaluate.protocol(mixed, "context60")["threshold"] == 0.3
    assert evaluate.protocol(mixed, "context60")["templates"] == "maskclip85"


def test_suite_prints_every_row_skips_the_missing_and_matches_single_runs(tmp_path, tiny_clip,
                                                                          capsys, monkeypatch):
    eight(tmp_path, skip=("ade20k",))
    two = tmp_path / "two_templates.txt"  # the protocol's 80 templates cost minutes on a CPU
    two.write_text("a photo of a {}.\nitap of the {}.\n")
    monkeypatch.setitem(model.TEMPLATE_FILES, "openai80", two)
    common = ["--data-root", str(tmp_path), "--method", "maskclip", "--teacher", "naclip",
              "--protocol", "peers", "--size", "112", "--window", "64", "--window-stride",
              "48"] + tiny_clip
    out = tmp_path / "eight.json"
    r = evaluate.main(evaluate.get_args(common + ["--suite", "eight", "--json", str(out)]))
    text = capsys.readouterr().out
    assert "suite: skipping ade20k:" in text and "ADEChallengeData2016" in text
    row = [ln for ln in text.splitlines() if ln.startswith("| NACLIP, tiny-eight")]
    assert len(row) == 1 and row[0].count("|") == 11 and row[0].endswith("(7/8) |")
    saved = json.loads(out.read_text())
    assert saved["skipped"] == ["ade20k"] and len(saved["datasets"]) == 7
    assert saved["mIoU"] == pytest.approx(np.mean([v["mIoU"] for v in r["datasets"].values()]))
    # a dataset in the suite scores as it does alone, under the same protocol
    for name in ("voc21", "cityscapes"):
        alone = evaluate.main(evaluate.get_args(common + ["--dataset", name]))
        assert alone["mIoU"] == pytest.approx(r["datasets"][name]["mIoU"], abs=1e-9)
    assert "background" in r["datasets"]["voc21"]["per_class"]
    assert f"| {r['datasets']['voc21']['mIoU']:.1f} |" in row[0]


def test_published_rows_and_their_means():
    """A published row's line ends with the mean of its numbers, and counts the datasets it has
    when it lacks some."""
    row = evaluate.published_row("naclip", "none", {"name": "ViT-B-16", "pretrained": "openai"})
    assert set(row[1]) == set(evaluate.SUITE)
    assert evaluate.suite_line("x", row[1]).endswith(f"| {np.mean(list(row[1].values())):.1f} |")
    assert evaluate.published_row("naclip", "none", {"name": "RN50", "pretrained": "openai"}) \
        is None
    mask = evaluate.published_row("maskclip", "none", {"name": "ViT-B-16", "pretrained": "openai"})
    have = [v for v in mask[1].values() if v is not None]
    assert 0 < len(have) < 8
    assert evaluate.suite_line("x", mask[1]).endswith(f"| {np.mean(have):.1f} ({len(have)}/8) |")
