"""Segments, the losses of CLIP-S4 and the objective of each method (docs/method.md).

Notation used in shape comments:
    B images, V = 2 views, BV = B*V view maps, D joint dimension, h x w feature grid, N = h*w,
    C = D + 2 clustering channels, k k-means clusters per view, P pixels, S segments in the batch,
    K known classes, M unknown prototypes.
"""
from collections import namedtuple
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

Segments = namedtuple("Segments", "ids count image region")
Segments.__doc__ = """ids (BV, h, w) long in [0, S) or -1 outside the image; count S; image (S,) the
source image of each segment; region (S,) its superpixel id."""


# ----------------------------------------------------------------------------------------------
# Segments (SegSort / HSG): spherical k-means on embedding + position, intersected with regions
# (docs/method.md section 6)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def kmeans_segments(z, regions, views=2, grid=(4, 4), iters=10, lam=1.0):
    """Cluster each view map by spherical k-means on normalise([z_p ; lam * (y, x)]), starting from
    a regular grid of gh x gw cells; a segment is a (cluster, region) pair. No gradient.
    Args:
        z: (BV, D, h, w) unit pixel embeddings, views of one image consecutive (index b*V + v).
        regions: (BV, h, w) long superpixel ids of the source, -1 outside the image.
        grid, iters, lam: clusters per view (grid), k-means iterations, weight of the position.
    Returns:
        Segments(ids, count, image, region)."""
    BV, D, h, w = z.shape
    gh, gw = grid
    ys = torch.linspace(-1, 1, h, device=z.device).view(h, 1).expand(h, w)
    xs = torch.linspace(-1, 1, w, device=z.device).view(1, w).expand(h, w)
    pos = torch.stack([ys, xs]).expand(BV, 2, h, w)
    feat = F.normalize(torch.cat([z.float(), lam * pos], dim=1).flatten(2), dim=1)  # (BV, C, N)
    cell_y = torch.arange(h, device=z.device) * gh // h
    cell_x = torch.arange(w, device=z.device) * gw // w
    assign = (cell_y.view(h, 1) * gw + cell_x.view(1, w)).flatten().expand(BV, -1)  # (BV, N)
    for _ in range(iters):
        onehot = F.one_hot(assign, gh * gw).float()  # (BV, N, k)
        centroids = F.normalize(feat @ onehot, dim=1)  # (BV, C, N) @ (BV, N, k) -> (BV, C, k)
        assign = (centroids.transpose(1, 2) @ feat).argmax(dim=1)  # (BV, k, N) -> (BV, N)
    reg = regions.flatten(1)  # (BV, N)
    n_reg = int(reg.max()) + 1
    view = torch.arange(BV, device=z.device).view(BV, 1)
    key = (view * (gh * gw) + assign) * n_reg + reg  # unique per (view, cluster, region)
    valid = reg >= 0
    uniq, inv = torch.unique(key[valid], return_inverse=True)
    ids = torch.full_like(reg, -1)
    ids[valid] = inv
    return Segments(ids.view(BV, h, w), len(uniq), uniq // n_reg // (gh * gw) // views,
                    uniq % n_reg)


def regions_on_grid(regions, size, grid="centre"):
    """Superpixel ids of the views (B, H, W) read on the (h, w) feature grid. grid "centre": cell i
    takes the id at the centre of its pixels [s*i, s*(i+1)) (s = H/h), where f's and the teacher's
    cell i look (model.PixelEmbedder); "corner": the id at pixel s*i (f built with shift 0)."""
    mode = "nearest-exact" if grid == "centre" else "nearest"
    return F.interpolate(regions[:, None].float(), size=size, mode=mode)[:, 0].long()


def segment_means(x, seg):
    """Normalised mean of x over each segment (with gradient): x (BV, D, h, w) -> (S, D)."""
    D = x.shape[1]
    flat = x.permute(0, 2, 3, 1).reshape(-1, D)  # (BV*h*w, D)
    ids = seg.ids.reshape(-1)
    keep = ids >= 0
    sums = flat.new_zeros(seg.count, D).index_add_(0, ids[keep], flat[keep])
    return F.normalize(sums, dim=1)


