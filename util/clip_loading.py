"""Loading a frozen open_clip CLIP, and the CLIP flags every script shares.

A CLIP is named by an open_clip architecture (or a --clip-config JSON registered under its stem)
and given weights by a pretrained tag (from the local caches, or downloaded once) or a local file:
an open_clip / OpenAI state dict in fp32 or fp16, safetensors, or OpenAI's TorchScript archive.
QuickGELU follows the weights. Offline, a tag that is not cached fails at once with one line.

Public API:
    load_clip(name, pretrained, config)     -> a frozen open_clip model and what was loaded
    add_clip_args(p), resolve_clip_args(a)  -> the shared flags and their defaults
    vision_stride(clip, clip_config)        -> the teacher's patch stride, read from the config
"""
import json
import logging
import os
import socket
import zipfile
from pathlib import Path

import open_clip
import torch

from util.files import UserError

TEACHERS = ("maskclip", "sclip", "clearclip", "naclip")  # --teacher; RN50 has only maskclip


# ----------------------------------------------------------------------------------------------
# Loading CLIP: built-in name or --clip-config, a pretrained tag or a local weights file
# ----------------------------------------------------------------------------------------------
def register_clip_config(path):
    """Register a custom open_clip architecture from FILE.json under the file's stem (open_clip's
    add_model_config convention) and return that name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--clip-config {path}: no such file")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--clip-config {path}: not valid JSON ({e})")
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise UserError(f"--clip-config {path}: an open_clip config needs embed_dim, vision_cfg "
                        f"and text_cfg")
    open_clip.add_model_config(path)
    return path.stem


def is_torchscript(path):
    """OpenAI's original .pt files are TorchScript archives (a zip holding a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path):
    """A CLIP state dict from a file: open_clip / OpenAI state dict (fp32 or fp16), safetensors,
    a {'state_dict': ...} wrapper or OpenAI's TorchScript archive. Returned in fp32."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(str(path))
        elif is_torchscript(path):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is a user error here, not a crash
        raise UserError(f"--clip-pretrained {path}: cannot read CLIP weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--clip-pretrained {path}: not a CLIP state dict")
    for k in ("input_resolution", "context_length", "vocab_size"):  # TorchScript extras
        sd.pop(k, None)
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v
            for k, v in sd.items()}


def hub_reachable(timeout=3.0):
    """True when the Hugging Face hub answers a TCP connect; False at once under HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained_tag(name, tag, cache_dir=None):
    """Path to the weights of an open_clip pretrained tag: from the local caches when present, else
    downloaded. Offline and uncached fails at once with a message saying where we looked (open_clip
    itself would retry the hub for about a minute)."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError(f"--clip-pretrained {tag}: neither a file nor a pretrained tag of {name} "
                        f"(tags: {', '.join(tags) or 'none'}; or pass a local weights file)")
    from huggingface_hub import constants, try_to_load_from_cache
    looked = []
    if cfg.get("hf_hub"):
        hub = cfg["hf_hub"]  # "org/repo/file", or "org/repo/" for open_clip's default file names
        repo, fname = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        for f in ([fname] if fname else ["open_clip_model.safetensors",
                                         "open_clip_pytorch_model.bin"]):
            hit = try_to_load_from_cache(repo, f, cache_dir=cache_dir)
            if isinstance(hit, str):
                return hit, cfg
        hub_cache = Path(cache_dir or constants.HF_HUB_CACHE)
        looked.append(str(hub_cache / ("models--" + repo.replace("/", "--"))))
    if cfg.get("url"):
        f = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if f.is_file():
            return str(f), cfg
        looked.append(str(f))
    if not hub_reachable():
        raise UserError(f"CLIP weights {name} '{tag}' are not on this machine and the network is "
                        f"unreachable; looked in {' and '.join(looked)}. Copy the weights file "
                        f"here and pass --clip-pretrained /path/to/file (open_clip state dict, "
                        f"fp32/fp16, or OpenAI's .pt), or run once with internet access to fill "
                        f"the cache")
    return open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir), cfg


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")  # a name that means a file, not a tag


def load_clip(name="ViT-B-16", pretrained="openai", config=None, quick_gelu="auto", device="cpu",
              cache_dir=None):
    """Build an open_clip CLIP, load its weights and freeze it (eval mode, no grad).

    Args:
        name: open_clip architecture name; replaced by the config's stem when `config` is given.
        pretrained: an open_clip tag ('openai', ...), a local weights file, or 'none' (random init).
        config: optional path to an open_clip JSON config to register (--clip-config).
        quick_gelu: 'auto' | 'on' | 'off'. OpenAI's weights were trained with QuickGELU but
            open_clip's plain 'ViT-B-16'/'RN50' configs use nn.GELU (open_clip only warns). 'auto'
            takes the tag's own quick_gelu flag, QuickGELU for OpenAI's TorchScript files, the
            config's choice otherwise.
    Returns:
        (model, info): model on `device` in fp32; info = dict(name, pretrained, weights,
            quick_gelu).
    """
    if config:
        name = register_clip_config(config)
    if open_clip.get_model_config(name) is None:
        raise UserError(f"unknown CLIP model '{name}' (open_clip knows e.g. ViT-B-16, RN50, "
                        f"ViT-L-14; `python -c 'import open_clip; print(open_clip.list_models())'` "
                        f"lists all; a custom architecture needs --clip-config FILE.json)")
    weights, qg = None, open_clip.get_model_config(name).get("quick_gelu", False)
    if pretrained and pretrained.lower() not in ("none", "random"):
        if os.path.isfile(pretrained):
            weights, qg = pretrained, qg or is_torchscript(pretrained)
        elif os.sep in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES:
            raise UserError(f"--clip-pretrained {pretrained}: no such file")
        else:
            weights, cfg = resolve_pretrained_tag(name, pretrained, cache_dir)
            qg = cfg.get("quick_gelu", False)
    if quick_gelu != "auto":
        qg = quick_gelu == "on"
    logging.disable(logging.WARNING)  # open_clip logs "no pretrained weights" for random init
    try:
        model = open_clip.create_model(name, pretrained=None, quick_gelu=qg, pretrained_text=False)
    finally:
        logging.disable(logging.NOTSET)
    if weights is not None:
        sd = read_state_dict(weights)
        transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())  # attn_mask
        sd = {k: v for k, v in sd.items() if k not in transient}
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2]
            raise UserError(f"--clip-pretrained {weights} does not fit CLIP '{name}' "
                            f"({first[0][:200] if first else 'mismatched keys'}); is --clip right?")
    model.eval().requires_grad_(False)
    info = dict(name=name, pretrained=pretrained, weights=weights, quick_gelu=bool(qg))
    return model.to(device), info


def add_clip_args(p):
    """The CLIP flags every script shares, defined once. Unset, they mean ViT-B-16 with OpenAI's
    weights, or on --dataset toy the toy CLIP toy/prepare.py wrote (resolve_clip_args)."""
    g = p.add_argument_group("CLIP teacher (a --checkpoint brings its own)")
    g.add_argument("--clip", default=None,
                   help="open_clip model name: ViT-B-16 (default) or RN50 as in the paper, or any "
                   "other")
    g.add_argument("--clip-pretrained", default=None,
                   help="open_clip tag (default openai) or a local weights file (state dict in "
                   "fp32 or fp16, safetensors, OpenAI's TorchScript .pt); none = random init")
    g.add_argument("--clip-config", default=None,
                   help="open_clip JSON config registered under its file's stem (a custom CLIP)")
    g.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto",
                   help="activation of the CLIP: auto follows the weights (QuickGELU for OpenAI's)")
    g.add_argument("--teacher", choices=TEACHERS, default="maskclip",
                   help="dense features: maskclip (the paper's), or a ViT's last block as SCLIP, "
                   "ClearCLIP or NACLIP change it (docs/method.md section 2b)")


def resolve_clip_args(args):
    """Fill the CLIP flags left unset: the toy CLIP in the toy world's folder for --dataset toy,
    ViT-B-16 with OpenAI's weights otherwise. Returns args."""
    unset = args.clip is None and args.clip_pretrained is None and args.clip_config is None
    if unset and getattr(args, "dataset", None) == "toy":
        root = Path(getattr(args, "data_root", None) or "data/toy")
        args.clip_config = str(root / "toyclip.json")
        args.clip_pretrained = str(root / "toyclip.pt")
    args.clip = args.clip or (Path(args.clip_config).stem if args.clip_config else "ViT-B-16")
    args.clip_pretrained = args.clip_pretrained or "openai"
    return args


def vision_stride(clip, clip_config=None):
    """The teacher's patch size (a ResNet tower: 32) read from the JSON config `clip_config`
    (--clip-config) or else open_clip's config of the architecture `clip` (--clip), without building
    the model; 16 when the name is unknown."""
    try:
        cfg = (json.loads(Path(clip_config).read_text()) if clip_config
               else open_clip.get_model_config(clip) or {})
    except (OSError, json.JSONDecodeError):
        return 16
    vision = cfg.get("vision_cfg", {})
    return 32 if isinstance(vision.get("layers"), (list, tuple)) else vision.get("patch_size", 16)
