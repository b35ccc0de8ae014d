"EntropyLogger: logged values against `get_preds` recomputed from the definitions and torchmetrics, the training history, fastai integration, two processes under torch.distributed."
import pickle
from pathlib import Path

import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
import torch.distributed as dist, torch.multiprocessing as mp
import fastai.losses as fl
import fastai.callback.progress, fastai.callback.schedule  # Learner.no_bar, lr_find
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.mixup import CutMix, MixUp
from fastai.data.core import DataLoaders, Datasets
from fastai.data.transforms import ItemGetter
from fastai.data.load import DataLoader
from fastai.interpret import Interpretation
from fastai.learner import Learner, Recorder, load_learner

from fakes import PaddedShard, multilabel_segmentation_dls
from calibration_refs import numpy_ace, numpy_aurc, scipy_temperature, torchmetrics_classification
from label_smoothing_fa.callbacks import EntropyLogger
from label_smoothing_fa.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, smooth_targets

LOGGED = ['smooth_ce', 'target_entropy', 'kl', 'entropy', 'confidence', 'nll']
RECORDED = ['smooth_ce', 'kl', 'entropy', 'confidence', 'ece']
CALIBRATION = ['ace', 'cw_ece', 'temperature', 'aurc']  # with `calibration=True`, after RECORDED

def close(a, b, tol=1e-5):
    as64 = lambda t: t.double() if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t, dtype=np.float64))
    a, b = as64(a), as64(b)
    assert torch.allclose(a, b, atol=tol, rtol=0), (a, b)

tm_ece = torchmetrics_classification().multiclass_calibration_error

# ---- small synthetic problems: (N, C) classification, (N, L, C) sequences, (N, C, H, W) segmentation ----

K = 5
SHAPES = {'flat': ((8,), ()), 'image': ((1, 8, 8), ()), 'seq': ((6, 8), (6,)), 'seg': ((3, 4, 4), (4, 4))}

def make_data(n, kind, seed, ignore_index=None, soft=False):
    "Inputs and labels from a fixed random teacher, noisy enough that the model stays unsure; a fifth ignored when `ignore_index`"
    g = torch.Generator().manual_seed(seed)
    x_shape, y_shape = SHAPES[kind]
    x = torch.randn(n, *x_shape, generator=g)
    teacher = torch.randn(x_shape[0] if kind == 'seg' else x_shape[-1] if kind == 'seq' else x[0].numel(), K, generator=torch.Generator().manual_seed(99))
    if kind == 'seg': logits = torch.einsum('nchw,ck->nhwk', x, teacher)
    elif kind == 'seq': logits = x @ teacher
    else: logits = x.flatten(1) @ teacher
    y = (logits + 2 * torch.randn(logits.shape, generator=g)).argmax(-1)
    if ignore_index is not None: y = torch.where(torch.rand(y.shape, generator=g) < 0.2, ignore_index, y)
    if soft: y = F.one_hot(y, K).float()
    return x, y

def make_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == 'seg': return nn.Conv2d(3, K, 1)
    if kind == 'seq': return nn.Linear(8, K)
    return nn.Sequential(nn.Flatten(), nn.Linear(64 if kind == 'image' else 8, K))

def make_learner(loss_func, cbs=(), kind='flat', n_train=128, n_valid=100, bs=32, ignore_index=None, soft=False, valid_dl=None,
                 datasets=False, **kwargs):
    "A `Learner` on `make_data`; `datasets`: fastai `Datasets` (which `export` needs) instead of plain lists"
    xt, yt = make_data(n_train, kind, 1, ignore_index, soft)
    xv, yv = make_data(n_valid, kind, 2, ignore_index, soft)
    if datasets:
        dsets = Datasets(list(zip(torch.cat([xt, xv]), torch.cat([yt, yv]))), [[ItemGetter(0)], [ItemGetter(1)]],
                         splits=[list(range(n_train)), list(range(n_train, n_train + n_valid))])
        dls = dsets.dataloaders(bs=bs)
    else: dls = DataLoaders(DataLoader(list(zip(xt, yt)), bs=bs, shuffle=True, drop_last=True),
                            valid_dl if valid_dl is not None else DataLoader(list(zip(xv, yv)), bs=bs))
    return Learner(dls, make_model(kind), loss_func=loss_func, cbs=list(cbs), **kwargs)

def fit(learn, n_epoch=1, lr=1e-2):
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, lr)
    return learn

def reference(logits, targs, eps, prior=None, axis=1, ignore_index=-100):
    "The logged quantities of each kept position, from their definitions with `smooth_targets`"
    p = torch.softmax(logits.float(), axis).movedim(axis, -1).reshape(-1, logits.shape[axis]).double()
    y = targs.argmax(axis).reshape(-1) if targs.dtype.is_floating_point else targs.reshape(-1)
    p, y = p[y != ignore_index], y[y != ignore_index]
    q = smooth_targets(y, p.shape[1], eps, prior).double()
    H = lambda t: -torch.special.xlogy(t, t).sum(1)
    sce = -(q * p.log()).sum(1)
    return torch.stack([sce, H(q), sce - H(q), H(p), p.max(1).values, -p.gather(1, y[:, None]).squeeze(1).log()], 1)

