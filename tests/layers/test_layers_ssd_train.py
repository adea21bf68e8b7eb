"""The SSD fork's training-side layers: MultiBoxLoss, DetectionEvaluate, AnnotatedData.

weiliu89/caffe, branch ssd, commit 4817bf8b4200b35ada8ed0dc378dceaf38c539e4.  OpenCV dnn
implements none of these (they are training / evaluation layers), so each is checked
against a numpy transcription of the fork's C++ (loops, float32 scalars, its own orders):
``ref_*`` below follow ``bbox_util.cpp``, ``multibox_loss_layer.cpp`` (forward and the
diffs its backward copies into ``loc``/``conf``), ``detection_evaluate_layer.cpp`` and
``annotated_data_layer.cpp`` / ``data_transformer.cpp``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import DataError, SchemaError, ShapeError
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.multibox_loss import MultiBoxLoss, _top_set
from caffe_compat.protos import caffe_pb2

F32 = np.float32
FLT_MIN = np.finfo(np.float32).tiny


# ============================================================================ box references
def r_size(b):
    if b[2] < b[0] or b[3] < b[1]:
        return F32(0)
    return F32(F32(b[2] - b[0]) * F32(b[3] - b[1]))


def r_iou(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        ix = (F32(0),) * 4
    else:
        ix = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    w = F32(ix[2] - ix[0])
    h = F32(ix[3] - ix[1])
    if w > 0 and h > 0:
        inter = F32(w * h)
        return F32(inter / F32(F32(r_size(a) + r_size(b)) - inter))
    return F32(0)


def r_encode(p, v, b, code, evit):
    if code == 1:
        d = [F32(b[k] - p[k]) for k in range(4)]
        return d if evit else [F32(d[k] / v[k]) for k in range(4)]
    pw, ph = F32(p[2] - p[0]), F32(p[3] - p[1])
    if code == 2:
        pcx, pcy = F32(F32(p[0] + p[2]) / F32(2)), F32(F32(p[1] + p[3]) / F32(2))
        bw, bh = F32(b[2] - b[0]), F32(b[3] - b[1])
        bcx, bcy = F32(F32(b[0] + b[2]) / F32(2)), F32(F32(b[1] + b[3]) / F32(2))
        d = [F32(F32(bcx - pcx) / pw), F32(F32(bcy - pcy) / ph),
             F32(np.log(F32(bw / pw))), F32(np.log(F32(bh / ph)))]
    else:
        d = [F32(F32(b[0] - p[0]) / pw), F32(F32(b[1] - p[1]) / ph),
             F32(F32(b[2] - p[2]) / pw), F32(F32(b[3] - p[3]) / ph)]
    return d if evit else [F32(d[k] / v[k]) for k in range(4)]


def r_decode(p, v, l, code, evit):
    vv = [F32(1)] * 4 if evit else v
    if code == 1:
        return [F32(p[k] + F32(vv[k] * l[k])) for k in range(4)]
    pw, ph = F32(p[2] - p[0]), F32(p[3] - p[1])
    if code == 2:
        pcx, pcy = F32(F32(p[0] + p[2]) / F32(2)), F32(F32(p[1] + p[3]) / F32(2))
        cx = F32(F32(F32(vv[0] * l[0]) * pw) + pcx)
        cy = F32(F32(F32(vv[1] * l[1]) * ph) + pcy)
        w = F32(F32(np.exp(F32(vv[2] * l[2]))) * pw)
        h = F32(F32(np.exp(F32(vv[3] * l[3]))) * ph)
        return [F32(cx - w / F32(2)), F32(cy - h / F32(2)), F32(cx + w / F32(2)), F32(cy + h / F32(2))]
    return [F32(p[0] + F32(F32(vv[0] * l[0]) * pw)), F32(p[1] + F32(F32(vv[1] * l[1]) * ph)),
            F32(p[2] + F32(F32(vv[2] * l[2]) * pw)), F32(p[3] + F32(F32(vv[3] * l[3]) * ph))]


# ============================================================================ MultiBoxLoss reference
def ref_get_gt(rows, bg, use_difficult):
    out = {}
    for r in rows:
        item = int(r[0])
        if item == -1:
            continue
        label = int(r[1])
        assert label != bg
        diff = bool(r[7] != 0)
        if not use_difficult and diff:
            continue
        out.setdefault(item, []).append({"label": label, "box": [F32(x) for x in r[3:7]], "diff": diff})
    return out


def ref_match(gts, preds, label, match_type, thr, ignore_cross):
    n = len(preds)
    idx = [-1] * n
    ovs = [F32(0)] * n
    if label == -1:
        gi = list(range(len(gts)))
    else:
        gi = [i for i, g in enumerate(gts) if g["label"] == label]
    if not gi:
        return idx, ovs
    overlaps = {}
    for i in range(n):
        if ignore_cross and any(c < 0 or c > 1 for c in preds[i]):
            idx[i] = -2
            continue
        for j in range(len(gi)):
            o = r_iou(preds[i], gts[gi[j]]["box"])
            if o > 1e-6:
                ovs[i] = max(ovs[i], o)
                overlaps.setdefault(i, {})[j] = o
    pool = list(range(len(gi)))
    while pool:
        mi, mj, mo = -1, -1, -1.0
        for i in sorted(overlaps):
            if idx[i] != -1:
                continue
            for j in pool:
                if j in overlaps[i] and overlaps[i][j] > mo:
                    mi, mj, mo = i, j, overlaps[i][j]
        if mi == -1:
            break
        idx[mi] = gi[mj]
        ovs[mi] = F32(mo)
        pool.remove(mj)
    if match_type == "PER_PREDICTION":
        for i in sorted(overlaps):
            if idx[i] != -1:
                continue
            mj, mo = -1, -1.0
            for j in range(len(gi)):
                if j in overlaps[i] and overlaps[i][j] >= F32(thr) and overlaps[i][j] > mo:
                    mj, mo = j, overlaps[i][j]
            if mj != -1:
                idx[i] = gi[mj]
                ovs[i] = F32(mo)
    return idx, ovs


def ref_nms(boxes, scores, thr, top_k):
    order = sorted(range(len(scores)), key=lambda k: -scores[k])  # stable
    if top_k > -1:
        order = order[:top_k]
    kept = []
    while order:
        best = order[0]
        if r_size(boxes[best]) < 1e-5:
            order.pop(0)
            continue
        kept.append(best)
        order.pop(0)
        if top_k > -1 and len(kept) >= top_k:
            break
        rest = []
        for c in order:
            if r_size(boxes[c]) < 1e-5:
                continue
            if r_iou(boxes[best], boxes[c]) > F32(thr):
                continue
            rest.append(c)
        order = rest
    return kept


def smooth(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def smooth_grad(d):
    return d if abs(d) < 1 else float(np.sign(d))


def ref_multibox(loc, conf, prior, gt, o):
    """Forward loss and the diffs the fork's backward writes into loc and conf (top diff 1)."""
    loc = np.asarray(loc, np.float32)
    conf = np.asarray(conf, np.float32)
    N = loc.shape[0]
    C = o["num_classes"]
    share = o.get("share_location", True)
    LC = 1 if share else C
    bg = o.get("background_label_id", 0)
    code = o.get("code_type", 1)
    evit = o.get("encode_variance_in_target", False)
    mining = o.get("mining_type", "MAX_NEGATIVE")
    conf_type = o.get("conf_loss_type", "SOFTMAX")
    loc_type = o.get("loc_loss_type", "SMOOTH_L1")
    pflat = np.asarray(prior, np.float32).reshape(-1)
    P = pflat.size // 8
    priors = [[F32(x) for x in pflat[4 * i:4 * i + 4]] for i in range(P)]
    var = [[F32(x) for x in pflat[4 * P + 4 * i:4 * P + 4 * i + 4]] for i in range(P)]
    lp = loc.reshape(N, P, LC, 4)
    cp = conf.reshape(N, P, C)
    gts = ref_get_gt(np.asarray(gt, np.float32).reshape(-1, 8), bg, o.get("use_difficult_gt", True))

    # FindMatches
    matches = []
    mover = []
    for i in range(N):
        mi, mo = {}, {}
        if i in gts:
            g = gts[i]
            if not o.get("use_prior_for_matching", True):
                for c in range(LC):
                    label = -1 if share else c
                    if not share and label == bg:
                        continue
                    preds = [r_decode(priors[p], var[p], [F32(x) for x in lp[i, p, c]], code, evit)
                             for p in range(P)]
                    mi[label], mo[label] = ref_match(g, preds, label, o.get("match_type", "PER_PREDICTION"),
                                                     o.get("overlap_threshold", 0.5),
                                                     o.get("ignore_cross_boundary_bbox", False))
            else:
                ti, to = ref_match(g, priors, -1, o.get("match_type", "PER_PREDICTION"),
                                   o.get("overlap_threshold", 0.5), o.get("ignore_cross_boundary_bbox", False))
                if share:
                    mi[-1], mo[-1] = ti, to
                else:
                    for c in range(LC):
                        if c == bg:
                            continue
                        mi[c] = [t if t > -1 and g[t]["label"] == c else -1 for t in ti]
                        mo[c] = list(to)
        matches.append(mi)
        mover.append(mo)

    def encode_loc(mt):
        preds, tgts, where = [], [], []
        for i in range(N):
            for key in sorted(mt[i]):
                for j, gidx in enumerate(mt[i][key]):
                    if gidx <= -1:
                        continue
                    g = gts[i][gidx]["box"]
                    t = r_encode(priors[j], var[j], g, code, evit)
                    slot = 0 if share else key
                    pr = [F32(x) for x in lp[i, j, slot]]
                    if o.get("bp_inside", False):
                        mb = priors[j] if o.get("use_prior_for_matching", True) else \
                            r_decode(priors[j], var[j], pr, code, evit)
                        pr = [t[k] if (mb[k] < 0 or mb[k] > 1) else pr[k] for k in range(4)]
                    if evit:
                        pr = [F32(pr[k] / var[j][k]) for k in range(4)]
                        t = [F32(t[k] / var[j][k]) for k in range(4)]
                    preds.append(pr)
                    tgts.append(t)
                    where.append((i, j, slot))
        return preds, tgts, where

    num_matches = sum(1 for i in range(N) for k in matches[i] for v in matches[i][k] if v > -1)
    negs = [[] for _ in range(N)]
    num_negs = 0
    if mining != "NONE":
        # ComputeConfLoss with match-derived labels
        closs = np.zeros((N, P), np.float32)
        for i in range(N):
            for p in range(P):
                label = bg
                for key in sorted(matches[i]):
                    if matches[i][key][p] > -1:
                        label = gts[i][matches[i][key][p]]["label"]
                        break
                x = cp[i, p]
                if conf_type == "SOFTMAX":
                    mx = x.max()
                    s = F32(0)
                    for c in range(C):
                        s = F32(s + F32(np.exp(F32(x[c] - mx))))
                    prob = F32(F32(np.exp(F32(x[label] - mx))) / s)
                    closs[i, p] = -np.log(max(prob, F32(FLT_MIN)))
                else:
                    l_ = 0.0
                    for c in range(C):
                        t = 1 if c == label else 0
                        xi = float(x[c])
                        l_ -= xi * (t - (xi >= 0)) - math.log(1 + math.exp(xi - 2 * xi * (xi >= 0)))
                    closs[i, p] = l_
        lloss = np.zeros((N, P), np.float32)
        if mining == "HARD_EXAMPLE" and num_matches:
            pr, tg, where = encode_loc(matches)
            for (i, j, _), a, b in zip(where, pr, tg):
                d = [float(a[k]) - float(b[k]) for k in range(4)]
                lloss[i, j] = sum(smooth(v) if loc_type == "SMOOTH_L1" else 0.5 * v * v for v in d)
        for i in range(N):
            loss = closs[i] + lloss[i]
            for key in sorted(matches[i]):
                mi = matches[i][key]
                mo = mover[i][key]
                if mining == "MAX_NEGATIVE":
                    elig = [m for m in range(P) if mi[m] == -1 and mo[m] < F32(o.get("neg_overlap", 0.5))]
                    num_pos = sum(1 for m in range(P) if mi[m] > -1)
                    num_sel = min(int(F32(num_pos) * F32(o.get("neg_pos_ratio", 3.0))), len(elig))
                else:
                    elig = list(range(P))
                    num_sel = min(o.get("sample_size", 64), len(elig))
                if o.get("nms_threshold", 0) > 0:
                    if o.get("use_prior_for_nms", False):
                        bx = [priors[m] for m in elig]
                    else:
                        bx = [r_decode(priors[m], var[m], [F32(x) for x in lp[i, m, 0]], code, evit) for m in elig]
                    kept = ref_nms(bx, [loss[m] for m in elig], o["nms_threshold"], o.get("nms_top_k", 0))
                    num_sel = min(len(kept), num_sel)
                    sel = {elig[kept[n]] for n in range(num_sel)}
                else:
                    order = sorted(elig, key=lambda m: -loss[m])
                    sel = set(order[:num_sel])
                for m in range(P):
                    if mi[m] > -1:
                        if mining == "HARD_EXAMPLE" and m not in sel:
                            mi[m] = -1
                            num_matches -= 1
                    elif mi[m] == -1 and m in sel:
                        negs[i].append(m)
                        num_negs += 1

    # loc loss (forward) and diffs
    dloc = np.zeros((N, P, LC, 4), np.float64)
    loc_loss = 0.0
    lw = o.get("loc_weight", 1.0)
    pr, tg, where = encode_loc(matches) if num_matches >= 1 else ([], [], [])
    dl = []
    for a, b in zip(pr, tg):
        d = [float(a[k]) - float(b[k]) for k in range(4)]
        if loc_type == "SMOOTH_L1":
            loc_loss += sum(smooth(v) for v in d)
            dl.append([smooth_grad(v) for v in d])
        else:
            loc_loss += sum(0.5 * v * v for v in d)
            dl.append(d)

    # conf
    if mining != "NONE":
        num_conf = num_matches + num_negs
    else:
        num_conf = N * P
    conf_loss = 0.0
    dconf = np.zeros((N, P, C), np.float64)
    if num_conf >= 1:
        if mining != "NONE":
            rows, labels, pos = [], [], []
            for i in range(N):
                if i not in gts:
                    continue
                for key in sorted(matches[i]):
                    for j in range(P):
                        if matches[i][key][j] > -1:
                            gl = bg + 1 if o.get("map_object_to_agnostic") else gts[i][matches[i][key][j]]["label"]
                            rows.append((i, j))
                            labels.append(gl)
                            pos.append(True)
                for j in negs[i]:
                    rows.append((i, j))
                    labels.append(bg)
                    pos.append(False)
            X = np.array([cp[i, j] for i, j in rows], np.float64).reshape(-1, C)
            if conf_type == "SOFTMAX":
                T = np.array(labels)
            else:
                T = np.full((len(rows), C), float(bg))
                for r, (lab, ps) in enumerate(zip(labels, pos)):
                    if ps:
                        T[r, lab] = 1
                    elif 0 <= bg < C:
                        T[r, bg] = 1
        else:
            rows = [(i, j) for i in range(N) for j in range(P)]
            X = cp.reshape(-1, C).astype(np.float64)
            if conf_type == "SOFTMAX":
                T = np.full(N * P, bg)
                for i in range(N):
                    if i not in gts:
                        continue
                    for key in sorted(matches[i]):
                        for j in range(P):
                            if matches[i][key][j] > -1:
                                T[i * P + j] = bg + 1 if o.get("map_object_to_agnostic") else \
                                    gts[i][matches[i][key][j]]["label"]
            else:
                flat = np.full(N * P * C, float(bg))
                for i in range(N):
                    if i not in gts:
                        continue
                    for key in sorted(matches[i]):
                        for j in range(P):
                            if matches[i][key][j] > -1:
                                gl = gts[i][matches[i][key][j]]["label"]
                                flat[i * P + j * C + gl] = 1  # the fork's per-image offset
                T = flat.reshape(N * P, C)
        if conf_type == "SOFTMAX":
            mx = X.max(1, keepdims=True)
            e = np.exp(X - mx)
            prob = e / e.sum(1, keepdims=True)
            pl = prob[np.arange(len(T)), T]
            conf_loss = float(-np.log(np.maximum(pl, FLT_MIN)).sum())
            dc = prob.copy()
            dc[np.arange(len(T)), T] -= 1
        else:
            conf_loss = float(sum(-(x * (t - (x >= 0)) - math.log(1 + math.exp(x - 2 * x * (x >= 0))))
                                  for x, t in zip(X.reshape(-1), T.reshape(-1))))
            dc = 1 / (1 + np.exp(-X)) - T
        for r, (i, j) in enumerate(rows):
            dconf[i, j] = dc[r]

    norm_mode = o.get("normalization", "VALID")
    norm = {"VALID": num_matches, "FULL": N * P, "BATCH_SIZE": N, "NONE": 1}[norm_mode]
    norm = max(1, norm)
    total = 0.0
    if o.get("loc_in_loss", True):
        total += lw * loc_loss / norm
    if o.get("conf_in_loss", True):
        total += conf_loss / norm
    for (i, j, slot), g in zip(where, dl):
        dloc[i, j, slot] = np.asarray(g) * lw / norm
    dconf /= norm
    if not o.get("loc_in_loss", True):  # propagate_down false: no backward to that bottom
        dloc[:] = 0
    if not o.get("conf_in_loss", True):
        dconf[:] = 0
    return dict(loss=total, dloc=dloc.reshape(N, -1), dconf=dconf.reshape(N, -1),
                num_matches=num_matches, num_negs=num_negs, negs=negs)


