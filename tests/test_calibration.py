"The calibration measures as functions on `get_preds` output, against float64 numpy/scipy references and torchmetrics."
import numpy as np, pytest, torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

from calibration_refs import numpy_ace, numpy_aurc, numpy_classwise_ece
from label_smoothing_fa.calibration import adaptive_ece, classwise_ece, aurc, fit_temperature

def test_calibration_refuses_targets_out_of_range():
    "Regression: a class index outside [0, K) (not `ignore_index`) counted as an error, silently; now refused"
    probs = torch.tensor([[.7, .3], [.2, .8]])
    for bad in ([0, 2], [-1, 1]):
        for f in (adaptive_ece, classwise_ece, aurc):
            with pytest.raises(ValueError, match='`targets` holds class indices outside'): f(probs, torch.tensor(bad))
        with pytest.raises(ValueError, match='`targets` holds class indices outside'):
            fit_temperature(probs.log(), torch.tensor(bad))
    assert aurc(probs, torch.tensor([0, -100])) == 0.  # `ignore_index` is still left out

@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 6), st.integers(0, 25), st.booleans(), st.integers(0, 2**16),
       st.sampled_from(['random', 'ties', 'onehot', 'quantised']), st.sampled_from([torch.float16, torch.float32, torch.float64]),
       st.integers(1, 20), st.booleans())
def test_calibration_functions_match_numpy(K, N, seg, seed, kind, dtype, n_bins, ignore):
    "ACE, classwise ECE and AURC against float64 numpy: ties, probabilities 0 and 1, N < n_bins, float16, segmentation; bin edges in the dtype (regression: float32 edges on float64 input)"
    g = torch.Generator().manual_seed(seed)
    shape, rshape = ((N, K, 2, 3), (N, 2, 3)) if seg else ((N, K), (N,))
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    p = z.round().softmax(1) if kind == 'ties' else z.softmax(1)
    if kind == 'onehot': p = F.one_hot(z.argmax(1), K).movedim(-1, 1).double()
    if kind == 'quantised': p = (p * 4).round() / 4; p = p / p.sum(1, keepdim=True).clamp_min(1e-9)
    p = p.to(dtype)
    y = torch.randint(0, K, rshape, generator=g)
    if ignore: y = torch.where(torch.rand(rshape, generator=g) < .3, -100, y)
    p64 = (p.float() if dtype == torch.float16 else p).double().movedim(1, -1).reshape(-1, K).numpy()
    y64 = y.reshape(-1).numpy()
    p64, y64 = p64[y64 != -100], y64[y64 != -100]
    got = [adaptive_ece(p, y, n_bins), classwise_ece(p, y, n_bins), aurc(p, y)]
    if len(y64) == 0: assert got == [None] * 3; return
    for g_, r in zip(got, [numpy_ace(p64, y64, n_bins), numpy_classwise_ece(p64, y64, n_bins, torch.float64 if dtype == torch.float64 else torch.float32),
                          numpy_aurc(p64, y64)]):
        assert abs(g_ - r) <= 1e-6, (got, r)

def test_counts_as_numpy_integers():
    "`n_bins` may be a numpy integer; bools and floats are refused"
    probs, targs = torch.softmax(torch.randn(50, 4), 1), torch.randint(0, 4, (50,))
    assert adaptive_ece(probs, targs, n_bins=np.int64(5)) == adaptive_ece(probs, targs, n_bins=5)
    for bad in (True, 2.0, np.float64(2)):
        with pytest.raises(ValueError, match='`n_bins` must be a positive integer'): adaptive_ece(probs, targs, n_bins=bad)

def test_calibration_imports_nothing_above():
    "The module is below `callbacks`: importing it alone does not import the callbacks"
    import subprocess, sys
    code = "import sys, label_smoothing_fa.calibration; assert 'label_smoothing_fa.callbacks' not in sys.modules"
    subprocess.run([sys.executable, '-c', code], check=True)

# ---- issue 15, item 16: inputs checked once, errors naming the argument ----

P3, T3 = torch.tensor([[.7, .2, .1], [.1, .5, .4], [.3, .3, .4]]), torch.tensor([0, 2, 1])
PROBABILITY_MEASURES = [adaptive_ece, classwise_ece, aurc]