def check_valid(learn, eps, prior=None, axis=1, ignore_index=-100):
    "The Recorder's last row and `valid_history` against `get_preds` recomputed, and torchmetrics' ECE"
    names, row = learn.recorder.metric_names[1:-1], learn.recorder.values[-1]
    assert [n for n in names if n not in CALIBRATION][-5:] == RECORDED
    got = dict(zip(names, row))
    logits, targs = learn.get_preds(act=lambda o: o)
    ref = reference(logits, targs, eps, prior, axis, ignore_index).mean(0)
    close([got[n] for n in RECORDED[:-1]], ref[[0, 2, 3, 4]])
    vh = learn.entropy_logger.valid_history
    close(vh[LOGGED].iloc[-1].to_numpy().astype(float), ref)
    p = torch.softmax(logits.float(), axis).movedim(axis, -1).reshape(-1, K)
    t = targs.argmax(axis).reshape(-1) if targs.dtype.is_floating_point else targs.reshape(-1)
    ece = tm_ece(p[t != ignore_index], t[t != ignore_index], K, n_bins=15, norm='l1')
    close(got['ece'], ece, 1e-6); close(vh['ece'].iloc[-1], ece, 1e-6)
    return got

# ---- validation values: exact against get_preds, for each kind of loss and output ----

prior5 = torch.tensor([.1, .3, .2, .25, .15])
CASES = {
    'ours':            (lambda: LabelSmoothingCrossEntropy(0.1), {}, 'flat', 0.1, None, 1, -100),
    'ours-others':     (lambda: LabelSmoothingCrossEntropy(0.2, prior='others'), {}, 'flat', 0.2, 'others', 1, -100),
    'ours-prior':      (lambda: LabelSmoothingCrossEntropy(0.3, prior=prior5), {}, 'flat', 0.3, prior5, 1, -100),
    'fastai-ls':       (lambda: fl.LabelSmoothingCrossEntropy(0.15), {}, 'flat', 0.15, None, 1, -100),
    'fastai-ce':       (lambda: fl.CrossEntropyLossFlat(), {}, 'flat', 0.1, None, 1, -100),
    'torch-ls':        (lambda: nn.CrossEntropyLoss(label_smoothing=0.2), {}, 'flat', 0.2, None, 1, -100),
    'own-settings':    (lambda: LabelSmoothingCrossEntropy(0.3), dict(eps=0.05, prior='others'), 'flat', 0.05, 'others', 1, -100),
    'seq-flat':        (lambda: LabelSmoothingCrossEntropyFlat(0.1), {}, 'seq', 0.1, None, -1, -100),
    'seq-fastai':      (lambda: fl.CrossEntropyLossFlat(ignore_index=-1), {}, 'seq', 0.1, None, -1, -1),
    'seg-axis1':       (lambda: LabelSmoothingCrossEntropy(0.1, axis=1, ignore_index=255), {}, 'seg', 0.1, None, 1, 255),
    'seg-flat':        (lambda: LabelSmoothingCrossEntropyFlat(0.2, axis=1, prior='others'), {}, 'seg', 0.2, 'others', 1, -100),
}

@pytest.mark.parametrize('case', list(CASES))
def test_valid_values_match_get_preds(case):
    loss, kw, kind, eps, prior, axis, ignore = CASES[case]
    learn = fit(make_learner(loss(), [EntropyLogger(**kw)], kind, ignore_index=None if kind == 'flat' else ignore), 2)
    assert learn.recorder.metric_names[-6:-1] == RECORDED
    got = check_valid(learn, eps, prior, axis, ignore)
    assert got['kl'] >= 0 and 0 < got['confidence'] <= 1 and 0 <= got['ece'] <= 1
    assert len(learn.entropy_logger.valid_history) == 2

def test_hand_computed_values():
    "Fixed predictions: ECE, confidence and the rest by hand, through a real `fit` (lr=0)"
    probs = torch.tensor([[.3, .25, .25, .1, .1], [.6, .4, 0, 0, 0], [.7, .3, 0, 0, 0], [.9, .1, 0, 0, 0], [1., 0, 0, 0, 0]])
    targs = torch.tensor([0, 1, 0, 0, 0])
    class Fixed(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.ones(()))
        def forward(self, i): return probs.log()[i.long()] + 0 * self.w
    items = list(zip(torch.arange(5), targs))
    dls = DataLoaders(DataLoader(items, bs=5), DataLoader(items, bs=2))
    learn = fit(Learner(dls, Fixed(), loss_func=fl.CrossEntropyLossFlat(), cbs=EntropyLogger(n_bins=4)), lr=0)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    # bins [0,.25) [.25,.5) [.5,.75) [.75,1) and 1.0 alone: |1-.3| + |1-(.6+.7)| + |1-.9| + |1-1| over 5 samples
    close(got['ece'], 1.1 / 5, 1e-6)
    close(got['confidence'], (.3 + .6 + .7 + .9 + 1) / 5)
    # uniform prior, eps=0.1, K=5: q' = .92 on the label, .02 elsewhere; zero probabilities make H(q', p) infinite
    assert got['smooth_ce'] == float('inf')
    close(learn.entropy_logger.valid_history['nll'].iloc[-1], -(torch.tensor([.3, .4, .7, .9, 1.]).log().mean()))
    close(learn.entropy_logger.valid_history['target_entropy'].iloc[-1], -(.92 * torch.tensor(.92).log() + 4 * .02 * torch.tensor(.02).log()))
    r = learn.entropy_logger.reliability
    assert r['count'].tolist() == [0, 1, 2, 1, 1]
    close(r['accuracy'].iloc[1:].to_numpy(), [1, .5, 1, 1])