# ============================================================================ fixtures
def make_priors(P, rng, variance=(0.1, 0.1, 0.2, 0.2), lo=0.0, hi=1.0):
    c = rng.uniform(lo + 0.1, hi - 0.1, size=(P, 2))
    wh = rng.uniform(0.1, 0.45, size=(P, 2))
    b = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
    v = np.tile(np.asarray(variance, np.float32), (P, 1))
    return np.stack([b.reshape(-1), v.reshape(-1)])[None]


def gt_rows(rows):
    a = np.asarray(rows, np.float32).reshape(-1, 8)
    return a.reshape(1, 1, -1, 8)


ENUM_FIELDS = {"match_type", "mining_type", "loc_loss_type", "conf_loss_type", "code_type"}


def mbl_layer(o, shapes, propagate_down=None):
    fields = []
    for k, v in o.items():
        if k in ("normalization", "loc_in_loss", "conf_in_loss", "nms_threshold", "nms_top_k"):
            continue
        if isinstance(v, bool):
            v = str(v).lower()
        elif k == "background_label_id" and v < 0:  # a uint32 field the fork reads as int
            v += 1 << 32
        elif k == "code_type":
            v = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}[v]
        fields.append(f"{k}: {v}")
    if "nms_threshold" in o:
        nms = f"nms_threshold: {o['nms_threshold']}"
        if "nms_top_k" in o:
            nms += f" top_k: {o['nms_top_k']}"
        fields.append(f"nms_param {{ {nms} }}")
    txt = ('name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc" bottom: "conf" bottom: "prior" '
           'bottom: "label" top: "loss" multibox_loss_param { ' + " ".join(fields) + " }")
    if "normalization" in o:
        txt += f" loss_param {{ normalization: {o['normalization']} }}"
    pd = propagate_down
    if pd is None and not (o.get("loc_in_loss", True) and o.get("conf_in_loss", True)):
        pd = [o.get("loc_in_loss", True), o.get("conf_in_loss", True), False, False]
    if pd is not None:
        txt += "".join(f" propagate_down: {str(p).lower()}" for p in pd)
    lp = text_format.Parse(txt, caffe_pb2.LayerParameter())
    return MultiBoxLoss(lp, shapes, BuildContext(phase="TRAIN"))


