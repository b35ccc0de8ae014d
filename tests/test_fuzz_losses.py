"""Property tests (hypothesis) of every public function and class of `losses` and `multilabel` against the float64
oracles of tests/oracles.py, on both paths (`backend='dense'` and `'fused'`), with the extremes among the strategies:
+-inf, NaN and +-3e38 logits, eps in {0, 1, (K-1)/K}, class weights at 1e-40 and 1e40, empty and 1-D inputs,
half-precision logits and autocast (issue 15, "Also")."""
from contextlib import nullcontext
import pytest, torch
from hypothesis import HealthCheck, given, settings, strategies as st

from label_smoothing_fa.losses import (LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat,
                                       label_smoothing_cross_entropy, reference_label_smoothing_cross_entropy,
                                       smooth_targets)
from label_smoothing_fa.multilabel import (LabelSmoothingBCEWithLogits, LabelSmoothingBCEWithLogitsFlat,
                                           label_smoothing_bce_with_logits, reference_label_smoothing_bce,
                                           smooth_multilabel_targets)
from oracles import multiclass, multilabel, smoothed

INF, NAN = float('inf'), float('nan')
EXTREMES = [INF, -INF, NAN, 3e38, -3e38]
def fuzz(n): return settings(max_examples=n, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

def close(ours, ref, dtype, logits=None):
    "`ours` against the float64 answer rounded to the loss's dtype: NaN and inf where it has them, else close"
    ref = ref.to(ours.dtype).double()
    tol = {torch.float64: 1e-9}.get(dtype, 2e-5)
    scale = ref.abs().nan_to_num(0, 0, 0).amax().item() if ref.numel() else 0.
    ulps = 0. if logits is None or not logits.isfinite().any() else logits[logits.isfinite()].abs().amax().item()
    ulps = 8 * torch.finfo(ours.dtype).eps * (1 + min(ulps, 1e30))  # the rounding of a log-sum-exp
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * scale + ulps, equal_nan=True)

@st.composite
def multiclass_problems(draw):
    "Logits (extremes injected), targets, options: everything `label_smoothing_cross_entropy` takes"
    K = draw(st.integers(1, 6))
    rows = draw(st.sampled_from([[], [0], [1], [3], [2, 3], [4]]))  # [] : a 1-D input; [0]: an empty batch
    axis = draw(st.integers(0, len(rows))) if rows else draw(st.sampled_from([0, 1, -1]))
    shape = rows[:axis] + [K] + rows[axis:] if rows else [K]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1., 10.]))
    n_bad = draw(st.integers(0, 2)) if x.numel() else 0
    for _ in range(n_bad): x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(EXTREMES))
    if draw(st.booleans()) and x.numel(): x.fill_(draw(st.sampled_from([3e38, -3e38])))
    x = x.to(dtype)
    cls = axis % len(shape)
    rshape = shape[:cls] + shape[cls + 1:]
    kind = draw(st.sampled_from(['index', 'ignore', 'soft']))
    if kind == 'soft':
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 3, cls)
        if draw(st.booleans()):  # zeros where a -inf logit adds nothing
            t = torch.where(torch.rand(shape, generator=g) < .4, 0., t) + (torch.arange(K) == 0).view(
                [-1 if d == cls else 1 for d in range(len(shape))]) * 1e-3
            t = t / t.sum(cls, keepdim=True)
        target = t.float() if dtype != torch.float64 else t
    else:
        target = torch.randint(0, K, rshape, generator=g)
        if kind == 'ignore': target = torch.where(torch.rand(rshape, generator=g) < .4, -100, target)
    eps = draw(st.sampled_from([0., 1., (K - 1) / K, 0.1]) | st.floats(1e-30, 1))  # (eps in the logits' dtype)
    priors = ['none', 'vector', 'sparse', 'matrix'] + (['others'] if K > 1 else [])
    prior = draw(st.sampled_from(priors))
    if prior in ('vector', 'sparse'):
        u = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
        if prior == 'sparse': u = torch.where(torch.arange(K) % 2 == 0, u, 0.); u = u / u.sum()
        prior = u.float()
    elif prior == 'matrix': prior = torch.softmax(torch.randn(K, K, generator=g, dtype=torch.float64) * 2, 1).float()
    else: prior = {'none': None, 'others': 'others'}[prior]
    weight = None
    if draw(st.booleans()):
        weight = (torch.rand(K, generator=g, dtype=torch.float64) + .05) * draw(st.sampled_from([1., 1e-40, 1e40]))
        if draw(st.booleans()): weight[0] = 0.
    kw = dict(eps=eps, weight=weight, prior=prior, axis=axis, reduction=draw(st.sampled_from(['mean', 'sum', 'none'])),
              weight_mode=draw(st.sampled_from(['sample', 'torch', 'fastai'])))
    return x, target, kw, draw(st.sampled_from([None, None, torch.bfloat16]))

