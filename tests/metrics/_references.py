"""Loop references (deliberately unvectorised) shared by the metrics tests."""

import itertools
import math

import numpy as np

# ================================================================================================
# Straightforward loop references (deliberately unvectorised)
# ================================================================================================


def ref_iou_distance(a, b, num_classes):
    ious = []
    for c in range(1, num_classes):
        inter = np.logical_and(a == c, b == c).sum()
        union = np.logical_or(a == c, b == c).sum()
        if union > 0:
            ious.append(inter / union)
    return 0.0 if not ious else 1.0 - float(np.mean(ious))


def ref_weighted_mean_distance(x, y, wx, wy, num_classes):
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            total += wx[i] * wy[j] * ref_iou_distance(x[i], y[j], num_classes)
    return total


def ref_ged(samples, references, num_classes, ws=None, wr=None):
    n, k = len(samples), len(references)
    ws = np.full(n, 1.0 / n) if ws is None else ws
    wr = np.full(k, 1.0 / k) if wr is None else wr
    cross = ref_weighted_mean_distance(samples, references, ws, wr, num_classes)
    ss = ref_weighted_mean_distance(samples, samples, ws, ws, num_classes)
    rr = ref_weighted_mean_distance(references, references, wr, wr, num_classes)
    return 2 * cross - ss - rr


def ref_hungarian(samples, references, num_classes):
    # Both sets replicated to lcm(N, K), then brute force over all one-to-one matchings.
    size = math.lcm(len(samples), len(references))
    s = [samples[i // (size // len(samples))] for i in range(size)]
    r = [references[i // (size // len(references))] for i in range(size)]
    best = -1.0
    for perm in itertools.permutations(range(size)):
        iou = np.mean([1 - ref_iou_distance(s[i], r[perm[i]], num_classes) for i in range(size)])
        best = max(best, iou)
    return best


def ref_ece(conf, acc, edges):
    total = 0.0
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        in_bin = [(c > lo or (b == 0 and c == lo)) and c <= hi for c in conf]
        idx = [i for i, flag in enumerate(in_bin) if flag]
        if idx:
            total += len(idx) / len(conf) * abs(np.mean(acc[idx]) - np.mean(conf[idx]))
    return total


def ref_auroc(u_ood, u_id):
    score = 0.0
    for a in u_ood:
        for b in u_id:
            score += 1.0 if a > b else (0.5 if a == b else 0.0)
    return score / (len(u_ood) * len(u_id))


def ref_aupr_fpr95(u, y):
    thresholds = sorted(set(u.tolist()), reverse=True)
    ap, prev_recall, fpr95 = 0.0, 0.0, None
    for t in thresholds:
        flagged = u >= t
        tp = np.sum(flagged & y)
        fp = np.sum(flagged & ~y)
        recall = tp / y.sum()
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
        if fpr95 is None and recall >= 0.95:
            fpr95 = fp / (~y).sum()
    return ap, fpr95


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def random_probs(rng, shape, num_classes, scale=2.0):
    return softmax(scale * rng.normal(size=(*shape, num_classes))).astype(np.float32)
