"""Regression tests of issue 15 (no silent wrong number, round 3), one or more per item, each on both paths (dense
and fused, forced by `_DENSE_BELOW`); items 1 and 2 are in test_torch_suite.py, the property tests in
test_fuzz_losses.py."""
import math
import numpy as np, pandas as pd, pytest, torch, torch.nn.functional as F
import fastai.losses as fl

import label_smoothing_fa.losses as L
from label_smoothing_fa.losses import (LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat,
                                       label_smoothing_cross_entropy as lsce, reference_label_smoothing_cross_entropy,
                                       smooth_targets)
from label_smoothing_fa.multilabel import (LabelSmoothingBCEWithLogits, LabelSmoothingBCEWithLogitsFlat,
                                           label_smoothing_bce_with_logits as bce)
from oracles import multiclass, multilabel

INF, NAN = float('inf'), float('nan')

@pytest.fixture(params=['dense', 'fused'])
def path(request, monkeypatch):
    monkeypatch.setattr(L, '_DENSE_BELOW', 0 if request.param == 'fused' else 1 << 62)
    return request.param

def loss_and_grad(x, target, **kw):
    x = x.detach().clone().requires_grad_()
    out = lsce(x, target, **kw)
    out.sum().backward()
    return out.detach(), x.grad

def test_item3_logits_near_float32_limit(path):
    "Item 3: every logit -3e38 (or +3e38): log K, not inf (the float32 mean of a row overflowed)"
    for value in (-3e38, 3e38):
        for target in (torch.tensor([0, 1, 2]), torch.softmax(torch.randn(3, 4), 1)):
            out, g = loss_and_grad(torch.full((3, 4), value), target, reduction='none')
            torch.testing.assert_close(out, torch.full((3,), math.log(4)))
            assert g.isfinite().all()
        out, _ = loss_and_grad(torch.full((3, 4), value), torch.tensor([0, 1, 2]), prior=torch.tensor([.1, .2, .3, .4]))
        torch.testing.assert_close(out, torch.tensor(math.log(4)))
    # one logit near the limit, classes on a strided axis (found by the fuzz): the prior's sum overflowed
    x = torch.tensor([[3e38, 1.], [-.29, 2.], [-2.18, 0.]])
    for eps in (.1, 1.):
        out, _ = loss_and_grad(x, torch.tensor([1, 0]), eps=eps, axis=0, reduction='none')
        torch.testing.assert_close(out.double(), multiclass(x, torch.tensor([1, 0]), eps, axis=0, reduction='none')
                                   .float().double(), rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_item4_eps_near_one_prior_on_prediction(dtype, path):
    "Item 4: eps near 1, prior on the predicted class, logits far from 0: no cancellation of lse - x_y against <v, x - x_y>"
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64) * 4 + 1e3, torch.randint(0, 5, (64,))
    u = torch.full((5,), 1e-3, dtype=torch.float64).index_fill(0, x[0].argmax(), 1 - 4e-3)
    for eps in (1 - 1e-3, 1 - 1e-6, 1.):
        ref = multiclass(x, y, eps, prior=u, reduction='none')
        ours = lsce(x.to(dtype), y, eps, prior=u.to(dtype), reduction='none').double()
        assert ((ours - multiclass(x.to(dtype), y, eps, prior=u.to(dtype), reduction='none')) / ref).abs().max() < \
            (1e-5 if dtype == torch.float32 else 1e-12)

@pytest.mark.parametrize('K', [2, 3, 7, 10, 39])
@pytest.mark.parametrize('weight_mode', ['sample', 'torch', 'fastai'])
def test_item5_others_eps_one_inf_target_logit(K, weight_mode, path):
    "Item 5: eps=1, 'others', -inf target logit: the target class's smoothed target is 0, so it adds exactly 0"
    torch.manual_seed(K)
    x, y = torch.randn(4, K), torch.randint(0, K, (4,))
    x[torch.arange(4), y] = -INF
    w = torch.rand(K) + .1
    for weight in (None, w):
        for reduction in ('mean', 'sum', 'none'):
            kw = dict(eps=1., prior='others', weight=weight, reduction=reduction, weight_mode=weight_mode)
            out, g = loss_and_grad(x, y, **kw)
            ref = multiclass(x, y, **kw)
            assert ref.isfinite().all() and out.isfinite().all() and g.isfinite().all()
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    soft = F.one_hot(y, K).float()  # the same with soft (one-hot) targets
    torch.testing.assert_close(lsce(x, soft, 1., prior='others').double(), multiclass(x, soft, 1., prior='others'))