@torch.no_grad()
def image_segments(feats, n_segments=36, iters=20, lam=1.0):
    """Segments of single images for evaluation and figures (knn.py, visualize.py): k-means on
    embedding + lam * position from a sqrt(n) x sqrt(n) grid, no superpixels (the supplementary says
    only "k-means"; the position term and its weight are our choice, knn.py --kmeans-lambda).
    feats (1, D, h, w) unit -> (Segments, their unit mean embeddings (S, D))."""
    g = int(round(n_segments ** 0.5))
    regions = torch.zeros(feats.shape[0], *feats.shape[2:], dtype=torch.long, device=feats.device)
    seg = kmeans_segments(feats, regions, views=1, grid=(g, g), iters=iters, lam=lam)
    return seg, segment_means(feats, seg)


def pixel_sample(seg, max_pixels, generator=None):
    """Indices of valid pixels (into the flattened BV*h*w grid), at most max_pixels of them."""
    idx = (seg.ids.reshape(-1) >= 0).nonzero().squeeze(1)
    if max_pixels and len(idx) > max_pixels:
        idx = idx[torch.randperm(len(idx), generator=generator, device=idx.device)[:max_pixels]]
    return idx


# ----------------------------------------------------------------------------------------------
# L_c: pixel-segment contrastive (paper; SegSort) -- docs/method.md section 7
# ----------------------------------------------------------------------------------------------
def segment_contrast(zp, zs, pos, kappa, among=None):
    """The pixel-segment contrast shared by L_c, SegSort and ConceptContrast's terms:
        mean_p -log( sum_{s in pos(p)} exp(kappa cos(z_p, z_s)) / sum_s exp(kappa cos(z_p, z_s)) ).
    zp (P, D), zs (S, D) unit; pos (P, S) bool; among (P, S) bool or None: the segments each
    pixel's sums run over (None: all). Pixels without a positive are left out."""
    logits = kappa * zp @ zs.T  # (P, S)
    if among is not None:
        logits = logits.masked_fill(~among, float("-inf"))
        pos = pos & among
    has = pos.any(dim=1)
    num = torch.logsumexp(logits[has].masked_fill(~pos[has], float("-inf")), dim=1)
    return (torch.logsumexp(logits[has], dim=1) - num).mean()


def pixel_segment_contrastive(z, seg, regions, pix, kappa=10.0, views=2, positives="region",
                              negatives=None, among="batch"):
    """L_c = mean_p -log( sum_{s in S+(p)} exp(kappa cos(z_p, z_s)) / sum_{s} exp(kappa cos(z_p,
    z_s)) ). The denominator runs over every segment of the batch (among "batch", the paper's:
    the others are the negatives) or of p's own image, both views (among "image", SPML's
    low-level term [beyond the paper]), and over `negatives` (E, D) unit if given
    (ConceptContrast's memory bank). S+(p):
      "region" (default, CLIP-S4's L_c): the segments of either view of p's image that lie in p's
               superpixel, so the two views of a region are pulled together;
      "others" (HSG's segsort+ [beyond the paper]): the same, less p's own segment, which also
               leaves the denominator, when another positive exists. With segments of a few cells
               p's own embedding is a large part of its segment's mean, so that positive is met
               before anything is learned;
      "own"    (SegSort's code): only the segment p itself belongs to, in its own view.
    z (BV, D, h, w) unit, seg Segments, regions (BV, h, w), pix (P,) flat pixel indices."""
    BV, D, h, w = z.shape
    zp = z.permute(0, 2, 3, 1).reshape(-1, D)[pix]  # (P, D)
    zs = segment_means(z, seg)  # (S, D)
    p_image = pix // (h * w) // views
    own = seg.ids.reshape(-1)[pix][:, None] == torch.arange(seg.count, device=z.device)  # (P, S)
    if positives == "own":
        pos = own
    else:
        p_region = regions.reshape(-1)[pix]
        pos = (p_image[:, None] == seg.image[None]) & (p_region[:, None] == seg.region[None])
    keep = None  # (P, S): the segments p's sums run over
    if positives == "others":
        keep = ~(own & (pos & ~own).any(dim=1, keepdim=True))
    if among == "image":
        same = p_image[:, None] == seg.image[None]
        keep = same if keep is None else keep & same
    if negatives is not None and len(negatives):
        zs = torch.cat([zs, negatives.to(zs.dtype)])
        pos = torch.cat([pos, pos.new_zeros(len(pos), len(negatives))], dim=1)  # (P, S + E)
        if keep is not None:
            keep = torch.cat([keep, keep.new_ones(len(keep), len(negatives))], dim=1)
    return segment_contrast(zp, zs, pos, kappa, keep)


