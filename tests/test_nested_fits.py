"The three callbacks under fastai's nested fits (get_preds, validate, tta, lr_find inside or after a fit), interrupted fits, and the pairings that can interfere: MixUp/CutMix, GradientAccumulation, mixed precision, fine_tune, compiled losses, SaveModelCallback/EarlyStopping on the fixed-meaning column."
import math, tempfile

import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastai.callback.progress, fastai.callback.schedule  # Learner.no_bar, fit_one_cycle, lr_find
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.schedule import SchedLin
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner

from label_smoothing_fa.adaptive import EpsScheduler, OnlineLabelSmoothing
from label_smoothing_fa.callbacks import EntropyLogger
from label_smoothing_fa.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat
from label_smoothing_fa.smoothing import _loss_chain, is_training_fit

K = 5

def make_learner(loss_func, cbs=(), n_train=128, n_valid=64, bs=32, seed=0, image=False):
    "A linear model on a noisy linear teacher: 4 training batches of 32 (shuffled), 2 validation batches; `image`: 1 x 2 x 4 inputs (CutMix)"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, 8, generator=g)
    y = (x @ torch.randn(8, K, generator=g) + torch.randn(len(x), K, generator=g)).argmax(1)
    if image: x = x.view(-1, 1, 2, 4)
    dsets = Datasets(list(zip(x, y)), [[ItemGetter(0)], [ItemGetter(1)]],
                     splits=[list(range(n_train)), list(range(n_train, len(x)))])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, K))
    return Learner(dsets.dataloaders(bs=bs, drop_last=True), model, loss_func=loss_func, cbs=list(cbs),
                   path=tempfile.mkdtemp())

def fit(learn, n_epoch=2, lr=1e-2, how='fit', **kwargs):
    with learn.no_bar(), learn.no_logging(): getattr(learn, how)(n_epoch, lr, **kwargs)
    return learn

def inner(learn): return _loss_chain(learn.loss_func)[-1]

class Probe(Callback):
    "Per training batch: the eps and prior the innermost loss holds when it computes the loss"
    order = 95
    def __init__(self): self.seen = []
    def after_loss(self):
        if self.training and is_training_fit(self.learn):
            lf = inner(self.learn)
            self.seen.append((self.epoch, lf.eps, getattr(lf, 'prior', None)))

class NestedAtEpochEnd(Callback):
    "A user's callback: `get_preds` and `validate` at the end of each training epoch (its own fits are skipped)"
    order = 90
    def __init__(self, *calls): self.calls, self.results = calls or ('get_preds', 'validate'), []
    def after_epoch(self):
        if not is_training_fit(self.learn): return  # the nested fits' own `after_epoch`
        for c in self.calls: self.results.append(getattr(self.learn, c)())

SCHEDULE = [0.5 * (1 - i / 8) for i in range(8)]  # SchedLin(.5, 0) over 2 epochs of 4 batches

# (a `validate` in the middle of a training epoch leaves fastai's `learn.training` False: fastai trains no more
# batches of that epoch, whatever the callbacks; `tests/test_callbacks.py` checks the logger's values there)
@pytest.mark.parametrize('nested', [NestedAtEpochEnd])
def test_scheduler_follows_its_schedule_around_nested_fits(nested):
    "The reproducer: eps per batch .5 .4375 ... 0.0625 (not .5 .4375 .375 .3125 .1 .1 .1 .1), loss as built after"
    loss, probe = LabelSmoothingCrossEntropy(0.1), Probe()
    learn = fit(make_learner(loss, [EpsScheduler(SchedLin(.5, 0)), probe, nested(), EntropyLogger()]))
    assert [eps for _, eps, _ in probe.seen] == pytest.approx(SCHEDULE)
    assert learn.eps_scheduler.history['eps'].tolist() == pytest.approx(SCHEDULE)
    assert loss.eps == 0.1
    # the logger followed the schedule too: its floor is each batch's
    assert learn.entropy_logger.history['fit'].tolist() == [0] * 8
    assert len(learn.entropy_logger.valid_history) == 2

