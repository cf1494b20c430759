"""segment.py end to end on awkward images, and its failures (one line, non-zero, nothing
written)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from util import clip_loading as C
import data
import segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_weights(tiny_configs, tmp_path_factory):
    torch.manual_seed(0)
    clip, _ = C.load_clip(pretrained="none", config=tiny_configs["vit"])
    f = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(clip.state_dict(), f)
    return ["--clip-config", str(tiny_configs["vit"]), "--clip-pretrained", str(f), "--size", "32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((30, 50), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.fromarray(rgb).save(d / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:1, :1]).save(d / "one.png")
    Image.fromarray(rng.integers(0, 256, (6, 700, 3), dtype=np.uint8)).save(d / "wide.png")
    return d


def test_load_image_modes(images):
    rgb = data.load_image(images / "rgb.png")
    assert rgb.shape == (30, 50, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(data.load_image(images / "gray.png")[..., 2], rgb[..., 0])
    np.testing.assert_array_equal(data.load_image(images / "rgba.png"), rgb)
    # 16 -> 8 bit
    np.testing.assert_array_equal(data.load_image(images / "deep16.png")[..., 1], rgb[..., 0])
    assert data.load_image(images / "rotated.jpg").shape == (50, 30, 3)  # EXIF applied


def test_teacher_size_bounds_huge_and_wide_images():
    assert data.teacher_size(4000, 6000, 448, 16, 1344) == (448, 672)
    assert data.teacher_size(10, 5000, 448, 16, 1344) == (16, 1344)
    assert data.teacher_size(1, 1, 448, 32, 1344) == (448, 448)


def test_segment_every_kind_of_image(images, tiny_weights, tmp_path, capsys):
    out = tmp_path / "out"
    segment.main(segment.get_args([str(images), "--classes", "sky", "grass;lawn", "egg",
                                   "--out-dir", str(out), "--cache-dir", ""] + tiny_weights))
    printed = capsys.readouterr().out
    for f in sorted(images.iterdir()):
        lab = Image.open(out / f"{f.stem}_labels.png")
        assert lab.mode == "P" and lab.size[::-1] == data.load_image(f).shape[:2]
        assert np.asarray(lab).max() < 3
        assert Image.open(out / f"{f.stem}_overlay.png").mode == "RGB"
        line = next(ln for ln in printed.splitlines() if ln.startswith(f.name))
        shares = [float(s.split()[-1].rstrip("%")) for s in line.split("|")[1].split(",")]
        assert sum(shares) == pytest.approx(100, abs=0.3)


def test_label_value_is_index_in_given_order(images, tiny_weights, tmp_path):
    """Reversing --classes must reverse the label values: pixel value = index in --classes."""
    a, b = tmp_path / "a", tmp_path / "b"
    base = [str(images / "rgb.png"), "--cache-dir", ""] + tiny_weights
    segment.main(segment.get_args(base + ["--classes", "sky", "egg", "--out-dir", str(a)]))
    segment.main(segment.get_args(base + ["--classes", "egg", "sky", "--out-dir", str(b)]))
    la, lb = (np.asarray(Image.open(d / "rgb_labels.png")) for d in (a, b))
    assert len(np.unique(la)) == 2  # both classes present, so the check below means something
    np.testing.assert_array_equal(la, 1 - lb)


def test_refinements_keep_the_image_size_and_ignore_the_order_of_names(images, tiny_weights,
                                                                         tmp_path):
    """Key smoothing, prompt denoising and PAMR together: a label per pixel of the input, and the
    same segmentation whichever order the names are given in."""
    base = [str(images / "rgb.png"), "--key-smoothing", "--prompt-denoising", "--refine", "pamr",
            "--cache-dir", ""] + tiny_weights
    a, b = tmp_path / "a", tmp_path / "b"
    segment.main(segment.get_args(base + ["--classes", "sky", "egg", "--out-dir", str(a)]))
    segment.main(segment.get_args(base + ["--classes", "egg", "sky", "--out-dir", str(b)]))
    la, lb = (np.asarray(Image.open(d / "rgb_labels.png")) for d in (a, b))
    assert la.shape == np.asarray(Image.open(images / "rgb.png")).shape[:2]
    assert set(np.unique(la)) <= {0, 1}
    np.testing.assert_array_equal(la, 1 - lb)


def run_cli(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLIP_S4_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "segment.py", *args, "--out-dir", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing", "not_image", "no_classes", "duplicate",
                                  "unknown_model", "offline"])
def test_failures_are_one_line_and_write_nothing(case, images, tiny_weights, tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is text, not a JPEG")
    good = [str(images / "rgb.png")]
    args = {
        "missing": good + [str(tmp_path / "nope.png"), "--classes", "sky"] + tiny_weights,
        "not_image": good + [str(fake), "--classes", "sky"] + tiny_weights,
        "no_classes": good + ["--classes"] + tiny_weights,
        "duplicate": good + ["--classes", "sky", "grass", "sky"] + tiny_weights,
        "unknown_model": good + ["--classes", "sky", "--clip", "ViT-Q-99"],
        "offline": good + ["--classes", "sky"],  # default ViT-B-16 'openai', not cached here
    }[case]
    r = run_cli(args, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert not (tmp_path / "out").exists()