# ----------------------------------------------------------------------------------------------
# L_e: embedding consistency with CLIP's dense map, at segment level (paper) -- docs/method.md 7
# ----------------------------------------------------------------------------------------------
def embedding_consistency(zs, cs, kappa=10.0, form="nce"):
    """Pull each segment embedding z_s toward CLIP's embedding c_s of the same segment.
    form "nce" [choice, default]: InfoNCE over the batch's segments,
        L_e = mean_s -log( exp(kappa cos(z_s, c_s)) / sum_{s'} exp(kappa cos(z_s, c_s')) );
    form "cos": L_e = mean_s 1 - cos(z_s, c_s). c_s carries no gradient. zs, cs (S, D) unit."""
    cs = cs.detach()
    if form == "cos":
        return (1 - (zs * cs).sum(dim=1)).mean()
    logits = kappa * zs @ cs.T  # (S, S)
    return F.cross_entropy(logits, torch.arange(len(zs), device=zs.device))


def relational_consistency(zs, cs, temperature=0.1):
    """L_r [beyond the paper]: keep the teacher's neighbourhoods, not only its labels. Each
    segment's similarities to the batch's other segments become a distribution, the teacher's the
    target (softmaxes over s' != s, temperature t):
        L_r = mean_s KL( softmax(cos(c_s, c_s') / t) || softmax(cos(z_s, z_s') / t) ).
    Relational distillation as in NeCo's neighbour ordering or CLIP-DINOiser's pooled features:
    k-NN retrieval reads exactly these relations. c_s carries no gradient. zs, cs (S, D) unit."""
    eye = torch.eye(len(zs), dtype=torch.bool, device=zs.device)
    student = (zs @ zs.T / temperature).masked_fill(eye, float("-inf"))  # (S, S)
    teacher = (cs.detach() @ cs.detach().T / temperature).masked_fill(eye, float("-inf"))
    log_p, log_q = F.log_softmax(teacher, dim=1), F.log_softmax(student, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(eye, 0.0)  # 0 * -inf on the diagonal
    return kl.sum(dim=1).mean()


# ----------------------------------------------------------------------------------------------
# L_s: semantic consistency over known text prototypes and learned unknown prototypes
# (paper) -- docs/method.md sections 7 and 8
# ----------------------------------------------------------------------------------------------
def semantic_consistency(z, seg, pix, targets, prototypes, kappa, balance=0.0, pool_from=None):
    """L_s = mean_p CE( kappa cos(z_p, P_j) over j, y_{s(p)} ): our per-pixel prediction over the
    target prototypes P = [T; U'] agrees with CLIP's label y_s of the pixel's segment. Segments
    with target -1 are left out; `balance` > 0 weighs the classes (class_balance; pool_from K:
    the unknown prototypes weigh as one class).
    z (BV, D, h, w) unit, pix (P,), targets (S,) long, prototypes (K+M, D) unit. seg None: targets
    (P,) are the scored pixels' own labels (train.py --target-at pixel)."""
    D = z.shape[1]
    zp = z.permute(0, 2, 3, 1).reshape(-1, D)[pix]  # (P, D)
    y = targets[seg.ids.reshape(-1)[pix]] if seg is not None else targets  # (P,)
    logits = kappa * zp @ prototypes.T.to(zp.dtype)  # (P, K+M)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y,
                           weight=class_balance(y, len(prototypes), balance, pool_from),
                           ignore_index=-1)


def class_balance(y, num_classes, power, pool_from=None):
    """Class weights that even out the classes of one batch's targets (beyond the paper, which
    weighs every pixel alike; train.py --balance):
        w_c = (n / (C n_c)) ^ power,
    n the targets (y >= 0), n_c those of class c, C the classes present. F.cross_entropy divides
    by the summed weights of the targets, so power 1 gives every present class the same share of
    the loss, and power 0 is plain cross-entropy (None is returned). pool_from K: the classes K and
    above (L_s's unknown prototypes) count as one class, so together they weigh as one known name
    (train.py --balance-unknown pooled). y (P,) long, -1 = none."""
    if not power:
        return None
    groups = num_classes if pool_from is None else pool_from + 1
    g = y[y >= 0] if pool_from is None else y[y >= 0].clamp(max=pool_from)
    n_c = torch.bincount(g, minlength=groups).float()  # (groups,)
    present = n_c > 0
    w = torch.ones(groups, device=y.device)
    w[present] = (n_c.sum() / (present.sum() * n_c[present])) ** power
    if pool_from is None:
        return w
    return torch.cat([w[:pool_from], w[pool_from].expand(num_classes - pool_from)])


