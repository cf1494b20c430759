"""Errors and files that every module shares: the one-line UserError, writes that never leave
half a file, and the on-disk caches (text prototypes, k-NN memories, probes) keyed by what made
them and computed again when unreadable."""
import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image


class UserError(Exception):
    """An expected failure caused by the input (missing file, bad flag, wrong checkpoint).
    Scripts print its message on one line and exit with status 1, no stack trace."""

    def __init__(self, message=""):
        # A DataLoader worker's exception reaches the main process as this class called with
        # "Caught UserError in DataLoader worker process N.\nOriginal Traceback ...\n
        # files.UserError: <message>" (torch's ExceptionWrapper); keep <message>, one line.
        text = str(message)
        if text.startswith("Caught UserError") and "UserError: " in text:
            text = text.rstrip().rsplit("UserError: ", 1)[1]
        super().__init__(text)


def atomic_save(obj, path, previous=None):
    """Write through a temporary file and a rename, so a crash never leaves half a file: a PIL image
    is saved in the format of the path's suffix, anything else with torch.save (checkpoints,
    caches). previous: a path that receives the old file once the new one is complete (train.py's
    ckpt_prev.pt), so a file that is damaged later still has a readable predecessor."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # one per process
    try:
        obj.save(tmp) if isinstance(obj, Image.Image) else torch.save(obj, tmp)
    except BaseException:  # a full disk or Ctrl-C: no half file left behind, the old one untouched
        tmp.unlink(missing_ok=True)
        raise
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)


def write_json(path, obj):
    """Write a metrics dict as indented JSON, creating the folder (evaluate.py / knn.py --json)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))


def cache_key(parts):
    """The 16 hex digits naming a cache file: sha1 of the JSON of `parts`, a list of everything
    that made the cached thing (weights, names, protocol)."""
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def read_cache(path, what):
    """A cached file's content (torch.load), or None when it is absent. One that cannot be read (a
    truncated write, a full disk) is reported in one line and None returned, so the caller
    computes it again: it is only a cache."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        print(f"{what}: {path} is unreadable ({type(e).__name__}); computing it again")
        return None
