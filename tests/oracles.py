"""Float64 oracles for the property tests: the losses written from their definitions, independently of the
library's own reference functions (no fused or dense path, no coefficients): the smoothed target in full,
torch's float64 log-softmax, and a class whose smoothed target (or weight) is 0 adding exactly 0."""
import math
import torch, torch.nn.functional as F

def smoothed(T, K, eps, prior):
    "q' = (1-eps) T + eps u, classes last, in float64 (T one-hot or soft, rows on the leading axes)"
    if prior is None: u = torch.full_like(T, 1 / K)
    elif isinstance(prior, str): u = (1 - T) / (K - 1)
    elif prior.ndim == 1: u = prior.double().expand_as(T)
    else: u = T @ prior.double()
    return (1 - eps) * T + eps * u

def xent(q, lp):
    "-sum_k q_k log p_k over the last axis, a class with q_k = 0 adding 0"
    return -torch.where(q == 0, 0., q * lp).sum(-1)

def multiclass(x, target, eps=0.1, weight=None, reduction='mean', prior=None, ignore_index=-100, axis=1,
               weight_mode='sample'):
    "The multiclass label-smoothing loss in float64, from its definition (torch's conventions)"
    x = x.double()
    one = x.ndim == 1  # no batch axis, as torch's: a batch of one
    if one:
        if target.ndim == 0 or target.shape == x.shape: target = target[None]
        x, axis = x[None], 1
    axis = axis % x.ndim
    xl = x.movedim(axis, -1)
    K = xl.shape[-1]
    soft = target.dtype.is_floating_point and target.shape == x.shape
    if soft:
        T, keep = target.double().movedim(axis, -1), torch.ones(xl.shape[:-1], dtype=torch.bool)
    else:
        y = target.reshape(xl.shape[:-1]).long()
        keep = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
        T = F.one_hot(torch.where(keep, y, 0), K).double()
    xl = torch.where(keep[..., None], xl, 0.)
    lp = torch.log_softmax(xl, -1)
    w = torch.ones(K, dtype=torch.float64) if weight is None else weight.double()
    q = smoothed(T, K, eps, prior)
    w_row = (T * w).sum(-1) if weight is not None else torch.ones_like(keep, dtype=torch.float64)
    kept = keep.double()
    def reduce(rows, den):
        rows = torch.where(keep, rows, 0.)
        if reduction == 'none': return rows
        if reduction == 'sum': return rows.sum()
        d = (den * kept).sum()
        if d > 0: return rows.sum() / d
        return torch.where(rows.isfinite(), rows, 0.).sum() * 0  # nothing to average: 0 (and a graph)
    weighted = lambda rows: torch.where(w_row == 0, 0., rows * w_row)  # a row of weight 0 adds 0, always
    if weight is None or weight_mode == 'sample': out = reduce(weighted(xent(q, lp)), w_row)
    elif weight_mode == 'torch': out = reduce(xent(w * q, lp), kept if soft else w_row)
    else:  # 'fastai': the class weights on the NLL term only
        nll = reduce(weighted(xent(T, lp)), w_row) if eps < 1 else 0.
        smooth = reduce(xent(smoothed(T, K, 1., prior), lp), kept) if eps > 0 else 0.
        out = (1 - eps) * nll + eps * smooth
    return out[0] if one and reduction == 'none' else out

def multilabel(x, target, eps=0.1, weight=None, reduction='mean', pos_weight=None, prior=None, ignore_index=None,
               dtype=torch.float64, compute=torch.float64):
    "The multi-label loss: torch's BCE with logits on y' = (1-eps) y + eps u, in float64 (each label's in `dtype`)"
    x, y = x.to(compute), target.double()
    if ignore_index is None: keep = torch.ones_like(y, dtype=torch.bool)
    elif math.isnan(ignore_index): keep = ~y.isnan()
    else: keep = y != ignore_index
    y = torch.where(keep, y, 0.)
    x = torch.where(keep, x, 0.)
    def per_label(v, default):
        v = torch.as_tensor(default if v is None else v).double()
        return v.view(-1, *[1] * (x.ndim - 2)) if v.ndim == 1 and x.ndim > 2 else v
    u, w, pw = per_label(prior, .5), per_label(weight, 1.), per_label(pos_weight, 1.)
    t = (1 - eps) * y + eps * u
    t, w, pw = t.to(compute), w.expand_as(x).to(compute), pw.to(compute)
    loss = F.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, reduction='none').double()
    loss = torch.where(keep, loss, 0.)  # torch's loss on y', in float64: its answer at +-inf too
    loss = loss.to(dtype).double()  # each label's loss rounded to `dtype`, as torch's (inf past its range)
    if reduction == 'none': return loss
    total = loss.to(dtype).sum().double()  # summed in `dtype`, as torch's (inf past its range)
    return total if reduction == 'sum' else total / keep.sum().clamp_min(1)