def run_both(o, loc, conf, prior, gt):
    layer = mbl_layer(o, [loc.shape, conf.shape, prior.shape, gt.shape])
    lt = torch.tensor(loc, requires_grad=True)
    ct = torch.tensor(conf, requires_grad=True)
    (loss,) = layer(lt, ct, torch.tensor(prior), torch.tensor(gt))
    loss.backward()
    ref = ref_multibox(loc, conf, prior, gt, o)
    return layer, loss, lt.grad.numpy(), ct.grad.numpy(), ref


def scene(rng, N=3, P=24, C=4, LC=1, bg=0):
    """Random priors and predictions; image 0 and 2 have ground truth (2 has a difficult
    box), image 1 has none (its row reads item_id -1)."""
    prior = make_priors(P, rng)
    labels = [c for c in range(C) if c != bg]
    rows = [[0, labels[0], 0, 0.1, 0.1, 0.45, 0.5, 0],
            [0, labels[-1], 1, 0.4, 0.35, 0.9, 0.8, 0],
            [-1, -1, -1, -1, -1, -1, -1, -1],
            [2, labels[1 % len(labels)], 0, 0.2, 0.5, 0.6, 0.95, 0],
            [2, labels[0], 1, 0.55, 0.05, 0.85, 0.4, 1]]
    gt = gt_rows(rows)
    loc = (rng.standard_normal((N, P * LC * 4)) * 0.7).astype(np.float32)
    conf = (rng.standard_normal((N, P * C)) * 1.5).astype(np.float32)
    return loc, conf, prior, gt