@pytest.mark.parametrize('nested', [NestedAtEpochEnd])
def test_online_learns_every_epoch_around_nested_fits(nested):
    "The reproducer: OLS keeps 3 epochs of 3 in its history, and trains epochs 1, 2 with the learned prior at 1 - alpha"
    loss, probe = LabelSmoothingCrossEntropy(0.1), Probe()
    ols = OnlineLabelSmoothing(alpha=0.6, warmup_eps=0.2)
    learn = fit(make_learner(loss, [ols, probe, nested()]), 3)
    assert ols.history['epoch'].tolist() == [0, 1, 2] and len(ols.priors) == 3
    for epoch, eps, prior in probe.seen:
        if epoch == 0: assert eps == 0.2 and prior is None
        else:
            assert eps == pytest.approx(0.4)
            assert torch.equal(prior.cpu(), ols.priors[epoch - 1])
    assert (loss.eps, loss.prior) == (0.1, None)

def test_after_online_fit_validate_and_get_preds_use_the_loss_as_built():
    "The reproducer: `validate` and `get_preds(with_loss=True)` see eps 0.1 and the uniform prior, not 1 - alpha and the learned prior"
    loss = LabelSmoothingCrossEntropy(0.1)
    learn = fit(make_learner(loss, [OnlineLabelSmoothing(alpha=0.3)]), 2)
    logits, targs = learn.get_preds(act=lambda o: o)
    as_built = F.cross_entropy(logits, targs, label_smoothing=0.1).item()
    valid_loss = learn.validate()[0]
    assert valid_loss == pytest.approx(as_built, abs=1e-5)
    _, _, losses = learn.get_preds(with_loss=True)
    assert losses.mean().item() == pytest.approx(as_built, abs=1e-5)
    learned = F.cross_entropy(logits, targs, reduction='none') * 0.3 - 0.7 * (
        learn.online_label_smoothing.prior[targs] * logits.log_softmax(1)).sum(1)
    assert abs(learned.mean().item() - as_built) > 1e-3  # the check tells the two apart

def test_tta_and_lr_find_after_a_fit_change_nothing():
    "`tta` (fires before_fit/after_fit around get_preds) and `lr_find` neither advance nor reset nor learn"
    loss = LabelSmoothingCrossEntropy(0.1)
    learn = fit(make_learner(loss, [EpsScheduler(SchedLin(.3, 0)), EntropyLogger()]))
    before = learn.eps_scheduler.history.copy(), learn.entropy_logger.history.copy()
    n_valid = len(learn.entropy_logger.valid_history)
    with learn.no_bar(), learn.no_logging():
        learn.tta(n=1); learn.lr_find(num_it=6, show_plot=False)
    assert learn.eps_scheduler.history.equals(before[0]) and learn.entropy_logger.history.equals(before[1])
    assert len(learn.entropy_logger.valid_history) == n_valid and loss.eps == 0.1
    assert len(learn.metrics) == 0

class Boom(Callback):
    "Raise `exc` at training batch `at` of the fit"
    def __init__(self, exc, at=5): self.exc, self.at = exc, at
    def before_batch(self):
        if self.training and self.train_iter == self.at: raise self.exc

@pytest.mark.parametrize('exc', [KeyboardInterrupt, RuntimeError('boom')])
def test_interrupted_fit_leaves_metrics_and_loss_as_found(exc):
    "After an exception (no `after_fit`), the next `validate` finds `learn.metrics` and the loss as they were: no None columns"
    from fastai.metrics import accuracy
    loss = LabelSmoothingCrossEntropy(0.1)
    learn = make_learner(loss, [EpsScheduler(SchedLin(.5, 0)), EntropyLogger(show=('nll',)), Boom(exc)])
    learn.metrics = [accuracy]
    found = list(learn.metrics)
    with pytest.raises(exc if isinstance(exc, type) else type(exc)): fit(learn)
    assert loss.eps == pytest.approx(SCHEDULE[5])  # the batch it stopped at: no event ran since
    learn.remove_cb(learn.boom)
    res = learn.validate()
    assert len(res) == 3 and None not in res  # valid_loss, accuracy, and the logger's nll
    assert list(learn.metrics) == found and loss.eps == 0.1
    logits, targs = learn.get_preds(act=lambda o: o)
    assert res[0] == pytest.approx(F.cross_entropy(logits, targs, label_smoothing=0.1).item(), abs=1e-5)
    assert res[2] == pytest.approx(F.cross_entropy(logits, targs).item(), abs=1e-5)