@pytest.mark.parametrize('f', PROBABILITY_MEASURES)
def test_logits_for_probabilities_are_refused(f):
    "Regression: logits crashed `classwise_ece` (IndexError) and gave numbers from the others"
    logits = torch.tensor([[2., -1, 0], [0, 1, 3], [1, 1, -2]])
    with pytest.raises(ValueError, match=r'`probs` holds values outside \[0, 1\].*not logits'): f(logits, T3)
    with pytest.raises(ValueError, match='`probs` holds values outside'): f(P3 + 0.4, T3)  # above 1 + tolerance
    with pytest.raises(ValueError, match="`probs` holds values outside"): f(P3 - 0.2, T3)
    with pytest.raises(ValueError, match="`probs` holds values outside"): f(P3 * 2, T3, multilabel=True)

@pytest.mark.parametrize('f', PROBABILITY_MEASURES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.float32, torch.float64])
def test_rounding_outside_unit_interval_is_clamped(f, dtype):
    "Regression: a -1e-9 from rounding crashed `classwise_ece`; within the dtype's tolerance it is 0 (or 1)"
    step = max(1e-9, torch.finfo(dtype).eps)
    p = P3.to(dtype).clone(); p[0, 2] = -step; p[2, 2] = 1 + step if dtype != torch.float16 else 1.
    assert f(p, T3) == f(p.clamp(0, 1), T3)
    ml = torch.tensor([[-step, 1 + step if dtype != torch.float16 else 1., .3]], dtype=dtype)
    assert f(ml, torch.tensor([[0., 1, 1]]), multilabel=True) == f(ml.clamp(0, 1), torch.tensor([[0., 1, 1]]), multilabel=True)

@pytest.mark.parametrize('f', PROBABILITY_MEASURES + [lambda p, t, **k: fit_temperature(p.log(), t, **k)])
def test_axis_and_dimensions_are_checked(f):
    "Regression: an out-of-range axis or 1-D scores gave a bare IndexError"
    for axis in (2, -3):
        with pytest.raises(ValueError, match=f'`axis` is {axis} but `(probs|logits)` has 2 dimensions'): f(P3, T3, axis=axis)
    with pytest.raises(ValueError, match='`axis` must be an integer'): f(P3, T3, axis=1.)
    assert f(P3, T3, axis=-1) == f(P3, T3) == f(P3, T3, axis=np.int64(1))
    with pytest.raises(ValueError, match=r'has shape \(3,\): it needs a batch and a class axis'): f(P3[0], T3[0])
    assert f(P3.T, T3, axis=0) == f(P3, T3)

@pytest.mark.parametrize('f', PROBABILITY_MEASURES + [lambda p, t, **k: fit_temperature(p.log(), t, **k)])
def test_integer_one_hot_targets_are_accepted(f):
    "Regression: integer one-hot targets (documented as accepted) were refused with a message about positions"
    for one_hot in (F.one_hot(T3, 3), F.one_hot(T3, 3).bool(), F.one_hot(T3, 3).int()):
        assert f(P3, one_hot) == f(P3, T3)
    seg_p = torch.softmax(torch.randn(2, 3, 4, 5), 1)
    seg_t = torch.randint(0, 3, (2, 4, 5))
    assert f(seg_p, F.one_hot(seg_t, 3).movedim(-1, 1)) == f(seg_p, seg_t)
    with pytest.raises(ValueError, match='not one-hot along `axis` 1'): f(P3, torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='not whole numbers'): f(P3, torch.tensor([0., 1.5, 2.]))

# ---- issue 16, part 3: the new measures, the metrics, temperature scaling applied ----

import relplot
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from calibration_refs import torchmetrics_classification
from label_smoothing_fa.calibration import (ece, mce, brier_score, nll, smooth_ece, ECE, MCE, AdaptiveECE, ClasswiseECE,
                                            SmoothECE, Brier, NLL, AURC, TemperatureScaling)
from label_smoothing_fa.losses import LabelSmoothingCrossEntropy
from label_smoothing_fa.multilabel import LabelSmoothingBCEWithLogitsFlat

tm = torchmetrics_classification()

def exact_smooth_ece_at(f, y, sigma, n_points=20001):
    "smECE_sigma in float64 from the definition: the Gaussian reflected at 0 and 1 per sample, trapezoid rule"
    t = np.linspace(0, 1, n_points)[:, None]
    k = sum(np.exp(-0.5 * ((t - img) / sigma) ** 2) for img in (f, -f, 2 - f))
    w = np.ones(n_points); w[[0, -1]] = .5
    return (w * np.abs(k @ (y - f))).sum() / (w * k.sum(1)).sum()

