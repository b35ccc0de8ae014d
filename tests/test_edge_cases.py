"""Property tests that hunt for wrong numbers at the edges: both paths (dense and fused) against a float64 reference on
random shapes, dtypes, layouts and options (priors: uniform, 'others', vectors and K x K matrices, dense or with zeros;
the fused path's blocks: one or many), with logits far from 0, masked (-inf) classes and padding (-inf, NaN in
ignored positions); shift invariance; eps=0 is torch's cross-entropy; torch.compile(fullgraph=True)."""
import pytest, torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

import label_smoothing_fa.losses as L
from label_smoothing_fa.losses import label_smoothing_cross_entropy, reference_label_smoothing_cross_entropy

INF, NAN = float('inf'), float('nan')

def run(path, x, target, block=None, **kw):
    "Loss and input gradient on one path: 'fused' (whatever the size, `block` logits a block) or 'dense'"
    old, L._DENSE_BELOW = L._DENSE_BELOW, (0 if path == 'fused' else 1 << 62)
    old_block, L._BLOCK = L._BLOCK, block or L._BLOCK
    try:
        x = x.detach().clone().requires_grad_()
        out = label_smoothing_cross_entropy(x, target, **kw)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape) if out.ndim else torch.ones(())
        (out * g).sum().backward()
        return out.detach(), x.grad
    finally: L._DENSE_BELOW, L._BLOCK = old, old_block

def reference(x, target, **kw):
    "The reference formula in float64, loss and gradient"
    x = x.detach().double().requires_grad_()
    tgt = target.double() if target.dtype.is_floating_point else target
    out = reference_label_smoothing_cross_entropy(x, tgt, **kw)
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape) if out.ndim else torch.ones(())
    (out * g).sum().backward()
    return out.detach(), x.grad

def magnitude(t): return t.abs().nan_to_num(0, 0, 0).amax().item() if t.numel() else 0.

def assert_close(a, b, rtol, atol):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)

@st.composite
def problems(draw):
    "Logits, targets and options; logits scaled, offset, and with non-finite values where the answer is defined"
    K = draw(st.integers(1, 7))
    rows = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    axis = draw(st.integers(0, len(rows)))
    shape = rows[:axis] + [K] + rows[axis:]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    scale = draw(st.sampled_from([0.01, 1., 10., 100.]))
    offset = draw(st.sampled_from([0., 1e3, -1e3, 1e4, -1e4])) if dtype in (torch.float32, torch.float64) else 0.
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    kind = draw(st.sampled_from(['index', 'ignore', 'soft']))
    eps = draw(st.sampled_from([0., 0.1, 0.5, 1.])) if draw(st.booleans()) else draw(st.floats(0, 1))
    prior = draw(st.sampled_from(['none', 'others', 'tensor', 'sparse', 'matrix', 'sparse matrix'])) if K > 1 else \
        draw(st.sampled_from(['none', 'matrix']))
    if 'matrix' in prior:  # a K x K prior: row y for target y
        u = torch.softmax(torch.randn(K, K, generator=g, dtype=torch.float64) * 2, 1)
        if prior == 'sparse matrix':  # zeros in every row but the diagonal, where -inf logits stay finite
            u = torch.where((torch.rand(K, K, generator=g) < 0.5) | torch.eye(K, dtype=torch.bool), u, 0.)
    else: u = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    if prior == 'sparse': u = torch.where(torch.arange(K) % 2 == 0, u, 0.)
    u = u / u.sum(-1, keepdim=True)
    prior = {'none': None, 'others': 'others'}.get(prior, u)
    rshape = rows[:axis] + rows[axis:]
    if kind == 'soft':
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 3, axis)
    else:
        target = torch.randint(0, K, rshape, generator=g)
        if kind == 'ignore': target = torch.where(torch.rand(rshape, generator=g) < 0.4, -100, target)
    inject = draw(st.sampled_from(['none', 'none', 'padding', 'masked']))
    xm = x.movedim(axis, -1).clone()
    if inject == 'padding' and kind == 'ignore':  # ignored positions' logits: -inf, NaN or huge
        pad = draw(st.sampled_from([-INF, NAN, 3e38]))
        xm[target == -100] = pad
    if inject == 'masked' and kind != 'soft':  # -inf where the smoothed target is 0
        target_mass = F.one_hot(torch.where(target == -100, 0, target), K).bool()
        prior_mass = torch.zeros(K, dtype=torch.bool) if eps == 0 else \
            torch.ones(K, dtype=torch.bool) if prior is None else \
            (torch.ones(K, dtype=torch.bool) if isinstance(prior, str) else prior > 0)
        if prior_mass.ndim == 2: prior_mass = prior_mass[torch.where(target == -100, 0, target)]  # row y's
        if prior == 'others': target_mass = target_mass | True  # 'others' puts mass on every class but one
        masked = ~(target_mass | prior_mass) & (torch.rand(xm.shape, generator=g) < 0.5)
        xm[masked] = -INF
    x = xm.movedim(-1, axis)
    weight = None
    if draw(st.booleans()):
        weight = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
        half = dtype in (torch.float16, torch.bfloat16)  # whose gradients overflow at 65504 (float16)
        weight = weight * draw(st.sampled_from([1., 1e-30] if half else [1., 1e-30, 1e20]))
    block = draw(st.sampled_from([None, None, 1, 8]))  # the fused path's blocks: one or many
    return x, target, dict(eps=eps, weight=weight, prior=prior, axis=axis, block=block,
                           reduction=draw(st.sampled_from(['mean', 'sum', 'none'])),
                           weight_mode=draw(st.sampled_from(['sample', 'torch', 'fastai'])))