class UnknownPrototypes(nn.Module):
    """M prototypes for what the known names do not cover, learned by online clustering of CLIP's
    segment embeddings (docs/method.md section 8; the paper says only "learned by clustering").
    CLIP's image embeddings sit far from its text embeddings (the modality gap), so prototypes are
    clustered in image space and shifted across the gap before they compete with text prototypes:
    u'_m = normalise(u_m - mean_img + mean_txt). `rule` says which segments are unknown (targets).
    RULES: the rules a run may name (train.py --unknown-rule)."""
    RULES = ("confidence", "argmax", "ignore", "none")

    def __init__(self, num, dim, momentum=0.99, tau=0.5, scale=100.0, dead_after=200,
                 rule="confidence"):
        super().__init__()
        self.momentum, self.tau, self.scale, self.dead_after = momentum, tau, scale, dead_after
        self.rule = rule
        self.register_buffer("protos", torch.zeros(num, dim))  # (M, D) image-space unit vectors
        self.register_buffer("idle", torch.zeros(num, dtype=torch.long))  # steps since assigned
        self.register_buffer("img_mean", torch.zeros(dim))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def targets(self, cs, text):
        """CLIP's label y_s of each segment under self.rule (the paper says only that the unknown
        prototypes are "learned by clustering"; docs/method.md section 8):
          "confidence" [choice, default]: a known name when CLIP's softmax over the known names
                       (at self.scale) reaches tau, else K + its nearest unknown prototype;
          "argmax"     (the abstract's reading): the nearest of the known names and the shifted
                       prototypes, argmax_j cos(c_s, [T; U']_j); before the prototypes exist the
                       segments under tau seed them;
          "ignore"     (MaskCLIP+'s code, its conf_thresh): under tau no target at all;
          "none":      every segment its nearest known name, no unknown class.
        cs (S, D), text (K, D) -> targets (S,) long in [0, K+M) (-1: no target), unknown (S,)
        bool: the segments the prototypes are clustered from (UnknownPrototypes.update)."""
        prob = F.softmax(self.scale * cs @ text.T, dim=1)  # (S, K)
        conf, known = prob.max(dim=1)
        if self.rule == "none":
            return known, torch.zeros_like(conf, dtype=torch.bool)
        unknown = conf < self.tau
        if self.rule == "ignore" or not self.started:  # no prototypes (yet, or M = 0)
            return torch.where(unknown, -1, known), unknown
        if self.rule == "argmax":
            y = (cs @ torch.cat([text, self.shifted(text)]).T).argmax(dim=1)  # (S,) in [0, K+M)
            return y, y >= len(text)
        nearest = (cs @ self.protos.T).argmax(dim=1) + len(text)  # (S,)
        return torch.where(unknown, nearest, known), unknown

    @torch.no_grad()
    def update(self, cs, unknown, generator=None):
        """One mini-batch spherical k-means step with EMA on the unknown segments' c_s; prototypes
        idle for `dead_after` steps re-seeded from unknown segments; mean_img tracks all c_s."""
        m = self.momentum
        self.img_mean.mul_(m if self.started else 0).add_(cs.mean(0),
                                                          alpha=1 - m if self.started else 1)
        cu = cs[unknown]
        M = len(self.protos)
        if M == 0 or len(cu) == 0:
            return
        if not self.started:  # seed from the first unknown segments
            pick = torch.randint(len(cu), (M,), generator=generator, device="cpu").to(cu.device)
            self.protos.copy_(cu[pick])
            self.started.fill_(True)
        assign = (cu @ self.protos.T).argmax(dim=1)  # (S_u,)
        sums = torch.zeros_like(self.protos).index_add_(0, assign, cu)
        hit = torch.bincount(assign, minlength=M) > 0
        new = F.normalize(m * self.protos + (1 - m) * F.normalize(sums, dim=1), dim=1)
        self.protos.copy_(torch.where(hit[:, None], new, self.protos))
        self.idle.add_(1).masked_fill_(hit, 0)
        dead = (self.idle >= self.dead_after).nonzero().squeeze(1)
        if len(dead):
            pick = torch.randint(len(cu), (len(dead),), generator=generator,
                                 device="cpu").to(cu.device)
            self.protos[dead] = cu[pick]
            self.idle[dead] = 0

    def shifted(self, text):
        """The prototypes moved across the modality gap, for comparison with text: (M, D)."""
        return F.normalize(self.protos - self.img_mean + text.mean(0), dim=1)


