"""The toy world: deterministic scenes, captions that tell the truth, a micro CLIP that learns and
loads back through the same path as any user checkpoint."""
import numpy as np
import torch

import data
import clip_loading as C
import model as M
import segment
import toy


def test_scenes_are_deterministic():
    a = toy.make_scene(np.random.default_rng([7, 0, 3]), 64, closeup=0.3)
    b = toy.make_scene(np.random.default_rng([7, 0, 3]), 64, closeup=0.3)
    c = toy.make_scene(np.random.default_rng([7, 0, 4]), 64, closeup=0.3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_captions_name_only_what_is_there():
    named_counts = {}
    for i in range(300):
        img, lab, caption, named = toy.make_scene(np.random.default_rng([0, 0, i]), 64, closeup=0.3)
        assert img.shape == (64, 64, 3) and lab.shape == (64, 64) and named
        present = set(np.unique(lab[lab != data.IGNORE]).tolist())
        assert present <= set(range(len(toy.CLASSES)))
        for name in named:
            assert toy.CLASSES.index(name) in present, (caption, name)
            assert name in caption
            named_counts[name] = named_counts.get(name, 0) + 1
    assert set(named_counts) == set(toy.CLASSES)  # every class gets named somewhere


def test_world_folder_reads_as_toy_and_as_folder(toy_world):
    root, _ = toy_world
    val = data.SegDataset("toy", root, "val")
    train = data.SegDataset("folder", root, "train")
    assert len(val) == 32 and len(train) == 96 and val.classes == toy.CLASSES
    item = val[0]
    assert item["image"].shape == (64, 64, 3) and item["label"].shape == (64, 64)
    assert set(np.unique(item["label"])) <= set(range(len(toy.CLASSES))) | {data.IGNORE}


def test_micro_clip_learns_and_loads_like_any_checkpoint(toy_world):
    root, result = toy_world
    losses = result["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    clip, info = C.load_clip(pretrained=str(root / "toyclip.pt"), config=root / "toyclip.json")
    saved = torch.load(root / "toyclip.pt", weights_only=True)
    torch.testing.assert_close(clip.visual.proj, saved["visual.proj"])
    assert 0 <= result["maskclip"]["mIoU"] <= 100


def test_segment_on_a_toy_image(toy_world, tmp_path, capsys):
    root, _ = toy_world
    segment.main(segment.get_args([str(root / "JPEGImages" / "val_0000.png"), "--classes",
                                   *toy.CLASSES[:4], "--clip-config", str(root / "toyclip.json"),
                                   "--clip-pretrained", str(root / "toyclip.pt"), "--size", "64",
                                   "--out-dir", str(tmp_path), "--cache-dir", ""]))
    assert (
        tmp_path / "val_0000_labels.png"
    ).is_file() and "val_0000.png" in capsys.readouterr().out


def test_tagged_scenes_tag_what_covers_one_percent():
    images, tags = toy.tagged_scenes(20, 64, seed=5)
    assert (
        images.shape == (20, 3, 64, 64)
        and images.dtype == torch.uint8
        and tags.shape == (20, len(toy.CLASSES))
    )
    for i in range(20):  # the same scene drawn again by hand: tags = classes over 1% of its pixels
        img, lab, _, _ = toy.make_scene(np.random.default_rng([5, 2, i]), 64, 0.3)
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), img)
        share = np.array([(lab == k).mean() for k in range(len(toy.CLASSES))])
        assert np.array_equal(tags[i].numpy().astype(bool), share >= 0.01)
    train_ids = set()  # its seeds are none of the train or val scenes'
    for i in range(20):
        train_ids.add(toy.make_scene(np.random.default_rng([5, 0, i]), 64, 0.3)[0].tobytes())
    assert not any(images[i].permute(1, 2, 0).numpy().tobytes() in train_ids for i in range(20))


def test_tag_accuracy_by_hand():
    class Fixed(torch.nn.Module):  # logits > 0 for classes 0 and 1 only
        def forward(self, x):
            return torch.tensor([[1.0, 1.0, -1.0]]).expand(len(x), -1)
    tags = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    acc, exact = toy.tag_accuracy(Fixed(), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), tags)
    assert abs(acc - 100 * 4 / 6) < 1e-4 and exact == 50.0


def test_toy_backbone_weights_load_into_f(toy_world):
    root, result = toy_world
    assert len(result["backbone"]["losses"]) == 4
    saved = torch.load(root / "resnet18_toy.pt", weights_only=True)
    assert not any(k.startswith("fc.") for k in saved)
    f = M.PixelEmbedder(16, "resnet18", str(root / "resnet18_toy.pt"), hidden=8)
    torch.testing.assert_close(f.trunk.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    # dilated: stride 8 with these weights
    assert f(torch.rand(1, 3, 32, 32)).shape == (1, 16, 4, 4)
