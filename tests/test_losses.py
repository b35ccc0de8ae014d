"Property tests of the loss against torch, fastai and the reference formula, and fastai integration with real Learners."
import pickle

import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastai.losses as fl
from fastai.callback.mixup import CutMix, MixUp
import fastai.callback.progress  # Learner.no_bar
from fastai.data.core import DataLoaders, Datasets
from fastai.data.transforms import Categorize, IndexSplitter, ItemGetter
from fastai.interpret import Interpretation
from fastai.learner import Learner, load_learner
from fastai.optimizer import Adam
from hypothesis import given, settings, strategies as st, HealthCheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import label_smoothing_fa.losses as L
from label_smoothing_fa.losses import (LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, label_smoothing_cross_entropy,
                                       reference_label_smoothing_cross_entropy, smooth_targets)

def close(a, b, tol=1e-5): assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol), (a, b)

@pytest.fixture(params=['fused', 'dense'])
def path(request, monkeypatch):
    "Run a test twice: fused path only, and with the dense path for small inputs"
    if request.param == 'fused': monkeypatch.setattr(L, '_DENSE_BELOW', 0)
    return request.param

def loss_and_grad(f, x, target, **kw):
    x = x.detach().clone().requires_grad_()
    out = f(x, target, **kw)
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape) if out.ndim else torch.ones(())
    (out * g).sum().backward()
    return out.detach(), x.grad

# ---- property tests over shapes, eps, priors, weights, ignore masks, reductions and dtypes ----

@st.composite
def problems(draw):
    K = draw(st.integers(2, 7))
    rows = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    axis = draw(st.integers(0, len(rows)))
    shape = rows[:axis] + [K] + rows[axis:]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1., 10.]))
    kind = draw(st.sampled_from(['index', 'ignore', 'soft']))
    if kind == 'soft': target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 3, axis)
    else:
        target = torch.randint(0, K, rows, generator=g)
        if kind == 'ignore': target = torch.where(torch.rand(rows, generator=g) < 0.4, -100, target)
    prior = draw(st.sampled_from(['none', 'others', 'tensor', 'matrix']))
    prior = {'none': None, 'others': 'others', 'tensor': torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0),
             'matrix': torch.softmax(torch.randn(K, K, generator=g, dtype=torch.float64) * 2, 1)}[prior]
    weight = draw(st.sampled_from([None, 'w']))
    weight = None if weight is None else torch.rand(K, generator=g, dtype=torch.float64) + 0.05
    return x, target, dict(eps=draw(st.floats(0, 1)), weight=weight, prior=prior, axis=axis,
                           reduction=draw(st.sampled_from(['mean', 'sum', 'none'])),
                           weight_mode=draw(st.sampled_from(['sample', 'torch', 'fastai'])))

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.booleans())
def test_fused_matches_reference(problem, fused):
    x, target, kw = problem
    ours, g_ours = loss_and_grad(label_smoothing_cross_entropy, x, target, backend='fused' if fused else 'dense', **kw)
    ref, g_ref = loss_and_grad(reference_label_smoothing_cross_entropy, x, target, **kw)
    close(ours, ref, 1e-7); close(g_ours, g_ref, 1e-7)
    assert torch.isfinite(ours).all() and torch.isfinite(g_ours).all()