def tolerances(x, ref):
    "Float32 (or the half types' float32) rounding of the loss; float64 input: much tighter"
    rtol = 1e-12 if x.dtype == torch.float64 else 2e-5
    return rtol, rtol * (1 + magnitude(ref))

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(['fused', 'dense']))
def test_both_paths_match_float64_reference(problem, path):
    x, target, kw = problem
    xr = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # half types compute in float32
    block = kw.pop('block')
    ref, g_ref = reference(xr, target, **kw)
    ours, g_ours = run(path, x, target, block, **kw)
    rtol, atol = tolerances(x, ref)
    assert_close(ours, ref, rtol, atol)
    # a gradient A p - B rounds like its terms, as large as the weights ('sum', 'none': not normalised)
    w_scale = 1. if kw['weight'] is None or kw['reduction'] == 'mean' else kw['weight'].max().item()
    g_atol = rtol * (1 + magnitude(g_ref) + w_scale)
    assert_close(g_ours, g_ref.to(g_ours.dtype), 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else rtol,
                 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else max(atol, g_atol))
    assert torch.isfinite(g_ours).all()  # every case drawn has a finite gradient (masked and padded included)

@settings(max_examples=100, deadline=None)
@given(problems(), st.sampled_from(['fused', 'dense']), st.sampled_from([1., -7.5, 1e3, -1e4]))
def test_shift_invariance(problem, path, c):
    "L(x + c) = L(x): adding a constant to every logit of a row changes nothing"
    x, target, kw = problem
    if x.dtype != torch.float64: x = x.double()  # exact shifts
    a, ga = run(path, x, target, **kw)
    b, gb = run(path, x + c, target, **kw)
    assert_close(a, b, 1e-9, 1e-9 * (1 + magnitude(a)))
    assert_close(ga, gb, 1e-9, 1e-9)

@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 400), st.sampled_from([0., 10., 1e3, -1e4]), st.integers(0, 2**16),
       st.sampled_from(['mean', 'sum', 'none']), st.sampled_from(['fused', 'dense']))
def test_eps_zero_is_torch_cross_entropy(n, k, offset, seed, reduction, path):
    "At eps=0 both paths give torch's F.cross_entropy, in float64, masked classes included"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * 5 + offset
    y = torch.randint(0, k, (n,), generator=g)
    x[torch.rand(n, k, generator=g) < 0.2] = -INF
    x[torch.arange(n), y] = offset  # the target classes stay finite
    ours, g_ours = run(path, x, y, eps=0., reduction=reduction)
    xt = x.clone().requires_grad_()
    ref = F.cross_entropy(xt, y, reduction=reduction)
    (ref * (torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).reshape(ref.shape) if ref.ndim else 1)).sum().backward()
    assert_close(ours, ref.detach(), 1e-12, 1e-12 * (1 + abs(offset)))
    assert_close(g_ours, xt.grad, 1e-12, 1e-12)

