"Multi-label loss: property tests against a float64 reference and torch on the smoothed targets, dtypes, extreme logits, fastai integration."
import pickle

import pandas as pd, pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastai.losses as fl
import fastai.callback.progress  # Learner.no_bar
from fastai.callback.mixup import MixUp
from fastai.data.block import DataBlock, MultiCategoryBlock, TransformBlock
from fastai.learner import Learner, load_learner
from fastai.metrics import accuracy_multi
from hypothesis import given, settings, strategies as st, HealthCheck

from fakes import multilabel_segmentation_dls
from label_smoothing_fa.multilabel import (LabelSmoothingBCEWithLogits, LabelSmoothingBCEWithLogitsFlat,
                                           label_smoothing_bce_with_logits, reference_label_smoothing_bce,
                                           smooth_multilabel_targets)

def close(a, b, tol=1e-5, atol=None):
    a, b = a.double(), b.double()
    atol = tol if atol is None else atol + tol
    ok = ((a - b).abs() <= atol + tol * b.abs()) | (a.isnan() & b.isnan()) | (a == b)
    assert ok.all(), (a, b, (a - b).abs().max())

def logit_scale(x, target, weight=None, pos_weight=None, ignore_index=None, reduction='mean', **kw):
    "|x| w max(1, pos_weight) reduced as the loss is: the size of a rounding error in torch's formula"
    per_label = lambda v: v.view(-1, *[1] * (x.ndim - 2)) if v is not None and v.ndim == 1 and x.ndim > 2 else v
    s = x.abs() * (1 if weight is None else per_label(weight))
    s = s * (1 if pos_weight is None else per_label(pos_weight).clamp_min(1))
    keep = torch.ones_like(x, dtype=torch.bool) if ignore_index is None else target != ignore_index
    s = torch.where(keep, s, 0.)
    return s if reduction == 'none' else s.sum() if reduction == 'sum' else s.sum() / keep.sum().clamp_min(1)

def loss_and_grad(f, x, target, **kw):
    x = x.detach().clone().requires_grad_()
    out = f(x, target, **kw)
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape) if out.ndim else torch.ones(())
    (out * g.to(out.dtype)).sum().backward()
    return out.detach(), x.grad

# ---- property tests: shapes, eps, priors, weights, pos_weight, ignored labels, reductions, dtypes, logit sizes ----

@st.composite
def problems(draw):
    K = draw(st.integers(1, 6))
    shape = [draw(st.integers(1, 5)), K] + draw(st.lists(st.integers(1, 4), max_size=2))
    if draw(st.booleans()) and len(shape) == 2 and shape[0] == 1: shape = [K]  # one item, labels on axis 0
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.1, 1., 10., 1e3, 1e6]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    kind = draw(st.sampled_from(['hard', 'soft', 'ignore']))
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    if kind != 'soft': target = (target > 0.5).double()
    if kind == 'ignore': target = torch.where(torch.rand(shape, generator=g) < 0.4, -1., target)
    lab = (K,)
    prior = draw(st.sampled_from([None, 'float', 'tensor']))
    prior = {None: None, 'float': draw(st.floats(0, 1)), 'tensor': torch.rand(lab, generator=g, dtype=torch.float64)}[prior]
    weight = draw(st.sampled_from([None, 'label', 'item', 'full']))
    item_shape = (shape[0],) + (1,) * (len(shape) - 1) if len(shape) > 1 else (1,)
    weight = {None: None, 'label': lab, 'item': item_shape, 'full': tuple(shape)}[weight]
    if weight is not None: weight = torch.rand(weight, generator=g, dtype=torch.float64) * 2
    pos_weight = draw(st.sampled_from([None, 'label']))
    if pos_weight: pos_weight = torch.rand(lab, generator=g, dtype=torch.float64) * 4
    return x, target, dict(eps=draw(st.floats(0, 1)), weight=weight, pos_weight=pos_weight, prior=prior,
                           ignore_index=-1. if kind == 'ignore' else None,
                           reduction=draw(st.sampled_from(['mean', 'sum', 'none'])))