def restore_unknown(saved, tau, scale, rule="confidence"):
    """A run's unknown prototypes from its checkpoint (`saved`: UnknownPrototypes' state dict) with
    the rule it was trained with (tau, scale, rule); None when it has none or they never started."""
    if saved is None or saved["protos"].shape[0] == 0:
        return None
    unknown = UnknownPrototypes(*saved["protos"].shape, tau=tau, scale=scale, rule=rule)
    unknown.load_state_dict(saved)
    return unknown if bool(unknown.started) else None


# ----------------------------------------------------------------------------------------------
# MaskCLIP+ baseline: cross-entropy on pseudo-labels with the text embeddings as a fixed classifier
# (docs/method.md section 11)
# ----------------------------------------------------------------------------------------------
def pseudo_label_loss(z, labels, text, kappa, balance=0.0):
    """MaskCLIP+: CE( kappa cos(z_p, T_j), label_p ) per pixel; labels (BV, h, w), -1 ignored;
    `balance` > 0 weighs the classes (class_balance)."""
    logits = kappa * torch.einsum("bdhw,kd->bkhw", z, text.to(z.dtype))  # (BV, K, h, w)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                           weight=class_balance(labels.flatten(), len(text), balance),
                           ignore_index=-1)


# ----------------------------------------------------------------------------------------------
# ConceptContrast (He et al., IJCAI 2022): local, global and co-occurring concepts, no teacher
# (docs/method.md section 12)
# ----------------------------------------------------------------------------------------------
class Concepts(nn.Module):
    """ConceptContrast's global concepts: a codebook of K learned unit vectors e_k (a parameter,
    moved by the codebook term of L_v only), and an optional memory bank of the last segments seen
    (their detached embeddings and codes: more negatives for L_c, more candidates for L_o).
    The codes start from the first batch's segment embeddings [choice: a data-dependent start, so
    that no code starts far from every segment; ConceptContrast's start is not recovered]."""

    def __init__(self, num, dim, bank=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim))  # (K, D), normalised when read
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("bank", torch.zeros(bank, dim))  # (N, D) past segment embeddings
        self.register_buffer("bank_codes", torch.full((bank,), -1, dtype=torch.long))  # -1: empty
        self.register_buffer("bank_next", torch.zeros((), dtype=torch.long))

    def codes(self):
        return F.normalize(self.weight, dim=1)  # (K, D)

    @torch.no_grad()
    def start(self, zs):
        """Seed the codes, once, from K of the segment embeddings zs (S, D), with a little noise so
        that repeats (when S < K) still differ."""
        if self.started:
            return
        K = len(self.weight)
        pick = torch.randperm(len(zs))[:K] if len(zs) >= K else torch.randint(len(zs), (K,))
        self.weight.copy_(zs[pick.to(zs.device)] + 1e-2 * torch.randn_like(self.weight))
        if dist.is_initialized():  # every process starts from the first one's codes
            dist.broadcast(self.weight.data, 0)
        self.started.fill_(True)

    def memory(self):
        """The bank's filled part: embeddings (N', D) and codes (N',)."""
        full = self.bank_codes >= 0
        return self.bank[full], self.bank_codes[full]

    @torch.no_grad()
    def remember(self, zs, codes):
        """Write a step's segments (S, D) and their codes (S,) into the bank, the oldest out."""
        N = len(self.bank)
        if N == 0:
            return
        zs, codes = zs[-N:], codes[-N:]
        at = (self.bank_next + torch.arange(len(zs), device=zs.device)) % N
        self.bank[at], self.bank_codes[at] = zs.to(self.bank.dtype), codes
        self.bank_next.copy_((self.bank_next + len(zs)) % N)


def vector_quantization(zs, concepts, beta=0.25):
    """ConceptContrast's L_v, a cosine VQ loss: each segment z_s goes to its most similar code,
    k(s) = argmax_k cos(z_s, e_k), and
        L_v = mean_s [1 - cos(sg[z_s], e_k(s))] + beta mean_s [1 - cos(z_s, sg[e_k(s)])],
    the codebook term (only the codes move toward the segments) and the commitment term (only f
    moves toward its codes); sg = stop-gradient. beta [choice: VQ-VAE's 0.25; ConceptContrast's
    value is not recovered]. zs (S, D) unit -> (L_v, codes (S,) long)."""
    e = concepts.codes()  # (K, D)
    codes = (zs.detach() @ e.detach().T).argmax(dim=1)  # (S,)
    # (S, D); index_select, not e[codes]: its backward sums repeated codes in a fixed order, so
    # a run on several CPU threads gives the same codebook every time
    ek = e.index_select(0, codes)
    book = (1 - (zs.detach() * ek).sum(dim=1)).mean()
    commit = (1 - (zs * ek.detach()).sum(dim=1)).mean()
    return book + beta * commit, codes


