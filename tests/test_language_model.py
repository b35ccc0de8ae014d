"Language models: the loss set on `language_model_learner` as fastai allows it (`learn.loss_func = ...`), the logger's `nll` and `perplexity` columns against `get_preds`, and fastai's `Perplexity`, which is exp of the smoothed loss."
import math, warnings

import pytest, torch, torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.metrics import Perplexity
from fastai.text.data import LMDataLoader
from fastai.text.learner import language_model_learner
from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_lm_config
import fastai.callback.progress  # Learner.no_bar

from label_smoothing_fa.adaptive import EpsScheduler
from label_smoothing_fa.callbacks import EntropyLogger
from label_smoothing_fa.losses import LabelSmoothingCrossEntropyFlat
from fastai.callback.schedule import SchedLin

def lm_dls(seed=0):
    "Numericalized token streams (no tokenizer, nothing to download): 30 tokens, 48 training and 12 validation texts"
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, 30, (int(n),), generator=g) for n in torch.randint(20, 40, (60,), generator=g)]
    dls = DataLoaders(LMDataLoader(seqs[:48], bs=4, seq_len=10), LMDataLoader(seqs[48:], bs=4, seq_len=10))
    dls.vocab = ['xxunk', 'xxpad', 'xxbos', 'xxeos'] + [f'w{i}' for i in range(26)]
    return dls

class LastValidation(Callback):
    "The predictions and targets of the last validation epoch"
    def before_validate(self): self.preds, self.targs = [], []
    def after_batch(self):
        if not self.training: self.preds.append(self.pred.detach().clone()); self.targs.append(self.yb[0].clone())

def lm_learner(**kwargs):
    torch.manual_seed(0)
    config = awd_lstm_lm_config.copy(); config.update(emb_sz=16, n_hid=32, n_layers=1)
    return language_model_learner(lm_dls(), AWD_LSTM, pretrained=False, config=config, **kwargs)

def test_loss_on_a_language_model_and_perplexity_of_the_hard_target():
    with pytest.raises(TypeError, match='loss_func'):  # fastai sets the loss itself
        lm_learner(loss_func=LabelSmoothingCrossEntropyFlat(0.1))
    probe = LastValidation()
    learn = lm_learner(cbs=[EntropyLogger(show=('nll', 'perplexity')), EpsScheduler(SchedLin(.3, .1)), probe])
    learn.loss_func = LabelSmoothingCrossEntropyFlat(0.1)  # the documented way
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    assert learn.recorder.metric_names[1:-1] == ['train_loss', 'valid_loss', 'nll', 'perplexity']
    valid_loss, nll, ppl = map(float, learn.recorder.values[-1][1:])
    # the fit's last validation, as the model (stateful, an LSTM) saw it
    flat_logits = torch.cat([p.reshape(-1, p.shape[-1]) for p in probe.preds]).float()
    flat_targs = torch.cat([t.reshape(-1) for t in probe.targs])
    ref_nll = F.cross_entropy(flat_logits, flat_targs).item()
    assert nll == pytest.approx(ref_nll, abs=1e-4) and ppl == pytest.approx(math.exp(ref_nll), rel=1e-4)
    # fastai's `Perplexity` is exp(valid_loss): with label smoothing, exp of the smoothed loss, larger
    # (validation runs at the last training batch's eps; fastai weights its batches by items, not positions)
    last_eps = learn.eps_scheduler.history['eps'].iloc[-1]
    smoothed = [F.cross_entropy(p.reshape(-1, p.shape[-1]).float(), t.reshape(-1), label_smoothing=last_eps)
                for p, t in zip(probe.preds, probe.targs)]
    assert valid_loss == pytest.approx(torch.stack(smoothed).mean().item(), abs=1e-4)
    assert math.exp(valid_loss) > ppl * 1.01
    assert learn.loss_func.eps == 0.1

def test_a_metric_of_the_same_name_is_refused():
    learn = lm_learner(metrics=[Perplexity()], cbs=[EntropyLogger(show=('nll', 'perplexity'))])
    learn.loss_func = LabelSmoothingCrossEntropyFlat(0.1)
    with pytest.raises(ValueError, match="has a column 'perplexity' already"):
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    learn.entropy_logger.show = ('nll',)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert learn.recorder.metric_names[1:-1] == ['train_loss', 'valid_loss', 'perplexity', 'nll']
    _, valid_loss, fastai_ppl, nll = map(float, learn.recorder.values[-1])
    assert fastai_ppl == pytest.approx(math.exp(valid_loss), rel=1e-5) and fastai_ppl > math.exp(nll)
