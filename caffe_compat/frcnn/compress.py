"""Fast R-CNN's truncated-SVD compression of fully connected layers (paper section 3.1).

A layer ``X`` (InnerProduct, weight ``W`` of shape N x K) is replaced in a "compressed"
definition by ``X_L`` (num_output ``l``, ``bias_term: false``) feeding ``X_U`` (num_output N,
with bias).  With the thin SVD ``W = U S V^T`` and the top ``l`` singular values kept::

    X_L.weight = diag(s_l) V_l^T    (l x K)
    X_U.weight = U_l                (N x l)
    X_U.bias   = X.bias

so ``X_U(X_L(x)) = U_l S_l V_l^T x + b``, the best rank-``l`` approximation of ``X``, at
``l (N + K)`` multiply-adds instead of ``N K``.  Which layers are compressed is found from the
two definitions (``X`` absent from the compressed net, ``X_L`` and ``X_U`` present) rather than
hard-coding fc6/fc7 as Fast R-CNN's ``tools/compress_net.py`` did; ``l`` is ``X_L``'s
num_output.  Every other layer's blobs are copied unchanged.

The factorization is computed in float64 from the Gram matrix of the smaller side
(``W W^T`` or ``W^T W``) with a symmetric eigensolver: on the 2-core dev CPU VGG16's fc6
(4096 x 25088) takes 17-19 s against 146 s for ``torch.linalg.svd`` (LAPACK's gesdd), fc7
(4096 x 4096) 9 s against 15 s (``benchmarks/compress_svd.py``).  In float64 it is exact far
beyond the float32 the factors are stored in: only singular values below ~1e-8 of the largest
lose accuracy, and their directions carry nothing a float32 weight can hold.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from caffe_compat.errors import GraphError, SchemaError, WeightsError

__all__ = ["compress_net", "compress_files", "compressed_pairs", "truncated_svd", "default_output"]


def truncated_svd(w: torch.Tensor, l: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(L, U, err)`` with ``U @ L`` the best rank-``l`` approximation of ``w`` (N x K).

    ``L = diag(s_l) V_l^T`` (l x K), ``U = U_l`` (N x l), both float64; ``err`` is the
    relative Frobenius error ``||w - U L|| / ||w||`` (from the discarded singular values).
    Each singular pair's sign is fixed so that ``U``'s largest-magnitude entry in a column
    is positive (a deterministic choice; an SVD leaves it free).
    """
    n, k = w.shape
    if not 1 <= l <= min(n, k):
        raise ValueError(f"rank {l} outside 1..{min(n, k)}")
    a = w.detach().to(torch.float64)
    wide = n <= k
    gram = a @ a.T if wide else a.T @ a               # the smaller side: min(N, K) squared
    evals, evecs = torch.linalg.eigh(gram)             # ascending
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    total = float(evals.sum())
    err = (float(evals[l:].sum()) / total) ** 0.5 if total > 0 else 0.0
    if wide:
        u = evecs[:, :l].contiguous()
        lower = u.T @ a                                 # = diag(s) V^T, no division by s
    else:
        v = evecs[:, :l]
        wv = a @ v
        # U = W V / s with s = ||W v||, the Rayleigh value: unit columns whatever the rounding
        # of the small eigenvalues; an exactly null direction gets zeros (it adds nothing)
        s = torch.linalg.vector_norm(wv, dim=0)
        u = wv / torch.where(s > 0, s, torch.ones_like(s))
        lower = s[:, None] * v.T
    idx = u.abs().argmax(0)
    sign = torch.sign(u.gather(0, idx[None]).squeeze(0))
    sign[sign == 0] = 1.0
    return lower * sign[:, None], u * sign[None], err


def _entries(net) -> Dict[str, object]:
    return {e.name: e for e in net.entries}


def _where(net, layer: str) -> Optional[str]:
    if getattr(net, "source", None):
        from caffe_compat.io import locate_layer

        return locate_layer(net.source, layer) or net.source
    return None