def image_codes(codes, image, num_codes):
    """Which codes occur in each image: (B, K) bool. codes (S,), image (S,) in [0, B)."""
    has = torch.zeros(int(image.max()) + 1, num_codes, dtype=torch.bool, device=codes.device)
    has[image, codes] = True
    return has


def cooccurrence_positives(codes, image, num_codes, rule="image"):
    """Which segments are positives for a pixel of image b, (B, S) bool. codes (S,) the segments'
    codes, image (S,) their images in [0, B).
      "image"   (default): s when its code occurs among the codes of b's own segments;
      "overlap": s when the code sets of s's image and of b share a code."""
    has = image_codes(codes, image, num_codes)  # (B, K)
    if rule == "image":
        return has[:, codes]
    shared = (has.float() @ has.float().T) > 0  # (B, B): the two images share a code
    return shared[:, image]


def concept_cooccurrence(z, seg, pix, codes, concepts, kappa=10.0, views=2, rule="image"):
    """ConceptContrast's L_c, here L_o (o for co-occurrence): the pixel-segment contrast whose
    positives for pixel p are the segments of concepts that co-occur with p's image
    (cooccurrence_positives). The bank's segments are positives when their code occurs in p's image
    (under either rule: the bank keeps no image's code set), negatives otherwise.
    z (BV, D, h, w) unit, seg Segments, pix (P,), codes (S,) from vector_quantization."""
    BV, D, h, w = z.shape
    zp = z.permute(0, 2, 3, 1).reshape(-1, D)[pix]  # (P, D)
    zs = segment_means(z, seg)  # (S, D)
    K = len(concepts.weight)
    p_image = pix // (h * w) // views
    pos = cooccurrence_positives(codes, seg.image, K, rule)[p_image]  # (P, S)
    bank, bank_codes = concepts.memory()
    if len(bank):
        has = image_codes(codes, seg.image, K)  # (B, K)
        zs = torch.cat([zs, bank.to(zs.dtype)])
        pos = torch.cat([pos, has[p_image][:, bank_codes]], dim=1)  # (P, S + N')
    return segment_contrast(zp, zs, pos, kappa)


# ----------------------------------------------------------------------------------------------
# The objectives: one object per method, built once from the run's settings, owning what it learns
# outside the gradient, called at every step with tensors only; its __call__ is the method's
# equation (docs/method.md section 7; DINO's DINOLoss is the pattern)
# ----------------------------------------------------------------------------------------------
@dataclass
class StepLoss:
    """What an objective returns at a step. total: the scalar back-propagated; terms: {letter:
    unweighted loss}; stats: the numbers the log reads ({name: tensor or function}, read at log
    time only, so a step does not wait on the GPU); target: (BV, h, w) long, the class each pixel
    was taught (a known name, K + an unknown prototype, or -1), kept only by an objective made
    with keep_targets (util.loop.FollowPixels), else None."""
    total: torch.Tensor
    terms: dict
    stats: dict = field(default_factory=dict)
    target: torch.Tensor | None = None


def weighted_total(terms, weights):
    """sum_k weights[k] * terms[k]: the scalar that is back-propagated."""
    return sum(weights[k] * v for k, v in terms.items())


def gather(x):
    """Concatenate a tensor whose first dimension differs across processes (their segments); the
    tensor itself in a single process."""
    if not dist.is_initialized():
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(sizes))
    parts = [x.new_zeros((most, *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, x.new_zeros((most - len(x), *x.shape[1:]))]))
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)])


def pixel_targets(seg, y):
    """Each pixel's class from its segment's label y (S,): (BV, h, w) long, -1 outside segments."""
    return torch.where(seg.ids >= 0, y[seg.ids.clamp(min=0)], -1)


class Objective:
    """What every method's objective offers the loop besides being called (each subclass's
    __call__(z, seg, regions, pix, clip_map, step) -> StepLoss): taught, whether it reads the
    teacher's map; state(), what a checkpoint keeps of it, {name: module}; extra_parameters(), the
    parameters the optimizer moves besides f's. None by default. The arguments of __call__:
    z (BV, D, h, w) unit, f's embeddings of the views (with gradient); seg Segments of z; regions
    (BV, h, w) superpixel ids, -1 = pad; pix (P,) flat indices of the scored pixels; clip_map (BV,
    D, h, w) unit, the teacher's map warped onto the views (no gradient), None untaught; step."""
    taught = False

    def state(self):
        return {}

    def extra_parameters(self):
        return []