@settings(max_examples=80, deadline=None)
@given(problems())
def test_matches_torch_where_the_same(problem):
    "Uniform prior, no weights or weight_mode='torch': exactly F.cross_entropy(label_smoothing=eps)"
    x, target, kw = problem
    kw.update(prior=None)
    if kw['weight'] is not None: kw['weight_mode'] = 'torch'
    if not target.dtype.is_floating_point and (target == -100).all() and kw['reduction'] == 'mean': return  # torch: 0/0
    ours, g_ours = loss_and_grad(label_smoothing_cross_entropy, x, target, **kw)
    xt, tt = x.movedim(kw['axis'], 1), (target.movedim(kw['axis'], 1) if target.dtype.is_floating_point else target)
    ref, g_ref = loss_and_grad(F.cross_entropy, xt, tt, weight=kw['weight'], reduction=kw['reduction'], label_smoothing=kw['eps'])
    close(ours, ref, 1e-7); close(g_ours, g_ref.movedim(1, kw['axis']), 1e-7)

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.booleans())
def test_matrix_priors_that_are_the_other_priors(problem, fused):
    "K x K priors: every row 1/K is None, (1 - I)/(K-1) is 'others', every row v is v; eps=0 leaves plain cross-entropy"
    x, target, kw = problem
    K = x.shape[kw['axis']]
    v = torch.softmax(torch.randn(K, dtype=torch.float64), 0)
    P = torch.softmax(torch.randn(K, K, dtype=torch.float64), 1)
    pairs = [(torch.full((K, K), 1 / K, dtype=torch.float64), None), ((1 - torch.eye(K, dtype=torch.float64)) / (K - 1), 'others'),
             (torch.ones(K, 1) * v, v)]
    kw['backend'] = 'fused' if fused else 'dense'
    for matrix, same in pairs:
        a, ga = loss_and_grad(label_smoothing_cross_entropy, x, target, **{**kw, 'prior': matrix})
        b, gb = loss_and_grad(label_smoothing_cross_entropy, x, target, **{**kw, 'prior': same})
        close(a, b, 1e-10); close(ga, gb, 1e-10)
    a, ga = loss_and_grad(label_smoothing_cross_entropy, x, target, **{**kw, 'prior': P, 'eps': 0.})
    b, gb = loss_and_grad(label_smoothing_cross_entropy, x, target, **{**kw, 'prior': None, 'eps': 0.})
    close(a, b, 1e-10); close(ga, gb, 1e-10)

def test_online_label_smoothing_is_a_matrix_prior(path):
    "alpha CE(y) + (1 - alpha) CE(P[y]), online label smoothing's loss, is ours with eps = 1 - alpha and prior = P"
    torch.manual_seed(0)
    x, y, P = torch.randn(40, 5) * 2, torch.randint(0, 5, (40,)), torch.softmax(torch.randn(5, 5) * 3, 1)
    for alpha in (0., 0.5, 0.9, 1.):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ols = alpha * F.cross_entropy(xs[0], y) - (1 - alpha) * (P[y] * F.log_softmax(xs[0], 1)).sum(1).mean()
        ours = label_smoothing_cross_entropy(xs[1], y, 1 - alpha, prior=P)
        ols.backward(); ours.backward()
        close(ours, ols); close(xs[1].grad, xs[0].grad, 1e-6)

