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

from label_smoothing_fa.adaptive import EpsScheduler
from label_smoothing_fa.callbacks import _loss_chain
from label_smoothing_fa.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat
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
    assert learn.recorder.hps == {'eps': h['eps'].tolist()}

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
    assert set(hps) == {'lr', 'mom', 'eps'} and len(hps['lr']) == len(hps['eps']) == 12
    assert hps['eps'] == pytest.approx([0.2 * (1 - i / 12) for i in range(12)], abs=1e-12)
    assert hps['lr'] == learn.recorder.lrs  # fastai's own record of the same batches
    learn.recorder.plot_sched()
    assert len(plt.gcf().axes) == 4
    plt.close('all')
    fit(learn, 1)  # a plain fit after it: the Recorder's hps are this fit's, not the stale lr of the last
    assert set(learn.recorder.hps) == {'eps'} and learn.recorder.hps['eps'] == pytest.approx([0.2 * (1 - i / 4) for i in range(4)], abs=1e-12)

def test_callback_order_independent_hps():
    "The merge into ParamScheduler's dict does not depend on the callbacks' order"
    cb = EpsScheduler(SchedLin(0.2, 0.))
    cb.order = 70  # after ParamScheduler's after_fit
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [cb]), 1, how='fit_one_cycle')
    assert set(learn.recorder.hps) == {'lr', 'mom', 'eps'}

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
    assert learn.recorder.hps['eps'] == h['eps'].tolist()[4:]
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