# ---- the training history ----

class Probe(Callback):
    "Keeps each training batch's prediction and its labels as the data loader gave them (before MixUp/CutMix), and as the loss saw them"
    order = -20
    def before_fit(self): self.seen, self.mixed = [], []
    def before_batch(self): self.yb0 = self.learn.yb
    def after_batch(self):
        if self.training:
            self.seen.append((self.learn.pred.detach().clone(), self.yb0[0].clone()))
            self.mixed.append(self.learn.yb[0].clone())

@pytest.mark.parametrize('every', [1, 3])
def test_history_matches_batches(every):
    probe = Probe()
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.2, prior='others'), [EntropyLogger(every=every), probe], n_train=320), 2)
    h = learn.entropy_logger.history
    assert list(h.columns) == ['fit', 'iter', 'epoch'] + LOGGED and (h['fit'] == 0).all()
    n = len(probe.seen)
    assert n == 20 and h['iter'].tolist() == list(range(0, n, every)) and h['epoch'].tolist() == [i // 10 for i in range(0, n, every)]
    for (_, row), i in zip(h.iterrows(), range(0, n, every)):
        close(row[LOGGED].to_numpy().astype(float), reference(*probe.seen[i], 0.2, 'others').mean(0))

@pytest.mark.parametrize('mix', [MixUp, CutMix])
@pytest.mark.parametrize('soft', [False, True])
def test_mixing_logs_against_unmixed_labels(mix, soft):
    "MixUp/CutMix: each sample against its own label, also when the loss mixes one-hot targets (not `y_int`)"
    loss = (lambda x, y: -(y * x.log_softmax(1)).sum(1).mean()) if soft else LabelSmoothingCrossEntropy(0.1)
    probe = Probe()
    learn = fit(make_learner(loss, [EntropyLogger(), probe, mix()], 'image', n_train=320, soft=soft))
    h = learn.entropy_logger.history
    assert len(h) == len(probe.seen) == 10
    for (_, row), (pred, y) in zip(h.iterrows(), probe.seen):
        close(row[LOGGED].to_numpy().astype(float), reference(pred, y, 0.1).mean(0))
    if soft and mix is CutMix:  # the mixed targets' argmax is often the other sample's label: the check above tells them apart
        assert any((m.argmax(1) != y.argmax(1)).any() for m, (_, y) in zip(probe.mixed, probe.seen))
    check_valid(learn, 0.1)

def test_half_precision_predictions():
    "Half and bfloat16 predictions are computed in float32"
    for dt in (torch.float16, torch.bfloat16):
        probe = Probe()
        learn = make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(), probe])
        learn.model = nn.Sequential(learn.model, nn.Identity())
        learn.model.register_forward_hook(lambda m, i, o: o.to(dt))
        fit(learn)
        assert probe.seen[0][0].dtype == dt
        h = learn.entropy_logger.history
        for (_, row), (pred, y) in zip(h.iterrows(), probe.seen): close(row[LOGGED].to_numpy().astype(float), reference(pred, y, 0.1).mean(0))
        check_valid(learn, 0.1)

def test_cancelled_batches_are_skipped():
    "A batch cancelled before its prediction is not logged (nor the one before it twice); the iteration count goes on"
    class Skip(Callback):
        order = -20
        def before_batch(self):
            if self.training and self.learn.iter == 1: raise CancelBatchException()
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(), Skip()]))
    assert learn.entropy_logger.history['iter'].tolist() == [0, 2, 3]

def test_train_metrics():
    "With `Recorder(train_metrics=True)` the training columns are the epoch's means over the logged batches"
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger()], n_train=320)
    learn.recorder.train_metrics = True
    fit(learn, 2)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    h = learn.entropy_logger.history
    for n in RECORDED[:-1]: close(got[f'train_{n}'], h[h['epoch'] == 1][n].mean())  # batches of equal size
    assert got['train_ece'] is None

def test_train_metrics_nll_and_perplexity():
    "The training epoch's perplexity is exp of its mean NLL, not the mean of the batches' perplexities"
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(show=('nll', 'perplexity'))], n_train=300)
    learn.recorder.train_metrics = True
    fit(learn, 2)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    h = learn.entropy_logger.history
    last = h[h['epoch'] == 1]
    close(got['train_nll'], last['nll'].mean())  # batches of equal size (drop_last)
    close(got['train_perplexity'], np.exp(got['train_nll']), 1e-4)
    assert got['train_perplexity'] < np.exp(last['nll']).mean()  # Jensen: the mean of exps is larger

# ---- fastai: get_preds & co leave the fit's history alone; export; bad arguments ----