def as_dtype(kw, dt):
    return {k: v.to(dt) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_matches_float64_reference(problem, dtype):
    "Value and input gradient against the definition in float64, on the input rounded to `dtype`"
    x, target, kw = problem
    x = x.clamp(-6e4, 6e4).to(dtype)  # finite in float16 (infinite logits: test_extreme_logits)
    ours, g_ours = loss_and_grad(label_smoothing_bce_with_logits, x, target.to(dtype if dtype == torch.float64
                                                                              else torch.float32), **kw)
    ref, g_ref = loss_and_grad(reference_label_smoothing_bce, x.double(), target, **kw)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and g_ours.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    # torch's (1 - y') x - log sigmoid(x) cancels for large |x|: an error of a rounding step of |x| per label
    close(ours, ref, tol, atol=tol * logit_scale(x.double(), target, **kw))
    g_tol = tol if dtype in (torch.float64, torch.float32) else 1e-2  # the gradient is rounded to `dtype`
    close(g_ours, g_ref, g_tol)
    assert torch.isnan(ours).sum() <= torch.isnan(ref).sum()

@settings(max_examples=120, deadline=None)
@given(problems())
def test_is_torch_on_the_smoothed_targets(problem):
    "Without ignored labels: torch's binary_cross_entropy_with_logits on y', bit for bit (value and gradient)"
    x, target, kw = problem
    if kw['ignore_index'] is not None: target, kw['ignore_index'] = target.clamp_min(0), None
    x, target, kw = x.float(), target.float(), as_dtype(kw, torch.float32)
    ours, g_ours = loss_and_grad(label_smoothing_bce_with_logits, x, target, **kw)
    y_s = smooth_multilabel_targets(target, kw['eps'], kw['prior'])
    per_label = lambda v: v.view(-1, *[1] * (x.ndim - 2)) if v is not None and v.ndim == 1 and x.ndim > 2 else v
    ref, g_ref = loss_and_grad(F.binary_cross_entropy_with_logits, x, y_s, weight=per_label(kw['weight']),
                               pos_weight=per_label(kw['pos_weight']), reduction=kw['reduction'])
    assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)

@settings(max_examples=60, deadline=None)
@given(problems())
def test_ignored_labels_are_left_out(problem):
    "Masking labels is the loss of the kept labels alone: mean over kept, 0 and a zero gradient where all are ignored"
    x, target, kw = problem
    if kw['ignore_index'] is None: return
    kw = dict(kw, reduction='sum')
    keep = target != -1
    x = torch.where(keep, x, float('nan'))  # whatever the ignored logits hold
    ours, g = loss_and_grad(label_smoothing_bce_with_logits, x, target, **kw)
    assert torch.isfinite(ours) and torch.isfinite(g).all() and (g[~keep] == 0).all()
    mean = label_smoothing_bce_with_logits(x, target, **dict(kw, reduction='mean'))
    close(mean, ours / keep.sum().clamp_min(1), 1e-9)
    if not keep.any(): assert ours == 0 and mean == 0

def test_target_gradient():
    "Soft targets that require grad get torch's target gradient, through the smoothing"
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: label_smoothing_bce_with_logits(x, t, 0.3, prior=0.2), y)
    pw, ym = torch.rand(3, dtype=torch.float64) * 3, torch.where(y > 0.8, -1., y.detach())
    assert torch.autograd.gradcheck(lambda z: label_smoothing_bce_with_logits(z, ym, 0.3, pos_weight=pw, ignore_index=-1),
                                    x.requires_grad_())

def test_extreme_logits():
    "Huge and infinite logits: torch's answer on y' (finite wherever torch's is), NaN logits give NaN"
    big = torch.tensor([1e38, -1e38, 3e4, -3e4, 1e6, -1e6, float('nan'), float('inf'), -float('inf')])
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        for t in (0., 1.):
            xb, yb = big.to(dt), torch.full_like(big, t)
            for pw in (None, torch.tensor(3.)):
                ours = label_smoothing_bce_with_logits(xb, yb, 0.1, pos_weight=pw, reduction='none')
                ref = F.binary_cross_entropy_with_logits(xb.float() if dt != torch.float64 else xb,
                    smooth_multilabel_targets(yb, 0.1).to(torch.float64 if dt == torch.float64 else torch.float32),
                    pos_weight=pw, reduction='none')
                assert torch.equal(ours.isnan(), ref.isnan()) and torch.isnan(ours[6])
                assert torch.isfinite(ours[:6]).all()
                close(ours, ref, 1e-6)

