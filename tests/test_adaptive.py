"Adaptive smoothing: `EpsScheduler` against hand-computed schedules and each batch's loss recomputed at the scheduled eps, through every supported loss and fastai's loops."
import math, pickle, warnings

import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastai.losses as fl
import fastai.callback.progress, fastai.callback.schedule  # Learner.no_bar, fit_one_cycle, lr_find
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.mixup import MixUp
from fastai.callback.schedule import SchedCos, SchedLin, SchedNo, SchedPoly, combine_scheds
from fastai.data.core import DataLoaders, Datasets
from fastai.data.load import DataLoader
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner, load_learner

from fakes import PaddedShard
from label_smoothing_fa.adaptive import EpsScheduler
from label_smoothing_fa.smoothing import _loss_chain
from label_smoothing_fa.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, smooth_targets
from label_smoothing_fa.multilabel import LabelSmoothingBCEWithLogits, LabelSmoothingBCEWithLogitsFlat

K = 5

def make_data(n, seed, multilabel=False):
    "Inputs and labels of a fixed random linear teacher with noise; multi-hot labels when `multilabel`"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    logits = x @ torch.randn(8, K, generator=torch.Generator().manual_seed(99)) + torch.randn(n, K, generator=g)
    return x, (logits > 0).float() if multilabel else logits.argmax(1)

def make_learner(loss_func, cbs=(), n_train=128, n_valid=64, bs=32, multilabel=False, datasets=False, path=None):
    "A `Learner` with a linear model; `datasets`: fastai `Datasets` (which `export` needs)"
    (xt, yt), (xv, yv) = make_data(n_train, 1, multilabel), make_data(n_valid, 2, multilabel)
    if datasets:
        items = list(zip(torch.cat([xt, xv]), torch.cat([yt, yv])))
        dsets = Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n_train)), list(range(n_train, n_train + n_valid))])
        dls = dsets.dataloaders(bs=bs)
    else: dls = DataLoaders(DataLoader(list(zip(xt, yt)), bs=bs, shuffle=True, drop_last=True), DataLoader(list(zip(xv, yv)), bs=bs))
    torch.manual_seed(0)
    return Learner(dls, nn.Linear(8, K), loss_func=loss_func, cbs=list(cbs), **({} if path is None else dict(path=path)))

def fit(learn, n_epoch=1, lr=1e-2, how='fit'):
    with learn.no_bar(), learn.no_logging(): getattr(learn, how)(n_epoch, lr)
    return learn

class Probe(Callback):
    "Per training batch: prediction, labels as the loss got them, the loss, and the smoothing each object of the loss's chain held"
    order = 95  # after MixUp
    def before_fit(self): self.seen = []
    def after_loss(self):
        if not self.training: return
        eps = [getattr(o, a) for o in self.chain for a in ('eps', 'label_smoothing') if a in vars(o)]
        self.seen.append((self.pred.detach().clone(), self.yb[0].clone(), self.learn.loss.item(), eps))

def smoothing(loss_func):
    inner = _loss_chain(loss_func)[-1]
    return getattr(inner, 'eps', getattr(inner, 'label_smoothing', None))

def bce_reference(x, y, eps):
    "Label-smoothed BCE with logits in float64 (prior 0.5)"
    x, t = x.double(), (1 - eps) * y.double() + eps * 0.5
    return -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)).mean().item()

# loss, its initial smoothing, multi-label, the loss of a batch at eps from its definition
multiclass = lambda x, y, eps: F.cross_entropy(x.double(), y, label_smoothing=eps).item()
LOSSES = {
    'ours':             (lambda: LabelSmoothingCrossEntropy(0.1), 0.1, False, multiclass),
    'ours-flat':        (lambda: LabelSmoothingCrossEntropyFlat(0.2), 0.2, False, multiclass),
    'ours-compiled':    (lambda: torch.compile(LabelSmoothingCrossEntropy(0.1)), 0.1, False, multiclass),
    'fastai-ls':        (lambda: fl.LabelSmoothingCrossEntropy(0.1), 0.1, False, multiclass),
    'fastai-ls-flat':   (lambda: fl.LabelSmoothingCrossEntropyFlat(eps=0.15), 0.15, False, multiclass),
    'fastai-ce-flat':   (lambda: fl.CrossEntropyLossFlat(), 0., False, multiclass),
    'torch-ce':         (lambda: nn.CrossEntropyLoss(label_smoothing=0.05), 0.05, False, multiclass),
    'ours-bce':         (lambda: LabelSmoothingBCEWithLogits(0.1), 0.1, True, bce_reference),
    'ours-bce-flat':    (lambda: LabelSmoothingBCEWithLogitsFlat(0.1), 0.1, True, bce_reference),
}