def test_predictions_leave_history(tmp_path):
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger()], path=tmp_path), 2)  # lr_find saves the model there
    el = learn.entropy_logger
    before = el.history, el.valid_history, el.reliability
    learn.get_preds(); learn.get_preds(with_loss=True, with_decoded=True)
    res = learn.validate()  # a validation of its own: our columns computed for it, then out of `metrics` again
    assert len(res) == 1 + len(RECORDED) and None not in res and len(learn.metrics) == 0
    assert res[1] == pytest.approx(res[0], rel=1e-5)  # smooth_ce: the loss itself
    Interpretation.from_learner(learn)
    learn.get_preds(dl=[(torch.randn(4, 8),)])  # unlabeled, as `predict` and a test set are
    learn('before_fit'); learn.get_preds(inner=True); learn('after_fit')  # the events `tta` fires: `before_fit`, but no training
    learn.lr_find(num_it=6, show_plot=False)
    for a, b in zip(before, (el.history, el.valid_history, el.reliability)): assert a.equals(b)
    fit(learn)  # a new fit adds to the history, under the next `fit` number
    assert len(el.history) == 12 and len(el.valid_history) == 3
    assert el.history['fit'].tolist() == [0] * 8 + [1] * 4 and el.history['iter'].tolist() == list(range(12))
    assert el.valid_history['fit'].tolist() == [0, 0, 1] and el.history.iloc[:8].equals(before[0])
    el.reset()
    assert len(el.history) == 0 and len(el.valid_history) == 0

def test_stale_values_are_none():
    "Our Recorder columns are computed on the data just validated, or None: after an interrupted fit too"
    class Interrupt(Callback):
        def after_batch(self):
            if self.training and self.epoch == 1: raise KeyboardInterrupt
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(), Interrupt()])
    with pytest.raises(KeyboardInterrupt): fit(learn, 3)
    assert len(learn.entropy_logger.valid_history) == 1  # the first epoch finished
    learn.remove_cb(learn.interrupt)
    res = learn.validate()  # computed on the data just validated: no None, no stale value
    assert len(res) == 1 + len(RECORDED) and None not in res and len(learn.metrics) == 0
    assert res[1] == pytest.approx(res[0], rel=1e-5)

def test_export_and_load(tmp_path):
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(n_bins=10)], n_train=1600, bs=8, datasets=True), 1)
    el = learn.entropy_logger
    assert len(el.history) == 200
    learn.path = tmp_path
    learn.export('after_fit.pkl')
    learn.remove_cb(el).add_cb(EntropyLogger(n_bins=10)).export('fresh.pkl')
    assert abs((tmp_path/'after_fit.pkl').stat().st_size - (tmp_path/'fresh.pkl').stat().st_size) < 1000  # the history alone is ~10 kB
    loaded = load_learner(tmp_path/'after_fit.pkl')
    assert len(loaded.entropy_logger.history) == 0 and len(loaded.entropy_logger.valid_history) == 0
    cb = pickle.loads(pickle.dumps(el))
    assert len(cb.history) == 0 and cb.n_bins == 10 and len(el.history) == 200

def test_bad_arguments():
    with pytest.raises(ValueError, match='`eps` must be in'): EntropyLogger(eps=-0.1)
    with pytest.raises(ValueError, match="`prior` must be None, 'others'"): EntropyLogger(prior='uniform')
    with pytest.raises(ValueError, match='`n_bins` must be a positive integer'): EntropyLogger(n_bins=0)
    with pytest.raises(ValueError, match='`every` must be a positive integer'): EntropyLogger(every=True)
    with pytest.raises(ValueError, match='no history to plot'): EntropyLogger().plot()
    with pytest.raises(ValueError, match='no validation epoch to plot'): EntropyLogger().plot_reliability()
    learn = make_learner(lambda x, y: x.sum() * 0, [EntropyLogger()])
    learn.model = nn.Sequential(nn.Linear(8, 2 * K), nn.Unflatten(1, (2, K)))  # (N, 2, K): 2 classes on axis 1, N*K positions
    with pytest.raises(ValueError, match=r'the target has 128 positions, the prediction 640 \(shape \(128, 2, 5\), class axis 1\)'): fit(learn)

def test_plots():
    import matplotlib; matplotlib.use('Agg')
    from matplotlib.figure import Figure
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger()]), 2)
    assert isinstance(learn.entropy_logger.plot(), Figure) and isinstance(learn.entropy_logger.plot_reliability(), Figure)

# ---- torch.distributed: two processes, each validating half, log the values of the whole ----

def _run(kind, rank=0, world_size=1):
    "Fit one epoch (lr=0: the weights stay as initialised) validating this process's share of 101 items; the logged values (calibration: gathered)"
    xv, yv = make_data(101, 'flat', 2)
    if world_size == 1: valid = DataLoader(list(zip(xv, yv)), bs=16)
    elif kind == 'halves':
        half = slice(0, 50) if rank == 0 else slice(50, None)
        valid = DataLoader(list(zip(xv[half], yv[half])), bs=16)
    else: valid = PaddedShard(xv, yv, rank, world_size, 16)
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(calibration=True)], n_train=32, valid_dl=valid), lr=0)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    return [got[n] for n in RECORDED + CALIBRATION], learn.entropy_logger.valid_history[LOGGED].iloc[-1].tolist()