def test_interrupted_online_fit_then_get_preds_with_loss():
    "OLS interrupted: `get_preds(with_loss=True)` right after sees the loss as built"
    loss = LabelSmoothingCrossEntropy(0.1)
    learn = make_learner(loss, [OnlineLabelSmoothing(alpha=0.5), Boom(KeyboardInterrupt, at=6)])
    with pytest.raises(KeyboardInterrupt): fit(learn)
    assert loss.eps == 0.5 and loss.prior is not None
    logits, targs, losses = learn.get_preds(act=lambda o: o, with_loss=True)
    assert (loss.eps, loss.prior) == (0.1, None)
    assert losses.mean().item() == pytest.approx(F.cross_entropy(logits, targs, label_smoothing=0.1).item(), abs=1e-5)

@pytest.mark.parametrize('mix', [MixUp, CutMix])
def test_scheduler_and_logger_with_mixup(mix):
    "MixUp/CutMix put their own method in `learn.loss_func`: the schedule reaches the loss and the logger reads it"
    loss, probe = LabelSmoothingCrossEntropy(0.1), Probe()
    learn = fit(make_learner(loss, [EpsScheduler(SchedLin(.5, 0)), mix(), probe, EntropyLogger()], image=True))
    assert [eps for _, eps, _ in probe.seen] == pytest.approx(SCHEDULE)
    h = learn.entropy_logger.history
    floor = lambda e: -((1 - e + e / K) * math.log(1 - e + e / K) + (K - 1) * (e / K) * math.log(e / K))
    assert h['target_entropy'].tolist() == pytest.approx([floor(e) for e in SCHEDULE], abs=1e-5)
    assert loss.eps == 0.1

def test_gradient_accumulation():
    "GradientAccumulation skips optimizer steps, not batches: eps still per batch, OLS counts every batch"
    loss, probe = LabelSmoothingCrossEntropy(0.1), Probe()
    learn = fit(make_learner(loss, [EpsScheduler(SchedLin(.5, 0)), GradientAccumulation(64), probe]))
    assert [eps for _, eps, _ in probe.seen] == pytest.approx(SCHEDULE) and loss.eps == 0.1
    ols = OnlineLabelSmoothing(alpha=0.5)
    plain = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [OnlineLabelSmoothing(alpha=0.5)]), 1, 0.)
    accum = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [ols, GradientAccumulation(64)]), 1, 0.)
    torch.testing.assert_close(ols.prior, plain.online_label_smoothing.prior)  # lr 0: the same model

class CPUAutocast(Callback):
    "What `MixedPrecision` does on a GPU, on the CPU: the model runs under bfloat16 autocast"
    order = 10
    def before_batch(self): self.ctx = torch.autocast('cpu', dtype=torch.bfloat16); self.ctx.__enter__()
    def after_pred(self): self.ctx.__exit__(None, None, None)
    def after_cancel_batch(self): self.ctx.__exit__(None, None, None)

def test_mixed_precision():
    "bfloat16 predictions: the logger's values equal the float32 recomputation from `get_preds`; fastai's MixedPrecision runs on the CPU (autocast off)"
    loss, probe = LabelSmoothingCrossEntropy(0.1), Probe()
    learn = fit(make_learner(loss, [EpsScheduler(SchedLin(.5, 0)), CPUAutocast(), probe,
                                   EntropyLogger(show=('nll', 'perplexity'))]))
    assert [eps for _, eps, _ in probe.seen] == pytest.approx(SCHEDULE)
    row = learn.recorder.values[-1]  # before `get_preds`, which starts the Recorder afresh
    with torch.autocast('cpu', dtype=torch.bfloat16): logits, targs = learn.get_preds(act=lambda o: o)
    assert logits.dtype == torch.bfloat16
    nll = F.cross_entropy(logits.float(), targs).item()
    assert [float(v) for v in row[2:]] == pytest.approx([nll, math.exp(nll)], rel=1e-4)
    with pytest.warns(UserWarning):  # CUDA is not available: autocast disabled
        fit(make_learner(LabelSmoothingCrossEntropy(0.1), [MixedPrecision(amp_mode='bf16'),
                                                           EpsScheduler(SchedLin(.5, 0))]))