@pytest.mark.parametrize('case', list(LOSSES))
def test_each_batch_at_the_scheduled_eps(case):
    make_loss, eps0, ml, reference = LOSSES[case]
    loss_func, probe = make_loss(), Probe()
    probe.chain = _loss_chain(loss_func)
    n_copies = sum(a in vars(o) for o in probe.chain for a in ('eps', 'label_smoothing'))
    learn = fit(make_learner(loss_func, [EpsScheduler(SchedLin(0.4, 0.1)), probe], multilabel=ml), 2)
    by_hand = [0.4 + (i / 8) * (0.1 - 0.4) for i in range(8)]
    h = learn.eps_scheduler.history
    assert list(h.columns) == ['fit', 'epoch', 'iter', 'pct_train', 'eps'] and len(probe.seen) == 8
    assert h['eps'].tolist() == pytest.approx(by_hand, abs=1e-12) and h['pct_train'].tolist() == [i / 8 for i in range(8)]
    for (pred, y, loss, eps), e in zip(probe.seen, by_hand):
        assert len(eps) == n_copies >= 1 and eps == pytest.approx([e] * n_copies, abs=1e-12)  # the loss and BaseLoss's copy
        assert loss == pytest.approx(reference(pred, y, e), abs=2e-6)
    assert [getattr(o, a) for o in probe.chain for a in ('eps', 'label_smoothing') if a in vars(o)] == [eps0] * n_copies
    assert learn.recorder.hps == {'ls_eps': h['eps'].tolist()}

def test_compiled_loss_is_not_recompiled_per_eps():
    "The package's loss under torch.compile takes a new eps without a graph per value (torch's own CE specialises on it)"
    from torch._dynamo.utils import counters
    torch._dynamo.reset(); counters.clear()
    loss = LabelSmoothingCrossEntropy(0.1)
    compiled = torch.compile(loss)
    x, y = torch.randn(16, K), torch.randint(0, K, (16,))
    for i in range(12):
        loss.eps = 0.05 * i / 11 + 0.1
        assert compiled(x, y).item() == pytest.approx(F.cross_entropy(x, y, label_smoothing=loss.eps).item(), abs=1e-5)
    assert counters['stats']['unique_graphs'] <= 2

@pytest.mark.parametrize('sched,by_hand', [
    (SchedCos(0.3, 0.), lambda p: 0.3 * (1 + math.cos(math.pi * p)) / 2),
    (SchedPoly(0.2, 0., 2), lambda p: 0.2 * (1 - p ** 2)),
    (SchedNo(0.25, 0.), lambda p: 0.25),
    (combine_scheds([0.25, 0.75], [SchedLin(0., 0.2), SchedLin(0.2, 0.)]), lambda p: 0.8 * p if p < 0.25 else 0.2 * (1 - (p - 0.25) / 0.75)),
    (lambda p: torch.tensor(0.1 + 0.1 * p), lambda p: 0.1 + 0.1 * p),  # a tensor
    (lambda p: __import__('numpy').float32(0.5 * p), lambda p: 0.5 * p),  # a numpy number
])
def test_schedules_hand_computed(sched, by_hand):
    probe = Probe()
    loss_func = LabelSmoothingCrossEntropy(0.1)
    probe.chain = _loss_chain(loss_func)
    learn = fit(make_learner(loss_func, [EpsScheduler(sched), probe], n_train=320), 2)  # 20 batches
    h = learn.eps_scheduler.history
    assert len(h) == 20
    for (_, row), (pred, y, loss, _) in zip(h.iterrows(), probe.seen):
        assert row['eps'] == pytest.approx(by_hand(row['pct_train']), abs=1e-6)
        assert loss == pytest.approx(multiclass(pred, y, row['eps']), abs=2e-6)
    assert loss_func.eps == 0.1

def test_one_cycle_hps_and_plot_sched():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EpsScheduler(SchedLin(0.2, 0.))]), 3, how='fit_one_cycle')
    hps = learn.recorder.hps
    assert set(hps) == {'lr', 'mom', 'ls_eps'} and len(hps['lr']) == len(hps['ls_eps']) == 12
    assert hps['ls_eps'] == pytest.approx([0.2 * (1 - i / 12) for i in range(12)], abs=1e-12)
    assert hps['lr'] == learn.recorder.lrs  # fastai's own record of the same batches
    learn.recorder.plot_sched()
    assert len(plt.gcf().axes) == 4
    plt.close('all')
    fit(learn, 1)  # a plain fit after it: the Recorder's hps are this fit's, not the stale lr of the last
    assert set(learn.recorder.hps) == {'ls_eps'} and learn.recorder.hps['ls_eps'] == pytest.approx([0.2 * (1 - i / 4) for i in range(4)], abs=1e-12)