def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try: torch.save({kind: _run(kind, rank, world_size) for kind in ('halves', 'padded')}, Path(out_dir)/f'{rank}.pt')
    finally: dist.destroy_process_group()

def test_distributed_two_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path/'rendezvous'), str(tmp_path)), nprocs=2, join=True)
    single = _run('halves')
    for rank in (0, 1):
        res = torch.load(tmp_path/f'{rank}.pt')
        for kind in ('halves', 'padded'):
            close(res[kind][0], single[0], 1e-6); close(res[kind][1], single[1], 1e-6)
    assert not dist.is_initialized()

# ---- calibration diagnostics: ace, cw_ece, temperature, aurc against independent references ----

from label_smoothing_fa import callbacks
from label_smoothing_fa.multilabel import LabelSmoothingBCEWithLogitsFlat
# torchmetrics is imported already (`tm_ece`, with torchvision hidden)
from torchmetrics.functional.classification import binary_calibration_error as tm_binary_ece

def calibration_reference(probs, targs, axis=1, ignore_index=-100, n_bins=15, columns=None):
    "The four from probabilities (rows of kept positions, or `get_preds` output) by the references above"
    p = probs.movedim(axis, -1).reshape(-1, probs.shape[axis])
    y = targs.argmax(axis).reshape(-1) if targs.dtype.is_floating_point else targs.reshape(-1)
    p, y = p[y != ignore_index], y[y != ignore_index]
    if columns is None:  # classwise: each class's p_k against [y = k], torchmetrics' binary ECE
        cw = np.mean([tm_binary_ece(p[:, k], (y == k).long(), n_bins=n_bins).item() for k in range(p.shape[1])])
    else:  # multi-label: per label, its p against its target
        cw = np.mean([tm_binary_ece(p[columns == l, 1], y[columns == l], n_bins=n_bins).item() for l in columns.unique()])
    p64, y64 = p.double().numpy(), y.numpy()
    return dict(ace=numpy_ace(p64, y64, n_bins), cw_ece=cw, temperature=scipy_temperature(np.log(p64), y64),
                aurc=numpy_aurc(p64, y64))

def check_calibration(learn, samples=None, **kwargs):
    "The Recorder's last row and `valid_history` hold the references on `get_preds` (`samples` makes them the reference's input)"
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))  # before `get_preds` starts it afresh
    probs, targs = learn.get_preds()
    if samples is not None: probs, targs, kwargs['columns'] = samples(probs, targs)
    ref = calibration_reference(probs, targs, **kwargs)
    for n in ('ace', 'cw_ece', 'aurc'): close(got[n], ref[n], 1e-6)
    T, T_ref = got['temperature'], ref['temperature']
    assert T == T_ref if T_ref in (0, float('inf')) else abs(T / T_ref - 1) < 1e-3, (T, T_ref)
    vh = learn.entropy_logger.valid_history
    assert list(vh.columns[-5:]) == ['ece'] + CALIBRATION and vh[CALIBRATION].iloc[-1].tolist() == [got[n] for n in CALIBRATION]
    return got

CALIBRATION_CASES = {
    'flat': (lambda: LabelSmoothingCrossEntropy(0.1), 'flat', None, 1, -100),
    'seq-flat': (lambda: fl.CrossEntropyLossFlat(ignore_index=-1), 'seq', -1, -1, -1),
    'seg-axis1': (lambda: LabelSmoothingCrossEntropy(0.1, axis=1, ignore_index=255), 'seg', 255, 1, 255),
}

@pytest.mark.parametrize('case', list(CALIBRATION_CASES))
def test_calibration_matches_get_preds(case):
    "Classification, sequences with ignored positions, segmentation (class axis 1): the columns are the references on `get_preds`"
    loss, kind, ignore, axis, ignore_index = CALIBRATION_CASES[case]
    learn = fit(make_learner(loss(), [EntropyLogger(calibration=True)], kind, ignore_index=ignore), 2)
    assert learn.recorder.metric_names[-10:-1] == RECORDED + CALIBRATION
    got = check_calibration(learn, axis=axis, ignore_index=ignore_index)
    assert 0 <= got['ace'] <= 1 and 0 <= got['cw_ece'] <= 1 and 0 <= got['aurc'] <= 1 and 0 < got['temperature'] < 10
    fit(learn, 1)
    check_valid(learn, 0.1, axis=axis, ignore_index=ignore_index)  # the other columns as without `calibration`

def test_calibration_edge_sets():
    "Fewer samples than bins, a class absent from the validation set, `n_bins`"
    xv, yv = make_data(60, 'flat', 2)
    few = DataLoader(list(zip(xv[:9], yv[:9])), bs=4)
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(calibration=True)], valid_dl=few))
    check_calibration(learn)
    absent = yv != 4
    assert absent.sum() < 60
    no_class_4 = DataLoader(list(zip(xv[absent], yv[absent])), bs=16)
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(n_bins=6, calibration=True)], valid_dl=no_class_4))
    check_calibration(learn, n_bins=6)
    probs, targs = learn.get_preds()
    assert probs.shape[1] == K and not (targs == 4).any()  # class 4 still counts: its p_4 against all zeros

