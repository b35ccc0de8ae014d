"""The loss and the callback in fastai.vision, as users run them: `vision_learner` and `unet_learner` on scikit-learn's
digits (real images that ship offline) through fastai's `DataBlock`, with MixUp, CutMix, TTA, interpretation and
export. The numbers are checked against a float64 recomputation from `get_preds`."""
import warnings
import numpy as np, pytest, torch, matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from sklearn.datasets import load_digits
from fastcore.basics import noop
from fastai.callback.core import Callback
import fastai.callback.schedule, fastai.callback.progress  # `fit_one_cycle`, `fine_tune`; `no_bar`
from fastai.callback.mixup import MixUp, CutMix
from fastai.data.block import DataBlock, CategoryBlock
from fastai.data.transforms import IndexSplitter, ItemGetter, Normalize
from fastai.interpret import ClassificationInterpretation
from fastai.learner import load_learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.augment import Resize, ResizeMethod, aug_transforms
from fastai.vision.data import ImageBlock, MaskBlock
from fastai.vision.learner import vision_learner, unet_learner
from torchvision.models import resnet18
from label_smoothing_fa.losses import LabelSmoothingCrossEntropyFlat, reference_label_smoothing_cross_entropy
from label_smoothing_fa.callbacks import EntropyLogger

SIZE, N_ITEMS, N_VALID, BS, EPS, VOID = 32, 640, 160, 32, 0.1, 255


@pytest.fixture(scope='module', autouse=True)
def two_threads():
    "The suite runs on 2 cores"
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def fit_quietly(learn, method='fit_one_cycle', *args, **kwargs):
    "Train without fastai's progress bar and table; returns `learn`"
    with learn.no_bar(), learn.no_logging(): getattr(learn, method)(*args, **kwargs)
    return learn


def ref_loss(logits, targs, reduction='mean', **kwargs):
    "The label-smoothing loss recomputed in float64 by the plain formula"
    return reference_label_smoothing_cross_entropy(logits.double(), targs.long(), EPS, reduction=reduction, **kwargs)


@pytest.fixture(scope='session')
def digits():
    "The first `N_ITEMS` digits as 8x8 uint8 arrays (0-255) and their classes"
    d = load_digits()
    return (d.images[:N_ITEMS] * (255 / 16)).round().astype(np.uint8), d.target[:N_ITEMS]


def classification_dls(digits, n_items=N_ITEMS, n_valid=N_VALID):
    """Classification `DataLoaders` over the first `n_items` digits (the last `n_valid` of them validate): 3-channel
    `PILImage`s upsampled to `SIZE` px by fastai's `Resize`, labels '0'-'9'"""
    images, targets = digits[0][:n_items], digits[1][:n_items]
    items = [(np.repeat(im[..., None], 3, 2), str(t)) for im, t in zip(images, targets)]
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ItemGetter(0), get_y=ItemGetter(1),
                       splitter=IndexSplitter(range(n_items - n_valid, n_items)),
                       item_tfms=Resize(SIZE, ResizeMethod.Squish),
                       batch_tfms=[*aug_transforms(do_flip=False, max_rotate=10, max_zoom=1.1, max_warp=0,
                                                   max_lighting=0.2), Normalize.from_stats([0.3] * 3, [0.4] * 3)])
    return dblock.dataloaders(items, bs=BS, num_workers=0, seed=42)


@pytest.fixture(scope='session')
def cls_dls(digits):
    "Classification `DataLoaders`: `N_ITEMS` digits, 15 training batches and 5 validation batches"
    return classification_dls(digits)


@pytest.fixture(scope='session')
def small_cls_dls(digits):
    "The same with 4 training batches and 2 validation batches: for checks of one epoch's bookkeeping, not learning"
    return classification_dls(digits, 6 * BS, 2 * BS)


def classifier(dls, cbs=(), lr=None):
    "A seeded resnet18 `vision_learner`, not pretrained, with the loss and an `EntropyLogger`"
    set_seed(42, reproducible=True)
    return vision_learner(dls, resnet18, pretrained=False, loss_func=LabelSmoothingCrossEntropyFlat(eps=EPS),
                          metrics=accuracy, cbs=[EntropyLogger(), *cbs])


@pytest.fixture(scope='session')
def trained(cls_dls):
    "A classifier after three epochs of `fit_one_cycle`, with its validation logits and targets from `get_preds`"
    learn = fit_quietly(classifier(cls_dls), 'fit_one_cycle', 3, 1e-2)
    values = list(learn.recorder.values)
    logits, targs = learn.get_preds(act=noop)
    return learn, values, logits, targs