@pytest.mark.parametrize('case', ['ours', 'fastai-ls-flat', 'torch-ce', 'ours-bce-flat'])
def test_entropy_logger_follows_the_schedule(case):
    "The logger's floor is each batch's H(q') at the scheduled eps, also at eps 0 for torch's loss (read as no smoothing); a fixed eps stays"
    make_loss, _, ml, _ = LOSSES[case]
    half = lambda p: 0.3 if p < 0.5 else 0.
    probe, logger, fixed = Probe(), EntropyLogger(), EntropyLogger(eps=0.1)
    loss_func = make_loss()
    probe.chain = _loss_chain(loss_func)
    learn = fit(make_learner(loss_func, [EpsScheduler(half), logger, probe], multilabel=ml), 2)
    for (_, row), (_, y, _, _), eps in zip(logger.history.iterrows(), probe.seen, [0.3] * 4 + [0.] * 4):
        if ml:  # each label a two-class target: 1 - eps + eps/2 on its value
            t = (1 - eps) * y.double() + eps / 2
            floor = (entropy_rows(torch.stack([t, 1 - t], -1))).mean().item()
        else: floor = entropy_rows(smooth_targets(y, K, eps).double()).mean().item()
        assert row['target_entropy'] == pytest.approx(floor, abs=1e-6)
    assert logger._told_eps is None  # after the fit: the loss's again
    learn.remove_cb(learn.eps_scheduler).add_cb(fixed)
    learn.add_cb(EpsScheduler(half))
    fit(learn, 1)
    te = fixed.history['target_entropy']
    assert len(te) == 4 and te.max() - te.min() < 1e-6  # its own eps, whatever the schedule

def test_callback_order_independent_hps():
    "The merge into ParamScheduler's dict does not depend on the callbacks' order"
    cb = EpsScheduler(SchedLin(0.2, 0.))
    cb.order = 70  # after ParamScheduler's after_fit
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [cb]), 1, how='fit_one_cycle')
    assert set(learn.recorder.hps) == {'lr', 'mom', 'ls_eps'}

def test_valid_loss_at_last_training_eps():
    learn = fit(make_learner(LabelSmoothingCrossEntropyFlat(0.1), [EpsScheduler(SchedLin(0.5, 0.))]), 2)
    valid_loss = learn.recorder.values[-1][1]
    logits, targs = learn.get_preds(act=lambda o: o)
    assert valid_loss == pytest.approx(multiclass(logits, targs, 0.5 * (1 - 7 / 8)), abs=1e-5)
    assert learn.get_preds(with_loss=True)[2].mean().item() == pytest.approx(multiclass(logits, targs, 0.1), abs=1e-5)  # after: restored

def test_validation_at_last_training_eps():
    "Validation batches run at the eps in force, the epoch's last training batch's, and are neither scheduled nor recorded"
    class ValidProbe(Callback):
        order = 10
        def before_fit(self): self.valid_eps = []
        def after_loss(self):
            if not self.training: self.valid_eps.append((self.epoch, smoothing(self.learn.loss_func)))
    probe = ValidProbe()
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EpsScheduler(SchedLin(0.4, 0.)), probe]), 2)
    assert len(learn.eps_scheduler.history) == 8
    assert probe.valid_eps == [(0, pytest.approx(0.4 * (1 - 3 / 8)))] * 2 + [(1, pytest.approx(0.4 * (1 - 7 / 8)))] * 2

def test_mixup_and_cancel():
    "With MixUp (which swaps `learn.loss_func` for its own), the scheduled eps still reaches the loss; cancelled fits restore"
    probe = Probe()
    loss_func = LabelSmoothingCrossEntropy(0.1)
    probe.chain = _loss_chain(loss_func)
    learn = fit(make_learner(loss_func, [EpsScheduler(SchedLin(0.3, 0.)), MixUp(), probe]), 1)
    assert [eps[0] for *_, eps in probe.seen] == pytest.approx([0.3 * (1 - i / 4) for i in range(4)])
    assert loss_func.eps == 0.1
    class Cancel(Callback):
        def after_batch(self):
            if self.train_iter == 2: raise CancelFitException
    learn = fit(make_learner(loss_func, [EpsScheduler(SchedLin(0.3, 0.)), Cancel()]), 2)
    assert loss_func.eps == 0.1 and len(learn.eps_scheduler.history) == 2  # batches 0 and 1

def test_error_leaves_eps_until_restore_or_next_fit():
    class Boom(Callback):
        def after_loss(self):
            if self.training and self.train_iter == 1: raise RuntimeError('boom')
    loss_func = fl.LabelSmoothingCrossEntropyFlat(eps=0.1)
    learn = make_learner(loss_func, [EpsScheduler(SchedLin(0.3, 0.)), Boom()])
    with pytest.raises(RuntimeError, match='boom'): fit(learn, 2)
    assert loss_func.func.eps == loss_func.eps == pytest.approx(0.3 * (1 - 1 / 8))
    learn.remove_cb(learn.boom)
    fit(learn, 1)
    assert loss_func.func.eps == loss_func.eps == 0.1

