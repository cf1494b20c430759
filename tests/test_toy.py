"""The toy world: deterministic scenes, captions that tell the truth, a micro CLIP that learns and
loads back through the same path as any user checkpoint."""
import numpy as np
import pytest
import torch

import data
from util import clip_loading as C
import model as M
import segment
from toy import prepare as toy
from toy import world as toyworld


WORLD1 = toyworld.make_world(1)


@pytest.mark.parametrize("world", [toyworld.WORLD0, WORLD1], ids=["world0", "world1"])
def test_scenes_are_deterministic(world):
    scene = lambda i: toyworld.make_scene(np.random.default_rng([7, 0, i]), 64, 0.3, 0.2, world)
    a, b, c = scene(3), scene(3), scene(4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("world", [toyworld.WORLD0, WORLD1], ids=["world0", "world1"])
def test_captions_name_only_what_is_there(world):
    named_counts, classes = {}, world.classes
    for i in range(300):
        rng = np.random.default_rng([0, 0, i])
        img, lab, caption, named = toyworld.make_scene(rng, 64, 0.3, 0.2, world)
        assert img.shape == (64, 64, 3) and lab.shape == (64, 64) and named
        present = set(np.unique(lab[lab != data.IGNORE]).tolist())
        assert present <= set(range(len(classes)))
        for name in named:
            assert classes.index(name) in present, (caption, name)
            assert name in caption
            named_counts[name] = named_counts.get(name, 0) + 1
    assert set(named_counts) == set(classes)  # every class gets named somewhere


def test_a_drawn_world_is_its_own_and_the_same_every_time():
    again, other = toyworld.make_world(1), toyworld.make_world(2)
    assert WORLD1 == again and WORLD1 != other
    assert len(WORLD1.classes) == 14 and len(set(WORLD1.classes)) == 14
    assert not set(WORLD1.classes) & set(toyworld.WORLD0.classes)  # other names
    looks = lambda w: {v[:2] for v in w.stuff.values()}  # (colour, pattern) of each stuff
    assert looks(WORLD1) != looks(toyworld.WORLD0)
    shapes = lambda w: {v[0] for v in w.things.values()}
    assert shapes(WORLD1) != shapes(toyworld.WORLD0)
    for shape, colours, habitats in WORLD1.things.values():
        assert shape in toyworld.SHAPES and set(colours) <= set(toyworld.COLOURS)
        assert set(habitats) <= set(WORLD1.stuff)
    assert toyworld.make_world(0) is toyworld.WORLD0


def test_things_sit_on_their_habitat():
    world = toyworld.World(**{**vars(toyworld.WORLD0), "p_habitat": 1.0})
    lab = np.zeros((64, 64), np.uint8)  # sky above, road below
    lab[40:] = world.classes.index("road")
    for i in range(20):
        x, y = toyworld.habitat_spot(world, "car", lab, np.random.default_rng(i))
        assert lab[int(y), int(x)] == world.classes.index("road")
    assert toyworld.habitat_spot(world, "tree", lab, np.random.default_rng(0)) is None  # no grass
    never = toyworld.World(**{**vars(toyworld.WORLD0), "p_habitat": 0.0})
    assert toyworld.habitat_spot(never, "car", lab, np.random.default_rng(0)) is None


def test_toy_py_writes_the_world_it_is_asked_for(tmp_path):
    args = toy.get_args(["--world", "1", "--tiny", "--backbone-steps", "0"])
    assert args.out_dir == "data/toy1"
    root = tmp_path / "w1"
    toyworld.write_world(root, WORLD1, 6, 3, 64, seed=0)
    assert (root / "classes.txt").read_text().split() == WORLD1.classes
    val = data.SegDataset("folder", root, "val")
    assert len(val) == 3 and val.classes == WORLD1.classes and val.typical_side() == 64


def test_world_folder_reads_as_toy_and_as_folder(toy_world):
    root, _ = toy_world
    val = data.SegDataset("toy", root, "val")
    train = data.SegDataset("folder", root, "train")
    classes = toyworld.WORLD0.classes
    assert len(val) == 32 and len(train) == 96 and val.classes == classes
    item = val[0]
    assert item["image"].shape == (64, 64, 3) and item["label"].shape == (64, 64)
    assert set(np.unique(item["label"])) <= set(range(len(classes))) | {data.IGNORE}


def test_micro_clip_learns_and_loads_like_any_checkpoint(toy_world):
    root, result = toy_world
    losses = result["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    clip, info = C.load_clip(pretrained=str(root / "toyclip.pt"), config=root / "toyclip.json")
    saved = torch.load(root / "toyclip.pt", weights_only=True)
    torch.testing.assert_close(clip.visual.proj, saved["visual.proj"])


def test_segment_on_a_toy_image(toy_world, tmp_path, capsys):
    root, _ = toy_world
    segment.main(segment.get_args([str(root / "JPEGImages" / "val_0000.png"), "--classes",
                                   *toyworld.WORLD0.classes[:4],
                                   "--clip-config", str(root / "toyclip.json"),
                                   "--clip-pretrained", str(root / "toyclip.pt"), "--size", "64",
                                   "--out-dir", str(tmp_path), "--cache-dir", ""]))
    assert (
        tmp_path / "val_0000_labels.png"
    ).is_file() and "val_0000.png" in capsys.readouterr().out


def test_tagged_scenes_tag_what_covers_one_percent():
    w, K = toyworld.WORLD0, len(toyworld.WORLD0.classes)
    images, tags = toy.tagged_scenes(w, 20, 64, seed=5)
    assert images.shape == (20, 3, 64, 64) and images.dtype == torch.uint8
    assert tags.shape == (20, K)
    for i in range(20):  # the same scene drawn again by hand: tags = classes over 1% of its pixels
        img, lab, _, _ = toyworld.make_scene(np.random.default_rng([5, 0, 2, i]), 64, 0.3, 0.2, w)
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), img)
        share = np.array([(lab == k).mean() for k in range(K)])
        assert np.array_equal(tags[i].numpy().astype(bool), share >= 0.01)
    train_ids = set()  # its seeds are none of the train or val scenes' (write_world's)
    for i in range(20):
        rng = np.random.default_rng([5, 0, False, i])
        train_ids.add(toyworld.make_scene(rng, 64, 0.3, 0.2, w)[0].tobytes())
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
