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