def test_fine_tune_lr_find_get_preds(tmp_path):
    loss_func = LabelSmoothingCrossEntropy(0.1)
    learn = make_learner(loss_func, [EpsScheduler(SchedLin(0.3, 0.1))], datasets=True, path=tmp_path)  # tta needs Datasets
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(2, freeze_epochs=1)
    h = learn.eps_scheduler.history
    assert h['fit'].tolist() == [0] * 4 + [1] * 8 and h['iter'].tolist() == list(range(12))
    assert h['eps'].tolist() == pytest.approx([0.3 - 0.2 * i / 4 for i in range(4)] + [0.3 - 0.2 * i / 8 for i in range(8)])
    assert learn.recorder.hps['ls_eps'] == h['eps'].tolist()[4:]
    before = h.copy()
    with learn.no_bar(): learn.lr_find(num_it=8, show_plot=False)
    learn.get_preds(); learn.validate(); learn.tta(n=1)
    assert learn.eps_scheduler.history.equals(before) and loss_func.eps == 0.1
    learn.eps_scheduler.reset()
    assert len(learn.eps_scheduler.history) == 0
    fit(learn, 1)
    assert learn.eps_scheduler.history['fit'].tolist() == [0] * 4

def test_fit_cbs_only():
    "Passed to one `fit` only: that fit is scheduled, the callback leaves with it"
    loss_func = LabelSmoothingCrossEntropy(0.1)
    learn = make_learner(loss_func)
    cb = EpsScheduler(SchedLin(0.3, 0.))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=cb)
    assert len(cb.history) == 4 and not any(isinstance(c, EpsScheduler) for c in learn.cbs) and loss_func.eps == 0.1

def test_export_and_load(tmp_path):
    loss_func = LabelSmoothingCrossEntropy(0.1)
    sched = combine_scheds([0.5, 0.5], [SchedLin(0., 0.3), SchedCos(0.3, 0.)])
    learn = fit(make_learner(loss_func, [EpsScheduler(sched)], n_train=1280, datasets=True, path=tmp_path), 1)
    assert len(learn.eps_scheduler.history) == 40
    learn.export('sched.pkl')
    learn.remove_cb(learn.eps_scheduler).add_cb(EpsScheduler(sched)).export('fresh.pkl')
    assert abs((tmp_path/'sched.pkl').stat().st_size - (tmp_path/'fresh.pkl').stat().st_size) < 200  # no history
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path/'sched.pkl')
    assert loaded.loss_func.eps == 0.1 and len(loaded.eps_scheduler.history) == 0
    assert loaded.eps_scheduler.sched(0.3) == sched(0.3)
    learn.remove_cb(learn.eps_scheduler).add_cb(EpsScheduler(lambda p: 0.3 * p)).export('lambda.pkl')  # cloudpickle
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert load_learner(tmp_path/'lambda.pkl').eps_scheduler.sched(0.5) == 0.15
    cb = pickle.loads(pickle.dumps(EpsScheduler(SchedLin(0.2, 0.))))
    assert cb.sched(0.5) == 0.1 and len(cb.history) == 0

def test_refusals():
    with pytest.raises(ValueError, match='`sched` must be a function'): EpsScheduler(0.1)
    for loss in (F.cross_entropy, fl.BCEWithLogitsLossFlat(), nn.NLLLoss(), fl.FocalLossFlat()):
        learn = make_learner(loss, [EpsScheduler(SchedLin(0.1, 0.))])
        with pytest.raises(ValueError, match='has no smoothing to set'): fit(learn)
    loss_func = LabelSmoothingCrossEntropy(0.1)
    learn = make_learner(loss_func, [EpsScheduler(lambda p: -0.1 if p > 0.5 else 0.2)])
    with pytest.raises(ValueError, match=r'the schedule gave eps=-0.1 at pct_train=0.625: `eps` must be in \[0, 1\]'): fit(learn, 2)
    assert loss_func.eps == 0.2  # the batch before; `restore()` puts it back
    learn.eps_scheduler.restore()
    assert loss_func.eps == 0.1

# ---- OnlineLabelSmoothing: the prior and each batch's loss against the batches recorded as the model trains ----

from pathlib import Path
import torch.distributed as dist, torch.multiprocessing as mp
from fastai.callback.core import CancelBatchException
from fastai.callback.mixup import CutMix
from label_smoothing_fa.adaptive import OnlineLabelSmoothing
from label_smoothing_fa.callbacks import EntropyLogger

SHAPES = {'flat': ((8,), ()), 'image': ((1, 8, 8), ()), 'seq': ((6, 8), (6,)), 'seg': ((3, 4, 4), (4, 4))}

