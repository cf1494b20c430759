"""Dataset readers on fixture folders in each exact layout, metrics against scikit-learn."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion

import data
from util import metrics
from data import UserError


def write_pair(img_dir, lab_dir, sid, label, ext=".jpg", suffix=""):
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    h, w = label.shape
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(img_dir / f"{sid}{ext}")
    Image.fromarray(label.astype(np.uint8)).save(lab_dir / f"{sid}{suffix}.png")


def make_voc(root):
    base = root / "VOCdevkit/VOC2012"
    lab = np.array([[0, 1, 255], [20, 15, 0]])
    for sid in ("a", "b", "c"):
        write_pair(base / "JPEGImages", base / "SegmentationClassAug", sid, lab)
    write_pair(base / "JPEGImages", base / "SegmentationClass", "c", lab)
    (base / "ImageSets/Segmentation").mkdir(parents=True)
    (base / "ImageSets/Segmentation/train_aug.txt").write_text("a\nb\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("c\n")


def test_voc_layout_counts_and_background(tmp_path):
    make_voc(tmp_path)
    train = data.SegDataset("voc", tmp_path, "train")
    val20 = data.SegDataset("voc", tmp_path, "val")
    val21 = data.SegDataset("voc", tmp_path, "val", background=True)
    assert len(train) == 2 and len(val20) == 1
    assert (
        len(val20.classes) == 20
        and val20.classes[15] == "potted plant"
        and len(val21.classes) == 21
    )
    # background ignored
    np.testing.assert_array_equal(val20[0]["label"], [[255, 0, 255], [19, 14, 255]])
    np.testing.assert_array_equal(val21[0]["label"], [[0, 1, 255], [20, 15, 0]])


def test_context_layout_and_folds(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2010"
    write_pair(
        base / "JPEGImages", base / "SegmentationClassContext", "x", np.array([[0, 1], [59, 30]])
    )
    (base / "ImageSets/SegmentationContext").mkdir(parents=True)
    (base / "ImageSets/SegmentationContext/val.txt").write_text("x\n")
    ds = data.SegDataset("context", tmp_path, "val")
    assert len(ds.classes) == 59
    np.testing.assert_array_equal(ds[0]["label"], [[255, 0], [58, 29]])
    folds = [set(f) for f in data.CONTEXT_FOLDS]
    assert [len(f) for f in folds] == [15, 15, 15, 14] and set.union(*folds) == set(ds.classes)
    assert sum(len(f) for f in folds) == len(set.union(*folds))  # disjoint
    assert ds.classes[29] == "ground" and "tv monitor" in folds[3]


def test_cocostuff_layout(tmp_path):
    base = tmp_path / "coco_stuff164k"
    write_pair(base / "images/val2017", base / "annotations/val2017", "000000000139",
               np.array([[0, 170], [255, 7]]), suffix="_labelTrainIds")
    ds = data.SegDataset("cocostuff", tmp_path, "val")
    assert len(data.COCOSTUFF_CLASSES) == 171 == len(set(data.COCOSTUFF_CLASSES)) == len(ds.classes)
    assert ds[0]["id"] == "000000000139" and ds.classes[170] == "wood"
    np.testing.assert_array_equal(ds[0]["label"], [[0, 170], [255, 7]])


def make_folder(root, labels):
    for i, lab in enumerate(labels):
        write_pair(root / "JPEGImages", root / "SegmentationClass", f"im{i}", lab, ext=".png")
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text(
        "\n".join(f"im{i}" for i in range(len(labels)))
    )
    (root / "classes.txt").write_text("sky\ngrass;lawn\n")


def test_folder_layout(tmp_path):
    make_folder(tmp_path, [np.array([[0, 1], [255, 1]])])
    ds = data.SegDataset("folder", tmp_path, "val")
    assert ds.classes == ["sky", "grass;lawn"]
    np.testing.assert_array_equal(ds[0]["label"], [[0, 1], [255, 1]])


def test_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="JPEGImages"):
        data.SegDataset("voc", tmp_path, "val")
    with pytest.raises(UserError, match="no such folder"):
        data.SegDataset("folder", tmp_path / "nope", "val")
    make_folder(tmp_path, [np.array([[0, 1]]), np.array([[0, 7]])])
    ds = data.SegDataset("folder", tmp_path, "val")
    with pytest.raises(UserError, match="label value 7"):
        ds[1]
    (tmp_path / "JPEGImages/im0.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="im0.png"):
        ds[0]
    with pytest.raises(UserError, match="no readable item at all"):
        data.SegDataset("folder", tmp_path, "val", bad_files="skip")  # both items bad
    with pytest.raises(UserError, match="im0.png"):
        data.SegDataset("folder", tmp_path, "val", bad_files="check")  # the first, before any use


def test_metrics_against_sklearn_and_absent_classes():
    rng = np.random.default_rng(0)
    gt, pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    gt[:50] = 255
    cm = metrics.confusion_matrix(pred, gt, 5)
    keep = gt != 255
    np.testing.assert_array_equal(cm, sk_confusion(gt[keep], pred[keep], labels=range(5)))
    m = metrics.segmentation_metrics(cm, list("abcde"))
    assert m["per_class"]["e"] is None  # absent from both: no IoU, not IoU 0
    iou = [cm[k, k] / (cm[k].sum() + cm[:, k].sum() - cm[k, k]) for k in range(4)]
    assert m["mIoU"] == pytest.approx(100 * np.mean(iou))
    assert m["pAcc"] == pytest.approx(100 * np.mean(pred[keep] == gt[keep]))
    # hand case: class 1 predicted but never present scores IoU 0 and counts in the mean
    m2 = metrics.segmentation_metrics(metrics.confusion_matrix([0, 1], [0, 0], 3), ["x", "y", "z"])
    assert m2["per_class"] == {"x": 50.0, "y": 0.0, "z": None} and m2["mIoU"] == 25.0


# ---------------------------------------------------------------- views, warps, superpixels
def coordinate_map(H, W):
    """(1, 2, H, W): each pixel holds its own centre (y + 0.5, x + 0.5) in source pixels."""
    y, x = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return torch.stack([y, x])[None].float()


@pytest.mark.parametrize("flip", [False, True])
def test_warp_of_coordinates_is_the_crop(flip):
    H, W = 40, 60
    y0, x0, h, w = 8, 12, 20, 30  # a crop of 20 x 30 source pixels, read at 10 x 15
    box = [[y0 / H, x0 / W, (y0 + h) / H, (x0 + w) / W]]
    out = data.warp(coordinate_map(H, W), box, [flip], (10, 15))[0]
    ys = y0 + (torch.arange(10) + 0.5) * h / 10
    xs = x0 + (torch.arange(15) + 0.5) * w / 15
    if flip:
        xs = xs.flip(0)
    torch.testing.assert_close(out[0], ys[:, None].expand(10, 15))
    torch.testing.assert_close(out[1], xs[None, :].expand(10, 15))


def test_warp_nearest_pads_outside():
    ids = torch.arange(4.0).view(1, 1, 2, 2)
    out = data.warp(ids, [[0.0, 0.5, 1.0, 1.5]], [False], (2, 2), mode="nearest", pad=-1)[0, 0]
    assert out.tolist() == [[1, -1], [3, -1]]


def test_random_box_inside_and_deterministic():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    boxes = [data.random_box(g1, 1.5) for _ in range(50)]
    assert boxes == [data.random_box(g2, 1.5) for _ in range(50)]
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
        area, r = (y1 - y0) * (x1 - x0), (x1 - x0) * 1.5 / (y1 - y0)
        assert 0.25 - 1e-6 <= area <= 1 and 3 / 4 - 1e-6 <= r <= 4 / 3 + 1e-6


def test_two_views_sample_and_superpixel_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 2, (48, 64))
    make_folder(tmp_path / "ds", [lab, lab])
    (tmp_path / "ds/ImageSets/Segmentation/train.txt").write_text("im0\nim1\n")
    base = data.SegDataset("folder", tmp_path / "ds", "train")
    tv = data.TwoViews(base, crop_size=32, teacher_side=64, stride=16, n_segments=16,
                       cache_dir=tmp_path / "slic", seed=1)
    s = tv[0]
    assert s["views"].shape == (2, 3, 32, 32) and s["regions"].shape == (2, 32, 32)
    assert s["source"].shape == (3, 64, 80) and s["boxes"].shape == (2, 4)
    s1 = tv[1]
    assert s["regions"].min() >= 0 and len(list((tmp_path / "slic").iterdir())) == 2
    import skimage.segmentation
    monkeypatch.setattr(skimage.segmentation, "slic", lambda *a,
                        **k: pytest.fail("superpixels recomputed"))
    again = tv[0]
    for k in ("views", "boxes", "flips", "regions"):
        assert torch.equal(again[k], s[k])  # same seed, same sample
    tv.set_epoch(1)
    assert not torch.equal(tv[0]["boxes"], s["boxes"])  # a new epoch draws new views
    batch = data.collate([tv[0], s1])
    assert batch["views"].shape == (2, 2, 3, 32, 32) and isinstance(batch["id"], list)


def test_two_views_without_photometric_change_are_the_warped_source(tmp_path):
    rng = np.random.default_rng(1)
    make_folder(tmp_path / "ds", [rng.integers(0, 2, (40, 40))] * 3)
    (tmp_path / "ds/ImageSets/Segmentation/train.txt").write_text("im0\nim1\nim2\n")
    base = data.SegDataset("folder", tmp_path / "ds", "train")
    tv = data.TwoViews(base, crop_size=24, teacher_side=40, stride=8, n_segments=8, seed=0,
                       scale=(0.5, 1.0), jitter=0.0, gray=0.0)
    for i in range(3):
        s = tv[i]
        src = data.image_tensor(base[i]["image"])  # (1, 3, H, W)
        plain = data.warp(src.expand(2, -1, -1, -1), s["boxes"], s["flips"], (24, 24))
        torch.testing.assert_close(s["views"], plain.clamp(0, 1))
        area = (s["boxes"][:, 2] - s["boxes"][:, 0]) * (s["boxes"][:, 3] - s["boxes"][:, 1])
        assert ((area >= 0.5 - 1e-6) & (area <= 1 + 1e-6)).all()
    jittered = data.TwoViews(base, crop_size=24, teacher_side=40, stride=8, n_segments=8, seed=0,
                             scale=(0.5, 1.0))  # SimCLR's jitter changes the views
    assert any(not torch.allclose(jittered[i]["views"], tv[i]["views"]) for i in range(3))


def test_eval_images_sizes(tmp_path):
    make_folder(tmp_path, [np.zeros((30, 50), np.uint8)])
    ev = data.EvalImages(data.SegDataset("folder", tmp_path, "val"), side=64, stride=16)
    item = ev[0]
    assert item["image"].shape == (3, 64, 112) and item["label"].shape == (30, 50)