def test_fine_tune_marks_and_lr_find_with_all_three():
    "fine_tune: two fits, each scheduled from its start; the plot marks where the second begins"
    loss = LabelSmoothingCrossEntropy(0.1)
    learn = make_learner(loss, [EpsScheduler(SchedLin(.3, 0)), EntropyLogger()])
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, freeze_epochs=1)
    assert learn.eps_scheduler.history['fit'].tolist() == [0] * 4 + [1] * 4
    assert learn.entropy_logger.history['fit'].tolist() == [0] * 4 + [1] * 4
    ax = learn.entropy_logger.plot().axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert 'next fit' in labels and 'validation, end of epoch' in labels
    assert ax.get_title() == r"entropy against the smoothed target ($\varepsilon$=0.075 to 0.3)"
    assert loss.eps == 0.1

def test_plot_title_three_significant_digits():
    loss = LabelSmoothingCrossEntropy(0.1)
    learn = fit(make_learner(loss, [EpsScheduler(lambda pct: 0.3 * (1 - pct) ** 12), EntropyLogger()]))
    title = learn.entropy_logger.plot().axes[0].get_title()
    lo = learn.eps_scheduler.history['eps'].min()
    assert title.endswith(f"={lo:.3g} to 0.3)") and len(f"{lo:.3g}") <= 8

@pytest.mark.parametrize('monitor', ['nll', 'perplexity'])
def test_save_model_and_early_stopping_on_the_fixed_meaning_column(monitor):
    "SaveModelCallback(monitor='nll', comp=np.less) keeps the epoch of least NLL; without comp fastai would maximise it: refused"
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [EpsScheduler(SchedLin(.5, 0)),
                         EntropyLogger(show=('smooth_ce', 'nll', 'perplexity'))])
    fit(learn, 4, 0.05, cbs=[SaveModelCallback(monitor=monitor, comp=np.less, fname='best'),
                             EarlyStoppingCallback(monitor=monitor, comp=np.less, patience=5)])
    names = learn.recorder.metric_names[1:-1]
    col = [row[names.index(monitor)] for row in learn.recorder.values]
    best = int(np.argmin(col))
    learn.load('best')
    logits, targs = learn.get_preds(act=lambda o: o)
    nll = F.cross_entropy(logits, targs).item()
    assert (nll if monitor == 'nll' else math.exp(nll)) == pytest.approx(col[best], rel=1e-5)
    with pytest.raises(ValueError, match="pass comp=np.less"):
        fit(learn, 1, cbs=SaveModelCallback(monitor=monitor))
    assert learn.loss_func.eps == 0.1 and len(learn.metrics) == 0

def test_validate_and_get_preds_after_a_fit_give_the_logger_columns():
    "A validation of its own (not in a fit) computes the logger's columns for `validate` and trackers, records nothing"
    logger = EntropyLogger(show=('smooth_ce', 'nll', 'perplexity'))
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [logger, SaveModelCallback(monitor='nll', comp=np.less)])
    fit(learn, 2, 0.05)
    history, valid_history = logger.history.copy(), logger.valid_history.copy()
    logits, targs = learn.get_preds(act=lambda o: o)  # SaveModelCallback finds its column here too
    names, values = learn.recorder.metric_names[2:-1], learn.validate()
    row = dict(zip(names, values))
    nll = F.cross_entropy(logits.double(), targs).item()
    smooth = F.cross_entropy(logits.double(), targs, label_smoothing=0.1).item()
    assert row['nll'] == pytest.approx(nll, rel=1e-6) and row['perplexity'] == pytest.approx(math.exp(nll), rel=1e-6)
    assert row['smooth_ce'] == pytest.approx(smooth, rel=1e-6) == pytest.approx(row['valid_loss'], rel=1e-5)
    assert len(learn.metrics) == 0  # the columns are out again
    assert logger.history.equals(history) and logger.valid_history.equals(valid_history)