def shaped_data(n, kind, seed, ignore_index=None, soft=False):
    "Inputs and labels (a fifth at `ignore_index` when given) of a fixed random teacher: flat, image, sequence or segmentation"
    g = torch.Generator().manual_seed(seed)
    x_shape, _ = SHAPES[kind]
    x = torch.randn(n, *x_shape, generator=g)
    t = torch.Generator().manual_seed(99)
    if kind == 'seg': logits = torch.einsum('nchw,ck->nhwk', x, torch.randn(3, K, generator=t))
    elif kind == 'seq': logits = x @ torch.randn(8, K, generator=t)
    else: logits = x.flatten(1) @ torch.randn(x[0].numel(), K, generator=t)
    y = (logits + torch.randn(logits.shape, generator=g)).argmax(-1)
    if ignore_index is not None: y = torch.where(torch.rand(y.shape, generator=g) < 0.2, ignore_index, y)
    if soft: y = F.one_hot(y, K).float()
    return x, y

def shaped_model(kind):
    torch.manual_seed(0)
    if kind == 'seg': return nn.Conv2d(3, K, 1)
    if kind == 'seq': return nn.Linear(8, K)
    return nn.Sequential(nn.Flatten(), nn.Linear(64 if kind == 'image' else 8, K))

def shaped_learner(loss_func, cbs=(), kind='flat', n_train=128, bs=32, train_dl=None, **data_kw):
    xt, yt = shaped_data(n_train, kind, 1, **data_kw)
    xv, yv = shaped_data(64, kind, 2, **data_kw)
    train = train_dl if train_dl is not None else DataLoader(list(zip(xt, yt)), bs=bs, shuffle=True, drop_last=True)
    return Learner(DataLoaders(train, DataLoader(list(zip(xv, yv)), bs=bs)), shaped_model(kind), loss_func=loss_func, cbs=list(cbs))

class Batches(Callback):
    "Per training batch: epoch, prediction, labels before MixUp, the loss, and the loss's eps and prior then"
    order = -20
    def before_fit(self): self.seen, self.inner = [], _loss_chain(self.learn.loss_func)[-1]  # before MixUp swaps it
    def before_batch(self): self.yb0 = self.learn.yb
    def after_loss(self):
        if not self.training: return
        inner = self.inner
        prior = inner.prior.clone() if isinstance(inner.prior, torch.Tensor) else inner.prior
        self.seen.append(dict(epoch=self.epoch, pred=self.pred.detach().clone(), y=self.yb0[0].clone(),
                              loss=self.learn.loss.item(), eps=inner.eps, prior=prior))

def rows_last(pred, y, axis):
    "Probabilities (float64) with the classes last, one row per position, and the flat labels"
    p = pred.double().softmax(axis).movedim(axis, -1).reshape(-1, K)
    y = y.argmax(axis) if y.dtype.is_floating_point and y.shape == pred.shape else y
    return p, y.reshape(-1)

def prior_by_hand(batches, last=None, axis=1, ignore=-100):
    "Mean softmax of each class's correctly classified positions, one at a time; the last row where there is none"
    sums, counts = torch.zeros(K, K, dtype=torch.float64), torch.zeros(K)
    for b in batches:
        p, y = rows_last(b['pred'], b['y'], axis)
        for pi, yi in zip(p, y.tolist()):
            if yi != ignore and pi.argmax().item() == yi: sums[yi] += pi; counts[yi] += 1
    last = torch.full((K, K), 1 / K, dtype=torch.float64) if last is None else last.double()
    return torch.stack([sums[c] / counts[c] if counts[c] else last[c] for c in range(K)])

def loss_by_hand(b, alpha, prior, axis=1, ignore=-100):
    "alpha CE(hard) + (1 - alpha) CE(prior[y]), the mean over the kept positions, in float64"
    p, y = rows_last(b['pred'], b['y'], axis)
    kept = y != ignore
    log_p, y = p[kept].log(), y[kept]
    return (alpha * -log_p.gather(1, y[:, None]).squeeze(1) + (1 - alpha) * -(prior[y] * log_p).sum(1)).mean().item()

OLS_CASES = {  # loss, kind, data, class axis, ignore_index
    'flat':     (lambda: LabelSmoothingCrossEntropy(0.1), 'flat', {}, 1, -100),
    'soft':     (lambda: LabelSmoothingCrossEntropy(0.1), 'flat', dict(soft=True), 1, -100),
    'seq-flat': (lambda: LabelSmoothingCrossEntropyFlat(0.1), 'seq', {}, -1, -100),
    'seg':      (lambda: LabelSmoothingCrossEntropy(0.1, axis=1, ignore_index=255), 'seg', dict(ignore_index=255), 1, 255),
    'seg-flat': (lambda: LabelSmoothingCrossEntropyFlat(0.1, axis=1, ignore_index=255, prior='others'), 'seg', dict(ignore_index=255), 1, 255),
}