class FixedPredictions(nn.Module):
    "Returns the given logits for item indices (a parameter so the optimiser has something)"
    def __init__(self, logits): super().__init__(); self.logits, self.w = logits, nn.Parameter(torch.ones(()))
    def forward(self, i): return self.logits[i.long()] + 0 * self.w

def fixed_learner(logits, targs, bs=2, train=None, **kwargs):
    "A `Learner` predicting `logits` for the validation items, in order, in batches of `bs`; one training batch (`train` items)"
    items = list(zip(torch.arange(len(targs)), targs))
    train_items = items if train is None else [items[i] for i in train]
    dls = DataLoaders(DataLoader(train_items, bs=len(train_items)), DataLoader(items, bs=bs))
    return fit(Learner(dls, FixedPredictions(logits), loss_func=fl.CrossEntropyLossFlat(), cbs=EntropyLogger(calibration=True, **kwargs)), lr=0)

def test_calibration_ties_by_hand():
    "Tied confidences keep the samples' order (stable sorts): by hand, and as numpy's stable sorts"
    conf, right = torch.tensor([.6, .6, .6, .6, .9]), torch.tensor([1, 1, 0, 0, 1])
    logits = torch.stack([conf, 1 - conf], 1).log()
    targs = 1 - right  # class 0 is right
    learn = fixed_learner(logits, targs, n_bins=2)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    # bins of 3 + 2 in the samples' order: {.6 R, .6 R, .6 W}, {.6 W, .9 R}: (|2 - 1.8| + |1 - 1.5|) / 5
    close(got['ace'], 0.7 / 5, 1e-6)
    # most confident first, ties in order: errors 0, 0, 0, 1, 2 among 1..5
    close(got['aurc'], (0 + 0 + 0 + 1 / 4 + 2 / 5) / 5, 1e-6)
    check_calibration(learn, n_bins=2)
    # the same samples, the tied ones in another order: another ACE and AURC
    learn = fixed_learner(logits[[2, 3, 0, 1, 4]], targs[[2, 3, 0, 1, 4]], n_bins=2)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    close(got['ace'], (abs(1 - 1.8) + abs(2 - 1.5)) / 5, 1e-6)
    close(got['aurc'], (0 + 1 / 2 + 2 / 3 + 2 / 4 + 2 / 5) / 5, 1e-6)

def test_calibration_nan_and_empty():
    "A NaN prediction makes the four NaN (the ECE leaves it out of its bins); an empty validation set gives None"
    logits = torch.randn(6, 3) * 2
    logits[2] = float('nan')
    learn = fixed_learner(logits, torch.tensor([0, 1, 2, 0, 1, 2]), train=[0, 1])  # (a NaN loss would make the weights NaN)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    assert all(np.isnan(got[n]) for n in CALIBRATION) and np.isnan(got['smooth_ce']) and np.isfinite(got['ece'])
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(calibration=True)], valid_dl=DataLoader([], bs=4)))
    assert learn.recorder.values[-1][-9:] == [None] * 9
    assert len(learn.entropy_logger.valid_history) == 1 and learn.entropy_logger.valid_history[CALIBRATION].isna().all().all()
    xv, yv = make_data(8, 'seq', 2)
    all_ignored = DataLoader(list(zip(xv, torch.full_like(yv, -1))), bs=4)
    learn = fit(make_learner(fl.CrossEntropyLossFlat(ignore_index=-1), [EntropyLogger(calibration=True)], 'seq', ignore_index=-1,
                             valid_dl=all_ignored))
    assert learn.recorder.values[-1][-9:] == [None] * 9

def test_calibration_degenerate_temperature():
    "All right with separable logits: T = 0; constant logits: NaN, the rest as defined"
    learn = fixed_learner(torch.tensor([[3., 0, 0], [0, 2, 1], [0, 0, 1]]), torch.tensor([0, 1, 2]))
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    assert got['temperature'] == 0 and got['aurc'] == 0
    learn = fixed_learner(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    assert np.isnan(got['temperature'])
    close(got['aurc'], np.mean([0, 1 / 2, 2 / 3, 2 / 4]), 1e-6)  # all tied at 1/3: class 0 predicted, in order

def test_calibration_multilabel():
    "Multi-label segmentation output (N, L, H, W) with ignored entries: each kept entry a two-class sample, cw_ece per label"
    dls = multilabel_segmentation_dls()
    learn = Learner(dls, nn.Conv2d(2, 3, 1), loss_func=LabelSmoothingBCEWithLogitsFlat(0.1, ignore_index=-1), lr=0.05,
                    cbs=[EntropyLogger(calibration=True)])
    fit(learn, 2, 0.05)
    def entries(probs, targs):
        "Kept entries as two-class rows (1 - p, p), their 0/1 targets and labels"
        kept = targs != -1
        labels = torch.arange(3).view(1, 3, 1, 1).expand(targs.shape)[kept]
        return torch.stack([1 - probs[kept], probs[kept]], 1), targs[kept].long(), labels
    got = check_calibration(learn, entries)
    assert got['ace'] >= 0 and got['cw_ece'] >= 0

def test_calibration_off_keeps_nothing(monkeypatch):
    "By default no validation logits are kept and nothing more is computed"
    calls = []
    monkeypatch.setattr(callbacks, '_samples', lambda *a, **k: calls.append(1))
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger()]), 2)
    assert calls == [] and learn.recorder.metric_names[-6:-1] == RECORDED
    assert list(learn.entropy_logger.valid_history.columns[-1:]) == ['ece']

