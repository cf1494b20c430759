"""util/figures.py: drawing the paper's figures (supplementary A.5-A.6) from arrays that
visualize.py has already computed. Nothing here runs a network: each function takes images,
embeddings or labels and returns a matplotlib figure, so a figure can be redrawn, restyled or tested
on its own.

    qualitative         Fig. 1: image | ground truth | one column per method
    class_means_umap    Fig. 2: per class, each method's mean pixel embedding and the text embedding
    unknown_strips      Fig. 3: one strip of segment patches per learned unknown prototype
    segment_map         Fig. 4: segment embeddings in a UMAP, each drawn as its patch
    facts               what a drawn figure holds (panels, titles, legend, labels, frame colours)
"""
import warnings

import numpy as np
import torch
from PIL import Image

GREEN, ORANGE = "#2ca02c", "#ff7f0e"  # Fig. 4's frames: known class / unknown class


def thumbnail(img, ids_full, s, side=48):
    """The patch of segment s: its bounding box, pixels outside the segment faded to white."""
    ys, xs = np.nonzero(ids_full == s)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = img[y0:y1, x0:x1].astype(np.float32)
    inside = (ids_full[y0:y1, x0:x1] == s)[..., None]
    crop = np.where(inside, crop, 0.25 * crop + 0.75 * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.BILINEAR))


def umap_2d(x, seed):
    """UMAP (cosine) of the rows of x -> (n, 2); the neighbourhood shrinks for small n. UMAP's numba
    code can change torch's CPU thread count, and with it the last bits of later forwards (seen with
    OMP_NUM_THREADS=1: 1 -> 2), so the count is put back: the same seed gives the same pictures."""
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap
        reducer = umap.UMAP(n_neighbors=max(2, min(15, len(x) - 1)), metric="cosine",
                            random_state=seed, init="random" if len(x) < 30 else "spectral")
        xy = reducer.fit_transform(np.asarray(x, np.float32))
    torch.set_num_threads(threads)
    return xy


# ----------------------------------------------------------------------------------------------
# Fig. 1: qualitative comparison
# ----------------------------------------------------------------------------------------------
def qualitative(rows, cols, ids, colours, class_names, known):
    """rows: one list of (H, W, 3) uint8 panels per image, in the order of cols (column titles);
    ids: each row's image id; colours (K, 3): each name's colour. The legend marks the names that
    are not in `known` (not given in training)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    K = len(class_names)
    legend_in = 0.45 + 0.25 * (1 + (K - 1) // 7)  # inches for the legend under the panels
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False,
                             figsize=(2.3 * len(cols), 2.3 * len(rows) + legend_in))
    for r, (panels, image_id) in enumerate(zip(rows, ids)):
        for c, (ax, pic) in enumerate(zip(axes[r], panels)):
            ax.imshow(pic)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
        axes[r, 0].set_ylabel(image_id, fontsize=8)
    handles = [Patch(facecolor=colours[k] / 255, edgecolor="k",
                     label=n if n in known else f"{n} (unknown)")
               for k, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(K, 7), fontsize=9, frameon=False,
               title="names segmented with  ((unknown): not given in training)", title_fontsize=9)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    return fig


# ----------------------------------------------------------------------------------------------
# Fig. 2: class means and text embeddings, one UMAP
# ----------------------------------------------------------------------------------------------
def class_means_umap(labels, means, text, names, seed):
    """labels: one per method; means: one (n, D) tensor of unit class means per method; text (n, D):
    the classes' text embeddings; names: the n class names. Each mean is joined to its class's text
    point. Returns the figure and each method's mean cosine of class mean to text."""
    import matplotlib.pyplot as plt
    n = len(names)
    xy = umap_2d(torch.cat(list(means) + [text]).numpy(), seed)
    fig, ax = plt.subplots(figsize=(8, 7))
    markers, colours = "osD^", ["#1f77b4", "#d62728", "#9467bd", "#8c564b"]
    txt_xy = xy[len(means) * n:]
    summary = {}
    for j, (label, mean) in enumerate(zip(labels, means)):
        pts = xy[j * n:(j + 1) * n]
        summary[label] = align = float((mean * text).sum(1).mean())
        for a, b in zip(pts, txt_xy):
            ax.plot([a[0], b[0]], [a[1], b[1]], color=colours[j], lw=0.6, alpha=0.5)
        ax.scatter(pts[:, 0], pts[:, 1], marker=markers[j], s=45, color=colours[j],
                   label=f"{label} pixel mean (mean cos to text {align:.2f})")
    ax.scatter(txt_xy[:, 0], txt_xy[:, 1], marker="*", s=160, color="k",
               label="CLIP text embedding")
    for name, (x, y) in zip(names, txt_xy):
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(loc="best", fontsize=9)
    ax.set_title(f"Average pixel embedding per class, projected with the text embeddings (UMAP, "
                 f"{n} classes)")
    fig.tight_layout()
    return fig, summary