@pytest.mark.parametrize('case', list(OLS_CASES))
def test_online_prior_and_loss_match_recorded_batches(case):
    "Trained for real (the model moves within each epoch): each epoch's prior from its batches, each batch's loss from the prior before"
    make_loss, kind, data_kw, axis, ignore = OLS_CASES[case]
    alpha, probe, loss_func = 0.6, Batches(), make_loss()
    ols = OnlineLabelSmoothing(alpha, warmup_eps=0.25)
    learn = fit(shaped_learner(loss_func, [ols, probe], kind, **data_kw), 3, lr=0.1)
    by_epoch = [[b for b in probe.seen if b['epoch'] == e] for e in range(3)]
    assert [len(b) for b in by_epoch] == [4] * 3 and len(ols.priors) == 3
    last = None
    for e in range(3):
        if e == 0:  # warm-up: plain label smoothing, uniform prior
            for b in by_epoch[0]:
                assert (b['eps'], b['prior']) == (0.25, None)
                p, y = rows_last(b['pred'], b['y'], axis)
                kept = y != ignore
                assert b['loss'] == pytest.approx(F.cross_entropy(p[kept].log(), y[kept], label_smoothing=0.25).item(), abs=2e-6)
        else:
            for b in by_epoch[e]:
                assert b['eps'] == pytest.approx(1 - alpha) and torch.equal(b['prior'], ols.priors[e - 1])
                assert b['loss'] == pytest.approx(loss_by_hand(b, alpha, ols.priors[e - 1].double(), axis, ignore), abs=2e-6)
        last = prior_by_hand(by_epoch[e], last, axis, ignore)
        assert torch.allclose(ols.priors[e].double(), last, atol=1e-6)
    counted = [sum(1 for b in by_epoch[e] for pi, yi in zip(*rows_last(b['pred'], b['y'], axis)) if yi != ignore and pi.argmax() == yi) for e in range(3)]
    assert ols.history['n_correct'].tolist() == counted
    inner = _loss_chain(loss_func)[-1]
    assert inner.eps == 0.1 and inner.prior == make_loss().prior  # restored: None or 'others'
    assert all(getattr(o, a) == getattr(_loss_chain(make_loss())[i], a) for i, o in enumerate(_loss_chain(loss_func)) for a in ('eps', 'prior') if a in vars(o))

@pytest.mark.parametrize('mix', [MixUp, CutMix])
def test_online_mixup_counts_each_sample_under_its_own_label(mix):
    probe = Batches()
    ols = OnlineLabelSmoothing(0.5)
    learn = fit(shaped_learner(LabelSmoothingCrossEntropy(0.1), [ols, probe, mix()], 'image', n_train=128), 2, lr=0.05)
    mixed = [b for b in probe.seen]
    assert len(mixed) == 8
    first = prior_by_hand(mixed[:4])
    assert torch.allclose(ols.priors[0].double(), first, atol=1e-6)
    assert torch.allclose(ols.priors[1].double(), prior_by_hand(mixed[4:], first), atol=1e-6)

def test_online_keeps_the_row_of_a_class_without_correct_samples():
    "Fixed predictions that change after the first epoch: class 2 is right in epoch 0 only, so epoch 1 keeps its row"
    probs = [torch.tensor([[.7, .2, .1, 0, 0], [.1, .2, .7, 0, 0], [.2, .5, .3, 0, 0]]),
             torch.tensor([[.6, .3, .1, 0, 0], [.5, .1, .4, 0, 0], [.2, .5, .3, 0, 0]])]
    labels = torch.tensor([0, 2, 1])
    class Fixed(nn.Module):
        def __init__(self): super().__init__(); self.w, self.table = nn.Parameter(torch.zeros(())), probs[0]
        def forward(self, i): return (self.table[i.long()] + 1e-9).log() + self.w
    class Switch(Callback):
        def before_epoch(self): self.learn.model.table = probs[min(self.epoch, 1)]
    items = list(zip(torch.arange(3), labels))
    ols = OnlineLabelSmoothing(0.5)
    learn = Learner(DataLoaders(DataLoader(items, bs=3), DataLoader(items, bs=3)), Fixed(), loss_func=LabelSmoothingCrossEntropy(0.1), cbs=[ols, Switch()])
    fit(learn, 2, lr=0)
    first, second = ols.priors
    assert ols.history[['n_correct', 'n_empty']].values.tolist() == [[3, 2], [2, 3]]
    assert torch.allclose(first[2], probs[0][1] / probs[0][1].sum(), atol=1e-6)  # class 2's one right prediction
    assert torch.equal(second[2], first[2])  # none in epoch 1: kept
    assert torch.allclose(second[0], probs[1][0], atol=1e-6) and torch.allclose(second[1], probs[1][2], atol=1e-6)
    assert torch.allclose(first[3], torch.full((K,), 1 / K)) and torch.equal(second[3], first[3])  # never seen: uniform

