"""Shared fixtures: tiny open_clip architectures built from configs written by the tests (no
downloads), and images of every awkward kind."""
import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a test never waits on the network

TINY_VIT = {"embed_dim": 32, "quick_gelu": False,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8,
                           "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 2}}
TINY_RN = {"embed_dim": 32, "quick_gelu": False,
           "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None,
                          "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 2}}


def write_config(folder, name, cfg):
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    return {"vit": write_config(d, "tiny-vit", TINY_VIT), "rn": write_config(d, "tiny-rn", TINY_RN)}


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The micro toy world (toy/prepare.py --tiny): dataset folder, tiny CLIP config and
    weights."""
    from toy import prepare as toy
    root = tmp_path_factory.mktemp("toy")
    result = toy.main(toy.get_args(["--tiny", "--out-dir", str(root)]))
    return root, result
