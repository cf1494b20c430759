r"""tools/ablate.py: train and score variants (flag sets) on toy worlds and seeds, in one table.

Each (world, variant, seed) is one train.py run with the README's command for a dataset of your
own, plus the variant's flags, then evaluate.py --with-teacher and, with --knn, knn.py for it and
once per world for its teacher. A finished row is appended to --results (JSON lines, kept in the
repo), so the same command skips it after a kill or in a later session; a train run that was
stopped continues with --resume; the worlds' superpixel maps are computed once per world.

    python tools/ablate.py --worlds 0 3 --variants recipe maskclip+ no-Lc no-Le no-Ls \
        no-unknown teacher-copy --knn
    python tools/ablate.py --worlds 4 5 --seeds 0 1 --variants recipe maskclip+ recipe+cf
    python tools/ablate.py --table          # the table of every finished row, nothing run
A variant is a name of VARIANTS, "NAME=FLAGS" for flags of your own ("big-e=--lambda-e 2"), and
"+cf" after either withholds a third of the world's names, things among them (class-free).
World N lives in data/toyN (world 0: data/toy; `python toy/prepare.py --world N ...`); "N=DIR"
points elsewhere.
"""
import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repo: the scripts run from here
sys.path.insert(0, str(ROOT))
from toy.world import make_world  # the world's names: which are things

# The variants of issue-style ablations: each term off, the unknown rule off, the teacher copied,
# and the rules beside the paper's reading (docs/method.md gives each one's paper note).
VARIANTS = {
    "recipe": [],  # the small-image recipe as the README runs it
    "maskclip+": ["--method", "maskclip+", "--self-train-after", "1.0"],  # same recipe, labels
    "no-Lc": ["--lambda-c", "0"],
    "no-Le": ["--lambda-e", "0"],
    "no-Ls": ["--lambda-s", "0"],
    "no-unknown": ["--unknown-rule", "none"],  # every segment its nearest known name
    "teacher-copy": ["--lambda-c", "0", "--lambda-s", "0", "--emb-loss", "cos"],
    "unknown-argmax": ["--unknown-rule", "argmax"],
    "unknown-ignore": ["--unknown-rule", "ignore"],
    "unknown-pooled": ["--balance-unknown", "pooled"],
    "Lc-others": ["--positives", "others"],
    "Lc-image": ["--contrast-among", "image"],
    "Le-cos": ["--emb-loss", "cos"],
    "target-pixel": ["--target-at", "pixel"],
    "relational": ["--lambda-r", "1"],
}


def withheld_names(world):
    """The class-free split of a toy world: the 3rd and 6th stuff, the 1st and 4th thing (4 of 14
    names, as docs/results.md's class-free rows)."""
    stuff, things = list(world.stuff), list(world.things)
    return [stuff[2], stuff[5], things[0], things[3]]


def parse_variant(spec):
    """"name", "name=--flag value ..." or either with "+cf" -> (label, flags, class_free)."""
    name, _, own = spec.partition("=")
    cf = name.endswith("+cf")
    base = name[:-3] if cf else name
    if own:
        flags = own.split()
    elif base in VARIANTS:
        flags = VARIANTS[base]
    else:
        raise SystemExit(f"error: variant {base!r}: not one of {', '.join(VARIANTS)}, and no "
                         f"=FLAGS given")
    return name, flags, cf


def parse_world(spec):
    """"N" -> (N, data/toy or data/toyN); "N=DIR" -> (N, DIR)."""
    num, _, root = spec.partition("=")
    n = int(num)
    return n, Path(root) if root else ROOT / ("data/toy" if n == 0 else f"data/toy{n}")


def row_key(world, name, flags, seed):
    """What makes a row the same row: the world, the variant's name and flags, the seed."""
    flat = json.dumps([world, name, flags, seed])
    return hashlib.sha1(flat.encode()).hexdigest()[:12]