def test_errors_name_the_argument():
    x, y = torch.zeros(3, 2), torch.ones(3, 2)
    cases = [(dict(target=torch.ones(3, 3)), "`target` must have the input's shape"),
             (dict(target=y * 1.5), r'`target` must hold probabilities in \[0, 1\]'),
             (dict(target=-y), r'`target` must hold probabilities'),
             (dict(eps=1.5), '`eps` must be in'), (dict(eps=-0.1), '`eps` must be in'),
             (dict(prior=1.2), r'`prior` must be \[0, 1\]'), (dict(prior=torch.tensor([.5, -.1])), '`prior` must be'),
             (dict(prior=torch.ones(3) / 3), '`prior` of shape'),
             (dict(weight=torch.tensor([1., -1.])), '`weight` must be finite and non-negative'),
             (dict(pos_weight=torch.tensor([-1., 1.])), '`pos_weight` must be finite and non-negative'),
             (dict(pos_weight=torch.ones(3)), '`pos_weight` of shape'),
             (dict(reduction='avg'), '`reduction` must be one of')]
    for kw, msg in cases:
        kw = dict(dict(target=y), **kw)
        with pytest.raises(ValueError, match=msg): label_smoothing_bce_with_logits(x, **kw)
    with pytest.raises(ValueError, match='`weight` must be'): LabelSmoothingBCEWithLogits(weight=torch.tensor([-1.]))
    with pytest.raises(ValueError, match='`prior` must be'): LabelSmoothingBCEWithLogitsFlat(prior=torch.tensor([2.]))

def test_conventions():
    "Keras, timm and mmpretrain formulas written out, against the loss"
    torch.manual_seed(0)
    x, y = torch.randn(6, 5) * 3, (torch.rand(6, 5) > .5).float()
    for eps in (0., 0.1, 0.4):
        keras = (x.clamp_min(0) - x * (y * (1 - eps) + 0.5 * eps) + torch.log1p(torch.exp(-x.abs()))).mean()
        close(label_smoothing_bce_with_logits(x, y, eps), keras)
        mmpre = torch.full_like(y, eps).masked_fill_(y > 0, 1 - eps)
        close(label_smoothing_bce_with_logits(x, y, 2 * eps), F.binary_cross_entropy_with_logits(x, mmpre))
        cls = torch.randint(0, 5, (6,))
        timm = torch.full((6, 5), eps / 5).scatter_(1, cls.view(-1, 1), 1 - eps + eps / 5)
        close(label_smoothing_bce_with_logits(x, F.one_hot(cls, 5).float(), eps, prior=1 / 5),
              F.binary_cross_entropy_with_logits(x, timm))

# ---- fastai ----

def features(r): return torch.tensor([r.a, r.b], dtype=torch.float32)
def labels(r): return [n for n, on in (('a', r.a > 0), ('b', r.b > 0), ('sum', r.a + r.b > 0.3)) if on]

def make_learner(loss_func, cbs=()):
    torch.manual_seed(0)
    df = pd.DataFrame(torch.randn(320, 2).numpy(), columns=['a', 'b'])
    dls = DataBlock(blocks=(TransformBlock(), MultiCategoryBlock(vocab=['a', 'b', 'sum'])),
                    get_x=features, get_y=labels).dataloaders(df, bs=32)
    return Learner(dls, nn.Linear(2, 3), loss_func=loss_func, metrics=accuracy_multi, lr=0.1, cbs=list(cbs)), df

def test_learner_end_to_end(tmp_path):
    learn, df = make_learner(LabelSmoothingBCEWithLogitsFlat(0.1, pos_weight=torch.tensor([1., 2., 1.])))
    with learn.no_bar(), learn.no_logging(): learn.fit(5)
    probs, targs, dec, losses = learn.get_preds(with_decoded=True, with_loss=True)
    xb = torch.stack([features(r) for r in learn.dls.valid.items.itertuples()])
    logits = learn.model(xb).detach()
    close(probs, logits.sigmoid()); assert torch.equal(dec, probs > 0.5)
    close(losses, label_smoothing_bce_with_logits(logits, targs, pos_weight=torch.tensor([1., 2., 1.]),
                                                  reduction='none').mean(1))
    acc = learn.validate()[1]
    close(torch.tensor(acc), ((probs > 0.5) == targs.bool()).float().mean())
    assert acc > 0.9
    lab, dec1, prob1 = learn.predict(df.iloc[3])
    assert list(lab) == [n for n, d in zip(['a', 'b', 'sum'], dec1) if d]
    learn.export(tmp_path/'learn.pkl')
    learn2 = load_learner(tmp_path/'learn.pkl')
    close(learn2.predict(df.iloc[3])[2], prob1)
    assert isinstance(learn2.loss_func, LabelSmoothingBCEWithLogitsFlat) and learn2.loss_func.func.eps == 0.1
    close(learn2.loss_func.func.pos_weight, torch.tensor([1., 2., 1.]))