def _weights_in_range(kw, target):
    "Whether the oracle's number is the loss's: weights out of float32's range only in the scale-free modes"
    w = kw['weight']
    if w is None or w.amax() == 0 or 1e-30 < w.amax() < 1e30: return True
    soft = target.dtype.is_floating_point and kw['weight_mode'] == 'torch'
    return kw['reduction'] == 'mean' and not soft

@fuzz(600)
@given(multiclass_problems(), st.sampled_from(['dense', 'fused']))
def test_function_against_float64(problem, path):
    "`label_smoothing_cross_entropy`: loss against the float64 oracle, gradient where the answer is finite"
    x, target, kw, autocast = problem
    if not _weights_in_range(kw, target): kw['weight'] = kw['weight'] / kw['weight'].amax()
    ref = multiclass(x.double(), target, **kw)
    xi = x.detach().clone().requires_grad_()
    with torch.autocast('cpu', dtype=autocast) if autocast else nullcontext():
        ours = label_smoothing_cross_entropy(xi, target, backend=path, **kw)
    assert ours.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert ours.shape == ref.shape
    close(ours, ref, x.dtype, x.double())
    if ref.isfinite().all() and x.dtype != torch.bfloat16:
        g = torch.linspace(-1, 1, ours.numel(), dtype=torch.float64).reshape(ours.shape)
        (ours.double() * g).sum().backward()
        xr = x.detach().double().clone().requires_grad_()
        (multiclass(xr, target, **kw) * g).sum().backward()
        if xr.grad.isfinite().all():
            torch.testing.assert_close(xi.grad.double(), xr.grad.to(x.dtype).double(), rtol=1e-4,
                                       atol=1e-5 if x.dtype == torch.float32 else 1e-9)

@fuzz(150)
@given(multiclass_problems(), st.sampled_from(['dense', 'fused']))
def test_modules_are_the_function(problem, path):
    "`LabelSmoothingCrossEntropy` is the function with its arguments; `...Flat` the mean (per item for 'none')"
    x, target, kw, _ = problem
    kw = {**kw, 'ignore_index': -100, 'backend': path}
    args = {k: kw[k] for k in ('eps', 'weight', 'reduction')}
    rest = {k: kw[k] for k in ('prior', 'ignore_index', 'axis', 'weight_mode', 'backend')}
    try: ref = label_smoothing_cross_entropy(x, target, **kw)
    except ValueError: return  # weights 1e40 cast to float32 in a mode that is not scale-free: refused alike
    torch.testing.assert_close(LabelSmoothingCrossEntropy(*args.values(), **rest)(x, target), ref, equal_nan=True)
    flat = LabelSmoothingCrossEntropyFlat(*args.values(), **rest)(x, target)
    if kw['reduction'] != 'none' or ref.ndim <= 1: torch.testing.assert_close(flat, ref, equal_nan=True)
    else: assert flat.shape == ref.shape[:1]

@fuzz(150)
@given(multiclass_problems())
def test_reference_and_smooth_targets_against_float64(problem):
    "`reference_label_smoothing_cross_entropy` (float64 input) and `smooth_targets` against the oracle"
    x, target, kw, _ = problem
    x = x.double()
    if not _weights_in_range(kw, target): return
    tgt = target.double() if target.dtype.is_floating_point else target
    close(reference_label_smoothing_cross_entropy(x, tgt, **kw), multiclass(x, tgt, **kw), torch.float64)
    K = x.shape[kw['axis'] % x.ndim]
    if tgt.dtype.is_floating_point: T = tgt.movedim(kw['axis'] % x.ndim, -1)
    else: T = torch.nn.functional.one_hot(tgt.clamp_min(0), K).double(); tgt = tgt.clamp_min(0)
    prior = kw['prior'].double() if isinstance(kw['prior'], torch.Tensor) else kw['prior']
    ours = smooth_targets(T if tgt.dtype.is_floating_point else tgt, K, kw['eps'], prior)
    torch.testing.assert_close(ours.double(), smoothed(T, K, kw['eps'], prior), rtol=1e-6, atol=1e-7)
    if ours.numel(): assert (ours >= 0).all()