def test_online_interrupted_fits_and_restore():
    probe, ols, loss_func = Batches(), OnlineLabelSmoothing(0.5), LabelSmoothingCrossEntropy(0.1)
    class StopAt(Callback):
        "Raise `exc` before training batch 2 of epoch 1"
        def __init__(self, exc): self.exc = exc
        def before_batch(self):
            if self.training and self.epoch == 1 and self.iter == 2: raise self.exc
    learn = shaped_learner(loss_func, [ols, probe, StopAt(CancelFitException)])
    fit(learn, 3, lr=0.05)
    assert len(ols.priors) == 1 and (loss_func.eps, loss_func.prior) == (0.1, None)  # the partial epoch dropped
    learn.remove_cb(learn.stop_at).add_cb(StopAt(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt): fit(learn, 3, lr=0.05)
    assert loss_func.eps == 0.5 and torch.equal(loss_func.prior, ols.priors[-1])  # no `after_fit`: until restore or the next fit
    assert len(ols.priors) == 2
    learn.remove_cb(learn.stop_at)
    fit(learn, 1, lr=0.05)  # restores first, drops the partial epoch's sums, starts from the last prior (no warm-up)
    assert (loss_func.eps, loss_func.prior) == (0.1, None)
    assert len(ols.priors) == 3 and probe.seen[0]['eps'] == 0.5 and torch.equal(probe.seen[0]['prior'], ols.priors[1])
    assert torch.allclose(ols.priors[2].double(), prior_by_hand(probe.seen, ols.priors[1]), atol=1e-6)
    assert ols.history['fit'].tolist() == [0, 1, 2]

def test_online_leaves_prior_alone_outside_training(tmp_path):
    ols, loss_func = OnlineLabelSmoothing(0.5), LabelSmoothingCrossEntropy(0.1)
    xt, yt = shaped_data(128, 'flat', 1)
    dsets = Datasets(list(zip(torch.cat([xt, xt[:64] + 1]), torch.cat([yt, yt[:64]]))), [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(128)), list(range(128, 192))])
    learn = Learner(dsets.dataloaders(bs=32), shaped_model('flat'), loss_func=loss_func, cbs=[ols], path=tmp_path)
    fit(learn, 2, lr=0.05)
    prior, history = ols.prior.clone(), ols.history
    learn.get_preds(); learn.get_preds(ds_idx=0, with_loss=True); learn.validate(); learn.tta(n=1); learn.predict(xt[0])
    with learn.no_bar(): learn.lr_find(num_it=6, show_plot=False)
    assert torch.equal(ols.prior, prior) and ols.history.equals(history) and (loss_func.eps, loss_func.prior) == (0.1, None)