def test_flat_matches_fastai_and_mixup():
    "eps=0 is fastai's BCEWithLogitsLossFlat; MixUp mixes the targets (y_int=False) and trains"
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 4), (torch.rand(8, 3, 4) > .5).float()
    close(LabelSmoothingBCEWithLogitsFlat(0.)(x, y), fl.BCEWithLogitsLossFlat()(x, y))
    close(LabelSmoothingBCEWithLogitsFlat(0., reduction='none')(x, y),
          fl.BCEWithLogitsLossFlat(reduction='none')(x, y).view(8, -1).mean(1))
    assert LabelSmoothingBCEWithLogitsFlat.y_int is False and LabelSmoothingBCEWithLogits.y_int is False
    learn, _ = make_learner(LabelSmoothingBCEWithLogitsFlat(0.1), cbs=[MixUp()])
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    assert all(torch.isfinite(torch.tensor(v[:2])).all() for v in learn.recorder.values)

def test_pickle_and_buffers():
    lf = LabelSmoothingBCEWithLogitsFlat(0.2, torch.tensor([1., 2.]), prior=torch.tensor([.1, .3]), ignore_index=-1)
    lf2 = pickle.loads(pickle.dumps(lf))
    x, y = torch.randn(5, 2), torch.tensor([[1., -1], [0, 1], [1, 1], [-1, -1], [0, 0]])
    close(lf2(x, y), lf(x, y))
    close(lf(x, y), label_smoothing_bce_with_logits(x, y, 0.2, torch.tensor([1., 2.]), prior=torch.tensor([.1, .3]),
                                                    ignore_index=-1))
    assert set(lf.func.state_dict()) == {'weight', 'prior'}

# ---- EntropyLogger with multi-label losses ----

from torchmetrics.functional.classification import binary_calibration_error
from label_smoothing_fa.callbacks import EntropyLogger

LOGGED = ['smooth_ce', 'target_entropy', 'kl', 'entropy', 'confidence', 'nll']

def reference_binary(probs, targs, eps, prior=None, ignore_index=None):
    "The logged means over kept labels, from the definitions in float64, and torchmetrics' binary ECE"
    keep = torch.ones_like(targs, dtype=torch.bool) if ignore_index is None else targs != ignore_index
    y = (targs[keep] > 0.5).double()
    u = 0.5 if prior is None else prior
    if isinstance(u, torch.Tensor): u = u.double().expand(targs.shape)[keep]
    t, p = (1 - eps) * y + eps * u, probs.double()[keep]
    h = lambda q: -(torch.special.xlogy(q, q) + torch.special.xlogy(1 - q, 1 - q))
    sce = -(torch.special.xlogy(t, p) + torch.special.xlogy(1 - t, 1 - p))
    nll = -torch.where(y > 0.5, p.log(), (1 - p).log())
    means = dict(zip(LOGGED, torch.stack([sce, h(t), sce - h(t), h(p), torch.maximum(p, 1 - p), nll]).mean(1).tolist()))
    return means, binary_calibration_error(probs[keep].float(), y.long(), n_bins=15).item()

def check_logger(learn, eps, prior=None, ignore_index=None, act=None):
    last = dict(zip([n.removeprefix('valid_') for n in learn.recorder.metric_names[1:-1]], learn.recorder.values[-1]))
    valid_loss = learn.recorder.values[-1][1]
    probs, targs = learn.get_preds(act=act)  # (it starts the Recorder afresh)
    ref, ece = reference_binary(probs, targs, eps, prior, ignore_index)
    ref['valid_loss'] = valid_loss
    for k in ('smooth_ce', 'kl', 'entropy', 'confidence'): close(torch.tensor(last[k]), torch.tensor(ref[k]))
    close(torch.tensor(last['ece']), torch.tensor(ece), 1e-6)
    v = learn.entropy_logger.valid_history.iloc[-1]
    for k in LOGGED: close(torch.tensor(v[k]), torch.tensor(ref[k]))
    return ref