class ClipS4Objective(Objective):
    """CLIP-S4 (paper; docs/method.md section 7):
        L = lambda_c L_c + lambda_e L_e + lambda_s L_s
    L_c pixel-segment contrastive (pixel_segment_contrastive), L_e embedding consistency between f's
    segment embeddings z_s and CLIP's c_s (embedding_consistency), L_s semantic consistency over the
    known text prototypes and the shifted unknown prototypes (semantic_consistency); optionally
    lambda_r L_r (relational_consistency, beyond the paper). A weight of 0 skips its term.
    Its state: the unknown prototypes U, moved after each step by one k-means step on the segments
    CLIP is unsure of, from every process (UnknownPrototypes.update).
    text (K, D) unit: the known names; unknown: UnknownPrototypes, its rule's tau and scale set;
    lambdas {"c", "e", "s"} and optionally "r"; kappa, kappa_e, kappa_s: the scales of L_c, L_e,
    L_s (kappa_s resolved: model.scale_or_clip); emb_form: L_e's form; positives, among: L_c's
    positives and denominator (pixel_segment_contrastive); balance: class_balance's power in L_s;
    pool_unknown: the unknown prototypes weigh as one class there; target_at: L_s's label of a
    pixel, CLIP's label of its segment ("segment", y_s) or of the pixel itself ("pixel", beyond the
    paper); keep_targets: return what each pixel was taught (StepLoss.target)."""
    taught = True  # reads the teacher's map

    def __init__(self, text, unknown, lambdas, kappa=10.0, kappa_e=10.0, kappa_s=100.0,
                 emb_form="nce", positives="region", balance=0.0, target_at="segment", views=2,
                 keep_targets=False, among="batch", pool_unknown=False):
        self.text, self.unknown, self.lambdas = text, unknown, lambdas
        self.kappa, self.kappa_e, self.kappa_s = kappa, kappa_e, kappa_s
        self.emb_form, self.positives, self.balance = emb_form, positives, balance
        self.target_at, self.views, self.keep_targets = target_at, views, keep_targets
        self.among, self.pool_unknown = among, pool_unknown

    def state(self):
        return {"unknown": self.unknown}

    def __call__(self, z, seg, regions, pix, clip_map, step=0):
        lam, text, unknown, terms = self.lambdas, self.text, self.unknown, {}
        if lam["c"]:
            terms["c"] = pixel_segment_contrastive(z, seg, regions, pix, self.kappa, self.views,
                                                   self.positives, among=self.among)
        cs = segment_means(clip_map, seg)  # (S, D): CLIP's segment embeddings c_s
        y, is_unknown = unknown.targets(cs, text)  # (S,): y_s, once per step
        zs = segment_means(z, seg) if lam["e"] or lam.get("r") else None  # (S, D): z_s
        if lam["e"]:
            terms["e"] = embedding_consistency(zs, cs, self.kappa_e, self.emb_form)
        if lam.get("r"):
            terms["r"] = relational_consistency(zs, cs)
        target = None
        if self.target_at == "pixel":  # each pixel labelled by its own CLIP embedding
            flat = clip_map.permute(0, 2, 3, 1).flatten(0, 2)  # (BV*h*w, D)
            target = unknown.targets(flat, text)[0].view(seg.ids.shape)
        elif self.keep_targets:
            target = pixel_targets(seg, y)
        if lam["s"]:
            # (K+M, D): the known names, then the unknown prototypes shifted across the gap
            protos = torch.cat([text, unknown.shifted(text)]) if unknown.started else text
            pool = len(text) if self.pool_unknown else None
            if self.target_at == "pixel":
                terms["s"] = semantic_consistency(z, None, pix, target.flatten()[pix], protos,
                                                  self.kappa_s, self.balance, pool)
            else:
                terms["s"] = semantic_consistency(z, seg, pix, y, protos, self.kappa_s,
                                                  self.balance, pool)
        unknown.update(gather(cs), gather(is_unknown))
        return StepLoss(weighted_total(terms, lam), terms,
                        {"unknown_share": is_unknown.float().mean()},
                        target if self.keep_targets else None)