def _module(net, entry, what: str):
    if entry.module is None:
        raise GraphError(f"{what} is not built ({entry.unbuilt_reason})", layer=entry.name,
                         where=_where(net, entry.name))
    return entry.module


def _weight_nk(ip) -> torch.Tensor:
    """An InnerProduct module's weight as N x K, whatever its ``transpose``."""
    return ip.weight.t() if ip.transpose else ip.weight


def compressed_pairs(net, svd_net) -> List[Tuple[str, str, str]]:
    """``[(X, X_L, X_U)]``: layers of ``net`` that ``svd_net`` replaces by an L/U pair.

    A pair counts when ``X`` is in ``net`` but not in ``svd_net`` while ``X_L`` and ``X_U``
    are; they are returned in ``net``'s layer order.
    """
    have = _entries(svd_net)
    return [(e.name, e.name + "_L", e.name + "_U") for e in net.entries
            if e.name not in have and e.name + "_L" in have and e.name + "_U" in have]


def _check_pair(net, svd_net, x: str, xl: str, xu: str) -> Tuple[object, object, object, int]:
    """The three InnerProduct modules and ``l``, after checking the pair fits ``x``."""
    e, es = _entries(net), _entries(svd_net)
    for name, ent, owner in ((x, e[x], net), (xl, es[xl], svd_net), (xu, es[xu], svd_net)):
        if ent.type != "InnerProduct":
            raise SchemaError(f"only InnerProduct layers can be SVD-compressed: '{name}' is "
                              f"{ent.type}", layer=name, where=_where(owner, name))
    m = _module(net, e[x], "the layer to compress")
    ml = _module(svd_net, es[xl], "the compressed lower layer")
    mu = _module(svd_net, es[xu], "the compressed upper layer")
    n, k, l = m.num_output, m.k, ml.num_output
    wl = _where(svd_net, xl)
    if ml.bias_term:
        raise SchemaError(f"'{xl}' must have 'bias_term: false' (the bias of '{x}' goes to '{xu}')",
                          layer=xl, where=wl)
    if ml.k != k:
        raise GraphError(f"'{xl}' takes inputs of size K = {ml.k} but '{x}' takes K = {k} "
                         f"(it must read what '{x}' read)", layer=xl, where=wl)
    if not 1 <= l <= min(n, k):
        raise SchemaError(f"rank l = num_output {l} of '{xl}' must be in 1..min(N, K) = "
                          f"{min(n, k)} for '{x}' (N = {n}, K = {k})", layer=xl, where=wl)
    if list(es[xu].bottoms) != list(es[xl].tops) or mu.k != l:
        raise GraphError(f"'{xu}' must take '{xl}''s output (K = {l}) as its only input, got "
                         f"bottoms {list(es[xu].bottoms)} (K = {mu.k})", layer=xu,
                         where=_where(svd_net, xu))
    if mu.num_output != n:
        raise SchemaError(f"'{xu}' must have num_output N = {n} as '{x}' has, got {mu.num_output}",
                          layer=xu, where=_where(svd_net, xu))
    if m.bias_term and not mu.bias_term:
        raise SchemaError(f"'{xu}' has 'bias_term: false' but '{x}' has a bias to carry over",
                          layer=xu, where=_where(svd_net, xu))
    return m, ml, mu, l


def _plain_copies(net, svd_net, skip: set) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(target, source) for every other layer's blobs, by layer name (CopyTrainedLayersFrom)."""
    src = _entries(net)
    plan = []
    for e in svd_net.entries:
        if e.name in skip or e.module is None or not e.module.blob_names:
            continue
        s = src.get(e.name)
        if s is None or (s.module is not None and not s.module.blob_names):
            raise WeightsError("layer has blobs but the original net has no such layer to copy "
                               "them from (renamed? only X -> X_L/X_U pairs are compressed)",
                               layer=e.name, where=_where(svd_net, e.name))
        _module(net, s, "the original layer to copy from")
        if list(s.module.blob_names) != list(e.module.blob_names):
            raise WeightsError(f"blobs {list(e.module.blob_names)} differ from the original layer's "
                               f"{list(s.module.blob_names)}", layer=e.name, where=_where(svd_net, e.name))
        for i, attr in enumerate(e.module.blob_names):
            dst, val = getattr(e.module, attr), getattr(s.module, attr)
            if tuple(dst.shape) != tuple(val.shape):
                raise WeightsError(f"shape {tuple(dst.shape)} differs from the original's "
                                   f"{tuple(val.shape)}", layer=e.name, blob=i,
                                   where=_where(svd_net, e.name))
            if dst is not val:
                plan.append((dst, val))
    return plan