@pytest.mark.parametrize('loss', ['ours', 'ours_prior', 'fastai', 'torch', 'explicit'])
def test_entropy_logger_multilabel(loss):
    prior = torch.tensor([.3, .3, .6])
    loss_func, logger, kw = {
        'ours': (LabelSmoothingBCEWithLogitsFlat(0.2), EntropyLogger(), dict(eps=0.2)),
        'ours_prior': (LabelSmoothingBCEWithLogitsFlat(0.1, prior=prior), EntropyLogger(), dict(eps=0.1, prior=prior)),
        'fastai': (fl.BCEWithLogitsLossFlat(), EntropyLogger(), dict(eps=0.1)),
        'torch': (nn.BCEWithLogitsLoss(), EntropyLogger(eps=0.05), dict(eps=0.05, act=torch.sigmoid)),
        'explicit': (lambda x, y: F.binary_cross_entropy_with_logits(x, y), EntropyLogger(multilabel=True, prior=0.4),
                     dict(eps=0.1, prior=0.4, act=torch.sigmoid)),
    }[loss]
    learn, _ = make_learner(loss_func, cbs=[logger])
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    assert learn.entropy_logger._fit.multilabel
    ref = check_logger(learn, **kw)
    if loss.startswith('ours'):  # smooth_ce is the loss's value: valid_loss
        close(torch.tensor(ref['valid_loss']), torch.tensor(ref['smooth_ce']))
    h = learn.entropy_logger.history
    assert len(h) == 3 * len(learn.dls.train) and (h['kl'] >= -1e-6).all()
    # per batch: kl = smooth_ce - floor, a mean of max(p, 1 - p) (batch values: test_entropy_logger_history_matches_batches)
    assert ((h['smooth_ce'] - h['target_entropy']).abs() - h['kl'] < 1e-6).all()
    assert (h['confidence'] >= 0.5).all() and (h['confidence'] <= 1).all()
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.figure
    assert isinstance(learn.entropy_logger.plot(), matplotlib.figure.Figure)
    assert isinstance(learn.entropy_logger.plot_reliability(), matplotlib.figure.Figure)
    r = learn.entropy_logger.reliability
    assert r['count'].sum() == 3 * len(learn.dls.valid_ds)  # one row per label

def test_entropy_logger_ignored_labels_and_segmentation():
    "Segmentation-shaped output (N, K, H, W) with ignored labels, through a plain DataLoaders"
    dls = multilabel_segmentation_dls()
    loss = LabelSmoothingBCEWithLogitsFlat(0.1, ignore_index=-1, prior=torch.tensor([.5, .3, .5]))
    learn = Learner(dls, nn.Conv2d(2, 3, 1), loss_func=loss, lr=0.05, cbs=[EntropyLogger()])
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    ref = check_logger(learn, 0.1, torch.tensor([.5, .3, .5]).view(3, 1, 1), ignore_index=-1)
    close(torch.tensor(ref['valid_loss']), torch.tensor(ref['smooth_ce']))

def test_entropy_logger_history_matches_batches():
    "Each training batch's row of the history is its prediction's statistics (checked on a fixed model: lr 0)"
    learn, _ = make_learner(LabelSmoothingBCEWithLogitsFlat(0.1), cbs=[EntropyLogger()])
    learn.lr = 0.
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    preds, targs = [], []
    for xb, yb in learn.dls.train:  # shuffled again: compare the mean over the epoch, weighted by batch size
        preds.append(learn.model(xb).detach()); targs.append(yb)
    ref, _ = reference_binary(torch.cat(preds).sigmoid(), torch.cat(targs), 0.1)
    h = learn.entropy_logger.history
    close(torch.tensor(h['smooth_ce'].mean()), torch.tensor(ref['smooth_ce']), 1e-5)
    close(torch.tensor(h['target_entropy'].iloc[0]), torch.tensor(ref['target_entropy']), 1e-3)