def read_rows(path):
    """The finished rows of --results, {key: row}."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def run(cmd, log):
    """Run one stage (a list of words) from the repo root, its output into `log`; stop on failure
    with the log's last lines."""
    t = time.time()
    with open(log, "w") as out:
        rc = subprocess.call([sys.executable, *cmd], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if rc:
        tail = "\n".join(Path(log).read_text().splitlines()[-5:])
        raise SystemExit(f"error: `python {' '.join(cmd)}` failed (rc {rc}); {log} ends:\n{tail}")
    return time.time() - t


def relative(word):
    """A path inside the repo as the repo's README writes it (data/toy3/toyclip.pt), else as is."""
    path = Path(word)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else word


def pixel_account(log_jsonl, last=3):
    """The training log's pixel-following numbers (loop.FollowPixels) over its last `last`
    log lines: the small classes' recall and precision under the target and f, in percent."""
    recs = [json.loads(x) for x in Path(log_jsonl).read_text().splitlines()]
    follow = [r["follow"] for r in recs if r.get("follow")][-last:]
    out = {}
    for k in ("small_teacher", "small_target", "small_f", "small_target_precision",
              "small_f_precision"):
        vals = [f[k] for f in follow if f.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def scores(ev, things):
    """mIoU, pAcc and the things' mean IoU of an evaluate.py result dict."""
    per = ev["per_class"]
    th = [per[t] for t in things if per.get(t) is not None]
    return {"mIoU": ev["mIoU"], "pAcc": ev["pAcc"], "things": sum(th) / len(th) if th else None,
            "per_class": per}


def world_flags(root):
    """The README's flags for a world in `root`: its folder dataset, and its toy CLIP."""
    return (["--dataset", "folder", "--data-root", str(root)],
            ["--clip-config", str(root / "toyclip.json"), "--clip-pretrained",
             str(root / "toyclip.pt")])


def train_and_score(args, n, root, name, flags, cf, seed, world):
    """One row: train (or finish) the run, score it, and return the row's numbers."""
    folder = Path(args.runs) / f"w{n}" / f"{name}_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    data, clip = world_flags(root)
    withheld = withheld_names(world) if cf else []
    cmd = (["train.py", *data, *clip, "--backbone-weights", args.backbone_weights,
            "--out-dir", str(folder), "--superpixel-cache", str(Path(args.runs) / f"w{n}" / "sp"),
            "--seed", str(seed), *flags]
           + (["--unknown-classes", *withheld] if withheld else []) + args.train_extra.split())
    if (folder / "ckpt.pt").exists():
        cmd.append("--resume")  # a stopped run continues; a finished one only saves again
    minutes = run(cmd, folder / "train.out") / 60
    ck = str(folder / "ckpt.pt")
    run(["evaluate.py", *data, "--checkpoint", ck, "--with-teacher", "--json",
         str(folder / "eval.json")], folder / "eval.out")
    ev = json.loads((folder / "eval.json").read_text())
    row = {"lang": scores(ev, world.things), "teacher": scores(ev["teacher"], world.things),
           "follow": pixel_account(folder / "log.jsonl"), "train_minutes": round(minutes, 1),
           "command": "python " + " ".join(relative(c) for c in cmd)}
    if withheld:
        row["withheld"] = {"names": withheld, "mIoU": ev["unknown"]["mIoU"],
                           "known_mIoU": ev["known"]["mIoU"],
                           "teacher_mIoU": ev["teacher"]["unknown"]["mIoU"],
                           "teacher_known_mIoU": ev["teacher"]["known"]["mIoU"]}
    if args.knn:
        row.update(knn_scores(args, n, root, folder))
    return row


def knn_scores(args, n, root, folder):
    """k-NN (knn.py) of the run in `folder` at --knn-size and, once per world, of its teacher at
    half that side (docs/results.md's Table 3 pairing: f's 8 px cells against 16 px patches)."""
    data, clip = world_flags(root)
    size = args.knn_size
    run(["knn.py", *data, "--checkpoint", str(folder / "ckpt.pt"), "--size", str(size), "--json",
         str(folder / f"knn{size}.json")], folder / f"knn{size}.out")
    mine = json.loads((folder / f"knn{size}.json").read_text())
    teacher = Path(args.runs) / f"w{n}" / f"teacher_knn{size // 2}.json"
    if not teacher.exists():
        run(["knn.py", *data, *clip, "--method", "maskclip", "--size", str(size // 2), "--json",
             str(teacher)], teacher.with_suffix(".out"))
    theirs = json.loads(teacher.read_text())
    return {"knn": {"size": size, **{k: mine[k] for k in ("mIoU", "pAcc")}},
            "teacher_knn": {"size": size // 2, **{k: theirs[k] for k in ("mIoU", "pAcc")}}}


def torch_version():
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def order(name):
    """Where a variant sits in the table: VARIANTS' order, then the others."""
    base = name.split("=")[0].removesuffix("+cf")
    return (list(VARIANTS).index(base) if base in VARIANTS else len(VARIANTS), name)


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows):
    """The markdown table of the rows, grouped by world: each world's teacher first."""
    head = ("| world | variant | seed | mIoU | pAcc | things | k-NN mIoU / pAcc | withheld / known "
            "mIoU | small classes: target, f recall / precision |\n" + "|---" * 9 + "|")
    lines = [head]
    for n in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == n]
        t, tk = mine[0]["teacher"], next((r["teacher_knn"] for r in mine if "teacher_knn" in r),
                                         None)
        cf = next((r["withheld"] for r in mine if "withheld" in r), None)
        lines.append(f"| {n} | teacher (MaskCLIP) | | {fmt(t['mIoU'])} | {fmt(t['pAcc'])} | "
                     f"{fmt(t['things'])} | "
                     + (f"{fmt(tk['mIoU'])} / {fmt(tk['pAcc'])}" if tk else "-") + " | "
                     + (f"{fmt(cf['teacher_mIoU'])} / {fmt(cf['teacher_known_mIoU'])}" if cf
                        else "-") + " | |")
        for r in sorted(mine, key=lambda r: (order(r["variant"]), r["seed"])):
            lang, k, w, f = r["lang"], r.get("knn"), r.get("withheld"), r["follow"]
            label = r["variant"] + (f" ({' '.join(r['extra'])})" if r.get("extra") else "")
            lines.append(
                f"| {n} | {label} | {r['seed']} | {fmt(lang['mIoU'])} | "
                f"{fmt(lang['pAcc'])} | {fmt(lang['things'])} | "
                + (f"{fmt(k['mIoU'])} / {fmt(k['pAcc'])}" + ("" if k.get("size") == 128 else
                                                              f" (f at {k.get('size', 96)} px)")
                   if k else "-") + " | "
                + (f"{fmt(w['mIoU'])} / {fmt(w['known_mIoU'])}" if w else "-") + " | "
                + f"{fmt(f['small_target'], 0)} / {fmt(f['small_target_precision'], 0)}, "
                f"{fmt(f['small_f'], 0)} / {fmt(f['small_f_precision'], 0)} |")
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--worlds", nargs="+", default=["0"], help="toy worlds: N, or N=DIR")
    arg("--variants", nargs="+", default=["recipe"],
        help=f"names ({', '.join(VARIANTS)}), NAME=FLAGS, either with +cf")
    arg("--seeds", type=int, nargs="+", default=[0])
    arg("--knn", action="store_true", help="also k-NN (knn.py) for each run and each teacher")
    arg("--knn-size", type=int, default=128,
        help="f's short side for k-NN; the teacher's is half (docs/results.md: 128 and 64)")
    arg("--results", default=str(ROOT / "docs/ablation.jsonl"),
        help="finished rows, one JSON line each; read to skip what is done")
    arg("--runs", default=str(ROOT / "runs/ablate"),
        help="run folders: <runs>/w<N>/<variant>_s<seed>")
    arg("--backbone-weights", default=str(ROOT / "data/toy/resnet18_toy.pt"),
        help="f's start (the README's command: world 0's toy ImageNet ResNet-18)")
    arg("--train-extra", default="",
        help="more train.py flags for every run, part of each row's key and shown beside its "
             "variant (tests: --iters 2; rows of the recipe before a default changed: "
             "--contrast-among batch)")
    arg("--table", action="store_true", help="print the table of --results and stop")
    return p.parse_args(argv)


def main(args):
    results = Path(args.results)
    done = read_rows(results)
    if args.table:
        print(table(list(done.values())))
        return list(done.values())
    jobs = [(parse_world(w), parse_variant(v), s) for w in args.worlds for v in args.variants
            for s in args.seeds]
    machine = f"{platform.machine()} x{os.cpu_count()} CPU, torch {torch_version()}"
    for j, ((n, root), (name, flags, cf), seed) in enumerate(jobs, start=1):
        key = row_key(n, name, flags + args.train_extra.split(), seed)
        if key in done and args.knn and done[key].get("knn", {}).get("size") != args.knn_size:
            print(f"[{j}/{len(jobs)}] world {n} {name} seed {seed}: k-NN ...", flush=True)
            done[key] = {**done[key], **knn_scores(args, n, root, Path(args.runs) / f"w{n}"
                                                   / f"{name}_s{seed}")}
            results.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
            continue
        if key in done:
            print(f"[{j}/{len(jobs)}] world {n} {name} seed {seed}: done, skipped", flush=True)
            continue
        if not (root / "toyclip.pt").exists():
            raise SystemExit(f"error: world {n} not found in {root}: make it with "
                             f"`python toy/prepare.py --world {n} --backbone-steps 0 --steps 900`")
        print(f"[{j}/{len(jobs)}] world {n} {name} seed {seed}: training ...", flush=True)
        t = time.time()
        row = train_and_score(args, n, root, name, flags, cf, seed, make_world(n))
        row = {"key": key, "world": n, "variant": name, "flags": flags, "seed": seed,
               **({"extra": args.train_extra.split()} if args.train_extra else {}),
               "machine": machine, "date": time.strftime("%Y-%m-%d"), **row}
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as out:
            out.write(json.dumps(row) + "\n")
        done[key] = row
        print(f"[{j}/{len(jobs)}] world {n} {name} seed {seed}: mIoU {row['lang']['mIoU']:.1f} "
              f"things {fmt(row['lang']['things'])} (teacher {row['teacher']['mIoU']:.1f} / "
              f"{fmt(row['teacher']['things'])}) in {(time.time() - t) / 60:.1f} min", flush=True)
    ran = [done[row_key(n, name, flags + args.train_extra.split(), s)]
           for (n, _), (name, flags, _), s in jobs]
    print(table(ran))
    return ran


if __name__ == "__main__":
    main(get_args())