# ----------------------------------------------------------------------------------------------
# Fig. 3: learned unknown classes
# ----------------------------------------------------------------------------------------------
def unknown_strips(label, rows, patches, strip):
    """rows: (text, segment indices best first) per unknown prototype; patches (S, h, w, 3). At most
    `strip` patches per row, the row's text at its left."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), strip, figsize=(1.2 * strip + 1.6, 1.25 * len(rows) + 0.6),
                             squeeze=False)
    for r, (text, sel) in enumerate(rows):
        for c in range(strip):
            axes[r, c].axis("off")
            if c < len(sel):
                axes[r, c].imshow(patches[int(sel[c])])
        axes[r, 0].text(-0.15, 0.5, text, transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=8)
    fig.suptitle(f"{label}: learned unknown classes (validation segments, best first)", fontsize=10)
    fig.subplots_adjust(left=0.2, wspace=0.05, hspace=0.15)
    return fig


# ----------------------------------------------------------------------------------------------
# Fig. 4: segment map
# ----------------------------------------------------------------------------------------------
def segment_map(label, emb, patches, is_known, cells, seed):
    """emb (S, D) segment embeddings, patches (S, h, w, 3), is_known (S,) bool. At most one patch
    per cell of a cells x cells grid over the UMAP, framed green (known) or orange (unknown), so
    that patches do not pile up. Returns the figure and the number of patches drawn."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    xy = umap_2d(emb, seed)
    lo, hi = xy.min(0), xy.max(0)
    cell = np.floor((xy - lo) / np.maximum(hi - lo, 1e-9) * (cells - 1e-6)).astype(int)
    chosen, taken = [], set()
    for s in np.random.default_rng(seed).permutation(len(xy)):
        if tuple(cell[s]) not in taken:
            taken.add(tuple(cell[s]))
            chosen.append(s)
    fig, ax = plt.subplots(figsize=(11, 11))
    ax.scatter(xy[:, 0], xy[:, 1], s=4, c=np.where(is_known, GREEN, ORANGE).tolist(), alpha=0.4)
    for s in chosen:
        frame = dict(edgecolor=GREEN if is_known[s] else ORANGE, linewidth=2)
        ax.add_artist(AnnotationBbox(OffsetImage(patches[s], zoom=0.75), xy[s], frameon=True,
                                     pad=0.1, bboxprops=frame))
    pad = 0.06 * (hi - lo)
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0]), ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax.set_xticks([]), ax.set_yticks([])
    n_known = int(is_known.sum())
    ax.legend(handles=[Line2D([], [], color=GREEN, lw=3, label=f"known class ({n_known} segments)"),
                       Line2D([], [], color=ORANGE, lw=3,
                              label=f"unknown class ({len(xy) - n_known} segments)")],
              loc="upper right")
    ax.set_title(f"{label}: {len(xy)} validation segments (UMAP), {len(chosen)} drawn")
    fig.tight_layout()
    return fig, len(chosen)


def facts(fig):
    """What a drawn figure contains, read back from its artists (for the tests and the caller):
    image panels, panel titles, legend entries, text labels and the frame colours of image boxes."""
    from matplotlib.colors import to_hex
    from matplotlib.offsetbox import AnnotationBbox
    legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend()]
    boxes = [b for a in fig.axes for b in a.artists if isinstance(b, AnnotationBbox)]
    return {"panels": sum(1 for a in fig.axes if a.images),
            "titles": [a.get_title() for a in fig.axes],
            "legend": [t.get_text() for lg in legends for t in lg.get_texts()],
            "texts": [t.get_text() for a in fig.axes for t in a.texts],
            "frames": [to_hex(b.patch.get_edgecolor()) for b in boxes]}