def test_show_chooses_the_columns():
    learn = fit(make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger(show=('kl', 'nll', 'perplexity'))]), 1)
    assert learn.recorder.metric_names[1:-1] == ['train_loss', 'valid_loss', 'kl', 'nll', 'perplexity']
    row = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    assert row['perplexity'] == pytest.approx(math.exp(row['nll']))
    for bad, msg in ((('nope',), "'nope', which is not a statistic"), (('ace',), 'needs `calibration=True`'),
                     (('kl', 'kl'), 'twice')):
        with pytest.raises(ValueError, match=msg): EntropyLogger(show=bad)
    assert EntropyLogger(calibration=True, show='ace').show == ('ace',)

def test_compiled_flat_loss_keeps_activation_and_decodes():
    "compile_loss: `get_preds` gives probabilities and decoded classes; the schedule reaches the compiled loss"
    from label_smoothing_fa.smoothing import compile_loss
    loss = compile_loss(LabelSmoothingCrossEntropyFlat(0.1))
    learn = fit(make_learner(loss, [EpsScheduler(SchedLin(.5, 0)), EntropyLogger()]), 1)
    probs, targs, decoded = learn.get_preds(with_decoded=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))
    assert torch.equal(decoded, probs.argmax(1))
    assert learn.eps_scheduler.history['eps'].tolist() == pytest.approx([0.5 * (1 - i / 4) for i in range(4)])
    assert loss.eps == loss.func._orig_mod.eps == 0.1

class FailInLrFind(Callback):
    "An error in the middle of `lr_find`: its fit ends without `after_fit`"
    def after_batch(self):
        if hasattr(self.learn, 'lr_finder') and self.train_iter == 2: raise RuntimeError('in lr_find')

def test_a_nested_fit_ended_by_an_exception_leaves_the_callbacks_on():
    "fastai turns `run` back on at the nested fit's `after_fit`, which an interrupted `lr_find` never reaches"
    loss, probe = LabelSmoothingCrossEntropy(0.1), Probe()
    learn = make_learner(loss, [EpsScheduler(SchedLin(.5, 0)), probe, EntropyLogger(), FailInLrFind()])
    with pytest.raises(RuntimeError, match='in lr_find'):
        with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=6, show_plot=False)
    learn.remove_cb(learn.fail_in_lr_find)
    fit(learn)
    assert [eps for _, eps, _ in probe.seen] == pytest.approx(SCHEDULE)
    assert learn.entropy_logger.history['fit'].tolist() == [0] * 8 and loss.eps == 0.1
    ols = OnlineLabelSmoothing(alpha=0.5)
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [ols, FailInLrFind()])
    with pytest.raises(RuntimeError, match='in lr_find'):
        with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=6, show_plot=False)
    learn.remove_cb(learn.fail_in_lr_find)
    fit(learn)
    assert ols.history['epoch'].tolist() == [0, 1]

def test_a_default_column_taken_by_a_metric_is_left_to_it():
    "`metrics=[ECE()]` with the default columns: one `ece` column (the metric's), equal to the logger's own; asked for by name: refused"
    from label_smoothing_fa.calibration import ECE
    learn = make_learner(LabelSmoothingCrossEntropy(0.1), [EntropyLogger()])
    learn.metrics = [ECE()]
    fit(learn, 1)
    names = learn.recorder.metric_names[1:-1]
    assert names == ['train_loss', 'valid_loss', 'ece', 'smooth_ce', 'kl', 'entropy', 'confidence']
    ece = float(learn.recorder.values[-1][names.index('ece')])
    assert ece == pytest.approx(learn.entropy_logger.valid_history['ece'].iloc[-1], abs=1e-6)
    learn.entropy_logger.show = ('ece',)
    with pytest.raises(ValueError, match="has a column 'ece' already"): fit(learn, 1)