def test_item6_1d_soft_target_inf_where_target_is_zero(path):
    "Item 6: a 1-D soft target on the fused path (K >= 65,536) with -inf where it is 0: the batched, finite loss"
    K = 70_000
    x, t = torch.randn(K), torch.zeros(K)
    t[:3] = torch.tensor([.5, .3, .2])
    x[10] = -INF
    for prior in (torch.zeros(K).index_fill(0, torch.tensor([0, 1]), .5), None):
        eps = 0. if prior is None else .1
        out = lsce(x, t, eps, prior=prior)
        torch.testing.assert_close(out, lsce(x[None], t[None], eps, prior=prior))
        assert out.isfinite()

def test_item7_1d_ignored_or_weightless_with_nan_logits(path):
    "Item 7: a 1-D input whose only position is ignored, or weighs 0, with NaN/inf logits: loss 0 and gradient 0"
    for x in (torch.tensor([NAN, 1., 2.]), torch.tensor([INF, -INF, 0.])):
        for target, kw in ((torch.tensor(-100), {}), (torch.tensor(0), dict(weight=torch.tensor([0., 1., 1.])))):
            for reduction in ('mean', 'sum', 'none'):
                out, g = loss_and_grad(x, target, reduction=reduction, **kw)
                assert out.item() == 0. and torch.equal(g, torch.zeros(3))

def test_item8_soft_others_eps_above_bound_inf_logit(path):
    "Item 8: soft targets, 'others', eps > (K-1)/K, -inf logit where q' > 0: +inf on both paths (as the float64 formula)"
    torch.manual_seed(0)
    K = 4
    x, t = torch.randn(3, K), torch.softmax(torch.randn(3, K), 1)
    x[0, 2] = -INF
    for eps in (0.8, 0.9, 1.):
        out = lsce(x, t, eps, prior='others', reduction='none')
        ref = multiclass(x, t, eps, prior='others', reduction='none')
        assert out[0].item() == INF == ref[0].item()
        torch.testing.assert_close(out[1:].double(), ref[1:])

def test_item9_pos_inf_logit_eps_zero(path):
    "Item 9: a +inf logit with eps=0: torch's answer (NaN for the +inf class's target, inf otherwise), any batch size"
    for n in (1, 2, 300):
        x = torch.randn(n, 4)
        x[0, 1] = INF
        for y0 in (1, 2):
            y = torch.zeros(n).long()
            y[0] = y0
            out = lsce(x, y, 0., reduction='none')
            ref = F.cross_entropy(x, y, reduction='none')
            torch.testing.assert_close(out, ref, equal_nan=True)

@pytest.mark.parametrize('weight_mode', ['sample', 'torch', 'fastai'])
def test_item10_weights_outside_float32_range(weight_mode, path):
    "Item 10: float64 class weights of 1e-50 or 1e40 with float32 logits: the scale-free modes give the weights' loss"
    torch.manual_seed(0)
    x, y, w = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.rand(5, dtype=torch.float64) + .1
    soft = torch.softmax(torch.randn(8, 5), 1)
    for target in (y, soft):
        same = lsce(x, target, weight=w.float(), weight_mode=weight_mode)
        for scale in (1e-50, 1e-40, 1e40):
            if weight_mode == 'torch' and target is soft: continue  # not scale-free: torch divides by N
            torch.testing.assert_close(lsce(x, target, weight=w * scale, weight_mode=weight_mode), same)

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_item11_autocast_does_not_lower_the_loss_precision(dtype, path):
    "Item 11: inside autocast the loss's own products stay float32: soft targets with class weights and priors"
    torch.manual_seed(0)
    x, t, w = torch.randn(16, 7), torch.softmax(torch.randn(16, 7), 1), torch.rand(7) + .1
    P = torch.softmax(torch.randn(7, 7), 1)
    for target in (t, torch.randint(0, 7, (16,))):
        for prior in (torch.softmax(torch.randn(7), 0), P):
            ref = multiclass(x, target, .2, weight=w, prior=prior)
            with torch.autocast('cpu', dtype=dtype):
                out, g = loss_and_grad(x, target, eps=.2, weight=w, prior=prior)
            torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
            assert g.dtype == torch.float32