def compress_net(net, svd_net) -> Dict[str, Tuple[int, float]]:
    """Fill ``svd_net``'s parameters from ``net``: SVD factors for each X -> X_L/X_U pair.

    Returns ``{X: (l, relative Frobenius error of the rank-l approximation)}`` in layer
    order.  Every other ``svd_net`` layer with blobs gets the same-named layer's blobs from
    ``net`` (shapes must agree).  All checks run before anything is written.
    Raises ``GraphError`` when no pair is found or a pair is wired wrongly, ``SchemaError``
    for an impossible rank, an ``X_L`` with a bias or an ``X_U`` of the wrong size,
    ``WeightsError`` for layers whose blobs cannot be copied.
    """
    pairs = compressed_pairs(net, svd_net)
    if not pairs:
        raise GraphError("no compressed layers found: expected a layer X of the original net "
                         "replaced by X_L and X_U in the compressed net",
                         where=getattr(svd_net, "source", None))
    checked = [(x, xl, xu) + _check_pair(net, svd_net, x, xl, xu) for x, xl, xu in pairs]
    skip = {n for p in pairs for n in p[1:]}
    copies = _plain_copies(net, svd_net, skip)
    with torch.no_grad():
        for dst, val in copies:
            dst.copy_(val)
    out: Dict[str, Tuple[int, float]] = {}
    for x, xl, xu, m, ml, mu, l in checked:
        lower, upper, err = truncated_svd(_weight_nk(m), l)
        with torch.no_grad():
            # stored as the layers hold them: (out, in), or (in, out) with transpose: true
            ml.weight.copy_(lower.T if ml.transpose else lower)
            mu.weight.copy_(upper.T if mu.transpose else upper)
            if mu.bias_term:
                if m.bias_term:
                    mu.bias.copy_(m.bias)
                else:
                    mu.bias.zero_()  # X had none: the pair must add nothing either
        out[x] = (l, err)
    return out


def default_output(weights: str, ranks: Dict[str, Tuple[int, float]]) -> str:
    """``<dir>/<stem>_svd_<X>_<l>...<ext>``, Fast R-CNN's naming (``..._svd_fc6_1024_fc7_256``).

    The extension is the input's when it is one we write (.caffemodel/.caffemodel.h5/.h5/.pt/
    .pth/.safetensors), else ``.caffemodel``.
    """
    for ext in (".caffemodel.h5", ".caffemodel", ".h5", ".pt", ".pth", ".safetensors"):
        if weights.endswith(ext):
            stem = weights[:-len(ext)]
            break
    else:
        stem, ext = weights, ".caffemodel"
    return stem + "_svd" + "".join(f"_{x}_{l}" for x, (l, _) in ranks.items()) + ext


def compress_files(definition: str, svd_definition: str, weights: str, out: Optional[str] = None, *,
                   phase: str = "test", allow_python_layers: Optional[bool] = None):
    """Load ``weights`` into ``definition``, compress into ``svd_definition``, write ``out``.

    Returns ``(out path, {X: (l, err)}, net, svd_net)``; ``out`` defaults to
    :func:`default_output`.  The format is chosen by ``out``'s extension.
    """
    from caffe_compat.net import Net

    net = Net(definition, weights=weights, phase=phase, allow_python_layers=allow_python_layers)
    svd_net = Net(svd_definition, phase=phase, allow_python_layers=allow_python_layers, seed=0)
    ranks = compress_net(net, svd_net)
    out = out or default_output(weights, ranks)
    svd_net.save_weights(out)
    return out, ranks, net, svd_net
