r"""train.py: train the pixel-embedding network of CLIP-S4 without labels (or a baseline).

The paper's setting (20k iterations; docs/benchmarks.md gives the time it takes):
    python train.py --dataset voc --data-root data/voc
Class-free Pascal Context (fold 0's names withheld everywhere):
    python train.py --dataset context --data-root data/context --unknown-fold 0 \
        --out-dir runs/ctx_f0
The toy world on 2 CPU cores (made first when data/toy holds none; its preset is printed):
    python train.py --dataset toy
Your own small images (folder layout, short side under 224 px: the same small-image recipe):
    python train.py --dataset folder --data-root DIR --clip-config my_clip.json \
        --clip-pretrained my_clip.pt --backbone-weights resnet18.pt --out-dir runs/mine
Baselines in the same harness: --method maskclip+ (pseudo-labels, then self-training), segsort
(L_c alone), conceptcontrast (codebook concepts and their co-occurrence, no teacher).
A killed or stopped run continues with the same command and --resume. Several GPUs (or CPU
processes with gloo), --batch-size per process:
    torchrun --nproc_per_node 4 train.py --dataset voc
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from util.clip_loading import add_clip_args, load_clip, resolve_clip_args, vision_stride
from data import (CONTEXT_FOLDS, DATASETS, SMALL_SIDE, SegDataset, TwoViews, add_bad_files_arg,
                  first_names)
from util.files import UserError
from util.metrics import DISPLAY_NAMES
from toy.world import world_state
from losses import (ClipS4Objective, Concepts, ConceptContrastObjective, MaskClipPlusObjective,
                    SegSortObjective, UnknownPrototypes, kmeans_segments, pixel_sample,
                    regions_on_grid)
from model import (ASPP_RATES, GRID_SHIFT, ClipTeacher, PixelEmbedder, class_embeddings,
                   scale_or_clip)
from util.loop import (FollowPixels, Phases, RunLog, TeacherCache, Validation, WeightAverage,
                       batches, log_extras, optimizer_for, optimizer_step, resume, save_checkpoint,
                       saved_on_interrupt, setup_distributed, trim_log)

# Per-dataset defaults, printed at start and kept in args.json; a flag given on the command line
# wins. The paper's datasets need none: the flags' own defaults are the paper's setting. Small
# images (a short side under SMALL_SIDE, as the toy world's 64 px or a small dataset of your own in
# the folder layout) get settings that follow from their size and the teacher's patch stride.


def small_image_recipe(side, stride):
    """The recipe for images of short side `side` < SMALL_SIDE seen by a teacher of patch `stride`
    (docs/method.md, section 9b), sized to train in minutes on a laptop's CPU:
      --teacher-size  the images' own side rounded to the stride: the teacher sees them as they are;
      --crop-size  and --eval-size 1.5 x side (a multiple of 8): f's stride-8 grid 1.5x finer
                   than the side / 8 and the teacher's side / stride;
      --aspp-rates DeepLab-v2's (6, 12, 18, 24) scaled by f's grid side / 42, the paper's grid
                   (336 / 8), so the branches look at the same share of the view (at least 1);
      --jitter 0 --grayscale 0: no photometric change of the views. A small image's things are
                   known by colour more than by shape, and the teacher's label of a thing (from
                   the untouched source) cannot be read off a grey or hue-shifted view; with
                   SimCLR's jitter the student loses the things (docs/results.md);
      --view-scale 0.5 1: crops of at least half the image, not a quarter: a thing of a few
                   pixels stays near the size it has at test time;
      --balance 1  every class the teacher names in a batch weighs alike in L_s (and MaskCLIP+'s
                   cross-entropy): with plain cross-entropy on a small teacher's noisy labels, f
                   learns the frequent classes and erases the rare ones, stuff and things alike
                   (docs/results.md, "Rare classes");
      --contrast-among image  L_c's denominator over the segments of the pixel's own image
                   (SPML's reading): a small image's segments are 2-3 feature cells, and against
                   the batch's thousand of them L_c pushes apart the pieces of one class
                   (docs/results.md, "Which term costs what");
      f            a ResNet-18 with a 128-channel head, 250 steps of 8 images, lr 0.01, warm-up 20,
                   8 unknown prototypes, validation every 50 steps;
      --trunk-stages 3  f's trunk stops after layer3: at stride 8 layer4 ran at 16x its usual area
                   and cost more than half of a step (docs/benchmarks.md, "The quick start");
                   layer3 already sees the whole view, and f scored higher without layer4 on
                   every toy world (docs/results.md, "Three stages of f");
      --average-from 0.5  f's weights averaged over the second half of the run: late in a short
                   run a stuff class flips between names from one check to the next, and the
                   last step's weights are a draw (docs/results.md, "A number that repeats")."""
    f_side = max(8, 8 * round(1.5 * side / 8))
    rates = [max(1, round(r * (f_side // 8) / 42)) for r in ASPP_RATES]
    return dict(teacher_size=max(stride, stride * round(side / stride)), crop_size=f_side,
                eval_size=f_side, aspp_rates=rates, jitter=0.0, grayscale=0.0,
                view_scale=[0.5, 1.0], balance=1.0, contrast_among="image", backbone="resnet18",
                head_dim=128, iters=250, batch_size=8, lr=0.01, warmup=20, unknown_protos=8,
                eval_every=50, average_from=0.5, trunk_stages=3)


def dataset_preset(dataset, root, split, stride):
    """The preset of a run on `dataset` read from `root`, with a teacher of patch `stride`: on toy
    the small-image recipe of the toy world's images, with f from the toy ImageNet weights toy.py
    wrote next to the scenes; on folder the same recipe when the images are small; none
    otherwise. The step of get_args that reads files (the images' headers)."""
    if dataset not in ("toy", "folder"):
        return {}
    try:
        side = SegDataset(dataset, root, split).typical_side()
    except UserError:
        side = None
    if dataset == "toy":
        return {**small_image_recipe(side or 64, stride),
                "backbone_weights": f"{root}/resnet18_toy.pt", "out_dir": "runs/toy",
                "final_eval": True}
    if side is None or side >= SMALL_SIDE:
        return {}
    return small_image_recipe(side, stride)


def parser():
    """train.py's flags in groups, as `--help` lists them: the paper's model and data, the method's
    own knobs, our choices where the paper is silent or beyond it, the baselines', optimisation,
    and the run (validation, output)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_args(p)
    for add in (model_args, data_args, method_args, choice_args, baseline_args, optim_args,
                run_args):
        add(p)
    return p


def model_args(p):
    g = p.add_argument_group("model", "the teacher's input and f (docs/method.md sections 2-3)")
    arg = g.add_argument
    arg("--teacher-size", type=int, default=448,
        help="short side of the source the teacher sees; f sees --crop-size views of it [choice]")
    arg("--backbone", default="resnet101", help="f's trunk: resnet101, resnet50, resnet18")
    arg("--backbone-weights", default="auto", help="auto (torchvision's cache), none, or a file")
    arg("--trunk-stages", type=int, choices=[3, 4], default=4,
        help="ResNet stages of f's trunk: 4 (DeepLab's) or 3 (up to layer3, layer4 dropped) "
             "[choice; model.dilated_resnet]")
    arg("--head-dim", type=int, default=512, help="channels of f's ASPP and head [choice]")
    arg("--aspp-rates", type=int, nargs=4, default=list(ASPP_RATES),
        help="dilation rates of f's four ASPP branches (DeepLab-v2's) [choice]")
    arg("--grid", choices=list(GRID_SHIFT), default="centre",
        help="f's cell i looks at the middle of pixels [8i, 8i+8), where it is painted, or at "
             "pixel 8i (corner) [choice; model.PixelEmbedder]")


def data_args(p):
    g = p.add_argument_group("data", "the dataset, its names and the two views of each image")
    arg = g.add_argument
    arg("--dataset", default="voc", choices=DATASETS)
    arg("--class-names", default=None, help="a file of class names replacing the dataset's")
    arg("--data-root", default=None, help="dataset folder (default data/<dataset>)")
    arg("--toy-prepare", default="",
        help="--dataset toy when --data-root holds no world of this version: toy/prepare.py "
             "makes world 0 there first, with these flags added (tests: --toy-prepare=--tiny)")
    add_bad_files_arg(g)
    p.set_defaults(bad_files="check")  # a bad file stops the run before any checkpoint
    arg("--split", default="train", help="split to train on")
    arg("--unknown-fold", type=int, default=None,
        help="class-free Pascal Context: withhold fold K's names")
    arg("--unknown-classes", nargs="+", default=[],
        help="class-free on any dataset: withhold these names")
    arg("--crop-size", type=int, default=336, help="side of each augmented view (paper: 336)")
    arg("--superpixels", type=int, default=64, help="SLIC regions per image [choice]")
    arg("--superpixel-cache", default=None,
        help="folder of the sources' SLIC maps, computed once (default: the run folder's "
             "superpixels/; runs on one dataset may share one)")
    arg("--view-scale", type=float, nargs=2, default=[0.25, 1.0],
        help="area range of each view's random crop, a share of the source [choice]")
    arg("--jitter", type=float, default=0.4,
        help="colour jitter of the views: brightness, contrast, saturation, hue/4 [choice: "
             "SimCLR's]; 0 = none")
    arg("--grayscale", type=float, default=0.2, help="chance a view is grey [choice: SimCLR's]")
    arg("--workers", type=int, default=2, help="DataLoader worker processes")
    arg("--teacher-cache", type=int, default=4096,
        help="MiB of teacher maps kept in memory (fp16, one per training image; 0: none)")


def method_args(p):
    g = p.add_argument_group("CLIP-S4", "the method's own terms and knobs (docs/method.md 4-8)")
    arg = g.add_argument
    arg("--method", default="clip-s4",
        choices=["clip-s4", "maskclip+", "segsort", "conceptcontrast"],
        help="segsort and conceptcontrast learn without a teacher: none runs in training")
    arg("--lambda-c", type=float, default=1.0, help="weight of L_c, pixel-segment contrastive")
    arg("--lambda-e", type=float, default=1.0, help="weight of L_e, embedding consistency [choice]")
    arg("--lambda-s", type=float, default=1.0, help="weight of L_s, semantic consistency [choice]")
    arg("--kappa", type=float, default=10.0, help="concentration of L_c (SegSort's value)")
    arg("--kappa-e", type=float, default=10.0, help="concentration of L_e's InfoNCE [choice]")
    arg("--kappa-s", type=float, default=0.0,
        help="logit scale of L_s and MaskCLIP+; 0 = CLIP's own [choice]")
    arg("--kmeans-grid", type=int, default=4, help="k-means starts from a G x G grid [choice]")
    arg("--kmeans-iters", type=int, default=10, help="k-means iterations per step [choice]")
    arg("--kmeans-lambda", type=float, default=1.0, help="weight of position in k-means [choice]")
    arg("--max-pixels", type=int, default=4096, help="pixels per step scored by L_c, L_s [choice]")
    arg("--unknown-protos", type=int, default=20, help="M unknown prototypes [choice]")
    arg("--unknown-tau", type=float, default=0.5,
        help="CLIP confidence below which a segment is unknown [choice]")
    arg("--unknown-scale", type=float, default=0.0,
        help="softmax scale of that confidence; 0 = the CLIP's own logit scale, the paper's 100 "
             "for OpenAI's CLIPs [choice; docs/method.md section 8]")


def choice_args(p):
    g = p.add_argument_group("readings", "where the paper is silent, other readings of its terms, "
                             "and terms beyond it (docs/method.md 7-9); the defaults are ours")
    arg = g.add_argument
    arg("--balance", type=float, default=0.0,
        help="class balance of L_s and MaskCLIP+'s cross-entropy: each target class weighs "
             "(n / (C n_c))^power in its batch; 0 = plain (the paper's), 1 = every class alike "
             "[beyond the paper; losses.class_balance]")
    arg("--balance-unknown", choices=["each", "pooled"], default="each",
        help="with --balance: each unknown prototype weighs as a class (each), or all of them "
             "together as one (pooled) [choice]")
    arg("--unknown-rule", choices=list(UnknownPrototypes.RULES), default="confidence",
        help="which segments L_s labels unknown: under --unknown-tau, by the nearest prototype "
             "(confidence); the nearest of the names and the prototypes, the abstract's reading "
             "(argmax); under tau no label, MaskCLIP+'s conf_thresh (ignore); none, every segment "
             "its nearest name (none) [choice; losses.UnknownPrototypes.targets]")
    arg("--target-at", choices=["segment", "pixel"], default="segment",
        help="L_s's label of a pixel: CLIP's label of the pixel's segment (segment, docs/method.md"
             " section 7) or of the pixel's own CLIP embedding (pixel) [choice]")
    arg("--emb-loss", default="nce", choices=["nce", "cos"],
        help="form of L_e: InfoNCE over the batch's segments (nce), or 1 - cos(z_s, c_s), the "
             "distance the paper's wording suggests (cos) [choice]")
    arg("--positives", choices=["region", "others", "own"], default="region",
        help="L_c's positives of a pixel: the segments of its superpixel in both views (region, "
             "CLIP-S4's), the same less its own segment when another exists (others, HSG's "
             "segsort+), or its own segment only (own, as SegSort's code) [choice]")
    arg("--contrast-among", choices=["batch", "image"], default="batch",
        help="L_c's denominator: every segment of the batch (batch, the paper's) or of the "
             "pixel's own image (image, SPML's low-level term) [choice]")
    arg("--lambda-r", type=float, default=0.0,
        help="weight of L_r, the teacher's segment neighbourhoods kept (0: off) [beyond the paper; "
             "losses.relational_consistency]")


def baseline_args(p):
    g = p.add_argument_group("baselines", "MaskCLIP+ and ConceptContrast (docs/method.md 11-12)")
    arg = g.add_argument
    arg("--self-train-after", type=float, default=0.1,
        help="maskclip+: share of training on the teacher's labels")
    arg("--codebook", type=int, default=256,
        help="conceptcontrast: K codes (its paper: 32-1024, worse below 128) [choice]")
    arg("--lambda-v", type=float, default=2.0, help="conceptcontrast: weight of L_v, the codes")
    arg("--lambda-o", type=float, default=1.0,
        help="conceptcontrast: weight of L_o, co-occurrence (its paper's L_c)")
    arg("--beta", type=float, default=0.25,
        help="conceptcontrast: weight of L_v's commitment term [choice: VQ-VAE's]")
    arg("--cooccur", choices=["image", "overlap"], default="image",
        help="conceptcontrast: L_o's positives, the segments whose code occurs in the pixel's "
             "image (image), or all segments of images sharing a code with it (overlap)")
    arg("--memory-bank", type=int, default=0,
        help="conceptcontrast: past segments kept as extra candidates (0: none) [choice]")


def optim_args(p):
    g = p.add_argument_group("optimisation", "SGD with poly decay (docs/method.md section 9)")
    arg = g.add_argument
    arg("--iters", type=int, default=20000, help="training iterations (paper: 20k)")
    arg("--batch-size", type=int, default=8, help="images per step, two views each [choice]")
    arg("--lr", type=float, default=3e-3, help="base learning rate, poly decay; head x10 [choice]")
    arg("--warmup", type=int, default=100, help="linear warm-up iterations [choice]")
    arg("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    arg("--weight-decay", type=float, default=1e-3, help="SGD weight decay (paper: 1e-3)")
    arg("--average-from", type=float, default=1.0,
        help="score the uniform average of f's weights over the steps after this share of "
             "--iters (BatchNorm statistics too): validation, the checkpoint and every script "
             "read it; 1 = f's last weights [beyond the paper; util.loop.WeightAverage]")
    arg("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    arg("--seed", type=int, default=0)


def run_args(p):
    g = p.add_argument_group("run", "validation while training, the run folder, the log")
    arg = g.add_argument
    arg("--eval-every", type=int, default=1000,
        help="score f on --eval-images validation images every N steps (0: never)")
    arg("--eval-images", type=int, default=50, help="how many: the first N of the val split")
    arg("--eval-size", type=int, default=None,
        help="their short side for f (default: the dataset's test side; the teacher is scored "
             "once there). evaluate.py, knn.py and visualize.py score the run at this side too")
    arg("--out-dir", default="runs/clip_s4", help="run folder: ckpt.pt, ckpt_prev.pt, log.jsonl")
    arg("--log-every", type=int, default=20, help="a log line every N steps")
    arg("--follow-pixels", action=argparse.BooleanOptionalAction, default=True,
        help="log where each class's pixels go: the share of its ground-truth pixels that the "
             "teacher, the training target and f call it (util.loop.FollowPixels; the labels "
             "are read for this line only)")
    arg("--save-every", type=int, default=1000, help="a checkpoint every N steps and at the end")
    arg("--resume", action="store_true", help="continue the run in --out-dir")
    arg("--stop-after", type=int, default=0,
        help="save and stop after N steps of this invocation (0: run to --iters)")
    arg("--final-eval", action=argparse.BooleanOptionalAction, default=False,
        help="after the last step, score f and its teacher on the whole val split, as "
             "evaluate.py --with-teacher does, and end with that line (on in the toy preset)")
    arg("--profile", action="store_true", help="print each phase's time per step (syncs CUDA)")
    arg("--device", choices=["auto", "cpu", "cuda"], default="auto")


def parse_command_line(argv=None, defaults=None):
    """The command line over `defaults` (a preset), the CLIP flags completed (resolve_clip_args)
    and the CLIP's files made absolute, so that the checkpoint finds its CLIP from anywhere.
    Reads no file."""
    p = parser()
    p.set_defaults(**(defaults or {}))
    args = resolve_clip_args(p.parse_args(argv))
    for k in ("clip_config", "clip_pretrained"):
        if getattr(args, k) and os.path.isfile(getattr(args, k)):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    return args


def get_args(argv=None):
    """The run's flags: the command line, then the dataset's preset (dataset_preset) for every
    flag it leaves unset (a flag given wins); args.preset holds the preset's values in use."""
    first = parse_command_line(argv)
    if first.dataset == "toy":
        prepare_toy_world(first.data_root or "data/toy", first.toy_prepare)
        first = parse_command_line(argv)  # the toy CLIP's files exist now: their full paths
    preset = dataset_preset(first.dataset, first.data_root or f"data/{first.dataset}",
                            first.split, vision_stride(first.clip, first.clip_config))
    args = parse_command_line(argv, preset)
    args.preset = {k: v for k, v in preset.items() if getattr(args, k) == v}
    return args


def prepare_toy_world(root, flags=""):
    """--dataset toy on first use: run toy/prepare.py (world 0, plus `flags`) in `root` when it
    holds no world, or one that another version made or that was cut short (toy.world.world_state);
    a folder of other files stops the run instead of being overwritten."""
    state = world_state(root)
    if state == "ready":
        return
    if state == "foreign":
        raise UserError(f"--data-root {root} holds files that are not a toy world's: give "
                        "another --data-root for --dataset toy, or --dataset folder")
    why = "holds no toy world" if state == "missing" else "holds a toy world of another version"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "toy" / "prepare.py"),
           "--out-dir", str(root), *flags.split()]
    print(f"{root} {why}: making world 0 first ({' '.join(cmd[1:])}; about 4 minutes on 2 CPU "
          "cores)", flush=True)
    if subprocess.run(cmd).returncode:
        raise UserError(f"toy/prepare.py stopped before {root} was complete: run it again with "
                        "the command above")


def split_names(classes, dataset, unknown_classes=(), unknown_fold=None):
    """Known and withheld class names (the class-free setting: --unknown-classes, or on Pascal
    Context --unknown-fold's names): withheld ones appear nowhere in training."""
    withheld = list(unknown_classes)
    if unknown_fold is not None:
        if dataset != "context" or not 0 <= unknown_fold < len(CONTEXT_FOLDS):
            raise UserError("--unknown-fold K takes 0-3 with --dataset context; elsewhere use "
                            "--unknown-classes")
        withheld += CONTEXT_FOLDS[unknown_fold]
    first = first_names(classes)
    missing = [n for n in withheld if n not in first]
    if missing:
        raise UserError(f"--unknown-classes {missing}: not class names of {dataset} "
                        f"({', '.join(first[:8])}, ...)")
    return [c for c, n in zip(classes, first) if n not in withheld], withheld


def build_objective(args, text, clip, device, keep_targets=False):
    """The run's objective (losses.py), built once from its flags: --kappa-s and --unknown-scale
    resolved here against the CLIP (0: its own logit scale, model.scale_or_clip). text (K, D):
    the known names; keep_targets: also return the class each pixel was taught (FollowPixels)."""
    kappa_s = scale_or_clip(args.kappa_s, clip)
    if args.method == "clip-s4":
        # "ignore" and "none" label no segment unknown: no prototypes to learn
        protos = args.unknown_protos if args.unknown_rule in ("confidence", "argmax") else 0
        unknown = UnknownPrototypes(protos, text.shape[1], tau=args.unknown_tau,
                                    scale=scale_or_clip(args.unknown_scale, clip),
                                    rule=args.unknown_rule).to(device)
        lambdas = {"c": args.lambda_c, "e": args.lambda_e, "s": args.lambda_s, "r": args.lambda_r}
        return ClipS4Objective(text, unknown, lambdas, args.kappa, args.kappa_e, kappa_s,
                               args.emb_loss, args.positives, args.balance, args.target_at,
                               keep_targets=keep_targets, among=args.contrast_among,
                               pool_unknown=args.balance_unknown == "pooled")
    if args.method == "maskclip+":
        return MaskClipPlusObjective(text, kappa_s, args.self_train_after * args.iters,
                                     args.balance, keep_targets)
    if args.method == "segsort":
        return SegSortObjective(args.lambda_c, args.kappa, args.positives)
    concepts = Concepts(args.codebook, text.shape[1], args.memory_bank).to(device)
    lambdas = {"c": args.lambda_c, "v": args.lambda_v, "o": args.lambda_o}
    return ConceptContrastObjective(concepts, lambdas, args.kappa, args.beta, args.cooccur,
                                    args.positives)


def open_run_folder(args, device, world, lead):
    """The run folder; a finished or started run is never overwritten without --resume. The first
    process prints the dataset's preset and every flag of the run."""
    out = Path(args.out_dir)
    ckpt_path, prev_path = out / "ckpt.pt", out / "ckpt_prev.pt"
    if (ckpt_path.exists() or prev_path.exists()) and not args.resume:
        raise UserError(f"{ckpt_path} exists: add --resume to continue it, or choose another "
                        f"--out-dir")
    if lead:
        if args.preset:
            print(f"preset {args.dataset}: "
                  + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.preset.items()))
        print(f"train.py | device {device} x {world} | {json.dumps(vars(args))}")
    return out


def build_run(args, device, world, lead, out):
    """Everything a run holds, built in this order (the seed's draws follow it): the training
    images and their two views, the teacher, the known names' text prototypes, f, the objective
    and its state, the optimizer. Returns a namespace of them."""
    r = SimpleNamespace(world=world)
    # ---- 1. data: the views, and the teacher that maps each source (docs/method.md 2, 5) ----
    r.base = SegDataset(args.dataset, args.data_root, args.split, class_names=args.class_names,
                        bad_files=args.bad_files)
    r.known, r.withheld = split_names(r.base.classes, args.dataset, args.unknown_classes,
                                      args.unknown_fold)
    r.clip, r.info = load_clip(args.clip, args.clip_pretrained, args.clip_config, args.quick_gelu,
                               device)
    r.teacher = ClipTeacher(r.clip, r.info, args.teacher).to(device)
    r.data = TwoViews(r.base, args.crop_size, args.teacher_size, r.teacher.stride,
                      n_segments=args.superpixels,
                      cache_dir=args.superpixel_cache or out / "superpixels", seed=args.seed,
                      scale=args.view_scale, jitter=args.jitter, gray=args.grayscale)
    # ---- 2. f, the known names' text prototypes (3, 4), the objective and its state (7, 8) ----
    r.text = class_embeddings(r.teacher, r.known)  # (K, D)
    r.f = PixelEmbedder(r.text.shape[1], args.backbone, args.backbone_weights, args.head_dim,
                        args.aspp_rates, GRID_SHIFT[args.grid], args.trunk_stages).to(device)
    r.net = torch.nn.parallel.DistributedDataParallel(r.f) if world > 1 else r.f  # f: unwrapped
    r.objective = build_objective(args, r.text, r.clip, device,
                                  keep_targets=lead and args.follow_pixels)
    # the teacher's map of each source, for the methods that learn from it
    r.teacher_maps = TeacherCache(r.teacher, args.teacher_cache) if r.objective.taught else None
    r.follow = (FollowPixels(r.base.classes, r.known)
                if lead and args.follow_pixels and r.objective.taught else None)
    # ---- 3. optimizer (9) ----
    r.outside = r.objective.extra_parameters()  # parameters DDP does not hold
    r.opt, r.sched = optimizer_for(r.f, args.lr, args.momentum, args.weight_decay, args.warmup,
                                   args.iters, r.outside)
    r.amp = device.type == "cuda" and not args.no_amp
    r.scaler = torch.amp.GradScaler("cuda", enabled=r.amp)
    r.state = {"model": r.f, **r.objective.state(), "optimizer": r.opt, "scheduler": r.sched,
               "scaler": r.scaler}
    # ---- 4. what is scored: f's last weights, or their average over the last steps ----
    r.average = None
    if args.average_from < 1:
        r.average = WeightAverage(r.f, int(args.average_from * args.iters))
        r.state["average"] = r.average.avg
    r.scored = lambda: r.average.scored(r.f) if r.average else r.f
    return r


def start(args, r, out, device, lead):
    """The validation split (first process), then the newest readable checkpoint of a resumed run
    with the run's own network flags, and args.json. Returns the first step."""
    r.val = None
    if lead and args.eval_every:
        val_split = SegDataset(args.dataset, args.data_root, "val", class_names=args.class_names,
                               bad_files=args.bad_files)
        r.val = Validation(val_split, args.eval_images, args.eval_size, r.teacher, r.f.stride,
                           device)
    network = {"aspp_rates": args.aspp_rates, "grid": args.grid, "trunk_stages": args.trunk_stages}
    step = resume(out, r.state, device, network, r.val) if args.resume else 0
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        trim_log(out / "log.jsonl", step)
    return step


def train_step(args, r, batch, step, phases, device):
    """One step of the method (docs/method.md 5-9): views -> the teacher's map -> f -> segments
    -> objective -> SGD. Returns the objective's StepLoss and the segments."""
    x = batch["views"].flatten(0, 1).to(device)  # (B, V, 3, S, S) -> (BV, 3, S, S)
    h, w = x.shape[2] // r.f.stride, x.shape[3] // r.f.stride
    regions = regions_on_grid(batch["regions"].flatten(0, 1), (h, w), args.grid)
    regions = regions.to(device)  # (BV, h, w)
    # the teacher's map warped onto the views, (BV, D, h, w); None for untaught methods
    clip_map = r.teacher_maps(batch, (h, w), device) if r.teacher_maps else None
    phases("teacher")
    with torch.autocast("cuda", dtype=torch.float16, enabled=r.amp):
        z = r.net(x).float()  # (BV, D, h, w)
    phases("forward")
    seg = kmeans_segments(z.detach(), regions, 2, (args.kmeans_grid,) * 2, args.kmeans_iters,
                          args.kmeans_lambda)
    pix = pixel_sample(seg, args.max_pixels)
    phases("kmeans")
    loss = r.objective(z, seg, regions, pix, clip_map, step)
    if r.follow is not None:  # where each class's pixels went (ground truth read here only)
        r.follow.add_views(batch["labels"].flatten(0, 1), args.grid, clip_map, z, r.text,
                           loss.target)
    phases("losses")
    if not torch.isfinite(loss.total):
        sys.exit(f"step {step}: non-finite loss {({k: v.item() for k, v in loss.terms.items()})}"
                 f"; stopping, the last good checkpoint is {Path(args.out_dir) / 'ckpt.pt'}")
    optimizer_step(loss.total, r.opt, r.sched, r.scaler, r.world, r.outside)
    phases("backward")
    return loss, seg


def train_loop(args, r, step, out, device, rank, lead):
    """From `step` to --iters (or --stop-after more): a step, then the log line, validation and a
    checkpoint when due; Ctrl-C saves first. Returns the last step."""
    ckpt_path, prev_path = out / "ckpt.pt", out / "ckpt_prev.pt"
    meta = {"args": vars(args), "clip": r.info, "classes": r.base.classes, "known": r.known,
            "withheld": r.withheld, "dim": r.text.shape[1], "method": args.method}  # load_run
    save = lambda: save_checkpoint(ckpt_path, prev_path, r.state, step, device,
                                   {**meta, "best": r.val.best if r.val is not None else None})
    r.f.train()
    stream = batches(r.data, args.batch_size, args.seed, args.workers, step, rank, r.world)
    phases = Phases(args.profile, device)
    stop = min(args.iters, step + args.stop_after) if args.stop_after else args.iters
    log = RunLog(out / "log.jsonl", args.iters, args.log_every, args.eval_every,
                 args.profile) if lead else None
    interrupted = lambda: f"interrupted: saved step {step} to {ckpt_path}; add --resume to continue"
    with saved_on_interrupt(save if lead else None, interrupted):
        while step < stop:
            phases("log+save")
            batch = next(stream)
            phases("data")
            loss, seg = train_step(args, r, batch, step, phases, device)
            step += 1
            if r.average:
                r.average.update(r.f, step)
            if lead and (step % args.log_every == 0 or step == args.iters):
                log.train(step, stop, loss.total, loss.terms, seg, log_extras(
                    r.opt, phases, args.log_every, loss.stats, device, r.teacher_maps, r.follow))
            due = args.eval_every and (step % args.eval_every == 0 or step == stop)
            if due and r.val is not None:
                t0 = time.perf_counter()
                result = r.val(r.scored(), step, r.amp)
                log.val(step, result, r.val, time.perf_counter() - t0)
            if due and r.world > 1:
                dist.barrier()  # the other processes wait while the first one validates
            if lead and (step % args.save_every == 0 or step == stop):
                save()
    if lead:
        log.done(step, r.val, ckpt_path)
    return step


def final_scores(args, r, out, device):
    """--final-eval: f and its teacher on every val image, scored as evaluate.py --with-teacher
    scores them (util.loop.Validation on the whole split), printed as its last line and added to
    log.jsonl. With --average-from, f's last weights are scored too, beside their average."""
    t0 = time.perf_counter()
    base = SegDataset(args.dataset, args.data_root, "val", class_names=args.class_names,
                      bad_files=args.bad_files)
    val = Validation(base, len(base), args.eval_size, r.teacher, r.f.stride, device)
    s, t = val(r.scored(), args.iters, r.amp)["mIoU"], val.teacher["mIoU"]
    last = val(r.f, args.iters, r.amp)["mIoU"] if r.scored() is not r.f else None
    with open(out / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"step": args.iters, "final_mIoU": s, "final_teacher_mIoU": t,
                             "final_last_mIoU": last,
                             "final_seconds": time.perf_counter() - t0}) + "\n")
    alone = f" (f's last weights alone: {last:.1f})" if last is not None else ""
    print(f"{DISPLAY_NAMES[r.teacher.info['teacher']]} {t:.1f} -> "
          f"{DISPLAY_NAMES.get(args.method, args.method)} {s:.1f} mIoU ({s - t:+.1f}) on all "
          f"{len(base)} val images{alone}")


def main(args):
    world, rank, device = setup_distributed(args.device)
    lead = rank == 0  # only the first process writes and validates
    torch.manual_seed(args.seed)
    out = open_run_folder(args, device, world, lead)
    r = build_run(args, device, world, lead, out)
    step = start(args, r, out, device, lead)
    step = train_loop(args, r, step, out, device, rank, lead)
    if lead and args.final_eval and step == args.iters:
        final_scores(args, r, out, device)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