def test_item12_multilabel_empty_mean_and_float64():
    "Item 12: an empty batch's mean is 0; float64 logits with integer/bool targets, float32 prior/weights: float64"
    for red, value in (('mean', 0.), ('sum', 0.)):
        assert bce(torch.zeros(0, 3), torch.zeros(0, 3), reduction=red).item() == value
        assert LabelSmoothingBCEWithLogits(reduction=red)(torch.zeros(0, 3), torch.zeros(0, 3)).item() == value
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 4) > .5
    w, pw, u = torch.rand(4) + .1, torch.rand(4) + .5, torch.tensor([.1, .3, .5, .7])
    for target in (y, y.long(), y.float()):
        ref = multilabel(x, target, .2, w, pos_weight=pw, prior=u)
        out = bce(x, target, .2, w, pos_weight=pw, prior=u)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=0)
        mod = LabelSmoothingBCEWithLogits(.2, w.double(), pos_weight=pw.double(), prior=u.double())
        torch.testing.assert_close(mod(x, target), ref, rtol=1e-13, atol=0)

def test_item13_smooth_targets_refuses_what_the_loss_refuses():
    "Item 13: soft targets that do not sum to 1, negative ones, float class indices read as one soft target"
    for bad, match in ((torch.tensor([[.5, .9, 0.]]), 'must sum to 1'), (torch.tensor([[1.5, -.5, 0.]]), 'negative'),
                       (torch.tensor([0., 1., 2.]), 'must sum to 1.*class indices are integers')):
        with pytest.raises(ValueError, match=match): smooth_targets(bad, 3)
        with pytest.raises(ValueError, match=match): lsce(torch.zeros(bad.shape), bad)
    torch.testing.assert_close(smooth_targets(torch.tensor([[.5, .5, 0.]]), 3, .3), torch.tensor([[.45, .45, .1]]))

def test_item14_ignore_index_none(path):
    "Item 14: ignore_index=None ignores nothing, in the function, the modules and the multi-label loss"
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    torch.testing.assert_close(lsce(x, y, ignore_index=None), lsce(x, y))
    torch.testing.assert_close(lsce(x, torch.softmax(x, 1), ignore_index=None), lsce(x, torch.softmax(x, 1)))
    torch.testing.assert_close(LabelSmoothingCrossEntropy(ignore_index=None)(x, y), lsce(x, y))
    flat = LabelSmoothingCrossEntropyFlat(ignore_index=None, reduction='none')
    torch.testing.assert_close(flat(x[None], y[None]), lsce(x, y)[None])
    with pytest.raises(ValueError, match='outside'): lsce(x, torch.full((6,), -100), ignore_index=None)

def test_item15_numpy_and_tensor_numbers(path):
    "Item 15: numpy scalars and 0-d tensors are numbers; bools are refused"
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    ref = lsce(x, y, 0.1, ignore_index=0, axis=1)
    for eps, ign, axis in ((np.float32(.1), np.int64(0), np.int64(1)), (np.float64(.1), np.int32(0), np.int16(-1)),
                           (torch.tensor(.1), torch.tensor(0), torch.tensor(1))):
        torch.testing.assert_close(lsce(x, y, eps, ignore_index=ign, axis=axis), ref)
        torch.testing.assert_close(LabelSmoothingCrossEntropy(eps, ignore_index=ign, axis=axis)(x, y), ref)
    torch.testing.assert_close(smooth_targets(y, np.int64(3), np.float32(.1)), smooth_targets(y, 3, .1))
    torch.testing.assert_close(bce(x, (x > 0).float(), np.float32(.1)), bce(x, (x > 0).float(), .1))
    for bad in (dict(eps=True), dict(eps=np.bool_(True)), dict(axis=True), dict(axis=1.), dict(ignore_index=1.5)):
        with pytest.raises(ValueError, match=f'`{next(iter(bad))}` must be'): lsce(x, y, **bad)

