"label_smoothing_fa.smoothing: every supported loss (wrapped by BaseLoss, compiled, under MixUp) read, set and restored, each checked by the loss it then computes against PyTorch's or a float64 formula; what a training fit is."
import copy

import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastai.losses as fl

from label_smoothing_fa.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat
from label_smoothing_fa.multilabel import LabelSmoothingBCEWithLogits, LabelSmoothingBCEWithLogitsFlat
from label_smoothing_fa.smoothing import (Smoothing, compile_loss, save_smoothing, set_smoothing, smoothing_of,
                                          _loss_chain)

def bce_reference(x, y, eps, prior=0.5):
    t = (1 - eps) * y.double() + eps * torch.as_tensor(prior, dtype=torch.float64)
    x = x.double()
    return -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)).mean().item()

multiclass = lambda x, y, eps: F.cross_entropy(x.double(), y, label_smoothing=eps).item()
# a loss, its smoothing as read, the loss at eps by its definition
LOSSES = {
    'ours': (lambda: LabelSmoothingCrossEntropy(0.1), Smoothing(0.1, None, 1, -100, False), multiclass),
    'ours-flat': (lambda: LabelSmoothingCrossEntropyFlat(0.2, ignore_index=7), Smoothing(0.2, None, -1, 7, False),
                  multiclass),
    'fastai-ls': (lambda: fl.LabelSmoothingCrossEntropy(0.1), Smoothing(0.1, None, 1, -100, False), multiclass),
    'fastai-ls-flat': (lambda: fl.LabelSmoothingCrossEntropyFlat(eps=0.15), Smoothing(0.15, None, -1, -100, False),
                       multiclass),
    'fastai-ce-flat': (lambda: fl.CrossEntropyLossFlat(), Smoothing(None, None, -1, -100, False), multiclass),
    'torch-ce': (lambda: nn.CrossEntropyLoss(label_smoothing=0.05), Smoothing(0.05, None, 1, -100, False), multiclass),
    'ours-bce': (lambda: LabelSmoothingBCEWithLogits(0.1), Smoothing(0.1, None, 1, -100, True), bce_reference),
    'ours-bce-flat': (lambda: LabelSmoothingBCEWithLogitsFlat(0.1), Smoothing(0.1, None, -1, -100, True),
                      bce_reference),
}

@pytest.mark.parametrize('case', list(LOSSES))
def test_read_set_restore(case):
    make, read, reference = LOSSES[case]
    loss = make()
    assert smoothing_of(loss) == read
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g)
    y = (torch.rand(16, 5, generator=g) > .5).float() if read.multilabel else torch.randint(0, 5, (16,), generator=g)
    before = loss(x, y).item()
    saved = save_smoothing(loss)
    for eps in (0., 0.3, 1.):
        set_smoothing(loss, eps=eps)
        assert loss(x, y).item() == pytest.approx(reference(x, y, eps), abs=1e-5)
        assert smoothing_of(loss).eps == (None if eps == 0 and 'ce' in case and 'ours' not in case else eps)
        # every copy a wrapper keeps reads the eps in force
        attr = 'label_smoothing' if isinstance(_loss_chain(loss)[-1], nn.CrossEntropyLoss) else 'eps'
        assert all(getattr(o, attr) == eps for o in _loss_chain(loss) if attr in vars(o))
    saved.restore()
    assert loss(x, y).item() == before and smoothing_of(loss) == read

def test_prior_set_and_restored():
    loss = LabelSmoothingCrossEntropyFlat(0.2)
    saved = save_smoothing(loss)
    P = torch.softmax(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)), 1)
    set_smoothing(loss, eps=0.4, prior=P)
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    q = 0.6 * F.one_hot(y, 5).double() + 0.4 * P[y].double()
    assert loss(x, y).item() == pytest.approx(-(q * x.double().log_softmax(1)).sum(1).mean().item(), abs=1e-6)
    saved.restore()
    assert (loss.eps, loss.func.eps, loss.func.prior) == (0.2, 0.2, None)
    ml = LabelSmoothingBCEWithLogitsFlat(0.1, prior=0.3)
    saved = save_smoothing(ml); set_smoothing(ml, prior=torch.tensor([.2, .4, .5, .6, .9]))
    assert smoothing_of(ml).prior.tolist() == pytest.approx([.2, .4, .5, .6, .9])
    saved.restore(); assert smoothing_of(ml).prior == 0.3

def test_refusals():
    for bad in (F.cross_entropy, fl.BCEWithLogitsLossFlat(), nn.NLLLoss()):
        with pytest.raises(ValueError, match='has no smoothing to set'): set_smoothing(bad, eps=0.1)
        with pytest.raises(ValueError, match='has no smoothing to set'): save_smoothing(bad)
    with pytest.raises(ValueError, match='has no prior to set'): set_smoothing(fl.CrossEntropyLossFlat(), prior=None)
    with pytest.raises(ValueError, match='`eps` must be in'): set_smoothing(LabelSmoothingCrossEntropy(), eps=-0.1)
    with pytest.raises(ValueError, match='prior'): set_smoothing(LabelSmoothingCrossEntropy(), prior='nope')

def test_mixup_lf_is_seen_through():
    "MixUp/CutMix put their bound method `lf` in `learn.loss_func`: the chain goes on to `old_lf`"
    from fastai.callback.mixup import MixUp
    loss, mix = LabelSmoothingCrossEntropyFlat(0.2), MixUp()
    mix.old_lf = loss
    assert _loss_chain(mix.lf)[1:] == [loss, loss.func] and smoothing_of(mix.lf).eps == 0.2
    set_smoothing(mix.lf, eps=0.05); assert loss.func.eps == 0.05

def test_compile_loss_keeps_activation_and_decodes():
    loss = compile_loss(LabelSmoothingCrossEntropyFlat(0.1))
    plain = torch.compile(LabelSmoothingCrossEntropyFlat(0.1))
    assert not hasattr(plain, 'activation')  # what `compile_loss` is for
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert torch.allclose(loss.activation(x), x.softmax(-1)) and torch.equal(loss.decodes(x), x.argmax(-1))
    set_smoothing(loss, eps=0.3)
    assert loss(x, y).item() == pytest.approx(multiclass(x, y, 0.3), abs=1e-5)
    assert compile_loss(LabelSmoothingCrossEntropy(0.1)).activation(x).sum(1).allclose(torch.ones(6))