@pytest.mark.parametrize('shape, axis', [((600, 500), 1), ((3, 200, 500), -1), ((2, 5, 200, 300), 1)])
def test_matrix_prior_over_several_blocks(shape, axis, path):
    "Inputs larger than a block: loss and gradient of a K x K prior (with zeros) against the float64 reference"
    torch.manual_seed(0)
    K = shape[axis]
    P = torch.softmax(torch.randn(K, K) * 3, 1) * (torch.rand(K, K) < 0.5) + torch.eye(K) * 0.01
    P = P / P.sum(1, keepdim=True)
    x = torch.randn(shape) * 3
    y = torch.randint(0, K, shape[:axis % len(shape)] + shape[axis % len(shape) + 1:])
    y.view(-1)[:7] = -100
    soft = torch.softmax(torch.randn(shape) * 2, axis)
    w = torch.rand(K) + 0.1
    for target, kw in ((y, {}), (soft, {}), (y, dict(weight=w, weight_mode='torch')), (soft, dict(weight=w, weight_mode='fastai'))):
        ours, g_ours = loss_and_grad(label_smoothing_cross_entropy, x, target, eps=0.3, prior=P, axis=axis, **kw)
        tgt = target.double() if target.dtype.is_floating_point else target
        kw = {k: (t.double() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
        ref, g_ref = loss_and_grad(reference_label_smoothing_cross_entropy, x.double(), tgt, eps=0.3, prior=P.double(), axis=axis, **kw)
        close(ours, ref, 1e-5); close(g_ours, g_ref, 1e-7)

class _FullSizeAllocations(TorchDispatchMode):
    "Records the operations whose outputs are new tensors of at least `n` elements"
    def __init__(self, n): super().__init__(); self.n, self.ops = n, []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.n and t.untyped_storage().data_ptr() not in inputs:
                self.ops.append(func.__name__)
        return out

@pytest.mark.parametrize('shape', [(4096, 64), (4, 64, 32, 32)])
def test_matrix_prior_allocates_no_n_by_k_prior(shape, monkeypatch):
    "Fused forward and backward: a K x K prior allocates no more N x K tensors than a vector prior does"
    monkeypatch.setattr(L, '_BLOCK', 1 << 12)  # many blocks, each small
    torch.manual_seed(0)
    K, x = shape[1], torch.randn(shape)
    u, P = torch.softmax(torch.randn(K), 0), torch.softmax(torch.randn(K, K), 1)
    for target in (torch.randint(0, K, shape[:1] + shape[2:]), torch.softmax(torch.randn(shape), 1)):
        counts = []
        for prior in (u, P):
            xi = x.clone().requires_grad_()
            with _FullSizeAllocations(x.numel() // 2) as mode:
                label_smoothing_cross_entropy(xi, target, 0.2, prior=prior, backend='fused').backward()
            counts.append(len(mode.ops))
        assert 1 <= counts[1] <= counts[0], counts  # the softmax buffer at least; the prior adds none

def test_matrix_prior_gradient():
    "A K x K prior that requires grad gets the reference's gradient, for index and soft targets and every weight mode"
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64)
    y, soft = torch.tensor([0, 3, -100, 1, 2, 2, 0]), torch.softmax(torch.randn(7, 4, dtype=torch.float64), 1)
    P, w = torch.softmax(torch.randn(4, 4, dtype=torch.float64), 1), torch.rand(4, dtype=torch.float64) + 0.1
    for target in (y, soft):
        for mode in ('sample', 'torch', 'fastai'):
            grads = []
            for f in (label_smoothing_cross_entropy, reference_label_smoothing_cross_entropy):
                Pi = P.clone().requires_grad_()
                f(x, target, 0.3, w, prior=Pi, weight_mode=mode).backward()
                grads.append(Pi.grad)
            close(grads[0], grads[1], 1e-12)

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(2, 50), st.floats(0, 1), st.sampled_from(['mean', 'sum', 'none']),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2**16))
def test_matches_fastai(n, k, eps, reduction, dtype, seed):
    "Same numbers as fastai's LabelSmoothingCrossEntropy (computed in float32), weights in 'fastai' mode"
    g = torch.Generator().manual_seed(seed)
    x, y, w = torch.randn(n, k, generator=g) * 4, torch.randint(0, k, (n,), generator=g), torch.rand(k, generator=g) + 0.1
    xh = x.to(dtype)
    for weight, mode in ((None, 'sample'), (w, 'fastai')):
        ours, g_ours = loss_and_grad(LabelSmoothingCrossEntropy(eps, weight, reduction, weight_mode=mode), xh, y)
        ref, g_ref = loss_and_grad(fl.LabelSmoothingCrossEntropy(eps, weight, reduction), xh.float(), y)
        assert ours.dtype == torch.float32 and g_ours.dtype == dtype
        close(ours, ref, 1e-4); close(g_ours.float(), g_ref.to(dtype).float(), 1e-2 if dtype != torch.float32 else 1e-6)

@pytest.mark.parametrize('shape', [(300, 10), (64, 2000), (4, 7, 33), (2, 5, 40, 41)])
def test_large_inputs_fused_vs_torch(shape, path):
    "Above the dispatch threshold too: loss and gradient equal torch's built-in to float32 rounding"
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    y = torch.randint(0, shape[1], shape[:1] + shape[2:])
    y[0] = -100
    ours, g_ours = loss_and_grad(label_smoothing_cross_entropy, x, y, eps=0.2)
    ref, g_ref = loss_and_grad(F.cross_entropy, x, y, label_smoothing=0.2)
    close(ours, ref, 1e-5); close(g_ours, g_ref, 1e-7)

def test_smoothing_extremes(path):
    torch.manual_seed(0)
    x, y = torch.randn(50, 6), torch.randint(0, 6, (50,))
    close(label_smoothing_cross_entropy(x, y, 0.), F.cross_entropy(x, y))
    close(label_smoothing_cross_entropy(x, y, 1.), -F.log_softmax(x, 1).mean())
    close(label_smoothing_cross_entropy(x, y, 0.3, prior='others'), (-(smooth_targets(y, 6, 0.3, 'others') * F.log_softmax(x, 1)).sum(1)).mean())

