"""Bad data in every reader: a corrupt image or label, a label whose size differs from its image,
a label value outside the classes. One line naming the file (also from a DataLoader worker),
before anything is written; --bad-files skip lists the bad files once and goes on."""
import json

import numpy as np
import pytest
import torch

import data
import evaluate
import segment
from test_benchmarks import item_paths, tiny_clip, write_pair, write_split  # noqa: F401 (fixture)

READERS = ["voc", "voc21", "context", "context60", "cocostuff", "coco-object", "cityscapes",
           "ade20k", "folder"]
# the smallest raw value each layout does not have (255 is ignore everywhere)
TOO_HIGH = {"voc": 21, "voc21": 21, "context": 60, "context60": 60, "cocostuff": 171,
            "coco-object": 171, "cityscapes": 19, "ade20k": 151, "folder": 2}


def damage(root, name, kind, sid="im1"):
    """Break item `sid` in one way; returns the path the message must name."""
    image, label = item_paths(root, name, sid)
    if kind == "image":
        image.write_bytes(b"not an image at all")
        return image
    if kind == "label":
        label.write_bytes(b"\x89PNG garbage")
        return label
    if kind == "size":
        write_pair(image, label, np.zeros((2, 3)), size=(3, 4))
        return label
    write_pair(image, label, np.full((2, 3), TOO_HIGH[name]))
    return label


@pytest.mark.parametrize("kind", ["image", "label", "size", "value"])
@pytest.mark.parametrize("name", READERS)
def test_every_reader_names_the_bad_file_in_one_line(tmp_path, name, kind):
    write_split(tmp_path, name, [np.zeros((2, 3)), np.zeros((2, 3))])
    path = damage(tmp_path, name, kind)
    ds = data.SegDataset(name, tmp_path, "val")
    ds[0]  # the good one reads
    with pytest.raises(data.UserError) as e:
        ds[1]
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    expected = {"image": "not a readable image", "label": "not a readable label",
                "size": "does not match image", "value": f"label value {TOO_HIGH[name]}"}
    assert expected[kind] in msg


def test_a_bad_file_read_in_a_worker_process_is_one_line(tmp_path):
    write_split(tmp_path, "voc21", [np.zeros((2, 3))] * 3)
    path = damage(tmp_path, "voc21", "image", "im2")
    ds = data.SegDataset("voc21", tmp_path, "val")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(data.UserError) as e:
        list(loader)
    assert str(e.value) == f"{path}: not a readable image (UnidentifiedImageError)"


def test_check_stops_before_the_first_item_and_skip_lists_once(tmp_path, capsys):
    write_split(tmp_path, "ade20k", [np.zeros((2, 3))] * 4)
    bad = [damage(tmp_path, "ade20k", "label", "im1"), damage(tmp_path, "ade20k", "image", "im3")]
    with pytest.raises(data.UserError, match=f"^{bad[0]}: not a readable label"):
        data.SegDataset("ade20k", tmp_path, "val", bad_files="check")
    ds = data.SegDataset("ade20k", tmp_path, "val", bad_files="skip")
    out = capsys.readouterr().out
    assert "leaving out 2 of 4 items of ade20k val" in out
    assert all(out.count(str(p)) == 1 for p in bad) and len(ds) == 2 and len(ds.bad) == 2
    # the left-out files are never read again, in this process or in workers
    ids = [it["id"] for it in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert ids == ["im0", "im2"] and capsys.readouterr().out == ""
    write_split(tmp_path, "ade20k", [np.full((2, 3), 200)] * 4)  # every value outside 0-150
    with pytest.raises(data.UserError, match="no readable item"):
        data.SegDataset("ade20k", tmp_path, "val", bad_files="skip")
    with pytest.raises(data.UserError, match="--bad-files maybe"):
        data.SegDataset("ade20k", tmp_path, "val", bad_files="maybe")


def test_evaluate_stops_before_writing_or_skips_and_lists(tmp_path, tiny_clip, capsys):  # noqa: F811
    write_split(tmp_path, "voc21", [np.zeros((20, 28))] * 3)
    path = damage(tmp_path, "voc21", "size", "im1")
    out = tmp_path / "m.json"
    common = ["--dataset", "voc21", "--data-root", str(tmp_path), "--method", "maskclip",
              "--size", "32", "--json", str(out)] + tiny_clip
    with pytest.raises(data.UserError, match=f"^{path}: label"):
        evaluate.main(evaluate.get_args(common))
    assert not out.exists()
    capsys.readouterr()
    r = evaluate.main(evaluate.get_args(common + ["--bad-files", "skip"]))
    text = capsys.readouterr().out
    assert text.count(str(path)) == 1 and "leaving out 1 of 3 items" in text
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(r["mIoU"])


def test_segment_skips_unreadable_images_or_stops_before_writing(tmp_path, tiny_clip, capsys):  # noqa: F811,E501
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"garbage")
    common = [str(folder), "--classes", "sky", "grass", "--size", "32", "--cache-dir", ""]
    with pytest.raises(data.UserError, match="b.jpg: not a readable image"):
        segment.main(segment.get_args(common + tiny_clip + ["--out-dir", str(tmp_path / "o1")]))
    assert not (tmp_path / "o1").exists()
    segment.main(segment.get_args(common + tiny_clip + ["--out-dir", str(tmp_path / "o2"),
                                                        "--bad-files", "skip"]))
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["a_labels.png",
                                                                   "a_overlay.png"]
    assert capsys.readouterr().out.count("b.jpg") == 1
