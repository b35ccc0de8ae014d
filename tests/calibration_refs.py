"Float64 references for the calibration measures, shared by the test files: numpy and scipy, independent of the library"
import importlib.metadata, sys
import numpy as np, scipy.optimize, torch

def numpy_ace(p, y, n_bins=15):
    "Adaptive ECE in float64: stable ascending order by confidence, `np.array_split` into bins"
    conf, right = p.max(1), p.argmax(1) == y
    order = np.argsort(conf, kind='stable')
    return sum(len(b) / len(p) * abs(right[b].mean() - conf[b].mean()) for b in np.array_split(order, n_bins) if len(b))

def numpy_aurc(p, y):
    "Mean over k of the error rate of the k most confident (stable descending order), float64"
    wrong = p.argmax(1) != y
    order = np.argsort(-p.max(1), kind='stable')
    return np.mean(np.cumsum(wrong[order]) / np.arange(1, len(p) + 1))

def scipy_temperature(log_p, y):
    "The T minimising the float64 NLL of softmax(log p / T), by scipy over log T in [-12, 12]; at a bound: 0 or inf"
    def nll(log_t):
        a = log_p / np.exp(log_t)
        a = a - a.max(1, keepdims=True)
        return np.mean(np.log(np.exp(a).sum(1)) - a[np.arange(len(y)), y])
    log_t = scipy.optimize.minimize_scalar(nll, bounds=(-12, 12), method='bounded', options=dict(xatol=1e-10)).x
    return 0. if log_t < -11.9 else float('inf') if log_t > 11.9 else float(np.exp(log_t))

def numpy_classwise_ece(p, y, n_bins, edge_dtype=torch.float32):
    "Mean over classes of the equal-width ECE of p_k against [y = k]; torchmetrics' bins: [lo, hi), 1.0 on its own, its edges (`torch.linspace` in `edge_dtype`)"
    edges = torch.linspace(0, 1, n_bins + 1, dtype=edge_dtype).double().numpy()
    def ece(pk, hit):
        b = np.searchsorted(edges, pk, side='right') - 1
        return sum(abs(hit[b == j].sum() - pk[b == j].sum()) for j in range(n_bins + 1)) / len(pk)
    return np.mean([ece(p[:, k], (y == k).astype(float)) for k in range(p.shape[1])])

def torchmetrics_classification():
    "torchmetrics' functional classification module, imported with torchvision hidden (its compiled ops need a matching torch build)"
    import lightning_utilities.core.imports as lu
    saved, hide = lu._version, 'torchvision' not in sys.modules
    def _version(name):
        if name == 'torchvision': raise importlib.metadata.PackageNotFoundError(name)
        return saved(name)
    lu._version = _version
    if hide: sys.modules['torchvision'] = None
    try: import torchmetrics.functional.classification as classification
    finally:
        lu._version = saved
        if hide: del sys.modules['torchvision']
    return classification
