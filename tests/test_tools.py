"""tools/bench.py quickstart: the README's quick start from no toy world at all, end to end, its
phases adding up to the whole and its last line the run's own final score."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_quickstart_from_nothing_on_the_micro_world():
    out = subprocess.run([sys.executable, "tools/bench.py", "quickstart", "--tiny"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    rows = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \| \d+% \|$", out, re.M))
    for phase in ("toy/prepare.py: toy CLIP", "toy/prepare.py: toy ResNet-18", "train.py: forward",
                  "train.py: final scoring, whole val split", "total"):
        assert phase in rows, (phase, out)
    parts = sum(int(v) for k, v in rows.items() if k != "total")
    assert abs(parts - int(rows["total"])) <= len(rows)  # each row rounded to a second
    assert re.search(r"MaskCLIP \d+\.\d -> CLIP-S4 \d+\.\d mIoU \([+-]\d+\.\d\) on all 32 val "
                     r"images \(f's last weights alone: \d+\.\d\)$", out.strip().splitlines()[-1])