def test_hand_computed():
    "Two classes, logits [4.2, -2.4], label 0, eps 0.1: q' = [0.95, 0.05]; loss = 0.95*0.0013595 + 0.05*6.6013595"
    x = torch.tensor([[4.2, -2.4]])
    lse = torch.logsumexp(x, 1).item()
    assert abs(lse - 4.2013595) < 1e-6
    close(label_smoothing_cross_entropy(x, torch.tensor([0]), 0.1), torch.tensor(0.95 * (lse - 4.2) + 0.05 * (lse + 2.4)))
    close(label_smoothing_cross_entropy(x, torch.tensor([0]), 0.1), torch.tensor(0.3313595), 1e-6)

def test_weight_modes_optimum():
    "'sample' keeps the optimum at p = q'; 'torch' moves it to p ∝ w∘q'"
    w, y = torch.tensor([1., 4., 1.]), torch.tensor([0])
    q = smooth_targets(y, 3, 0.3)[0]
    for mode, target in (('sample', q), ('torch', w * q / (w * q).sum()), ('fastai', None)):
        x = torch.zeros(1, 3, requires_grad=True)
        opt = torch.optim.LBFGS([x], max_iter=200, line_search_fn='strong_wolfe')
        def closure():
            opt.zero_grad(); l = label_smoothing_cross_entropy(x, y, 0.3, w, 'sum', weight_mode=mode); l.backward(); return l
        opt.step(closure)
        p = x.detach().softmax(1)[0]
        if target is None: target = ((1 - 0.3) * w[0] * F.one_hot(y, 3)[0] + 0.3 / 3) / ((1 - 0.3) * w[0] + 0.3)
        close(p, target, 1e-4)

def test_all_ignored_is_zero(path):
    x = torch.randn(4, 3, requires_grad=True)
    for red in ('mean', 'sum'):
        for w, mode in ((None, 'sample'), (torch.ones(3), 'torch'), (torch.ones(3), 'fastai')):
            loss = label_smoothing_cross_entropy(x, torch.full((4,), -100), weight=w, reduction=red, weight_mode=mode)
            loss.backward()
            assert loss.item() == 0 and x.grad.abs().sum() == 0
            x.grad = None

@pytest.mark.parametrize('bad, match', [
    (dict(eps=1.1), '`eps` must be in'), (dict(eps=-0.01), '`eps` must be in'),
    (dict(prior=torch.tensor([.5, .5])), '`prior` has 2 values'), (dict(prior=torch.tensor([.5, .6, -.1])), '`prior` must be finite and non-negative'),
    (dict(prior=torch.tensor([.5, .2, .2])), '`prior` must sum to 1'), (dict(prior='rest'), '`prior` must be None'),
    (dict(prior=torch.ones(3, 2) / 2), r'must be square, .* got shape \(3, 2\)'), (dict(prior=torch.eye(2)), '`prior` is 2 x 2 but the input has 3'),
    (dict(prior=torch.tensor([[1., 0, 0], [0, .5, .4], [0, 0, 1]])), 'row 1 sums to 0.900000'),
    (dict(prior=torch.tensor([[1., 0, 0], [0, 1, 0], [0, float('inf'), 1]])), 'got inf in row 2, column 1'),
    (dict(prior=torch.ones(3, 3, 3) / 3), 'or a K x K matrix of them'),
    (dict(weight=torch.ones(4)), '`weight` has 4 values'), (dict(weight=torch.tensor([1., -1., 1.])), '`weight` must be finite'),
    (dict(weight=torch.ones(3, 1)), '`weight` must be a 1-D'),
    (dict(reduction='avg'), '`reduction` must be one of'), (dict(weight_mode='keras'), '`weight_mode` must be one of')])
def test_bad_arguments(bad, match, path):
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=match): label_smoothing_cross_entropy(x, y, **bad)
    if set(bad) <= {'eps', 'prior', 'weight', 'reduction', 'weight_mode'} and 'prior' not in bad and 'weight' not in bad:
        with pytest.raises(ValueError, match=match): LabelSmoothingCrossEntropy(**bad)

@pytest.mark.parametrize('target, match', [
    (torch.tensor([0, 1, 3, 0, 1]), r'outside \[0, 3\)'), (torch.tensor([0, 1, -1, 0, 1]), r'outside \[0, 3\)'),
    (torch.zeros(5, 2).long(), '`target` must be class indices of shape'), (torch.zeros(4).long(), '`target` must be class indices of shape'),
    (torch.full((5, 3), 0.5), 'must sum to 1'), (torch.tensor([[1.5, -.5, 0.]] * 5), 'negative'),
    (torch.tensor([0., 1., 2.5, 0., 1.]), 'whole numbers')])