CASES = {
    "ssd_default": dict(num_classes=4, code_type=2, normalization="VALID"),
    "bipartite_none_l2_full": dict(num_classes=4, match_type="BIPARTITE", mining_type="NONE",
                                   loc_loss_type="L2", normalization="FULL"),
    "logistic_mining": dict(num_classes=4, conf_loss_type="LOGISTIC", code_type=2),
    "logistic_no_mining": dict(num_classes=4, conf_loss_type="LOGISTIC", mining_type="NONE"),
    "logistic_bg_minus1": dict(num_classes=3, conf_loss_type="LOGISTIC", mining_type="NONE",
                               background_label_id=-1),
    "unshared_prior_matching": dict(num_classes=4, share_location=False, mining_type="NONE",
                                    code_type=3, normalization="BATCH_SIZE"),
    "decoded_matching": dict(num_classes=4, use_prior_for_matching=False, code_type=2,
                             overlap_threshold=0.3),
    "decoded_unshared": dict(num_classes=4, use_prior_for_matching=False, share_location=False,
                             mining_type="NONE", overlap_threshold=0.3),
    "hard_example": dict(num_classes=4, mining_type="HARD_EXAMPLE", sample_size=9, code_type=2),
    "hard_example_nms_decoded": dict(num_classes=4, mining_type="HARD_EXAMPLE", sample_size=12,
                                     nms_threshold=0.5, nms_top_k=20),
    "max_negative_nms_prior": dict(num_classes=4, use_prior_for_nms=True, nms_threshold=0.4,
                                   nms_top_k=30, neg_overlap=0.6),
    "variance_in_target_bp_inside_cross": dict(num_classes=4, encode_variance_in_target=True,
                                               bp_inside=True, ignore_cross_boundary_bbox=True,
                                               code_type=2),
    "no_difficult_weighted_none": dict(num_classes=4, use_difficult_gt=False, loc_weight=2.5,
                                       normalization="NONE"),
    "background_2": dict(num_classes=4, background_label_id=2, neg_pos_ratio=2.0),
    "agnostic": dict(num_classes=2, map_object_to_agnostic=True, neg_pos_ratio=1.5),
    "loc_only": dict(num_classes=4, conf_in_loss=False),
    "conf_only": dict(num_classes=4, loc_in_loss=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_multibox_loss_matches_fork_reference(name):
    o = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name) + 7)
    C = o["num_classes"]
    LC = 1 if o.get("share_location", True) else C
    bg = o.get("background_label_id", 0)
    loc, conf, prior, gt = scene(rng, C=C, LC=LC, bg=bg if bg >= 0 else C + 5)
    if o.get("map_object_to_agnostic"):
        gt.reshape(-1, 8)[gt.reshape(-1, 8)[:, 0] >= 0, 1] = 1
    if "bp_inside" in o:  # a few priors sticking out of the image
        p = prior.reshape(2, -1, 4)
        p[0, :4] += np.float32([[-0.2, 0, 0, 0], [0, -0.15, 0, 0], [0, 0, 0.2, 0], [0, 0, 0, 0.3]])
    layer, loss, gl, gc, ref = run_both(o, loc, conf, prior, gt)
    assert layer.last_stats.num_matches == ref["num_matches"]
    assert layer.last_stats.num_negs == ref["num_negs"]
    assert ref["num_matches"] > 0
    np.testing.assert_allclose(float(loss.detach()), ref["loss"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(gl, ref["dloc"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gc, ref["dconf"], rtol=1e-5, atol=1e-6)
    if o.get("loc_in_loss", True) is False:
        assert not gl.any() and gc.any()


def test_propagate_down_false_excludes_term_through_net():
    """propagate_down false for loc: the fork leaves the loc term out of the loss value."""
    from caffe_compat.net import Net
    rng = np.random.default_rng(3)
    loc, conf, prior, gt = scene(rng)
    proto = """
layer { name: "in" type: "Input" top: "loc" top: "conf" top: "prior" top: "label"
  input_param { shape { dim: %d dim: %d } shape { dim: %d dim: %d } shape { dim: 1 dim: 2 dim: %d }
                shape { dim: 1 dim: 1 dim: %d dim: 8 } } }
layer { name: "l" type: "MultiBoxLoss" bottom: "loc" bottom: "conf" bottom: "prior" bottom: "label"
  top: "loss" multibox_loss_param { num_classes: 4 } %s }
"""
    shp = (loc.shape + conf.shape + (prior.shape[2], gt.shape[2]))
    full = Net(proto % (shp + ("",)), phase="train")
    half = Net(proto % (shp + ("propagate_down: false propagate_down: true propagate_down: false "
                                "propagate_down: false",)), phase="train")
    feed = dict(loc=torch.tensor(loc), conf=torch.tensor(conf), prior=torch.tensor(prior),
                label=torch.tensor(gt))
    a = float(full.forward(**feed)["loss"])
    b = float(half.forward(**feed)["loss"])
    ref_full = ref_multibox(loc, conf, prior, gt, dict(num_classes=4))["loss"]
    ref_half = ref_multibox(loc, conf, prior, gt, dict(num_classes=4, loc_in_loss=False))["loss"]
    np.testing.assert_allclose([a, b], [ref_full, ref_half], rtol=2e-5)
    assert b < a


# ---------------------------------------------------------------------------- edge cases
def test_no_ground_truth_anywhere():
    rng = np.random.default_rng(0)
    loc, conf, prior, _ = scene(rng)
    gt = gt_rows([[-1] * 8])
    for mining in ("MAX_NEGATIVE", "NONE"):
        o = dict(num_classes=4, mining_type=mining)
        layer, loss, gl, gc, ref = run_both(o, loc, conf, prior, gt)
        assert layer.last_stats.num_matches == 0 and layer.last_stats.num_negs == 0
        assert not gl.any()
        np.testing.assert_allclose(float(loss.detach()), ref["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gc, ref["dconf"], rtol=1e-5, atol=1e-7)
        if mining == "NONE":  # every prior is background, normalizer max(1, 0) = 1
            assert float(loss.detach()) > 0 and gc.any()
        else:
            assert float(loss.detach()) == 0 and not gc.any()


def test_all_priors_matched_leaves_no_negatives():
    rng = np.random.default_rng(1)
    P = 6
    prior = make_priors(P, rng)
    boxes = prior.reshape(2, P, 4)[0]
    rows = [[0, 1 + (k % 3), k, *boxes[k], 0] for k in range(P)]  # a gt on every prior
    gt = gt_rows(rows)
    loc = rng.standard_normal((1, P * 4)).astype(np.float32)
    conf = rng.standard_normal((1, P * 4)).astype(np.float32)
    layer, loss, gl, gc, ref = run_both(dict(num_classes=4, code_type=2), loc, conf, prior, gt)
    st = layer.last_stats
    assert st.num_matches == P and st.num_negs == 0
    assert bool((st.matches[0][-1][0] == torch.arange(P)).all())
    np.testing.assert_allclose(float(loss.detach()), ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(gc, ref["dconf"], rtol=1e-5, atol=1e-7)


def test_difficult_gt_excluded_or_included():
    rng = np.random.default_rng(2)
    loc, conf, prior, gt = scene(rng)
    r = gt.reshape(-1, 8)
    r[:, 7] = np.where(r[:, 0] >= 0, 1, r[:, 7])  # every box difficult
    with_d, _, _, _, ref_w = run_both(dict(num_classes=4), loc, conf, prior, gt)
    without, loss, gl, gc, ref_wo = run_both(dict(num_classes=4, use_difficult_gt=False), loc, conf, prior, gt)
    assert with_d.last_stats.num_matches == ref_w["num_matches"] > 0
    assert without.last_stats.num_matches == 0 and float(loss.detach()) == 0


def test_neg_mining_count():
    rng = np.random.default_rng(4)
    loc, conf, prior, gt = scene(rng, P=40)
    for ratio in (0.5, 1.0, 3.0, 100.0):
        o = dict(num_classes=4, neg_pos_ratio=ratio)
        layer, *_ , ref = run_both(o, loc, conf, prior, gt)
        st = layer.last_stats
        for i, m in enumerate(st.matches):
            if not m:
                assert st.neg_indices[i].numel() == 0
                continue
            idx, ov = m[-1]
            elig = int(((idx == -1) & (ov < 0.5)).sum())
            want = min(int(np.float32(int((idx > -1).sum())) * np.float32(ratio)), elig)
            assert st.neg_indices[i].numel() == want
        assert sorted(map(tuple, [n.tolist() for n in st.neg_indices])) == sorted(map(tuple, ref["negs"]))


def test_background_label_in_gt_is_an_error():
    rng = np.random.default_rng(5)
    loc, conf, prior, _ = scene(rng)
    gt = gt_rows([[0, 0, 0, 0.1, 0.1, 0.5, 0.5, 0]])
    layer = mbl_layer(dict(num_classes=4), [loc.shape, conf.shape, prior.shape, gt.shape])
    with pytest.raises(DataError, match="background"):
        layer(torch.tensor(loc), torch.tensor(conf), torch.tensor(prior), torch.tensor(gt))


# libstdc++ (g++ 12.2) std::sort of 40 equal (loss, index) pairs, descending by loss:
# the fork's MineHardExamples keeps the first num_sel of this order
GNU_SORT_40_EQUAL = [30, 21, 22, 23, 24, 25, 26, 27, 28, 29, 20, 31, 32, 33, 34, 35, 36, 37, 38,
                     39, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def test_equal_losses_pick_negatives_as_std_sort():
    assert sorted(_top_set(np.ones(40, np.float32), 6).tolist()) == sorted(GNU_SORT_40_EQUAL[:6])
    v = np.arange(40, dtype=np.float32)  # no tie: the plain top-k
    assert sorted(_top_set(v, 5).tolist()) == [35, 36, 37, 38, 39]
    # end to end: equal confidences make every negative's loss equal
    P = 43
    rng = np.random.default_rng(6)
    prior = make_priors(P, rng)
    boxes = prior.reshape(2, P, 4)[0]
    boxes[:] = np.float32([0.6, 0.6, 0.7, 0.7])  # 40 far-away priors ...
    boxes[:3] = np.float32([[0.0, 0.0, 0.3, 0.3], [0.02, 0.0, 0.3, 0.3], [0.0, 0.02, 0.3, 0.3]])
    prior = np.stack([boxes.reshape(-1), prior.reshape(2, -1)[1]])[None].astype(np.float32)
    gt = gt_rows([[0, 1, 0, 0.0, 0.0, 0.3, 0.3, 0], [0, 2, 1, 0.01, 0.0, 0.3, 0.3, 0]])
    loc = np.zeros((1, P * 4), np.float32)
    conf = np.zeros((1, P * 4), np.float32)
    layer = mbl_layer(dict(num_classes=4, neg_pos_ratio=2.0), [loc.shape, conf.shape, prior.shape, gt.shape])
    layer(torch.tensor(loc), torch.tensor(conf), torch.tensor(prior), torch.tensor(gt))
    st = layer.last_stats
    assert st.num_matches == 3  # all three near priors match (bipartite + per-prediction)
    elig = np.arange(3, P)
    want = sorted(elig[GNU_SORT_40_EQUAL[:6]].tolist())
    assert sorted(st.neg_indices[0].tolist()) == want


def test_param_errors():
    shapes = [(1, 8), (1, 8), (1, 2, 8), (1, 1, 1, 8)]
    with pytest.raises(SchemaError, match="num_classes"):
        mbl_layer({}, shapes)
    with pytest.raises(SchemaError, match="share_location"):
        mbl_layer(dict(num_classes=2, share_location=False), shapes)
    with pytest.raises(SchemaError, match="background_label_id"):
        mbl_layer(dict(num_classes=2, background_label_id=2), shapes)
    with pytest.raises(SchemaError, match="do_neg_mining"):
        mbl_layer(dict(num_classes=2, do_neg_mining=False), shapes)
    with pytest.raises(SchemaError, match="sample_size"):
        mbl_layer(dict(num_classes=2, mining_type="HARD_EXAMPLE", sample_size=0), shapes)
    with pytest.raises(ShapeError, match="conf"):
        mbl_layer(dict(num_classes=3), shapes)
    # the deprecated flag agreeing with mining_type is fine
    mbl_layer(dict(num_classes=4, do_neg_mining=False, mining_type="NONE"), shapes)


@pytest.mark.parametrize("match_type", ["BIPARTITE", "PER_PREDICTION"])
def test_match_bbox_tie_order(match_type):
    """Duplicated priors and ground truth make equal overlaps: the fork takes the lowest
    prediction, then the lowest ground-truth index."""
    from caffe_compat.layers.multibox_loss import match_bbox
    rng = np.random.default_rng(11)
    base = make_priors(5, rng).reshape(2, 5, 4)[0]
    preds = np.concatenate([base, base[::-1], base[:2]]).astype(np.float32)  # 12, with repeats
    gtb = np.concatenate([base[1:3], base[1:3], base[4:5] + 0.01]).astype(np.float32)
    labels = np.array([1, 2, 1, 2, 1])
    gts = [{"label": int(l), "box": [F32(x) for x in b], "diff": False} for l, b in zip(labels, gtb)]
    for label in (-1, 1, 2):
        for cross in (False, True):
            idx, ov = match_bbox(torch.tensor(gtb), torch.tensor(labels), torch.tensor(preds), label,
                                 match_type, 0.3, cross)
            r_idx, r_ov = ref_match(gts, [[F32(x) for x in p] for p in preds], label, match_type, 0.3, cross)
            assert idx.tolist() == r_idx
            np.testing.assert_array_equal(ov.numpy(), np.asarray(r_ov, np.float32))


# ============================================================================ DetectionEvaluate
def ref_detection_evaluate(det, gt, C, bg, thr, eval_diff, sizes=None, start=0):
    """detection_evaluate_layer.cpp Forward_cpu as loops (normalized boxes, or pixel boxes
    through OutputBBox without resize_param when ``sizes`` is given)."""
    det = np.asarray(det, np.float32).reshape(-1, 7)
    gt = np.asarray(gt, np.float32).reshape(-1, 8)
    npc = C if bg == -1 else C - 1
    nvalid = sum(1 for r in det if r[1] != -1)
    top = np.zeros((npc + nvalid, 5), np.float32)
    dets = {}
    for r in det:
        if int(r[0]) == -1:
            continue
        dets.setdefault(int(r[0]), {}).setdefault(int(r[1]), []).append(r)
    gts = {}
    for r in gt:
        if int(r[0]) == -1:
            break
        gts.setdefault(int(r[0]), {}).setdefault(int(r[1]), []).append(r)
    num_pos = {}
    for im in gts:
        for lab, rows in gts[im].items():
            n = len(rows) if eval_diff else sum(1 for r in rows if not r[7])
            num_pos[lab] = num_pos.get(lab, 0) + n
    k = 0
    for c in range(C):
        if c == bg:
            continue
        top[k] = [-1, c, num_pos.get(c, 0), -1, -1]
        k += 1

    def to_pixels(box, hw):
        h, w = hw
        c = [min(max(F32(v), F32(0)), F32(1)) for v in box]
        return [F32(c[0] * F32(w)), F32(c[1] * F32(h)), F32(c[2] * F32(w)), F32(c[3] * F32(h))]

    def pix_iou(a, b):
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            return F32(0)
        w = F32(F32(min(a[2], b[2]) - max(a[0], b[0])) + 1)
        h = F32(F32(min(a[3], b[3]) - max(a[1], b[1])) + 1)
        sa = F32(F32(a[2] - a[0] + 1) * F32(a[3] - a[1] + 1))
        sb = F32(F32(b[2] - b[0] + 1) * F32(b[3] - b[1] + 1))
        inter = F32(w * h)
        return F32(inter / F32(F32(sa + sb) - inter))

    count = start
    for im in sorted(dets):
        for lab in sorted(dets[im]):
            if lab == -1:
                continue
            rows = dets[im][lab]
            if im not in gts or lab not in gts[im]:
                for r in rows:
                    top[k] = [im, lab, r[2], 0, 1]
                    k += 1
                continue
            g = gts[im][lab]
            visited = [False] * len(g)
            for r in sorted(rows, key=lambda r: -r[2]):  # <= 16 per group: std::sort is stable here
                top[k, :3] = [im, lab, r[2]]
                best, jm = -1.0, -1
                for j, gr in enumerate(g):
                    if sizes:
                        o = pix_iou(to_pixels(r[3:7], sizes[count]), to_pixels(gr[3:7], sizes[count]))
                    else:
                        o = r_iou([F32(v) for v in r[3:7]], [F32(v) for v in gr[3:7]])
                    if o > best:
                        best, jm = o, j
                if best >= F32(thr):
                    if eval_diff or not g[jm][7]:
                        top[k, 3:] = [0, 1] if visited[jm] else [1, 0]
                        visited[jm] = True
                else:
                    top[k, 3:] = [0, 1]
                k += 1
        if sizes:
            count = (count + 1) % len(sizes)
    return top.reshape(1, 1, -1, 5)


def de_layer(det_shape, gt_shape, extra=""):
    from caffe_compat.layers.detection_evaluate import DetectionEvaluate
    lp = text_format.Parse('name: "eval" type: "DetectionEvaluate" bottom: "det" bottom: "label" '
                           'top: "out" detection_evaluate_param { ' + extra + " }",
                           caffe_pb2.LayerParameter())
    return DetectionEvaluate(lp, [det_shape, gt_shape], BuildContext(phase="TEST"))


def de_scene(rng, C=4, bg=0):
    labels = [c for c in range(C) if c != bg]
    gt = [[0, labels[0], 0, 0.1, 0.1, 0.4, 0.4, 0], [0, labels[0], 1, 0.5, 0.5, 0.9, 0.9, 1],
          [0, labels[1], 2, 0.2, 0.6, 0.5, 0.95, 0], [2, labels[1], 0, 0.3, 0.3, 0.7, 0.7, 0],
          [3, labels[2], 0, 0.0, 0.0, 0.2, 0.2, 0],
          [-1, -1, -1, -1, -1, -1, -1, -1], [4, labels[0], 0, 0.1, 0.1, 0.3, 0.3, 0]]  # after the break
    det = []
    for im in (0, 1, 2, 4):
        for _ in range(7):
            lab = labels[int(rng.integers(0, len(labels)))]
            c = rng.uniform(0.15, 0.85, 2)
            wh = rng.uniform(0.1, 0.5, 2)
            det.append([im, lab, round(float(rng.uniform(0.05, 1)), 2), *(c - wh / 2), *(c + wh / 2)])
    det[3][3:] = gt[0][3:7]  # exact hits, a duplicate and a difficult one
    det[3][1] = labels[0]
    det[4][1:] = [labels[0], 0.2, *gt[0][3:7]]
    det[5][1:] = [labels[0], 0.9, *gt[1][3:7]]
    det.append([-1, labels[0], 0.5, 0, 0, 1, 1])  # counted, not written: a zero row at the end
    if bg != 99:  # (with background_label_id -1 the fork refuses a label -1 row)
        det.append([2, -1, 0.5, 0, 0, 1, 1])  # label -1: neither counted nor written
    return (np.asarray(det, np.float32).reshape(1, 1, -1, 7),
            np.asarray(gt, np.float32).reshape(1, 1, -1, 8))


@pytest.mark.parametrize("bg,eval_diff,thr", [(0, True, 0.5), (0, False, 0.5), (2, True, 0.3),
                                              (-1, False, 0.5)])
def test_detection_evaluate_matches_fork_reference(bg, eval_diff, thr):
    rng = np.random.default_rng(bg + 5)
    C = 4
    det, gt = de_scene(rng, C, bg if bg >= 0 else 99)
    bgv = bg if bg >= 0 else (1 << 32) - 1
    layer = de_layer(det.shape, gt.shape, f"num_classes: {C} background_label_id: {bgv} "
                     f"overlap_threshold: {thr} evaluate_difficult_gt: {str(eval_diff).lower()}")
    (out,) = layer(torch.tensor(det), torch.tensor(gt))
    ref = ref_detection_evaluate(det, gt, C, bg, thr, eval_diff)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert tuple(out.shape) == (1, 1, (C if bg == -1 else C - 1) + det.shape[2] - (bg != -1), 5)
    assert (out[0, 0, -1] == 0).all()  # the image-id -1 row leaves a zero row
    assert (out[0, 0, :, 3] == 1).any() and (out[0, 0, :, 4] == 1).any()
    if not eval_diff:
        assert ((out[0, 0, :, 3] == 0) & (out[0, 0, :, 4] == 0) & (out[0, 0, :, 0] >= 0)).any()


def test_detection_evaluate_equal_scores_follow_std_sort():
    """20 detections of one label with equal scores: libstdc++'s introsort order decides
    which one takes the ground truth (the fork's std::sort)."""
    from caffe_compat.layers.ssd import _gnu_sort, _score_desc
    n = 20
    det = np.zeros((n, 7), np.float32)
    det[:, 0], det[:, 1], det[:, 2] = 0, 1, 0.5
    det[:, 3:] = [0.1, 0.1, 0.5, 0.5]
    gt = np.float32([[0, 1, 0, 0.1, 0.1, 0.5, 0.5, 0]])
    layer = de_layer((1, 1, n, 7), (1, 1, 1, 8), "num_classes: 2")
    (out,) = layer(torch.tensor(det).reshape(1, 1, n, 7), torch.tensor(gt).reshape(1, 1, 1, 8))
    order = [(0.5, i) for i in range(n)]
    _gnu_sort(order, _score_desc)
    tp = out[0, 0, 1:, 3].numpy()
    assert tp.sum() == 1 and tp[0] == 1  # the first in sorted order is the true positive
    assert [p[1] for p in order][:3] != [0, 1, 2]  # (the order is not the input order)


def test_detection_evaluate_name_size_file(tmp_path):
    rng = np.random.default_rng(9)
    det, gt = de_scene(rng)
    f = tmp_path / "sizes.txt"
    f.write_text("img0 300 500\nimg1 200 100\nimg2 64 64\n")
    layer = de_layer(det.shape, gt.shape, f'num_classes: 4 name_size_file: "{f}" '
                     'resize_param { resize_mode: WARP height: 300 width: 300 }')
    sizes = [(300, 500), (200, 100), (64, 64)]
    (a,) = layer(torch.tensor(det), torch.tensor(gt))
    np.testing.assert_array_equal(a.numpy(), ref_detection_evaluate(det, gt, 4, 0, 0.5, True, sizes, 0))
    assert layer.count == 4 % 3  # four images with detections
    (b,) = layer(torch.tensor(det), torch.tensor(gt))
    np.testing.assert_array_equal(b.numpy(), ref_detection_evaluate(det, gt, 4, 0, 0.5, True, sizes, 1))
    assert not np.array_equal(a.numpy(), b.numpy())
    missing = de_layer(det.shape, gt.shape, 'num_classes: 4 name_size_file: "/nonexistent/x.txt"')
    with pytest.raises(DataError, match="name_size_file"):
        missing(torch.tensor(det), torch.tensor(gt))


def test_detection_evaluate_errors():
    with pytest.raises(SchemaError, match="num_classes"):
        de_layer((1, 1, 2, 7), (1, 1, 2, 8))
    with pytest.raises(SchemaError, match="background_label_id"):
        de_layer((1, 1, 2, 7), (1, 1, 2, 8), "num_classes: 3 background_label_id: 3")
    with pytest.raises(SchemaError, match="overlap_threshold"):
        de_layer((1, 1, 2, 7), (1, 1, 2, 8), "num_classes: 3 overlap_threshold: 0")
    with pytest.raises(ShapeError, match="detections"):
        de_layer((1, 1, 2, 6), (1, 1, 2, 8), "num_classes: 3")
    layer = de_layer((1, 1, 1, 7), (1, 1, 1, 8), "num_classes: 3")
    with pytest.raises(DataError, match="background"):
        layer(torch.tensor([[[[0, 0, 0.5, 0, 0, 1, 1]]]], dtype=torch.float32),
              torch.tensor([[[[0, 1, 0, 0, 0, 1, 1, 0]]]], dtype=torch.float32))


# ============================================================================ AnnotatedData
def anno_datum(img, groups, encode=".png", with_type=True, label=0):
    """An AnnotatedDatum: ``img`` HWC uint8 BGR; ``groups`` [(label, [(inst, box, diff)])]."""
    import cv2
    ad = caffe_pb2.AnnotatedDatum()
    h, w = img.shape[:2]
    c = 1 if img.ndim == 2 else img.shape[2]
    d = ad.datum
    d.channels, d.height, d.width, d.label = c, h, w, label
    if encode:
        ok, buf = cv2.imencode(encode, img)
        assert ok
        d.data, d.encoded = buf.tobytes(), True
    else:
        d.data = (img[:, :, None] if img.ndim == 2 else img).transpose(2, 0, 1).tobytes()
    if with_type:
        ad.type = caffe_pb2.AnnotatedDatum.BBOX
    for gl, annos in groups:
        g = ad.annotation_group.add()
        g.group_label = gl
        for inst, box, diff in annos:
            a = g.annotation.add()
            a.instance_id = inst
            a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax = box
            a.bbox.difficult = diff
    return ad


def write_lmdb(path, records):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, r in enumerate(records):
            txn.put(b"%08d" % i, r.SerializeToString())
    env.close()


def ad_layer(text, phase="TRAIN", seed=0):
    from caffe_compat.layers.annotated_data import AnnotatedData
    lp = text_format.Parse('name: "data" type: "AnnotatedData" top: "data" top: "label" ' + text,
                           caffe_pb2.LayerParameter())
    g = torch.Generator()
    g.manual_seed(seed)
    return AnnotatedData(lp, [], BuildContext(phase=phase, generator=g))


def ad_scene(rng):
    imgs = [rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in ((40, 60), (50, 50), (30, 70))]
    groups = [
        [(1, [(0, (0.1, 0.2, 0.5, 0.6), False), (1, (-0.2, 0.5, 0.4, 1.3), True)]),
         (3, [(2, (1.2, 0.1, 1.5, 0.3), False)])],  # entirely outside: the group disappears
        [],
        [(2, [(0, (0.25, 0.25, 0.75, 0.8), False)]), (1, [(5, (0.0, 0.0, 1.0, 1.0), True)])],
    ]
    return imgs, groups


def expected_rows(groups, item_id):
    rows = []
    for gl, annos in groups:
        for inst, box, diff in annos:
            b = np.clip(np.float32(box), 0, 1)
            if b[2] - b[0] <= 0 or b[3] - b[1] <= 0:
                continue
            rows.append([item_id, gl, inst, *b, float(diff)])
    return rows


@pytest.mark.parametrize("encode", [".png", None])
def test_annotated_data_warp_mean_scale_and_labels(tmp_path, encode):
    import cv2
    rng = np.random.default_rng(0)
    imgs, groups = ad_scene(rng)
    write_lmdb(tmp_path / "db", [anno_datum(im, g, encode) for im, g in zip(imgs, groups)])
    layer = ad_layer(f'data_param {{ source: "{tmp_path}/db" batch_size: 2 backend: LMDB }} '
                     'transform_param { mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 '
                     'resize_param { resize_mode: WARP height: 24 width: 32 } } '
                     'annotated_data_param { label_map_file: "labelmap.prototxt" }', phase="TEST")
    assert layer.infer_top_shapes([]) == [(2, 3, 24, 32), (1, 1, 3, 8)]
    mean = np.float32([104, 117, 123])[:, None, None]
    for batch in ([0, 1], [2, 0], [1, 2]):  # wraps around the database
        data, label = layer()
        for k, i in enumerate(batch):
            want = (cv2.resize(imgs[i], (32, 24)).astype(np.float32).transpose(2, 0, 1) - mean) * 0.5
            np.testing.assert_array_equal(data[k].numpy(), want)
        rows = [r for k, i in enumerate(batch) for r in expected_rows(groups[i], k)]
        got = label.numpy().reshape(-1, 8)
        if not rows:
            np.testing.assert_array_equal(got, -np.ones((1, 8)))
        else:
            np.testing.assert_allclose(got, np.float32(rows), atol=1e-6)
    # a batch without any box: one row of -1
    write_lmdb(tmp_path / "empty", [anno_datum(imgs[1], [], encode)])
    e = ad_layer(f'data_param {{ source: "{tmp_path}/empty" batch_size: 2 backend: LMDB }} '
                 'transform_param { resize_param { height: 8 width: 8 } }')
    np.testing.assert_array_equal(e()[1].numpy(), -np.ones((1, 1, 1, 8), np.float32))


def test_annotated_data_crop_and_mirror_move_boxes(tmp_path):
    import cv2
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    groups = [(1, [(0, (0.1, 0.2, 0.6, 0.7), False), (1, (0.7, 0.0, 0.95, 0.45), False)])]
    write_lmdb(tmp_path / "db", [anno_datum(img, groups)])
    layer = ad_layer(f'data_param {{ source: "{tmp_path}/db" batch_size: 1 backend: LMDB }} '
                     'transform_param { mirror: true crop_h: 12 crop_w: 16 '
                     'resize_param { height: 24 width: 32 interp_mode: NEAREST } }')
    resized = cv2.resize(img, (32, 24), interpolation=cv2.INTER_NEAREST).astype(np.float32).transpose(2, 0, 1)
    seen = set()
    for _ in range(12):
        data, label = layer()
        x = data[0].numpy()
        hit = None
        for h in range(24 - 12 + 1):
            for w in range(32 - 16 + 1):
                c = resized[:, h:h + 12, w:w + 16]
                for m in (False, True):
                    if np.array_equal(c[:, :, ::-1] if m else c, x):
                        hit = (h, w, m)
        assert hit is not None
        h, w, m = hit
        seen.add(m)
        crop = np.float32([w / 32, h / 24, (w + 16) / 32, (h + 12) / 24])
        rows = []
        for inst, box, _ in groups[0][1]:
            b = np.float32(box)
            if b[0] >= crop[2] or b[2] <= crop[0] or b[1] >= crop[3] or b[3] <= crop[1]:
                continue
            p = np.clip([(b[0] - crop[0]) / (crop[2] - crop[0]), (b[1] - crop[1]) / (crop[3] - crop[1]),
                         (b[2] - crop[0]) / (crop[2] - crop[0]), (b[3] - crop[1]) / (crop[3] - crop[1])], 0, 1)
            if (p[2] - p[0]) * (p[3] - p[1]) <= 0:
                continue
            if m:
                p = [1 - p[2], p[1], 1 - p[0], p[3]]
            rows.append([0, 1, inst, *p, 0])
        got = label.numpy().reshape(-1, 8)
        if rows:
            np.testing.assert_allclose(got, np.float32(rows), atol=2e-6)
        else:
            np.testing.assert_array_equal(got, -np.ones((1, 8)))
    assert seen == {False, True}


def test_annotated_data_without_annotation_type_gives_datum_labels(tmp_path):
    rng = np.random.default_rng(2)
    imgs, groups = ad_scene(rng)
    write_lmdb(tmp_path / "db", [anno_datum(im, g, with_type=False, label=7 + k)
                                 for k, (im, g) in enumerate(zip(imgs, groups))])
    layer = ad_layer(f'data_param {{ source: "{tmp_path}/db" batch_size: 3 backend: LMDB }} '
                     'transform_param { resize_param { height: 10 width: 10 } }')
    assert layer.infer_top_shapes([]) == [(3, 3, 10, 10), (3, 1, 1, 1)]
    assert layer()[1].reshape(-1).tolist() == [7.0, 8.0, 9.0]


def test_annotated_data_expand_moves_boxes_consistently(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    boxes = [(0.1, 0.2, 0.5, 0.6), (0.3, 0.1, 0.9, 0.4), (0.05, 0.5, 0.2, 0.95)]
    groups = [(1, [(k, b, False) for k, b in enumerate(boxes)])]
    write_lmdb(tmp_path / "db", [anno_datum(img, groups, ".jpg")])
    layer = ad_layer(f'data_param {{ source: "{tmp_path}/db" batch_size: 1 backend: LMDB }} '
                     'transform_param { mean_value: 104 mean_value: 117 mean_value: 123 '
                     'resize_param { height: 32 width: 32 } '
                     'expand_param { prob: 1 max_expand_ratio: 3 } }')
    ratios = []
    for _ in range(4):
        data, label = layer()
        got = label.numpy().reshape(-1, 8)[:, 3:7]
        assert got.shape == (3, 4)
        b = np.float32(boxes)
        # every box undergoes the same x -> s x + t (and y) map: the expansion
        sx = (got[:, 2] - got[:, 0]) / (b[:, 2] - b[:, 0])
        sy = (got[:, 3] - got[:, 1]) / (b[:, 3] - b[:, 1])
        np.testing.assert_allclose(sx, sx[0], rtol=1e-4)
        np.testing.assert_allclose(sy, sy[0], rtol=1e-4)
        np.testing.assert_allclose(got[:, 0] - sx[0] * b[:, 0], got[0, 0] - sx[0] * b[0, 0], atol=1e-5)
        assert 1 / 3 - 0.02 <= sx[0] <= 1 and 1 / 3 - 0.02 <= sy[0] <= 1
        ratios.append(float(sx[0]))
    assert len(set(np.round(ratios, 4))) > 1
    assert data.shape == (1, 3, 32, 32)


def test_annotated_data_distort_and_batch_sampler(tmp_path):
    rng = np.random.default_rng(4)
    img = rng.integers(60, 200, size=(40, 40, 3), dtype=np.uint8)
    boxes = [(0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.95)]
    groups = [(2, [(k, b, False) for k, b in enumerate(boxes)])]
    write_lmdb(tmp_path / "db", [anno_datum(img, groups, ".jpg")])
    base = f'data_param {{ source: "{tmp_path}/db" batch_size: 1 backend: LMDB }} '
    plain = ad_layer(base + 'transform_param { resize_param { height: 40 width: 40 } }')
    ref = plain()[0]
    dist = ad_layer(base + 'transform_param { resize_param { height: 40 width: 40 } '
                    'distort_param { brightness_prob: 1 brightness_delta: 40 contrast_prob: 1 '
                    'contrast_lower: 0.5 contrast_upper: 1.5 saturation_prob: 1 saturation_lower: 0.5 '
                    'saturation_upper: 1.5 hue_prob: 1 hue_delta: 18 random_order_prob: 1 } }')
    d, lab = dist()
    assert d.shape == ref.shape and not torch.equal(d, ref)
    np.testing.assert_allclose(lab.numpy().reshape(-1, 8)[:, 3:7], np.float32(boxes), atol=1e-6)
    samp = ad_layer(base + 'transform_param { resize_param { height: 24 width: 24 } '
                    'emit_constraint { emit_type: CENTER } } annotated_data_param { '
                    'batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 '
                    'max_aspect_ratio: 2 } sample_constraint { min_jaccard_overlap: 0.3 } '
                    'max_sample: 1 max_trials: 50 } }')
    for _ in range(5):
        d, lab = samp()
        assert d.shape == (1, 3, 24, 24)
        rows = lab.numpy().reshape(-1, 8)
        if rows[0, 0] == -1:
            continue
        b = rows[:, 3:7]
        assert (b >= 0).all() and (b <= 1).all() and ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert set(rows[:, 1]) == {2}


def test_sample_constraint_matches_fork():
    """SatisfySampleConstraint's odd control flow (``found`` carries over objects)."""
    from caffe_compat.layers.annotated_data import _SSDTransformer

    def ref(sampled, objects, c):
        has_j = "min_j" in c or "max_j" in c
        has_s = "min_s" in c or "max_s" in c
        has_o = "min_o" in c or "max_o" in c
        if not (has_j or has_s or has_o):
            return True
        found = False
        for ob in objects:
            if has_j:
                j = r_iou(sampled, ob)
                if "min_j" in c and j < F32(c["min_j"]) or "max_j" in c and j > F32(c["max_j"]):
                    continue
                found = True
            if has_s:
                s = cov(sampled, ob)
                if "min_s" in c and s < F32(c["min_s"]) or "max_s" in c and s > F32(c["max_s"]):
                    continue
                found = True
            if has_o:
                o = cov(ob, sampled)
                if "min_o" in c and o < F32(c["min_o"]) or "max_o" in c and o > F32(c["max_o"]):
                    continue
                found = True
            if found:
                return True
        return found

    def cov(a, b):
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            return F32(0)
        inter = r_size([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
        return F32(inter / r_size(a)) if inter > 0 else F32(0)

    names = {"min_j": "min_jaccard_overlap", "max_j": "max_jaccard_overlap",
             "min_s": "min_sample_coverage", "max_s": "max_sample_coverage",
             "min_o": "min_object_coverage", "max_o": "max_object_coverage"}
    t = _SSDTransformer(caffe_pb2.TransformationParameter(), "TRAIN", torch.Generator(), "x")
    rng = np.random.default_rng(12)
    for trial in range(300):
        c = {k: round(float(rng.uniform(0.1, 0.9)), 2) for k in names if rng.random() < 0.3}
        sc = caffe_pb2.SampleConstraint(**{names[k]: v for k, v in c.items()})
        objs = []
        for _ in range(int(rng.integers(0, 4))):
            p = rng.uniform(0, 0.6, 2)
            objs.append([F32(v) for v in (*p, *(p + rng.uniform(0.05, 0.4, 2)))])
        p = rng.uniform(0, 0.5, 2)
        s = [F32(v) for v in (*p, *(p + rng.uniform(0.1, 0.5, 2)))]
        assert t._satisfy(s, objs, sc) == ref(s, objs, c), (c, objs, s)


def test_annotated_data_param_errors(tmp_path):
    src = f'data_param {{ source: "{tmp_path}/none" batch_size: 2 backend: LMDB }} '
    cases = [("transform_param { noise_param { decolorize: true } }", "noise_param"),
             ("transform_param { cvt_bgr2rgb: true }", "another fork"),
             ("annotated_data_param { yolo_data_type: 1 }", "another fork"),
             ("annotated_data_param { anno_type: LANE }", "anno_type"),
             ("transform_param { resize_param { height: 0 width: 3 } }", "height"),
             ("transform_param { resize_param { resize_mode: FIT_SMALL_SIZE height: 3 width: 3 } }",
              "batch_size 1"),
             ("transform_param { expand_param { max_expand_ratio: 1 } }", "max_expand_ratio"),
             ("annotated_data_param { batch_sampler { sampler { min_scale: 0 } } }", "min_scale")]
    for text, match in cases:
        with pytest.raises(SchemaError, match=match):
            ad_layer(src + text)
    layer = ad_layer(src)  # builds; the missing source is reported when it is read
    assert layer.infer_top_shapes([]) == [None, None]
    with pytest.raises(DataError, match="not found"):
        layer()


# ============================================================================ an SSD-style TRAIN net
def test_ssd_train_net_forward_backward(tmp_path):
    from caffe_compat.net import Net
    rng = np.random.default_rng(5)
    imgs, groups = ad_scene(rng)
    write_lmdb(tmp_path / "db", [anno_datum(im, g, ".jpg") for im, g in zip(imgs, groups)])
    C = 4
    proto = f"""
name: "tiny_ssd"
layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ mirror: true mean_value: 104 mean_value: 117 mean_value: 123
    resize_param {{ prob: 1 resize_mode: WARP height: 32 width: 32 interp_mode: LINEAR interp_mode: AREA }}
    emit_constraint {{ emit_type: CENTER }}
    distort_param {{ brightness_prob: 0.5 brightness_delta: 32 }}
    expand_param {{ prob: 0.5 max_expand_ratio: 2.0 }} }}
  data_param {{ source: "{tmp_path}/db" batch_size: 3 backend: LMDB }}
  annotated_data_param {{ label_map_file: "labelmap.prototxt"
    batch_sampler {{ max_sample: 1 max_trials: 1 }}
    batch_sampler {{ sampler {{ min_scale: 0.3 max_scale: 1.0 min_aspect_ratio: 0.5 max_aspect_ratio: 2.0 }}
      sample_constraint {{ min_jaccard_overlap: 0.1 }} max_sample: 1 max_trials: 50 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 stride: 2 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param {{ num_output: 8 kernel_size: 3 stride: 2 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loc" type: "Convolution" bottom: "conv2" top: "loc"
  convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "mbox_loc" flatten_param {{ axis: 1 }} }}
layer {{ name: "conf" type: "Convolution" bottom: "conv2" top: "conf"
  convolution_param {{ num_output: {4 * C} kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "mbox_conf" flatten_param {{ axis: 1 }} }}
layer {{ name: "priors" type: "PriorBox" bottom: "conv2" bottom: "data" top: "mbox_priorbox"
  prior_box_param {{ min_size: 8 max_size: 16 aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }} }}
layer {{ name: "mbox_loss" type: "MultiBoxLoss" bottom: "mbox_loc" bottom: "mbox_conf"
  bottom: "mbox_priorbox" bottom: "label" top: "mbox_loss" include {{ phase: TRAIN }}
  propagate_down: true propagate_down: true propagate_down: false propagate_down: false
  loss_param {{ normalization: VALID }}
  multibox_loss_param {{ loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1.0
    num_classes: {C} share_location: true match_type: PER_PREDICTION overlap_threshold: 0.5
    use_prior_for_matching: true background_label_id: 0 use_difficult_gt: true neg_pos_ratio: 3.0
    neg_overlap: 0.5 code_type: CENTER_SIZE ignore_cross_boundary_bbox: false mining_type: MAX_NEGATIVE }} }}
"""
    net = Net(proto, phase="train")
    assert net.blob_shapes["mbox_priorbox"] == (1, 2, 8 * 8 * 4 * 4)
    torch.manual_seed(0)
    matched = 0
    for _ in range(3):
        net.zero_grad()
        out = net.forward()
        loss = out["mbox_loss"]
        assert torch.isfinite(loss)
        net.backward()
        w = dict(net.named_parameters())
        assert all(torch.isfinite(p.grad).all() for p in w.values() if p.grad is not None)
        rows = net.blobs["label"].reshape(-1, 8)
        assert ((rows[:, 0] >= 0) & (rows[:, 0] < 3) | (rows[:, 0] == -1)).all()
        st = net._modules["mbox_loss"].last_stats if "mbox_loss" in net._modules else None
        if st is not None:
            matched += st.num_matches
    assert matched > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_ssd_test_net_detection_output_to_evaluate():
    """DetectionOutput -> DetectionEvaluate in a TEST net (the fork's test prototxt wiring):
    the data-dependent row count follows the detections."""
    from caffe_compat.net import Net
    rng = np.random.default_rng(8)
    P, C = 30, 3
    prior = make_priors(P, rng)
    loc = (rng.standard_normal((1, P * 4)) * 0.3).astype(np.float32)
    logits = rng.standard_normal((P, C)).astype(np.float32) * 2
    conf = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).reshape(1, -1).astype(np.float32)
    gt = gt_rows([[0, 1, 0, 0.1, 0.1, 0.5, 0.5, 0], [0, 2, 1, 0.4, 0.4, 0.9, 0.9, 1],
                  [0, 1, 2, 0.5, 0.1, 0.9, 0.4, 0]])
    net = Net(f"""
layer {{ name: "in" type: "Input" top: "loc" top: "conf" top: "prior" top: "label"
  input_param {{ shape {{ dim: 1 dim: {P * 4} }} shape {{ dim: 1 dim: {P * C} }}
    shape {{ dim: 1 dim: 2 dim: {P * 4} }} shape {{ dim: 1 dim: 1 dim: 3 dim: 8 }} }} }}
layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "det"
  detection_output_param {{ num_classes: {C} share_location: true background_label_id: 0
    nms_param {{ nms_threshold: 0.45 top_k: 100 }} code_type: CENTER_SIZE keep_top_k: 50
    confidence_threshold: 0.05 }} }}
layer {{ name: "eval" type: "DetectionEvaluate" bottom: "det" bottom: "label" top: "eval"
  detection_evaluate_param {{ num_classes: {C} background_label_id: 0 overlap_threshold: 0.3
    evaluate_difficult_gt: false }} }}
""", phase="test")
    assert net.blob_shapes["eval"] == (1, 1, C - 1 + 1, 5)
    out = net.forward(loc=torch.tensor(loc), conf=torch.tensor(conf), prior=torch.tensor(prior),
                      label=torch.tensor(gt))
    det = net.blobs["det"].numpy()
    assert det.shape[2] > 1
    np.testing.assert_array_equal(out["eval"].numpy(), ref_detection_evaluate(det, gt, C, 0, 0.3, False))
    assert out["eval"].shape[2] == C - 1 + det.shape[2]


def test_softmax_conf_loss_clamps_at_flt_min():
    """A label probability below FLT_MIN costs -log(FLT_MIN) (the fork's clamp), while the
    gradient stays p - onehot."""
    rng = np.random.default_rng(13)
    loc, conf, prior, gt = scene(rng, N=1)
    conf = conf.reshape(-1, 4)
    conf[:, 0] = -150.0  # background: every negative's probability underflows
    conf = conf.reshape(1, -1)
    layer, loss, gl, gc, ref = run_both(dict(num_classes=4, mining_type="NONE"), loc, conf, prior, gt[:, :, :2])
    np.testing.assert_allclose(float(loss.detach()), ref["loss"], rtol=1e-5)
    assert float(loss.detach()) * layer.last_stats.normalizer > 80 * (24 - layer.last_stats.num_matches)
    np.testing.assert_allclose(gc, ref["dconf"], rtol=1e-5, atol=1e-6)


def test_annotated_data_fit_modes(tmp_path):
    import cv2
    rng = np.random.default_rng(14)
    img = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)  # aspect 1.5
    box = (0.1, 0.2, 0.7, 0.9)
    write_lmdb(tmp_path / "db", [anno_datum(img, [(1, [(0, box, False)])])])
    src = f'data_param {{ source: "{tmp_path}/db" batch_size: 1 backend: LMDB }} '
    pad = ad_layer(src + 'transform_param { resize_param { resize_mode: FIT_LARGE_SIZE_AND_PAD '
                   'height: 32 width: 32 pad_value: 7 } }', phase="TEST")
    d, lab = pad()
    r = cv2.resize(img, (32, 21))  # floor(32 / 1.5) rows, then 5 + 6 rows of padding
    want = cv2.copyMakeBorder(r, 5, 6, 0, 0, cv2.BORDER_CONSTANT, value=(7, 7, 7, 0))
    np.testing.assert_array_equal(d[0].numpy(), want.astype(np.float32).transpose(2, 0, 1))
    p = (32 - 32 / 1.5) / 2  # the boxes use the fractional padding (the fork's arithmetic)
    wb = [box[0], (p + box[1] * (32 - 2 * p)) / 32, box[2], (p + box[3] * (32 - 2 * p)) / 32]
    np.testing.assert_allclose(lab.numpy().reshape(-1, 8)[0, 3:7], wb, atol=1e-5)
    small = ad_layer(src + 'transform_param { resize_param { resize_mode: FIT_SMALL_SIZE '
                     'height: 32 width: 32 interp_mode: NEAREST } }', phase="TEST")
    assert small.infer_top_shapes([])[0] == (1, 3, 32, 48)
    d, lab = small()
    np.testing.assert_array_equal(d[0].numpy(), cv2.resize(img, (48, 32), interpolation=cv2.INTER_NEAREST)
                                  .astype(np.float32).transpose(2, 0, 1))
    np.testing.assert_allclose(lab.numpy().reshape(-1, 8)[0, 3:7], box, atol=1e-6)


def test_output_bbox_modes():
    from caffe_compat.layers.detection_evaluate import _Box, output_bbox
    rp = caffe_pb2.ResizeParameter(resize_mode=caffe_pb2.ResizeParameter.FIT_LARGE_SIZE_AND_PAD,
                                   height=300, width=300)
    b = _Box([0.1, 0.3, 0.6, 0.7])
    out = output_bbox(b, (200, 400), rp)  # aspect 2: 75 rows of padding top and bottom
    pad = (300 - 300 / 2) / 2 / 300
    ys = [(0.3 - pad) / (1 - 2 * pad), (0.7 - pad) / (1 - 2 * pad)]
    np.testing.assert_allclose([float(v) for v in out.c], [40, ys[0] * 200, 240, ys[1] * 200], rtol=1e-5)
    warp = output_bbox(_Box([-0.1, 0.2, 0.5, 1.2]), (100, 50))
    np.testing.assert_allclose([float(v) for v in warp.c], [0, 20, 25, 100])
    assert float(warp.size) == (25 + 1) * (80 + 1)  # pixel boxes carry +1 sizes
    rp_s = caffe_pb2.ResizeParameter(resize_mode=caffe_pb2.ResizeParameter.FIT_SMALL_SIZE,
                                     height=300, width=300, height_scale=600, width_scale=900)
    s = output_bbox(_Box([0.1, 0.1, 0.5, 0.5]), (400, 500), rp_s)
    np.testing.assert_allclose([float(v) for v in s.c], [90, 60, 450, 300])  # scaled, clipped to 500x400


def test_nms_param_without_top_k_mines_nothing():
    """``nms_param`` without ``top_k`` reads top_k = 0: the fork's ApplyNMS keeps nothing, so
    MAX_NEGATIVE picks no negative and HARD_EXAMPLE drops every positive too."""
    rng = np.random.default_rng(15)
    loc, conf, prior, gt = scene(rng)
    for mining in ("MAX_NEGATIVE", "HARD_EXAMPLE"):
        o = dict(num_classes=4, mining_type=mining, nms_threshold=0.5)
        layer, loss, gl, gc, ref = run_both(o, loc, conf, prior, gt)
        st = layer.last_stats
        assert st.num_negs == ref["num_negs"] == 0
        assert st.num_matches == ref["num_matches"] == (0 if mining == "HARD_EXAMPLE" else st.num_matches)
        np.testing.assert_allclose(float(loss.detach()), ref["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gc, ref["dconf"], rtol=1e-5, atol=1e-7)


def test_legacy_normalize_flag():
    shapes = [(1, 8), (1, 8), (1, 2, 8), (1, 1, 1, 8)]
    lp = text_format.Parse('name: "l" type: "MultiBoxLoss" top: "loss" multibox_loss_param { num_classes: 4 } '
                           'loss_param { normalize: false }', caffe_pb2.LayerParameter())
    assert MultiBoxLoss(lp, shapes, BuildContext()).opts.normalization == "BATCH_SIZE"
    lp.loss_param.normalization = caffe_pb2.LossParameter.FULL  # `normalization` wins
    assert MultiBoxLoss(lp, shapes, BuildContext()).opts.normalization == "FULL"


def test_empty_batch_sampler_of_test_prototxts_keeps_the_whole_image(tmp_path):
    """The fork's SSD test nets carry ``batch_sampler { }``: 100 trials of the full image;
    the crop is the image itself (re-encoded as JPEG for encoded records)."""
    import cv2
    yy, xx = np.mgrid[0:12, 0:18]
    img = np.stack([yy * 20, xx * 14, 100 + yy * 5 + xx * 3], -1).astype(np.uint8)  # smooth
    groups = [(1, [(0, (0.1, 0.2, 0.6, 0.9), True)])]
    for encode in (None, ".png"):
        write_lmdb(tmp_path / f"db{encode}", [anno_datum(img, groups, encode)])
        layer = ad_layer(f'data_param {{ source: "{tmp_path}/db{encode}" batch_size: 1 backend: LMDB }} '
                         'transform_param { resize_param { height: 12 width: 18 } } '
                         'annotated_data_param { batch_sampler { } }', phase="TEST")
        d, lab = layer()
        np.testing.assert_allclose(lab.numpy().reshape(-1, 8),
                                   np.float32([[0, 1, 0, 0.1, 0.2, 0.6, 0.9, 1]]), atol=1e-6)
        want = cv2.resize(img, (18, 12)).astype(np.float32).transpose(2, 0, 1)
        if encode is None:
            np.testing.assert_array_equal(d[0].numpy(), want)
        else:  # lossy JPEG round trip, as the fork's CropImage re-encodes
            assert not np.array_equal(d[0].numpy(), want)
            assert np.abs(d[0].numpy() - want).mean() < 8