class MaskClipPlusObjective(Objective):
    """MaskCLIP+ (Zhou et al., ECCV 2022): L = CE over pixels of kappa cos(z_p, T_j) against the
    argmax label of the teacher's map over the known names T (pseudo_labels) until step
    `self_train_from`, then of f's own detached map (self-training). text (K, D), kappa the logit
    scale (resolved), balance class_balance's power."""
    taught = True

    def __init__(self, text, kappa, self_train_from, balance=0.0, keep_targets=False):
        self.text, self.kappa, self.self_train_from = text, kappa, self_train_from
        self.balance, self.keep_targets = balance, keep_targets

    def __call__(self, z, seg, regions, pix, clip_map, step=0):
        source = z.detach() if step >= self.self_train_from else clip_map
        labels = pseudo_labels(source, self.text, regions)  # (BV, h, w)
        terms = {"p": pseudo_label_loss(z, labels, self.text, self.kappa, self.balance)}
        return StepLoss(weighted_total(terms, {"p": 1.0}), terms, {},
                        labels if self.keep_targets else None)


def pseudo_labels(source, text, regions):
    """MaskCLIP+'s labels: the nearest known name of each pixel of `source` (BV, D, h, w) unit,
    -1 where regions (BV, h, w) is -1 (outside the view). Returns (BV, h, w) long."""
    labels = torch.einsum("bdhw,kd->bkhw", source, text).argmax(dim=1)  # (BV, h, w)
    return labels.masked_fill(regions < 0, -1)


class SegSortObjective(Objective):
    """SegSort (Hwang et al., ICCV 2019), unsupervised: L = lambda_c L_c, no teacher. With
    positives "own" a pixel's positive is its own segment, as in SegSort's code; with "region" (the
    default) this is CLIP-S4's L_c alone, CLIP-S4 without its teacher."""

    def __init__(self, lambda_c=1.0, kappa=10.0, positives="region", views=2):
        self.lambda_c, self.kappa, self.positives, self.views = lambda_c, kappa, positives, views

    def __call__(self, z, seg, regions, pix, clip_map=None, step=0):
        terms = {"c": pixel_segment_contrastive(z, seg, regions, pix, self.kappa, self.views,
                                                self.positives)}
        return StepLoss(weighted_total(terms, {"c": self.lambda_c}), terms)


class ConceptContrastObjective(Objective):
    """ConceptContrast (He et al., IJCAI 2022; docs/method.md section 12), no teacher:
        L = lambda_c L_c + lambda_v L_v + lambda_o L_o
    L_c its local concepts, the pixel-segment contrast (pixel_segment_contrastive; ConceptContrast
    calls it L_s), L_v its global concepts (vector_quantization), L_o the co-occurrence of concepts
    (concept_cooccurrence; its L_c): one letter names one loss across this repo's methods.
    Its state: the codebook (a parameter the optimizer moves, outside f) and the memory bank,
    written after each step from every process's segments. concepts Concepts; lambdas {"c", "v",
    "o"}; rule: concept_cooccurrence's positives."""

    def __init__(self, concepts, lambdas, kappa=10.0, beta=0.25, rule="image", positives="region",
                 views=2):
        self.concepts, self.lambdas, self.kappa, self.beta = concepts, lambdas, kappa, beta
        self.rule, self.positives, self.views = rule, positives, views

    def state(self):
        return {"concepts": self.concepts}

    def extra_parameters(self):
        """The codebook: moved by SGD beside f (util.loop.optimizer_for), outside DDP's module."""
        return [self.concepts.weight]

    def __call__(self, z, seg, regions, pix, clip_map=None, step=0):
        lam, concepts = self.lambdas, self.concepts
        zs = segment_means(z, seg)  # (S, D)
        concepts.start(zs.detach())
        loss_v, codes = vector_quantization(zs, concepts, self.beta)
        bank, _ = concepts.memory()
        terms = {}
        if lam["c"]:
            terms["c"] = pixel_segment_contrastive(z, seg, regions, pix, self.kappa, self.views,
                                                   self.positives, bank)
        if lam["v"]:
            terms["v"] = loss_v
        if lam["o"]:
            terms["o"] = concept_cooccurrence(z, seg, pix, codes, concepts, self.kappa,
                                              self.views, self.rule)
        concepts.remember(gather(zs.detach()), gather(codes))
        return StepLoss(weighted_total(terms, lam), terms,
                        {"codes_used": lambda: torch.unique(codes).numel()})