# ---- a changing eps and prior: each batch is logged with its own ----

from label_smoothing_fa.callbacks import _target_entropy
from label_smoothing_fa.smoothing import _loss_chain

def floor_by_hand(eps, K=K, prior=None):
    "H(q') of each class's smoothed one-hot target, float64 xlogy on q' = (1-eps) e_y + eps u_y"
    u = torch.full((K, K), 1 / K, dtype=torch.float64) if prior is None else prior.double().expand(K, K)
    q = (1 - eps) * torch.eye(K, dtype=torch.float64) + eps * u
    return -torch.special.xlogy(q, q).sum(1)

def test_floor_of_a_matrix_prior():
    "The floor per row of a K x K prior, against q' built by hand, without the loss"
    P = torch.softmax(torch.randn(K, K, generator=torch.Generator().manual_seed(0)) * 3, 1)
    P[2] = torch.tensor([0., 0, 1, 0, 0])  # a row on its own class: q' one-hot, H = 0
    for eps in (0., 0.25, 1.):
        close(_target_entropy(K, eps, P), floor_by_hand(eps, prior=P), 1e-6)
    close(_target_entropy(K, 0.25, P)[2], 0., 1e-7)

class SetEps(Callback):
    "A test schedule: sets the innermost loss's eps (through `BaseLoss`) before each training batch, or tells the logger"
    def __init__(self, schedule, tell=False): self.schedule, self.tell = schedule, tell
    def before_batch(self):
        if not self.training: return
        eps = self.schedule[self.learn.train_iter]
        if self.tell: self.learn.entropy_logger.set_eps(eps)
        else: _loss_chain(self.learn.loss_func)[-1].eps = eps

@pytest.mark.parametrize('every', [1, 3])
def test_history_follows_eps_per_batch(every):
    "Each logged batch against the eps its loss used: every column, the floor by hand, and the epoch means"
    schedule = np.linspace(0.4, 0.0, 20).tolist()
    probe = Probe()
    learn = make_learner(LabelSmoothingCrossEntropyFlat(0.4, axis=1), [EntropyLogger(every=every), probe, SetEps(schedule)], n_train=320)
    learn.recorder.train_metrics = True
    fit(learn, 2)
    h = learn.entropy_logger.history
    assert h['iter'].tolist() == list(range(0, 20, every))
    for (_, row), i in zip(h.iterrows(), range(0, 20, every)):
        close(row[LOGGED].to_numpy().astype(float), reference(*probe.seen[i], schedule[i]).mean(0))
        close(row['target_entropy'], floor_by_hand(schedule[i])[0], 1e-6)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    for n in RECORDED[:-1]: close(got[f'train_{n}'], h[h['epoch'] == 1][n].mean())  # batches of equal size
    # validation: the eps of the last training batch
    logits, targs = learn.get_preds(act=lambda o: o)
    close(learn.entropy_logger.valid_history[LOGGED].iloc[-1].to_numpy().astype(float),
          reference(logits, targs, schedule[-1]).mean(0))

class PriorPerEpoch(Callback):
    "A stand-in for online label smoothing: a new K x K prior and eps = 1 - alpha at each epoch; in the third, in place mid-epoch"
    def __init__(self): self.used = []  # (eps, prior) of each training batch (not in `before_fit`: `get_preds` fires it)
    def before_batch(self):
        if not self.training: return
        loss, it = self.learn.loss_func, self.iter
        P = torch.softmax(torch.randn(K, K, generator=torch.Generator().manual_seed(self.epoch)) * 2, 1)
        if self.epoch < 2 and it == 0: loss.prior, loss.eps = P, 1 - (0.5 + 0.1 * self.epoch)
        if self.epoch == 2 and it == 5: loss.prior.copy_(P)  # the same tensor, a new version, batches waiting
        self.used.append((loss.eps, loss.prior.clone()))

def test_history_follows_matrix_prior_per_epoch():
    probe, online = Probe(), PriorPerEpoch()
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(), probe, online], n_train=320), 3)
    h = learn.entropy_logger.history
    assert len(h) == 30
    for (_, row), (pred, y), (eps, P) in zip(h.iterrows(), probe.seen, online.used):
        close(row[LOGGED].to_numpy().astype(float), reference(pred, y, eps, P).mean(0))
    assert not torch.equal(online.used[24][1], online.used[25][1])  # the in-place change
    logits, targs = learn.get_preds(act=lambda o: o)
    eps, P = online.used[-1]
    close(learn.entropy_logger.valid_history[LOGGED].iloc[-1].to_numpy().astype(float), reference(logits, targs, eps, P).mean(0))