def test_vision_learner_fit_one_cycle(trained, cls_dls):
    learn, values, logits, targs = trained
    test_loss, acc = values[-1][1], values[-1][2]
    assert logits.shape == (N_VALID, 10) and targs.shape == (N_VALID,)
    # fastai's validation loss is the loss of the logits get_preds returns, recomputed in float64
    assert test_loss == pytest.approx(ref_loss(logits, targs).item(), rel=1e-4)
    assert acc == pytest.approx((logits.argmax(1) == targs).float().mean().item(), abs=1e-6)
    assert acc > 0.5  # chance is 0.1
    log = learn.entropy_logger
    last = log.valid_history.iloc[-1]
    assert last['smooth_ce'] == pytest.approx(test_loss, rel=1e-4)  # the loss is H(q', p) with the same eps
    assert last['confidence'] == pytest.approx(logits.softmax(1).amax(1).mean().item(), rel=1e-4)
    assert log.reliability['count'].sum() == N_VALID
    assert len(log.history) == 3 * len(cls_dls.train) and list(log.history['epoch'].unique()) == [0, 1, 2]
    assert len(log.valid_history) == 3


def test_get_preds_with_decoded(trained):
    learn, _, logits, targs = trained
    probs, targs2, decoded = learn.get_preds(with_decoded=True)
    assert probs.shape == (N_VALID, 10) and decoded.shape == (N_VALID,)
    torch.testing.assert_close(probs, logits.softmax(1), rtol=1e-5, atol=1e-6)  # the loss's activation
    assert torch.equal(targs2, targs)
    assert torch.equal(decoded, probs.argmax(1))  # the loss's decodes


def test_predict(trained, cls_dls):
    learn, _, logits, _ = trained
    for i in (0, N_VALID - 1):  # the validation set is not shuffled: item i is row i of get_preds
        item = cls_dls.valid_ds.items[i]
        label, idx, probs = learn.predict(item)
        torch.testing.assert_close(probs, logits[i].softmax(0), rtol=1e-5, atol=1e-6)
        assert idx == probs.argmax() and label == learn.dls.vocab[idx]


def test_tta(trained):
    learn, _, logits, targs = trained
    set_seed(0)
    (aug, plain), targs_aug = learn.tta(n=2, beta=None)
    set_seed(0)
    mixed, targs_mixed = learn.tta(n=2)
    assert aug.shape == plain.shape == mixed.shape == (N_VALID, 10)
    assert torch.equal(targs_aug, targs) and torch.equal(targs_mixed, targs)
    torch.testing.assert_close(plain, logits.softmax(1), rtol=1e-5, atol=1e-6)  # the un-augmented pass
    torch.testing.assert_close(mixed, torch.lerp(aug, plain, 0.25))  # fastai's default beta
    torch.testing.assert_close(aug.sum(1), torch.ones(N_VALID))
    assert not torch.allclose(aug, plain, atol=1e-3)  # the augmented passes differ
    assert (mixed.argmax(1) == targs).float().mean() > 0.5