@st.composite
def multilabel_problems(draw):
    "Logits (extremes injected), labels in [0, 1] (some ignored: -1 or NaN), options of the multi-label loss"
    shape = draw(st.sampled_from([[4], [0, 3], [3, 4], [2, 3, 2, 2], [1, 1]]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1., 20.]))
    for _ in range(draw(st.integers(0, 2)) if x.numel() else 0):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(EXTREMES))
    x = x.to(dtype)
    kind = draw(st.sampled_from(['hard', 'soft', 'bool', 'long']))
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    y = y if kind == 'soft' else (y > .5).double()
    ignore = draw(st.sampled_from([None, -1., NAN]))
    if ignore is not None and kind in ('hard', 'soft'):
        y = torch.where(torch.rand(shape, generator=g) < .3, ignore, y)
    target = {'bool': y.bool(), 'long': y.long()}.get(kind, y.to(dtype if dtype != torch.bfloat16 else torch.float32))
    K = shape[1] if len(shape) > 1 else shape[0]
    def per_label(low):
        v = torch.rand(K, generator=g, dtype=torch.float64) + low
        return v if draw(st.booleans()) else None
    weight, pos_weight, prior = per_label(.05), per_label(.5), per_label(0.)
    if prior is not None: prior = prior.clamp(0, 1)
    if weight is not None: weight = weight * draw(st.sampled_from([1., 1e-40] + ([1e40] if dtype == torch.float64 else [])))
    if draw(st.booleans()) and prior is None: prior = draw(st.sampled_from([0., .25, 1.]))
    kw = dict(eps=draw(st.sampled_from([0., 1., .1]) | st.floats(0, 1)), weight=weight,
              reduction=draw(st.sampled_from(['mean', 'sum', 'none'])), pos_weight=pos_weight, prior=prior,
              ignore_index=ignore)
    return x, target, kw, draw(st.sampled_from([None, torch.bfloat16]))

@fuzz(400)
@given(multilabel_problems())
def test_multilabel_against_float64(problem):
    "`label_smoothing_bce_with_logits` and its modules against torch's loss on y' in float64; gradients too"
    x, target, kw, autocast = problem
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    # torch's loss on y' (computed in float64): in float32 it is torch's float32 steps (they overflow near
    # 3e38, and lose digits where the loss is small): the documented answer
    ref = multilabel(x.to(dt), target, **kw, dtype=dt, compute=dt)
    xi = x.detach().clone().requires_grad_()
    with torch.autocast('cpu', dtype=autocast) if autocast else nullcontext():
        ours = label_smoothing_bce_with_logits(xi, target, **kw)
    assert ours.shape == ref.shape
    close(ours, ref, x.dtype)
    args = [kw[k] for k in ('eps', 'weight', 'reduction')]
    rest = {k: kw[k] for k in ('pos_weight', 'prior', 'ignore_index')}
    torch.testing.assert_close(LabelSmoothingBCEWithLogits(*args, **rest)(x, target), ours.detach(), equal_nan=True)
    if kw['reduction'] != 'none':
        torch.testing.assert_close(LabelSmoothingBCEWithLogitsFlat(*args, **rest)(x, target), ours.detach(),
                                   equal_nan=True)
    if x.dtype != torch.bfloat16 and ref.isfinite().all():
        ours.sum().backward()
        xr = x.detach().double().clone().requires_grad_()
        multilabel(xr, target, **kw).sum().backward()
        if xr.grad.isfinite().all():
            torch.testing.assert_close(xi.grad.double(), xr.grad.to(x.dtype).double(), rtol=1e-4, atol=1e-6)

@fuzz(150)
@given(multilabel_problems())
def test_multilabel_reference_and_targets_against_float64(problem):
    "`reference_label_smoothing_bce` and `smooth_multilabel_targets` against the float64 definitions"
    x, target, kw, _ = problem
    ours = reference_label_smoothing_bce(x.double(), target, **kw)
    finite = x.isfinite().all() or not x.numel()  # at +-inf the reference is the definition's limit, not torch's
    if finite:  # torch's float64 BCE, the oracle, rounds its log-sum-exp: about eps (1 + |x|) a label, weighted
        w, pw = (1. if kw[k] is None else kw[k].double().abs().max().item() for k in ('weight', 'pos_weight'))
        n = max(1, x.numel()) if kw['reduction'] != 'mean' else 1
        slack = 8 * torch.finfo(torch.float64).eps * (1 + x.double().abs().amax().item() if x.numel() else 1)
        ref = multilabel(x.double(), target, **kw)
        scale = ref.abs().nan_to_num(0, 0, 0).amax().item() if ref.numel() else 0.
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9 * scale + slack * w * max(pw, 1.) * n,
                                   equal_nan=True)
    y = target.double()
    if y.isnan().any() or (y < 0).any():
        with pytest.raises(ValueError, match='`target`'): smooth_multilabel_targets(target, kw['eps'], kw['prior'])
        return
    u = kw['prior'] if kw['prior'] is not None else .5
    u = torch.as_tensor(u, dtype=torch.float64)
    if u.ndim == 1 and y.ndim > 2: u = u.view(-1, *[1] * (y.ndim - 2))  # per label, on axis 1
    ours = smooth_multilabel_targets(target.double() if target.dtype == torch.float64 else target, kw['eps'],
                                     kw['prior'])
    torch.testing.assert_close(ours.double(), (1 - kw['eps']) * y + kw['eps'] * u, rtol=1e-6, atol=1e-7)