def test_set_eps_and_fixed_eps():
    "A loss with no eps to read is told by `set_eps`; a constructor's eps ignores both the loss and `set_eps`"
    schedule = np.linspace(0.3, 0.05, 10).tolist()
    loss = lambda x, y: F.cross_entropy(x, y, label_smoothing=0.2)
    probe = Probe()
    learn = fit(make_learner(loss, [EntropyLogger(), probe, SetEps(schedule, tell=True)], n_train=320))
    for (_, row), (pred, y), eps in zip(learn.entropy_logger.history.iterrows(), probe.seen, schedule):
        close(row[LOGGED].to_numpy().astype(float), reference(pred, y, eps).mean(0))
    for tell in (False, True):
        learn = fit(make_learner(LabelSmoothingCrossEntropy(0.3), [EntropyLogger(eps=0.05), SetEps(schedule, tell)], n_train=320))
        close(learn.entropy_logger.history['target_entropy'].to_numpy(), floor_by_hand(0.05)[0].expand(10), 1e-6)
    el = EntropyLogger()
    el.set_eps(0.2); el.set_eps(None)
    assert el._told_eps is None
    with pytest.raises(ValueError, match='`eps` must be in'): el.set_eps(-1)

def test_multilabel_follows_eps():
    "A multi-label loss's eps changed per batch: each batch's floor is the binary entropy of its smoothed target"
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, :3] > 0).float()
    dls = DataLoaders(DataLoader(list(zip(x, y)), bs=16), DataLoader(list(zip(x, y)), bs=16))
    schedule = [0.4, 0.3, 0.2, 0.1]
    learn = fit(Learner(dls, nn.Linear(8, 3), loss_func=LabelSmoothingBCEWithLogitsFlat(0.4), cbs=[EntropyLogger(), SetEps(schedule)]))
    h2 = lambda t: -(t * np.log(t) + (1 - t) * np.log(1 - t))
    # prior 0.5: y' = eps / 2 or 1 - eps / 2, the same binary entropy
    close(learn.entropy_logger.history['target_entropy'].to_numpy(), [h2(e / 2) for e in schedule], 1e-6)

def test_interrupted_fit_then_new_fit():
    "The batches an interrupted fit left waiting join the history before the next fit starts"
    class Interrupt(Callback):
        def after_batch(self):
            if self.training and self.epoch == 1 and self.iter == 1: raise KeyboardInterrupt
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(), Interrupt()])
    with pytest.raises(KeyboardInterrupt): fit(learn, 3)
    learn.remove_cb(learn.interrupt)
    fit(learn)
    h = learn.entropy_logger.history
    assert h['iter'].tolist() == list(range(10)) and h['fit'].tolist() == [0] * 6 + [1] * 4

def test_calibration_off_by_default(monkeypatch):
    "Without `calibration=True` the logger keeps no validation samples and adds no calibration columns"
    import label_smoothing_fa.callbacks as cbs_module
    calls, samples = [], cbs_module._samples
    monkeypatch.setattr(cbs_module, '_samples', lambda *a, **k: calls.append(1) or samples(*a, **k))
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger()]))
    assert not calls and learn.entropy_logger._valid.samples == []
    assert not set(CALIBRATION) & set(learn.recorder.metric_names)
    fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(calibration=True)]))
    assert calls  # the check sees the samples being kept when asked

def test_counts_as_numpy_integers():
    "The logger's `n_bins` and `every` may be numpy integers (stored as int); bools and floats are refused"
    logger = EntropyLogger(n_bins=np.int64(5), every=np.int32(2))
    assert type(logger.n_bins) is int and type(logger.every) is int and logger.n_bins == 5
    for bad in (True, 2.0, np.float64(2)):
        with pytest.raises(ValueError, match='`n_bins` must be a positive integer'): EntropyLogger(n_bins=bad)


def test_multilabel_nan_marked_missing_labels_are_left_out():
    "`ignore_index=float('nan')`: the logger and the calibration functions leave NaN labels out, as the loss does"
    from label_smoothing_fa.calibration import ece
    from label_smoothing_fa.multilabel import LabelSmoothingBCEWithLogitsFlat
    torch.manual_seed(0)
    x = torch.randn(256, 6); y = (x[:, :3] > 0).float(); y[torch.rand(256, 3) < 0.2] = float('nan')
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:192], ds[192:], bs=64)
    learn = Learner(dls, nn.Linear(6, 3), cbs=EntropyLogger(calibration=True),
                    loss_func=LabelSmoothingBCEWithLogitsFlat(0.1, ignore_index=float('nan')))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    last = learn.entropy_logger.valid_history.iloc[-1]
    p, t = learn.get_preds()
    keep = ~t.isnan()
    p_y = torch.where(t[keep] > 0.5, p[keep], 1 - p[keep]).double()
    assert last['nll'] == pytest.approx(-p_y.log().mean().item(), rel=1e-6)
    assert last['ece'] == pytest.approx(ece(p, t, multilabel=True, ignore_index=float('nan')), abs=1e-7)
    assert not np.isnan(last[['smooth_ce', 'kl', 'entropy', 'confidence', 'ace', 'cw_ece', 'aurc']]).any()