def test_bad_targets(target, match, path):
    with pytest.raises(ValueError, match=match): label_smoothing_cross_entropy(torch.randn(5, 3), target)

def test_soft_target_gradient_flows():
    "Soft targets that require grad (distillation) get their gradient from the plain formula"
    x, t = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1).requires_grad_()
    label_smoothing_cross_entropy(x, t).backward()
    t2 = t.detach().clone().requires_grad_()
    F.cross_entropy(x, t2, label_smoothing=0.1).backward()
    close(t.grad, t2.grad)

def test_double_backward_recomputes():
    x = torch.randn(300, 300, requires_grad=True)
    y = torch.randint(0, 300, (300,))
    loss = label_smoothing_cross_entropy(x, y)
    g1, = torch.autograd.grad(loss, x, retain_graph=True)
    g2, = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)

def test_module_attributes_and_buffers():
    w, u = torch.tensor([1., 2., 3.]), torch.tensor([.2, .3, .5])
    lf = LabelSmoothingCrossEntropy(0.2, w, 'sum', prior=u, axis=1)
    assert lf.y_int and lf.eps == 0.2 and lf.reduction == 'sum' and set(lf.state_dict()) == {'weight', 'prior'}
    lf.to('meta')
    assert lf.weight.device.type == 'meta' and lf.prior.device.type == 'meta'
    flat = LabelSmoothingCrossEntropyFlat(0.2, w, axis=1)
    flat.to('meta')
    assert flat.func.weight.device.type == 'meta'
    lf2 = pickle.loads(pickle.dumps(LabelSmoothingCrossEntropy(0.2, w, prior='others')))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    close(lf2(x, y), label_smoothing_cross_entropy(x, y, 0.2, w, prior='others'))
    flat2 = pickle.loads(pickle.dumps(LabelSmoothingCrossEntropyFlat(0.2)))
    close(flat2(x, y), label_smoothing_cross_entropy(x, y, 0.2))
    P = torch.softmax(torch.randn(3, 3), 1)
    lf3 = pickle.loads(pickle.dumps(LabelSmoothingCrossEntropy(0.2, w, prior=P, weight_mode='torch')))
    assert set(lf3.state_dict()) == {'weight', 'prior'} and 'prior=tensor(3 x 3)' in repr(lf3)
    close(lf3(x, y), label_smoothing_cross_entropy(x, y, 0.2, w, prior=P, weight_mode='torch'))
    assert lf3.to('meta').prior.device.type == 'meta'

def test_flat_matches_fastai_flat():
    torch.manual_seed(0)
    xs, ys = torch.randn(3, 9, 6), torch.randint(0, 6, (3, 9))
    for red in ('mean', 'sum'):
        close(LabelSmoothingCrossEntropyFlat(0.1, reduction=red)(xs, ys), fl.LabelSmoothingCrossEntropyFlat(0.1, reduction=red)(xs, ys))
    x4, y4 = torch.randn(2, 6, 5, 7), torch.randint(0, 6, (2, 5, 7))
    close(LabelSmoothingCrossEntropyFlat(0.1, axis=1)(x4, y4), fl.LabelSmoothingCrossEntropyFlat(0.1, axis=1)(x4, y4))
    close(LabelSmoothingCrossEntropyFlat(0.1, axis=1)(x4, y4.view(-1)), fl.LabelSmoothingCrossEntropyFlat(0.1, axis=1)(x4, y4))

# ---- fastai integration: real Learners on small synthetic data ----

def classification_dls(n=384, n_in=8, k=4, seed=0, bs=64):
    "Datasets of (features, label) with a vocab, so `predict` decodes a class"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = (x @ torch.randn(n_in, k, generator=g)).argmax(1)
    items = [(x[i], int(y[i])) for i in range(n)]
    dsets = Datasets(items, tfms=[[ItemGetter(0)], [ItemGetter(1), Categorize()]], splits=IndexSplitter(range(n - 96, n))(items))
    return dsets.dataloaders(bs=bs, shuffle=True, seed=seed)

