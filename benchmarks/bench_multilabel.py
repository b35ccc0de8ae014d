"""Speed and memory of one forward+backward of the multi-label loss, measured side by side in one run.

Compared: this package's `label_smoothing_bce_with_logits(eps=0.1)` ('ours'), fastai's `BCEWithLogitsLossFlat` on the
hard targets (what a multi-label Learner uses today, no smoothing), torch's `binary_cross_entropy_with_logits` on
targets the user smooths by hand ('torch_smoothed': `y * 0.9 + 0.05`), and 'custom', a candidate
`autograd.Function` that recomputes the smoothed targets in backward instead of saving them (it saves the logits and
the hard targets only, which the batch keeps alive anyway). Float32 on the CPU (or CUDA with --cuda).

- time: medians of interleaved runs (the implementations take turns, so drift in the machine's speed hits all alike);
- saved: bytes autograd keeps for backward beyond the logits and the targets, as a multiple of the logits' size
  (counted with `torch.autograd.graph.saved_tensors_hooks`: exact, independent of the machine's load);
- peak (with --cuda): growth of the CUDA allocator's peak over one forward+backward, as a multiple of the logits'
  size. On the CPU, peak resident memory under glibc's arenas did not repeat from run to run (tried): not reported.

On a shared machine the times are indicative only; the ratios are what to read.

    python benchmarks/bench_multilabel.py [--quick] [--cuda]
"""
import argparse, json, sys
from pathlib import Path
import torch, torch.nn.functional as F
import fastai.losses as fl
sys.path.insert(0, str(Path(__file__).parent))
from bench_loss import medians
from label_smoothing_fa.multilabel import label_smoothing_bce_with_logits

EPS = 0.1
CASES = {'256x20': (256, 20), '4096x1000': (4096, 1000), 'seg 8x21x256x256': (8, 21, 256, 256)}

class SmoothedBCE(torch.autograd.Function):
    "Candidate: torch's kernel forward; a backward that recomputes y' = (1-eps) y + eps/2 from y (mean reduction)"
    @staticmethod
    def forward(ctx, x, y, eps):
        ctx.save_for_backward(x, y); ctx.eps = eps
        return F.binary_cross_entropy_with_logits(x, torch.lerp(y, torch.full((), .5, dtype=y.dtype), eps))

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        eps = ctx.eps
        grad = torch.sigmoid(x).sub_(y, alpha=1 - eps).sub_(eps / 2).mul_(g / x.numel())  # sigma(x) - y'
        return grad, None, None

IMPLS = {
    'ours': lambda x, y: label_smoothing_bce_with_logits(x, y, EPS),
    'fastai': lambda x, y: fl.BCEWithLogitsLossFlat()(x, y),
    'torch_smoothed': lambda x, y: F.binary_cross_entropy_with_logits(x, y * (1 - EPS) + EPS / 2),
    'custom': lambda x, y: SmoothedBCE.apply(x, y, EPS),
}

def make(case, device='cpu', seed=0):
    "Logits (with an allocated gradient buffer) and multi-hot float targets for `case`"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(CASES[case], generator=g).to(device).requires_grad_()
    x.grad = torch.zeros_like(x)
    return x, (torch.rand(CASES[case], generator=g) > 0.7).float().to(device)

def step(impl, x, y): IMPLS[impl](x, y).backward()

def saved_extra(impl, x, y):
    "Bytes saved for backward other than `x` and `y` themselves, in multiples of the logits' size"
    ptrs, extra = {x.data_ptr(), y.data_ptr()}, {}
    def pack(t):
        if t.data_ptr() not in ptrs: extra[t.data_ptr()] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): loss = IMPLS[impl](x, y)
    loss.backward()
    return sum(extra.values()) / (x.numel() * x.element_size())

def peak(impl, case):
    "On CUDA: growth of the allocator's peak over one forward+backward, in multiples of the logits' size"
    x, y = make(case, 'cuda')
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(impl, x, y); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / (x.numel() * 4)

def run(quick, device):
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    rows = []
    for case in CASES:
        mem = {impl: peak(impl, case) for impl in IMPLS} if device == 'cuda' else {}
        x, y = make(case, device)
        for impl in IMPLS: step(impl, x, y)  # warm-up; also checks that every implementation runs
        with torch.no_grad():  # same loss value everywhere (fastai's is unsmoothed: not compared)
            vals = {k: IMPLS[k](x, y).item() for k in ('ours', 'torch_smoothed', 'custom')}
        assert max(vals.values()) - min(vals.values()) < 1e-5 * abs(vals['ours']), vals
        reps = 5 if quick else 21
        t = medians({k: (lambda k=k: (step(k, x, y), sync())) for k in IMPLS}, reps)
        sav = {k: saved_extra(k, x, y) for k in IMPLS}
        row = dict(case=case, **{f'{k}_ms': round(v * 1e3, 3) for k, v in t.items()},
                   ours_vs_fastai=round(t['ours'] / t['fastai'], 3),
                   ours_vs_torch_smoothed=round(t['ours'] / t['torch_smoothed'], 3),
                   custom_vs_ours=round(t['custom'] / t['ours'], 3),
                   **{f'{k}_saved_x': round(v, 2) for k, v in sav.items()},
                   **{f'{k}_peak_x': round(v, 2) for k, v in mem.items()})
        rows.append(row); print(json.dumps(row), flush=True)
    return rows

def show(rows, title):
    print(f'\n{title}')
    cols = ('ours', 'fastai', 'torch_smoothed', 'custom')
    print(f"{'case':<18}" + ''.join(f'{c + " ms":>18}' for c in cols)
          + f"{'ours/fastai':>13}{'ours/torch_sm':>15}{'custom/ours':>13}")
    for r in rows:
        print(f"{r['case']:<18}" + ''.join(f"{r[c + '_ms']:>18.3f}" for c in cols)
              + f"{r['ours_vs_fastai']:>12.2f}x{r['ours_vs_torch_smoothed']:>14.2f}x{r['custom_vs_ours']:>12.2f}x")
    print('\nmemory, in multiples of the logits\' size: saved for backward beyond x and y'
          + (' / peak growth (CUDA)' if 'ours_peak_x' in rows[0] else ''))
    for r in rows:
        cell = lambda c: f"{r[c + '_saved_x']:.2f}" + (f" / {r[c + '_peak_x']:.2f}" if c + '_peak_x' in r else '')
        print(f"{r['case']:<18}" + ''.join(f'{cell(c):>18}' for c in cols))

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='fewer repetitions')
    p.add_argument('--cuda', action='store_true', help='run on the GPU')
    a = p.parse_args()
    device = 'cuda' if a.cuda else 'cpu'
    rows = run(a.quick, device)
    show(rows, f'forward+backward, float32, {device}, {torch.get_num_threads()} threads '
               '(ratios: lower is faster; indicative on a shared machine)')
