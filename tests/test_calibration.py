"The calibration measures as functions on `get_preds` output, against float64 numpy/scipy references and torchmetrics."
import numpy as np, pytest, torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

from calibration_refs import numpy_ace, numpy_aurc, numpy_classwise_ece
from label_smoothing_fa import calibration
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
    "ACE, classwise ECE and AURC against float64 numpy: ties, probabilities 0 and 1, N < n_bins, float16, segmentation"
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
    for g_, r in zip(got, [numpy_ace(p64, y64, n_bins), numpy_classwise_ece(p64, y64, n_bins), numpy_aurc(p64, y64)]):
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