def test_item17_multilabel_missing_labels_marked_nan():
    "Item 17: ignore_index=NaN leaves labels marked NaN out; without it the error says how to mark them"
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), (torch.rand(8, 5) > .5).float()
    missing = y.masked_fill(torch.rand(8, 5) < .3, NAN)
    for red in ('mean', 'sum', 'none'):
        xi = x.clone().requires_grad_()
        out = bce(xi, missing, .1, reduction=red, ignore_index=NAN)
        torch.testing.assert_close(out.double(), multilabel(x, missing, .1, reduction=red, ignore_index=NAN))
        out.sum().backward()
        assert torch.equal(xi.grad[missing.isnan()], torch.zeros(int(missing.isnan().sum())))
    for mod in (LabelSmoothingBCEWithLogits(ignore_index=np.nan), LabelSmoothingBCEWithLogitsFlat(ignore_index=NAN)):
        torch.testing.assert_close(mod(x, missing), bce(x, missing, ignore_index=NAN))
    flat = LabelSmoothingBCEWithLogitsFlat(ignore_index=NAN, reduction='none')
    kept = ~missing.isnan()
    torch.testing.assert_close(flat(x, missing), bce(x, missing, ignore_index=NAN, reduction='none').sum(1) / kept.sum(1))
    with pytest.raises(ValueError, match=r"NaN labels: .*ignore_index=float\('nan'\)"): bce(x, missing)

def test_item18_integer_logits_refused():
    "Item 18: integer logits are refused with a message naming `input`, in both losses and the reference"
    for f, target in ((lsce, torch.tensor([0, 1])), (reference_label_smoothing_cross_entropy, torch.tensor([0, 1])),
                      (bce, torch.zeros(2, 3))):
        for dtype in (torch.int64, torch.int32, torch.bool):
            with pytest.raises(ValueError, match='`input` must be floating-point logits'):
                f(torch.zeros(2, 3, dtype=dtype), target)

def test_flat_takes_tabular_targets_like_fastai(path):
    "Issue 16: (bs, 1) targets, as fastai's tabular learners give them, are fastai's flattened targets"
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16, 1))
    for red in ('mean', 'sum'):
        torch.testing.assert_close(LabelSmoothingCrossEntropyFlat(0.1, reduction=red)(x, y),
                                   fl.LabelSmoothingCrossEntropyFlat(eps=0.1, reduction=red)(x, y))
    torch.testing.assert_close(LabelSmoothingCrossEntropyFlat(0.1, reduction='none')(x, y),
                               LabelSmoothingCrossEntropyFlat(0.1, reduction='none')(x, y[:, 0]))
    with pytest.raises(ValueError, match='`target` must be class indices of shape'):
        LabelSmoothingCrossEntropyFlat(0.1)(x, torch.randint(0, 3, (16, 2)))

def test_tabular_learner_trains_with_the_flat_loss():
    "Issue 16: tabular_learner(dls, loss_func=LabelSmoothingCrossEntropyFlat(0.1)) fits, validates and predicts"
    from fastai.tabular.all import TabularDataLoaders, Categorify, Normalize, tabular_learner
    torch.manual_seed(0)
    n = 200
    df = pd.DataFrame({'a': np.random.RandomState(0).randn(n), 'b': np.random.RandomState(1).randn(n)})
    df['c'] = np.where(df.a + df.b > 0, 'hi', 'lo')
    dls = TabularDataLoaders.from_df(df, cont_names=['a', 'b'], y_names='c', procs=[Categorify, Normalize], bs=32,
                                     valid_idx=list(range(150, 200)))
    learn = tabular_learner(dls, layers=[8], loss_func=LabelSmoothingCrossEntropyFlat(0.1))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    preds, targs = learn.get_preds()
    assert preds.shape == (50, 2) and torch.allclose(preds.sum(1), torch.ones(50))
    loss = learn.validate()[0]
    assert math.isfinite(loss)

def test_no_test_helpers_in_the_library():
    "Issue 15, 'Also': the notebook's test helpers are not exported (`_compare_with_reference` raised a NameError)"
    import label_smoothing_fa.multilabel as M
    for name in ('_fused_only', '_compare_with_reference', '_check_against'):
        assert not hasattr(L, name) and not hasattr(M, name)
