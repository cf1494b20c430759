"""docs/method.md points each concept at the function that implements it: every such pointer
(`module.name`, `util.module.name`, `module.Class.method`) resolves in the code."""
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"data", "model", "losses", "train", "evaluate", "knn", "segment", "visualize", "util",
           "toy"}


def resolve(ref):
    """The object `ref` names: the longest importable module prefix, then attributes."""
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(ref)


def test_method_md_pointers_resolve():
    text = (ROOT / "docs" / "method.md").read_text()
    refs = sorted({r for r in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", text)
                   if r.split(".")[0] in MODULES and not r.endswith((".py", ".md", ".txt"))})
    assert len(refs) > 40  # the document is read, not skipped
    broken = []
    for ref in refs:
        try:
            resolve(ref)
        except (AttributeError, ModuleNotFoundError):
            broken.append(ref)
    assert not broken, f"docs/method.md points at names the code does not have: {broken}"
