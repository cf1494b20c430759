"""The small pieces several scripts share: the learning-rate schedule, the save on Ctrl-C, the cache
keys and unreadable caches, the first synonym, the CLIP-scale rule, PAMR's settings."""
import json
from argparse import Namespace

import pytest
import torch

from util import files
import model as M
import train
from util import loop
from data import first_names


def test_poly_schedule_matches_the_formula():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = loop.poly_schedule(opt, iters=10, warmup=4)
    for s in range(12):
        want = 2.0 * min(1.0, (s + 1) / 4) * (1 - min(s, 9) / 10) ** 0.9
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
        opt.step()
        sched.step()
    opt = torch.optim.SGD([p], lr=0.1)  # no warm-up: the probe's schedule, exactly
    sched = loop.poly_schedule(opt, iters=7)
    for s in range(7):
        assert opt.param_groups[0]["lr"] == 0.1 * (1 - min(s, 6) / 7) ** 0.9
        opt.step()
        sched.step()


def test_saved_on_interrupt_saves_once_and_exits_130(capsys):
    saved = []
    with pytest.raises(SystemExit) as e:
        with loop.saved_on_interrupt(lambda: saved.append(1), lambda: "how to go on"):
            raise KeyboardInterrupt
    assert e.value.code == 130 and saved == [1] and "how to go on" in capsys.readouterr().out
    with loop.saved_on_interrupt(lambda: saved.append(2), lambda: "never"):
        pass
    assert saved == [1]
    with pytest.raises(SystemExit):  # a process that saves nothing still stops
        with loop.saved_on_interrupt(None, lambda: "stopped"):
            raise KeyboardInterrupt


def test_cache_key_and_unreadable_cache(tmp_path, capsys):
    parts = ["ViT-B-16", ["openai", True], ["a photo of a {}."], [["sky"]]]
    same = json.loads(json.dumps(parts))  # equal values, other objects: the same key
    assert files.cache_key(parts) == files.cache_key(same)
    assert len(files.cache_key(parts)) == 16 and int(files.cache_key(parts), 16) >= 0
    assert files.cache_key(parts) != files.cache_key(parts + [1])
    assert files.cache_key(parts) != files.cache_key([["openai", True], "ViT-B-16"] + parts[2:])
    assert files.read_cache(tmp_path / "absent.pt", "memory") is None
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert files.read_cache(tmp_path / "cut.pt", "memory") is None
    assert "memory:" in capsys.readouterr().out
    files.atomic_save({"x": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(files.read_cache(tmp_path / "ok.pt", "memory")["x"], torch.arange(3))


def test_first_names_split_names_and_scales():
    assert first_names(["tv monitor;television", "sky", "a;b;c"]) == ["tv monitor", "sky", "a"]
    known, withheld = train.split_names(["sky", "tv monitor;tv", "cat"], "folder", ["tv monitor"])
    assert known == ["sky", "cat"] and withheld == ["tv monitor"]
    with pytest.raises(files.UserError, match="not class names"):
        train.split_names(["sky"], "folder", ["dog"])
    with pytest.raises(files.UserError, match="--unknown-fold"):
        train.split_names(["sky"], "voc", unknown_fold=0)
    clip = Namespace(logit_scale=torch.tensor(100.0).log())
    assert M.scale_or_clip(0, clip) == pytest.approx(100.0) and M.scale_or_clip(20.0, clip) == 20
    assert M.refiner("none") is None and callable(M.refiner("pamr", 2, [1]))
    with pytest.raises(files.UserError, match="dilations >= 1"):
        M.refiner("pamr", 2, [0])