def mlp(n_in=8, k=4): return nn.Sequential(nn.Linear(n_in, 32), nn.ReLU(), nn.Linear(32, k))

def learner(dls, model, loss_func, **kw):
    torch.manual_seed(0)
    return Learner(dls, model, loss_func=loss_func, opt_func=Adam, lr=1e-2, **kw)

def test_learner_trains_predicts_and_exports(tmp_path):
    dls = classification_dls()
    learn = learner(dls, mlp(), LabelSmoothingCrossEntropy(0.1, torch.ones(4)), path=tmp_path)
    before = learn.validate()[0]
    with learn.no_bar(), learn.no_logging(): learn.fit(8, 3e-2)
    after = learn.validate()[0]
    assert after < before - 0.4
    preds, targs, decoded = learn.get_preds(with_decoded=True)
    close(preds.sum(1), torch.ones(len(preds)))
    assert torch.equal(decoded, preds.argmax(1))
    assert (decoded == targs).float().mean() > 0.6  # chance is 0.25
    # the recorded validation loss is the loss over get_preds' raw outputs
    raw, targs = learn.get_preds(act=lambda o: o)
    close(torch.tensor(after), label_smoothing_cross_entropy(raw, targs, 0.1), 1e-5)
    item = dls.valid_ds.items[0]
    cls, idx, probs = learn.predict(item)
    assert idx == probs.argmax() and str(cls) == str(dls.vocab[idx]) and abs(probs.sum() - 1) < 1e-6
    learn.export('export.pkl')
    learn2 = load_learner(tmp_path/'export.pkl')
    assert isinstance(learn2.loss_func, LabelSmoothingCrossEntropy) and torch.equal(learn2.loss_func.weight, torch.ones(4))
    cls2, idx2, probs2 = learn2.predict(item)
    assert cls2 == cls and torch.allclose(probs2, probs)
    interp = Interpretation.from_learner(learn)
    losses, idxs = interp.top_losses(5)
    assert len(interp.losses) == 96 and losses[0] >= losses[-1]
    close(interp.losses, label_smoothing_cross_entropy(raw, targs, 0.1, reduction='none'), 1e-5)

def test_loss_moves_with_the_learner():
    "fastai's TrainEvalCallback moves the loss to the data's device before fit: the weights are buffers and go with it"
    dls = classification_dls()
    for lf in (LabelSmoothingCrossEntropy(0.1, torch.ones(4)), LabelSmoothingCrossEntropyFlat(0.1, torch.ones(4))):
        learn = learner(dls, mlp(), lf)
        learn.dls.device = torch.device('meta')
        learn.train_eval.before_fit()
        weight = lf.weight if isinstance(lf, nn.Module) else lf.func.weight
        assert weight.device.type == 'meta'

@pytest.mark.parametrize('mixer', [MixUp, CutMix])
@pytest.mark.parametrize('flat', [False, True])
def test_mixup_cutmix_train(mixer, flat):
    "MixUp and CutMix train with both classes, on image-shaped input (CutMix needs H, W)"
    torch.manual_seed(0)
    n, k = 256, 3
    x = torch.randn(n, 1, 4, 4)
    y = (x.flatten(1) @ torch.randn(16, k)).argmax(1)
    dls = DataLoaders.from_dsets(list(zip(x[:192], y[:192])), list(zip(x[192:], y[192:])), bs=32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, k))
    lf = LabelSmoothingCrossEntropyFlat(0.1) if flat else LabelSmoothingCrossEntropy(0.1)
    learn = learner(dls, model, lf, cbs=mixer())
    before = learn.validate()[0]
    with learn.no_bar(), learn.no_logging(): learn.fit(5)
    assert learn.validate()[0] < before and learn.loss_func is lf and lf.reduction == 'mean'

class SeqModel(nn.Module):
    "Per-position classifier over a sequence: (N, L, F) -> (N, L, C)"
    def __init__(self, f=6, k=5): super().__init__(); self.lin = nn.Linear(f, k)
    def forward(self, x): return self.lin(x)