def test_interpretation_top_losses(trained):
    learn, _, logits, targs = trained
    interp = ClassificationInterpretation.from_learner(learn)
    losses, idx = interp.top_losses(5)
    per_item = ref_loss(logits, targs, reduction='none')
    torch.testing.assert_close(losses.double(), per_item.sort(descending=True).values[:5], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(per_item[idx], losses.double(), rtol=1e-4, atol=1e-5)
    interp.plot_top_losses(4, nrows=2)
    fig = plt.gcf()
    assert len([ax for ax in fig.axes if ax.get_images()]) == 4  # four images drawn
    plt.close('all')


class MixRecorder(Callback):
    "The first training batch's prediction, labels and loss, and the mixing callback's partner labels and `lam`"
    order = 100
    def __init__(self, mixer): self.mixer, self.seen = mixer, None
    def after_loss(self):
        if self.training and self.seen is None:
            m = getattr(self.learn, self.mixer)
            self.seen = (self.pred.detach().clone(), self.yb[0].clone(), m.yb1[0].clone(), m.lam.clone(),
                         self.loss.detach().clone())


@pytest.mark.parametrize('mix', [MixUp(0.4), CutMix(1.)], ids=['MixUp', 'CutMix'])
def test_mixup_cutmix(small_cls_dls, mix):
    cls_dls = small_cls_dls
    rec = MixRecorder('mix_up' if isinstance(mix, MixUp) else 'cut_mix')
    learn = fit_quietly(classifier(cls_dls, cbs=[mix, rec]), 'fit_one_cycle', 1, 1e-2)
    pred, y, y1, lam, loss = rec.seen
    # the mixed loss is the lerp of the two labels' losses, per item for MixUp, one lam for CutMix
    expected = torch.lerp(ref_loss(pred, y1, 'none'), ref_loss(pred, y, 'none'), lam.double()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat) and learn.loss_func.func.reduction == 'mean'
    log = learn.entropy_logger
    assert len(log.history) == len(cls_dls.train)
    logits, targs = learn.get_preds(act=noop)
    assert log.valid_history.iloc[-1]['smooth_ce'] == pytest.approx(ref_loss(logits, targs).item(), rel=1e-4)


@pytest.fixture(scope='module')
def fine_tuned(cls_dls):
    return fit_quietly(classifier(cls_dls), 'fine_tune', 1, 1e-2, freeze_epochs=1)


def test_fine_tune(fine_tuned):
    learn = fine_tuned
    logits, targs = learn.get_preds(act=noop)
    assert learn.entropy_logger.valid_history.iloc[-1]['smooth_ce'] == pytest.approx(ref_loss(logits, targs).item(),
                                                                                     rel=1e-4)
    assert (logits.argmax(1) == targs).float().mean() > 0.2  # chance is 0.1


def test_fine_tune_keeps_both_phases(fine_tuned, cls_dls):
    log = fine_tuned.entropy_logger
    assert len(log.valid_history) == 2 and log.valid_history['fit'].tolist() == [0, 1]  # one epoch per phase
    assert len(log.history) == 2 * len(cls_dls.train)  # every training batch of both phases
    assert log.history['fit'].tolist() == [0] * len(cls_dls.train) + [1] * len(cls_dls.train)


def test_export_load_learner(trained, cls_dls, tmp_path):
    learn = trained[0]
    learn.export(tmp_path/'digits.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # load_learner's warning about unpickling
        loaded = load_learner(tmp_path/'digits.pkl')
    assert isinstance(loaded.loss_func, LabelSmoothingCrossEntropyFlat) and loaded.loss_func.func.eps == EPS
    assert list(loaded.dls.vocab) == [str(i) for i in range(10)]
    items = cls_dls.valid_ds.items[:8]
    probs, _ = loaded.get_preds(dl=loaded.dls.test_dl(items))
    expected, _ = learn.get_preds(dl=learn.dls.test_dl(items))
    torch.testing.assert_close(probs, expected)
    assert loaded.predict(items[0])[0] == learn.predict(items[0])[0]


# ---------------------------------------------------------------- segmentation

@pytest.fixture(scope='session')
def seg_dls(digits):
    """Segmentation `DataLoaders`: each digit upsampled to `SIZE` px, its mask 'stroke' where the 8x8 pixel is dark,
    'background' where it is light, and the void class `VOID` in between (the loss ignores it)"""
    images, _ = digits
    images = images[:128]
    up = lambda a: np.kron(a, np.ones((SIZE // 8, SIZE // 8), dtype=a.dtype))
    masks = np.where(images > 160, 1, np.where(images < 40, 0, VOID)).astype(np.uint8)
    items = [(np.repeat(up(im)[..., None], 3, 2), up(m)) for im, m in zip(images, masks)]
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(['background', 'stroke'])), get_x=ItemGetter(0),
                       get_y=ItemGetter(1), splitter=IndexSplitter(range(96, 128)),
                       batch_tfms=Normalize.from_stats([0.3] * 3, [0.4] * 3))
    return dblock.dataloaders(items, bs=16, num_workers=0)


def test_unet_learner_segmentation(seg_dls):
    set_seed(42, reproducible=True)
    loss_func = LabelSmoothingCrossEntropyFlat(eps=EPS, axis=1, ignore_index=VOID)
    learn = fit_quietly(unet_learner(seg_dls, resnet18, pretrained=False, n_out=2, loss_func=loss_func,
                                     cbs=EntropyLogger()), 'fit_one_cycle', 1, 1e-2)
    valid_loss = learn.recorder.values[-1][1]
    logits, masks = learn.get_preds(act=noop)
    assert logits.shape == (32, 2, SIZE, SIZE) and masks.shape == (32, SIZE, SIZE)
    kept = masks != VOID
    assert 0 < (~kept).sum() < kept.sum()  # the void class is there, and ignored
    ref = ref_loss(logits, masks.long(), ignore_index=VOID, axis=1)  # the mean over the kept pixels
    log = learn.entropy_logger
    assert log.valid_history.iloc[-1]['smooth_ce'] == pytest.approx(ref.item(), rel=1e-4)
    assert log.reliability['count'].sum() == kept.sum()  # only the kept pixels are binned
    # fastai's validation loss: the mean over batches (each the mean over its kept pixels), weighted by batch size
    per_batch = [ref_loss(l, m.long(), ignore_index=VOID, axis=1) * len(l) for l, m in
                 zip(logits.split(16), masks.split(16))]
    assert valid_loss == pytest.approx((sum(per_batch) / len(logits)).item(), rel=1e-4)
    probs, _, decoded = learn.get_preds(with_decoded=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(32, SIZE, SIZE))  # softmax over axis 1
    assert torch.equal(decoded, probs.argmax(1))
    pixel_acc = (decoded == masks)[kept].float().mean()
    assert pixel_acc > 0.8  # light against dark pixels: more than the share of either class
    assert pixel_acc > max((masks[kept] == c).float().mean() for c in (0, 1))


def test_segmentation_default_axis_says_which_axis(seg_dls):
    xb, yb = seg_dls.one_batch()
    set_seed(42)
    learn = unet_learner(seg_dls, resnet18, pretrained=False, n_out=2, loss_func=LabelSmoothingCrossEntropyFlat())
    with torch.no_grad(): out = learn.model(xb)
    with pytest.raises(ValueError, match=r'pass `axis=1`'): learn.loss_func(out, yb)