@settings(max_examples=15, deadline=None)
@given(st.integers(30, 800), st.floats(-0.1, 0.1), st.floats(0.02, 0.98), st.integers(0, 2**16))
def test_smooth_ece_against_relplot_and_the_formula(n, bias, centre, seed):
    "smECE of binary predictions away from 0 and 1: relplot's `smECE` to its grid's precision; the formula's fixed point to 1e-5"
    rng = np.random.default_rng(seed)
    f = np.clip(rng.normal(centre, 0.2, n), 0.01, 0.99)
    y = (rng.uniform(0, 1, n) < np.clip(f + bias, 0, 1)).astype(float)
    got = smooth_ece(torch.tensor(f)[:, None], torch.tensor(y)[:, None], multilabel=True)
    assert abs(exact_smooth_ece_at(f, y, got) - got) <= 1e-5 * max(got, 1e-3)  # sigma* = smECE_sigma*
    if got < 0.15: assert abs(got - relplot.smECE(f, y)) <= 2e-3, (got, relplot.smECE(f, y))

def test_smooth_ece_top_label_and_ends():
    "Multi-class: the top-label confidence against correctness; confidences of exactly 1.0 (the end point) as the formula"
    torch.manual_seed(0)
    logits = torch.randn(500, 4) * 20
    targs = torch.distributions.Categorical(logits=logits / 5).sample()
    p = logits.softmax(1).double()  # float32: confidences of exactly 1.0
    conf, right = p.max(1).values, (p.argmax(1) == targs).double()
    assert (conf == 1).sum() > 5
    got = smooth_ece(p, targs)
    assert got == smooth_ece(conf[:, None], right[:, None], multilabel=True)
    assert abs(exact_smooth_ece_at(conf.numpy(), right.numpy(), got) - got) < 1e-5

@pytest.mark.parametrize('seed', range(3))
def test_ece_mce_against_torchmetrics(seed):
    "Float32 predictions: `ece`/`mce` are torchmetrics' multiclass and binary calibration errors (l1, max)"
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(700, 6, generator=g) * torch.rand(700, 1, generator=g) * 20
    targs = torch.randint(0, 6, (700,), generator=g)
    p = logits.softmax(1)
    for n_bins in (15, 7):
        for norm, f in (('l1', ece), ('max', mce)):
            ref = tm.multiclass_calibration_error(p, targs, 6, n_bins=n_bins, norm=norm)
            assert abs(f(p, targs, n_bins) - ref.item()) < 1e-6
            kept = torch.rand(700, 6, generator=g) > .2
            t_ml = torch.where(kept, (torch.rand(700, 6, generator=g) < p).float(), -1.)
            ref = tm.binary_calibration_error(p[kept], t_ml[kept].long(), n_bins=n_bins, norm=norm)
            assert abs(f(p, t_ml, n_bins, ignore_index=-1, multilabel=True) - ref.item()) < 1e-6

def test_brier_and_nll_against_numpy():
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(300, 5, generator=g, dtype=torch.float64) * 3).softmax(1)
    y = torch.randint(0, 5, (300,), generator=g)
    pn, yn = p.numpy(), y.numpy()
    assert abs(brier_score(p, y) - ((pn - np.eye(5)[yn]) ** 2).sum(1).mean()) < 1e-12
    assert abs(nll(p, y) - -np.log(pn[np.arange(300), yn]).mean()) < 1e-12
    q = p[:, 0].clone(); t = (y == 0).double()
    assert abs(brier_score(q[:, None], t[:, None], multilabel=True) - ((q - t) ** 2).mean().item()) < 1e-12

def _learner(x, y, loss, metrics, bs=16):
    "A linear model to 4 outputs, validating on (x, y) in batches of `bs`; exportable (fastai `Datasets`)"
    n = len(x)
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n)), list(range(n))])
    return Learner(dsets.dataloaders(bs=bs), torch.nn.Linear(x.shape[-1], 4), loss_func=loss, metrics=metrics)

def _all(): return [ECE(), MCE(), AdaptiveECE(), ClasswiseECE(), SmoothECE(), Brier(), NLL(), AURC()]
FUNCTIONS = dict(ece=ece, mce=mce, adaptive_ece=adaptive_ece, classwise_ece=classwise_ece, smooth_ece=smooth_ece,
                 brier=brier_score, nll=nll, aurc=aurc)