def test_online_export_load_and_reset(tmp_path):
    ols, loss_func = OnlineLabelSmoothing(0.7), LabelSmoothingCrossEntropy(0.1, prior='others')
    xt, yt = shaped_data(128, 'flat', 1)
    xv, yv = shaped_data(64, 'flat', 2)
    dsets = Datasets(list(zip(torch.cat([xt, xv]), torch.cat([yt, yv]))), [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(128)), list(range(128, 192))])
    learn = Learner(dsets.dataloaders(bs=32), shaped_model('flat'), loss_func=loss_func, cbs=[ols], path=tmp_path)
    fit(learn, 2, lr=0.05)
    learn.export('ols.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path/'ols.pkl')
    assert (loaded.loss_func.eps, loaded.loss_func.prior) == (0.1, 'others')
    cb = loaded.online_label_smoothing
    assert torch.equal(cb.prior, ols.prior) and len(cb.history) == 0 and cb.alpha == 0.7
    probe = Batches()
    loaded.dls = learn.dls
    loaded.add_cb(probe)
    fit(loaded, 1, lr=0.05)  # goes on from the exported prior: no warm-up
    b = probe.seen[0]
    assert b['eps'] == pytest.approx(0.3) and torch.equal(b['prior'], ols.prior)
    assert b['loss'] == pytest.approx(loss_by_hand(b, 0.7, ols.prior.double()), abs=2e-6)
    cb.reset()
    assert cb.prior is None and len(cb.history) == 0
    fit(loaded, 1, lr=0.05)
    assert probe.seen[0]['eps'] == 0.1 * 0 + 0.1 and probe.seen[0]['prior'] is None  # warm-up again (warmup_eps 0.1)

def test_online_compiled_loss():
    "Through torch.compile's wrapper: the learned prior reaches the compiled loss, and is restored"
    probe, ols, loss = Batches(), OnlineLabelSmoothing(0.5), LabelSmoothingCrossEntropy(0.1)
    fit(shaped_learner(torch.compile(loss), [ols, probe]), 2, lr=0.05)
    assert torch.allclose(ols.priors[0].double(), prior_by_hand(probe.seen[:4]), atol=1e-6)
    for b in probe.seen[4:]:
        assert torch.equal(b['prior'], ols.priors[0])
        assert b['loss'] == pytest.approx(loss_by_hand(b, 0.5, ols.priors[0].double()), abs=2e-6)
    assert (loss.eps, loss.prior) == (0.1, None)

def entropy_rows(q): return -torch.special.xlogy(q, q).sum(-1)

def test_online_with_entropy_logger():
    "The EntropyLogger beside it follows the loss's eps and prior: each batch's floor is H(q') of its targets' rows"
    probe, ols = Batches(), OnlineLabelSmoothing(0.6, warmup_eps=0.2)
    learn = fit(shaped_learner(LabelSmoothingCrossEntropy(0.1), [ols, EntropyLogger(), probe]), 3, lr=0.05)
    h = learn.entropy_logger.history
    assert len(h) == 12
    for (_, row), b in zip(h.iterrows(), probe.seen):
        q = smooth_targets(b['y'], K, b['eps'], b['prior'])  # warm-up: uniform; then 1 - alpha, row y of the prior
        assert row['target_entropy'] == pytest.approx(entropy_rows(q.double()).mean().item(), abs=1e-5)
    assert h['target_entropy'].iloc[:4].nunique() == 1 and h['target_entropy'].iloc[4:].nunique() > 1

def test_online_refusals():
    for loss, msg in ((LabelSmoothingBCEWithLogitsFlat(), 'is for multiclass losses'), (fl.BCEWithLogitsLossFlat(), 'is multi-label'),
                      (fl.LabelSmoothingCrossEntropy(), 'the loss must be'), (F.cross_entropy, 'the loss must be')):
        learn = shaped_learner(loss, [OnlineLabelSmoothing()])
        with pytest.raises(ValueError, match=msg): fit(learn)
    with pytest.raises(ValueError, match='`alpha` must be in'): OnlineLabelSmoothing(-0.5)
    with pytest.raises(ValueError, match='`warmup_eps` must be a number'): OnlineLabelSmoothing(warmup_eps='0.1')

# ---- torch.distributed: two processes, each training on its shard, learn the prior of the whole training set ----

def _run_online(rank=0, world_size=1):
    "One epoch at lr=0 (the weights as initialised) on this process's shard of 101 items; the learned prior"
    xt, yt = shaped_data(101, 'flat', 1)
    with torch.no_grad(): right = (shaped_model('flat')(xt).argmax(1) == yt).nonzero()[0, 0].item()
    xt, yt = xt.roll(-right, 0), yt.roll(-right, 0)  # item 0, which the padding repeats, is counted: twice would show
    train = DataLoader(list(zip(xt, yt)), bs=16) if world_size == 1 else PaddedShard(xt, yt, rank, world_size, 16)
    ols = OnlineLabelSmoothing(0.5)
    fit(shaped_learner(LabelSmoothingCrossEntropy(0.1), [ols], train_dl=train), 1, lr=0)
    return ols.prior, ols.history['n_correct'].tolist()

def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try: torch.save(_run_online(rank, world_size), Path(out_dir)/f'{rank}.pt')
    finally: dist.destroy_process_group()

def test_online_distributed_two_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path/'rendezvous'), str(tmp_path)), nprocs=2, join=True)
    single_prior, single_counted = _run_online()
    for rank in (0, 1):
        prior, counted = torch.load(tmp_path/f'{rank}.pt')
        assert counted == single_counted and torch.allclose(prior, single_prior, atol=1e-6)
    assert not dist.is_initialized()

def test_online_nan_prediction_is_never_correct():
    "Regression: a NaN prediction (argmax: its NaN's index) counted as correct and made the next prior NaN, then the loss refused it"
    table = torch.tensor([[.7, .2, .1, 0, 0], [float('nan')] * 5, [.2, .5, .3, 0, 0]])
    class Fixed(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(()))
        def forward(self, i): return (table[i.long()] + 1e-9).log() + self.w
    items = list(zip(torch.arange(3), torch.tensor([0, 0, 1])))
    ols = OnlineLabelSmoothing(0.5)
    learn = Learner(DataLoaders(DataLoader(items, bs=3), DataLoader(items, bs=3)), Fixed(), loss_func=LabelSmoothingCrossEntropy(0.1), cbs=[ols])
    fit(learn, 2, lr=0)
    # epoch 0: rows 0 and 2, not the NaN row; the NaN gradient makes every prediction of epoch 1 NaN: none counted
    assert ols.history['n_correct'].tolist() == [2, 0]
    assert torch.isfinite(ols.prior).all() and torch.allclose(ols.prior[0], table[0] / table[0].sum())
    assert math.isnan(learn.recorder.values[-1][0])  # the NaN shows in the training loss
