"The two processes of `test_applications.py`'s distributed test: fastai's `distrib_ctx` on gloo (a module light to import)"
import os
from pathlib import Path
import torch, torch.distributed as dist
import fastai.callback.progress  # Learner.no_bar
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner
from label_smoothing_fa.callbacks import EntropyLogger
from label_smoothing_fa.calibration import ECE, NLL
from label_smoothing_fa.losses import LabelSmoothingCrossEntropyFlat

EPS = 0.1

N_VALID = 101  # odd: `DistributedDL` pads the second process's shard with a repeated item


def distrib_learner():
    "A seeded linear classifier of 8 features into 5 classes, 64 training and `N_VALID` validation items"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64 + N_VALID, 8, generator=g), torch.randint(0, 5, (64 + N_VALID,), generator=g)
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]],
                     splits=[list(range(64)), list(range(64, 64 + N_VALID))])
    torch.manual_seed(0)
    return Learner(dsets.dataloaders(bs=16, num_workers=0), torch.nn.Linear(8, 5), loss_func=LabelSmoothingCrossEntropyFlat(EPS),
                   metrics=[ECE(), NLL()], cbs=EntropyLogger(calibration=True))


def _cpu_broadcast(self, t, rank):
    "`DistributedDL._broadcast` on gloo: fastai's sends a CUDA tensor (`.cuda()`, for nccl), the one CUDA-only step"
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()


def run(rank, world_size, port, out_dir):
    "One process: train one epoch at lr=0 under `distrib_ctx`, save the Recorder's row and the logger's validation"
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastai.distributed import DistributedDL
    import fastai.distributed  # Learner.distrib_ctx
    DistributedDL._broadcast = _cpu_broadcast
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        learn = distrib_learner()
        with learn.distrib_ctx(cpu=True), learn.no_bar(), learn.no_logging(): learn.fit(1, 0)  # lr=0: the weights stay
        result = dict(metrics=learn.recorder.values[-1], valid=learn.entropy_logger.valid_history.iloc[-1].to_dict(),
                      names=learn.recorder.metric_names)
        torch.save(result, Path(out_dir)/f'{rank}.pt')
    finally: dist.destroy_process_group()
