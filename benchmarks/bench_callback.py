"""What `EntropyLogger` adds to the time of a training epoch.

The digits demo's data and model (`label_smoothing_fa.demo`: scikit-learn's 8x8 digits, a 64-128-10 MLP, batch size 64)
with the label-smoothing loss and accuracy are fitted with and without the callback: the same `Learner`, the callback added
and removed, in turns ABBA from the same weights, so that both see the same machine load. The script prints the median
time of an epoch (training and validation) with and without, their ratio, the median of the paired ratios, and the time
spent inside the callback's own events during those fits: its cost without the noise of the machine (on a shared
2-core machine epoch times move by several percent from run to run).

    python benchmarks/bench_callback.py [--reps 21] [--epochs 2] [--threads 1]
"""
import argparse, gc, statistics, time
import torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.progress  # Learner.no_bar

from label_smoothing_fa.callbacks import EntropyLogger
from label_smoothing_fa.demo import digits_dls, digits_model
from label_smoothing_fa.losses import LabelSmoothingCrossEntropy

def learner(cbs):
    set_seed(42, reproducible=True)
    return Learner(digits_dls(), digits_model(), loss_func=LabelSmoothingCrossEntropy(0.1), metrics=accuracy, cbs=cbs)

def epoch_time(learn, epochs):
    "Wall-clock and CPU seconds per epoch of a fresh `fit` (no progress bar or printing)"
    learn.opt = None
    gc.collect()
    with learn.no_bar(), learn.no_logging():
        wall, cpu = time.perf_counter(), time.process_time()
        learn.fit(epochs, 1e-3)
        return (time.perf_counter() - wall) / epochs, (time.process_time() - cpu) / epochs

class TimedLogger(EntropyLogger):
    "`EntropyLogger` adding up the seconds spent in its own events"
    spent = 0.

def _timed(f):
    def event(self):
        start = time.perf_counter()
        try: return f(self)
        finally: TimedLogger.spent += time.perf_counter() - start
    return event

for _ev in ('before_fit', 'before_train', 'before_validate', 'before_batch', 'after_pred', 'after_batch', 'after_validate', 'after_fit'):
    setattr(TimedLogger, _ev, _timed(getattr(EntropyLogger, _ev)))

def main(reps=21, epochs=2, threads=1):
    if threads: torch.set_num_threads(threads)
    learn, logger = learner(None), TimedLogger()
    init = {k: v.clone() for k, v in learn.model.state_dict().items()}
    def timed(name):
        if name == 'with': learn.add_cb(logger)
        learn.model.load_state_dict(init)
        try: return epoch_time(learn, epochs)
        finally: learn.remove_cb(logger)
    timed('without'); timed('with')  # warm up
    times, TimedLogger.spent = {'without': [], 'with': []}, 0.
    for rep in range(reps):
        for name in (('without', 'with') if rep % 2 == 0 else ('with', 'without')): times[name].append(timed(name))
    med = lambda name, k: statistics.median(t[k] for t in times[name])
    t0, t1, c0, c1 = med('without', 0), med('with', 0), med('without', 1), med('with', 1)
    paired = statistics.median(b[0] / a[0] for a, b in zip(times['without'], times['with']))
    n_train, n_valid = len(learn.dls.train), len(learn.dls.valid)
    inside = TimedLogger.spent / (reps * epochs)
    print(f"digits MLP, batch size 64: {n_train} training + {n_valid} validation batches per epoch, torch threads: {torch.get_num_threads()}")
    print(f"epoch without EntropyLogger: {t0 * 1e3:8.1f} ms wall, {c0 * 1e3:8.1f} ms CPU  (medians of {reps} fits of {epochs} epochs, interleaved)")
    print(f"epoch with    EntropyLogger: {t1 * 1e3:8.1f} ms wall, {c1 * 1e3:8.1f} ms CPU")
    print(f"ratio with/without:          {t1 / t0:8.3f} wall,    {c1 / c0:8.3f} CPU  (median of the paired wall ratios: {paired:.3f}; budget: 1.05)")
    print(f"time inside the callback's events: {inside * 1e3:.1f} ms per epoch = {inside / (n_train + n_valid) * 1e6:.0f} us per batch "
          f"= {100 * inside / t0:.1f}% of the epoch without it")
    return t1 / t0, c1 / c0

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reps', type=int, default=21, help='interleaved repetitions (default: 21)')
    p.add_argument('--epochs', type=int, default=2, help='epochs per fit (default: 2)')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads, as the demo trains; 0 leaves the default (default: 1)')
    main(**vars(p.parse_args()))