def test_sequence_output_with_mixup():
    "fastai's Flat class crashes with MixUp on (N, L, C) output; ours mixes one loss per item"
    torch.manual_seed(0)
    n, L_, f, k = 192, 7, 6, 5
    x = torch.randn(n, L_, f)
    y = (x @ torch.randn(f, k)).argmax(-1)
    y[:, -1] = -100
    dls = DataLoaders.from_dsets(list(zip(x[:160], y[:160])), list(zip(x[160:], y[160:])), bs=32)
    with pytest.raises(RuntimeError):
        learn = learner(dls, SeqModel(f, k), fl.LabelSmoothingCrossEntropyFlat(0.1), cbs=MixUp())
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    learn = learner(dls, SeqModel(f, k), LabelSmoothingCrossEntropyFlat(0.1, ignore_index=-100), cbs=MixUp())
    before = learn.validate()[0]
    with learn.no_bar(), learn.no_logging(): learn.fit(4)
    assert learn.validate()[0] < before
    preds, targs, decoded = learn.get_preds(with_decoded=True)
    assert preds.shape == (32, L_, k) and torch.equal(decoded, preds.argmax(-1))
    _, _, losses = learn.get_preds(with_loss=True)
    assert losses.shape == (32,)

class SegModel(nn.Module):
    def __init__(self, k=2): super().__init__(); self.conv = nn.Conv2d(2, k, 3, padding=1)
    def forward(self, x): return self.conv(x)

@pytest.mark.parametrize('lf', [lambda: LabelSmoothingCrossEntropyFlat(0.1, axis=1), lambda: LabelSmoothingCrossEntropy(0.1, axis=1)])
def test_segmentation(lf):
    "(N, C, H, W) output with the classes on axis 1, like CrossEntropyLossFlat(axis=1)"
    torch.manual_seed(0)
    x = torch.randn(96, 2, 6, 6)
    y = (x[:, 0] > x[:, 1]).long()
    dls = DataLoaders.from_dsets(list(zip(x[:64], y[:64])), list(zip(x[64:], y[64:])), bs=16)
    learn = learner(dls, SegModel(), lf())
    before = learn.validate()[0]
    with learn.no_bar(), learn.no_logging(): learn.fit(8, 5e-2)
    assert learn.validate()[0] < before
    preds, targs, decoded = learn.get_preds(with_decoded=True)
    close(preds.sum(1), torch.ones(32, 6, 6))
    assert torch.equal(decoded, preds.argmax(1)) and (decoded == targs).float().mean() > 0.9
    raw, _ = learn.get_preds(act=lambda o: o)
    close(torch.tensor(learn.validate()[0]), F.cross_entropy(raw, targs, label_smoothing=0.1), 1e-5)

def test_backend_argument(monkeypatch):
    "`backend=` is checked; 'auto' is dense below `_DENSE_BELOW` logits and fused above; what asks for it gets it"
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match='`backend` must be one of'): label_smoothing_cross_entropy(x, y, backend='cuda')
    for cls in (LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat):
        with pytest.raises(ValueError, match='`backend` must be one of'): cls(backend='cuda')
    assert LabelSmoothingCrossEntropyFlat(backend='fused').func.backend == 'fused'
    assert "backend='dense'" in repr(LabelSmoothingCrossEntropy(backend='dense'))
    calls, apply = [], L._FusedLabelSmoothing.apply
    monkeypatch.setattr(L._FusedLabelSmoothing, 'apply', lambda *a: calls.append(a[0].numel()) or apply(*a))
    big, yb = torch.randn(300, L._DENSE_BELOW // 300 + 1), torch.randint(0, 10, (300,))
    u = torch.softmax(torch.randn(big.shape[1]), 0)
    for inp, tgt, kw, fused in ((x, y, {}, False), (big, yb, {}, True), (x, y, dict(backend='fused'), True),
                                (big, yb, dict(backend='dense'), False),
                                (big, yb, dict(backend='fused', prior=u.requires_grad_()), False)):  # more to differentiate
        calls.clear()
        for loss in (label_smoothing_cross_entropy(inp, tgt, **kw), LabelSmoothingCrossEntropy(**kw)(inp, tgt)):
            close(loss, reference_label_smoothing_cross_entropy(inp, tgt, prior=kw.get('prior')))
        assert calls == ([inp.numel()] * 2 if fused else []), (kw, calls)
    lf = LabelSmoothingCrossEntropy(0.1)
    del lf.backend  # a module pickled before `backend` existed: 'auto'
    close(lf(x, y), F.cross_entropy(x, y, label_smoothing=0.1))
