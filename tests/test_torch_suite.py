"""PyTorch's own tests of `F.cross_entropy`, mirrored on our loss: the no-batch-dimension cases (a 1-D input of K
logits, a scalar class index or K probabilities, across reductions, dtypes and priors) and `gradcheck` in float64
through the fused path, classes last and on a strided axis, with backward re-entrant (issue 15, items 1 and 2)."""
import pytest, torch, torch.nn as nn, torch.nn.functional as F

import label_smoothing_fa.losses as L
from label_smoothing_fa.losses import LabelSmoothingCrossEntropy, label_smoothing_cross_entropy

@pytest.fixture(params=['dense', 'fused'])
def path(request, monkeypatch):
    "Each test on both paths: the fused one forced whatever the input's size"
    monkeypatch.setattr(L, '_DENSE_BELOW', 0 if request.param == 'fused' else 1 << 62)
    return request.param

@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('kind', ['index', 'soft', 'ignored'])
def test_item1_no_batch_dim_matches_batch_of_one(reduction, dtype, kind, path):
    "Item 1, torch's test_cross_entropy_loss no-batch-dim: a (K,) input is the batch of one, unsqueezed"
    torch.manual_seed(0)
    K = 5
    x = torch.randn(K, dtype=torch.float64).to(dtype)
    target = {'index': torch.tensor(3), 'ignored': torch.tensor(-100),
              'soft': torch.softmax(torch.randn(K, dtype=torch.float64), 0).to(dtype)}[kind]
    for eps, prior in ((0., None), (0.2, None), (0.2, 'others'), (0.3, torch.softmax(torch.randn(K), 0))):
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ours = label_smoothing_cross_entropy(xs[0], target, eps, reduction=reduction, prior=prior)
        batched = label_smoothing_cross_entropy(xs[1][None], target[None], eps, reduction=reduction, prior=prior)
        assert ours.shape == (batched[0].shape if reduction == 'none' else ())
        torch.testing.assert_close(ours, batched[0] if reduction == 'none' else batched)
        ours.sum().backward(); batched.sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
        if prior is None and not (kind == 'ignored' and reduction == 'mean'):  # torch's loss (there 0/0: NaN, ours 0)
            xt = xs[2].float() if dtype == torch.bfloat16 else xs[2]
            ref = F.cross_entropy(xt, target.to(xt.dtype) if kind == 'soft' else target, label_smoothing=eps,
                                  reduction=reduction)
            torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('axis', [0, -1, 1])
def test_item1_any_axis_naming_the_only_axis(axis, path):
    "Item 1: 0, -1 and 1 (torch's class axis of the batched form) all name a 1-D input's class axis"
    x, y = torch.randn(7), torch.tensor(2)
    torch.testing.assert_close(label_smoothing_cross_entropy(x, y, axis=axis), F.cross_entropy(x, y, label_smoothing=.1))
    torch.testing.assert_close(LabelSmoothingCrossEntropy(axis=axis)(x, y), F.cross_entropy(x, y, label_smoothing=.1))

@pytest.mark.parametrize('axis', [2, -2, 5])
def test_item1_explicit_out_of_range_axis_refused(axis):
    "Item 1: an explicit axis out of range stays refused, with its name"
    with pytest.raises(ValueError, match=f'`axis` is {axis} but the input has 1 dimensions'):
        label_smoothing_cross_entropy(torch.randn(4), torch.tensor(1), axis=axis)

def test_item1_module_no_batch_dim_like_torch_module(path):
    "Item 1: the module, as nn.CrossEntropyLoss, on (K,) with a scalar target, for each reduction and weights"
    x, y, w = torch.randn(6), torch.tensor(4), torch.rand(6) + .1
    for reduction in ('mean', 'sum', 'none'):
        ours = LabelSmoothingCrossEntropy(0.15, w, reduction, weight_mode='torch')(x, y)
        ref = nn.CrossEntropyLoss(w, reduction=reduction, label_smoothing=0.15)(x, y)
        torch.testing.assert_close(ours, ref)

@pytest.mark.parametrize('layout', ['last', 'strided'])
@pytest.mark.parametrize('kind', ['index', 'soft'])
def test_item2_gradcheck_fused(layout, kind):
    "Item 2, torch's gradcheck tests of the loss: float64, fused path, classes last and on a strided axis"
    torch.manual_seed(0)
    shape, axis = ((5, 4), 1) if layout == 'last' else ((3, 4, 5), 1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rows = shape[:axis] + shape[axis + 1:]
    target = torch.randint(0, 4, rows) if kind == 'index' else \
        torch.softmax(torch.randn(shape, dtype=torch.float64), axis)
    for kw in ({}, dict(prior='others', eps=.3), dict(prior=torch.softmax(torch.randn(4, 4, dtype=torch.float64), 1)),
               dict(weight=torch.rand(4, dtype=torch.float64) + .1, weight_mode='torch', reduction='sum')):
        assert torch.autograd.gradcheck(lambda z: label_smoothing_cross_entropy(z, target, axis=axis, backend='fused', **kw), x)

@pytest.mark.parametrize('layout', ['last', 'strided'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_item2_backward_is_reentrant(layout, dtype):
    "Item 2: two autograd.grad(retain_graph=True) calls through one fused graph give bit-identical gradients"
    torch.manual_seed(0)
    x = torch.randn((64, 33) if layout == 'last' else (4, 33, 16), dtype=dtype, requires_grad=True)
    y = torch.randint(0, 33, (64,) if layout == 'last' else (4, 16))
    y.view(-1)[:3] = -100
    for kw in ({}, dict(prior='others'), dict(prior=torch.softmax(torch.randn(33, 33), 1))):
        loss = label_smoothing_cross_entropy(x, y, 0.2, reduction='none', backend='fused', **kw)
        g = torch.randn_like(loss)
        g1, = torch.autograd.grad(loss, x, g, retain_graph=True)
        g2, = torch.autograd.grad(loss, x, g, retain_graph=True)
        g3, = torch.autograd.grad(loss, x, g)
        assert torch.equal(g1, g2) and torch.equal(g2, g3)
