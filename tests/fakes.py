"Small stand-ins the test files share: a distributed shard, multi-label segmentation data"
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader

class PaddedShard:
    "Process `rank`'s share of the items as fastai's `DistributedDL` deals it: padded by repeating the first"
    # items, with `n`, `n_padded` and `i`; `DistributedDL` itself needs accelerate and CUDA
    def __init__(self, x, y, rank, world_size, bs):
        self.n, self.rank, self.world_size, self.bs = len(x), rank, world_size, bs
        self.n_padded = -(-self.n // world_size) * world_size
        idxs = list(range(self.n)); idxs += idxs[:self.n_padded - self.n]
        per = self.n_padded // world_size
        self.idxs, self.x, self.y = idxs[rank * per:(rank + 1) * per], x, y
    def __len__(self): return -(-len(self.idxs) // self.bs)
    def __iter__(self):
        self.i = 0
        for k in range(0, len(self.idxs), self.bs):
            b = self.idxs[k:k + self.bs]; self.i += len(b)
            yield self.x[b], self.y[b]

def multilabel_segmentation_dls():
    "96 items of (2, 4, 4) inputs and 3 labels per pixel, a fifth of the entries ignored (-1); 64 train"
    torch.manual_seed(0)
    x = torch.randn(96, 2, 4, 4)
    y = torch.stack([(x[:, 0] > 0), (x[:, 1] > 0.5), (x.sum(1) > 0)], 1).float()
    y = torch.where(torch.rand(y.shape) < 0.2, -1., y)
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds[:64], bs=16, shuffle=True), DataLoader(ds[64:], bs=16))