@pytest.mark.parametrize('kind', ['flat', 'seq', 'multilabel'])
def test_metrics_are_the_functions_on_get_preds(kind):
    "Over batches, each metric's value is its function's on `get_preds` output; ECE is torchmetrics'"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, 5, generator=g) * 3 if kind == 'seq' else torch.randn(50, 5, generator=g) * 3
    if kind == 'multilabel':
        y = torch.where(torch.rand(50, 4, generator=g) < .2, -1., (torch.rand(50, 4, generator=g) < .5).float())
        loss, kw = LabelSmoothingBCEWithLogitsFlat(0.1, ignore_index=-1), dict(multilabel=True, ignore_index=-1)
    else:
        y = torch.randint(0, 4, x.shape[:-1], generator=g)
        if kind == 'seq': y[:, 0] = -1
        loss = CrossEntropyLossFlat(ignore_index=-1) if kind == 'seq' else LabelSmoothingCrossEntropy(0.1)
        kw = dict(axis=-1, ignore_index=-1) if kind == 'seq' else {}
    learn = _learner(x, y, loss, _all())
    got = dict(zip([m.name for m in learn.metrics], learn.validate()[1:]))
    probs, targs = learn.get_preds()
    for name, f in FUNCTIONS.items(): assert abs(got[name] - f(probs, targs, **kw)) < 1e-6, name
    if kind == 'flat':
        assert abs(got['ece'] - tm.multiclass_calibration_error(probs, targs, 4, n_bins=15, norm='l1').item()) < 1e-6
    if kind == 'multilabel':
        kept = targs != -1
        assert abs(got['ece'] - tm.binary_calibration_error(probs[kept], targs[kept].long()).item()) < 1e-6

def test_nll_metric_is_finite_where_probabilities_underflow():
    "The NLL metric reads log-softmax: a label 200 logits below the top gives 200, not inf"
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    learn = _learner(x, y, CrossEntropyLossFlat(), [NLL()])
    learn.model = torch.nn.Linear(2, 4)
    with torch.no_grad(): learn.model.weight.zero_(); learn.model.bias.copy_(torch.tensor([200., 0, 0, 0]))
    value = learn.validate()[1]
    assert abs(value - (200 + np.log1p(3 * np.exp(-200))) / 2) < 1e-9 and np.isfinite(value)

def test_calibrate_temperature_applies_and_survives_export(tmp_path):
    "`get_preds` gives softmax(z / T) after `calibrate_temperature`, the metrics use T, training's loss is the same; export/load keep it"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 5, generator=g)
    y = torch.distributions.Categorical(logits=x[:, :4] * 0.5).sample()
    learn = _learner(x, y, LabelSmoothingCrossEntropy(0.1), [ECE(), NLL()])
    with torch.no_grad(): learn.model.weight.copy_(torch.eye(4, 5) * 4); learn.model.bias.zero_()  # over-confident
    raw, targs = learn.get_preds()
    T = learn.calibrate_temperature()
    assert T == fit_temperature(raw.log(), targs) or abs(T / fit_temperature(raw.log(), targs) - 1) < 1e-6
    assert T > 1
    probs_T, _ = learn.get_preds()
    logits = learn.model(x).detach()
    assert torch.allclose(probs_T, (logits / T).softmax(1), atol=1e-6)
    ece_T, nll_T = learn.validate()[1:]
    assert abs(ece_T - ece(probs_T, targs)) < 1e-9 and abs(nll_T - nll(probs_T.double(), targs)) < 1e-5
    assert learn.loss_func(logits, y) == LabelSmoothingCrossEntropy(0.1)(logits, y)
    learn.path = tmp_path
    learn.export('t.pkl')
    loaded = load_learner(tmp_path/'t.pkl')
    assert isinstance(loaded.loss_func.activation, TemperatureScaling) and loaded.loss_func.activation.temperature == T
    assert torch.allclose(loaded.get_preds(dl=learn.dls.valid)[0], probs_T)
    del learn.loss_func.activation
    assert torch.allclose(learn.get_preds()[0], raw)

def test_calibrate_temperature_refuses_degenerate_sets():
    "A set whose best T is 0, inf or undefined is refused; the activation stays as it was"
    x, y = torch.zeros(8, 2), torch.tensor([0, 1] * 4)
    learn = _learner(x, y, CrossEntropyLossFlat(), [])
    with torch.no_grad(): learn.model.weight.zero_(); learn.model.bias.zero_()  # constant logits: NaN
    with pytest.raises(ValueError, match='no temperature to apply'): learn.calibrate_temperature()
    assert not isinstance(learn.loss_func.activation, TemperatureScaling)