@pytest.mark.parametrize('shape', [(16, 10), (300, 300), (2, 5, 40, 41)])
def test_compile_fullgraph_matches_eager(shape):
    "torch.compile with the default backend, fullgraph: values and gradients of eager, on both paths"
    torch.manual_seed(0)
    axis = 1
    x = torch.randn(shape) * 3
    y = torch.randint(0, shape[axis], shape[:axis] + shape[axis + 1:])
    y.view(-1)[0] = -100
    compiled = torch.compile(lambda x, y: label_smoothing_cross_entropy(x, y, 0.1, axis=axis), fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    l1, l2 = compiled(x1, y), label_smoothing_cross_entropy(x2, y, 0.1, axis=axis)
    l1.backward(); l2.backward()
    assert_close(l1, l2, 1e-5, 1e-6); assert_close(x1.grad, x2.grad, 1e-5, 1e-8)

def test_logits_spanning_float32_range_give_inf_not_nan():
    "Regression: a target logit near -3e38 beside one near 3e38 gave NaN on the fused path (inf - inf)"
    x = torch.tensor([[-3e38, -3e38, 1e38, 3e38, 2e38]])
    for prior in [None, torch.tensor([.1, .2, .3, .2, .2]), torch.full((5, 5), .2)]:
        for path in ['fused', 'dense']:
            loss, grad = run(path, x, torch.tensor([0]), prior=prior, reduction='none')
            assert loss.item() == INF  # the loss, about 5.6e38, overflows float32
            assert torch.isfinite(grad).all()

@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([1e30, 1e38, 3.4e38]), st.integers(1, 6),
       st.sampled_from([None, 'others', 'tensor', 'matrix']), st.sampled_from([0, 1]), st.booleans(),
       st.sampled_from(['fused', 'dense']), st.sampled_from(['sample', 'torch', 'fastai']), st.booleans())
def test_huge_finite_logits_never_nan(seed, scale, K, prior, axis, soft, path, weight_mode, weighted):
    "Finite float32 logits as large as float32 allows: NaN only where the float64 answer is NaN"
    g = torch.Generator().manual_seed(seed)
    x = ((torch.rand(4, K, generator=g, dtype=torch.float64) * 2 - 1) * scale).float()
    if axis == 0: x = x.T.contiguous()
    target = torch.softmax(torch.randn(x.shape, generator=g), axis) if soft else torch.randint(0, K, (4,), generator=g)
    if prior == 'others' and K < 2: prior = None
    prior = {'tensor': torch.softmax(torch.randn(K, generator=g), 0),
             'matrix': torch.softmax(torch.randn(K, K, generator=g), 1)}.get(prior, prior)
    kw = dict(prior=prior, axis=axis, reduction='none', weight_mode=weight_mode,
              weight=torch.rand(K, generator=g) if weighted else None)
    loss, grad = run(path, x, target, **kw)
    ref, g_ref = reference(x.double(), target, **kw)
    assert not (loss.isnan() & ~ref.isnan()).any(), (loss, ref)
    assert not (grad.isnan() & ~g_ref.isnan()).any(), (grad, g_ref)
    small = ref.abs() < 1e30  # no overflow on the way: the float32 answer
    assert_close(loss[small], ref[small], 2e-5, 2e-5 * (1 + magnitude(ref[small])))

def test_dense_path_exact_across_float32_range():
    "Small inputs: logits spanning more than float32's range give the float64 loss, not inf"
    x = torch.tensor([[-3e38, -3e38, 1e38, 3e38, 2e38], [3e38, -3e38, 0., 0., 0.]])
    y = torch.tensor([3, 0])
    for prior in (None, 'others', torch.tensor([.1, .2, .3, .2, .2])):
        got = label_smoothing_cross_entropy(x, y, reduction='none', prior=prior)
        want = reference_label_smoothing_cross_entropy(x.double(), y, reduction='none', prior=prior)
        assert torch.isfinite(want).all() and torch.allclose(got.double(), want, rtol=1e-6)
