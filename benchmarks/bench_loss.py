"""Speed and peak memory of one forward+backward: this package's fused loss against PyTorch's built-in
`F.cross_entropy(label_smoothing=0.1)` and fastai's `LabelSmoothingCrossEntropy(Flat)`.

Float32 on the CPU, default allocator; times are medians of interleaved runs (the implementations take turns, so drift
in the machine's speed hits all of them alike). Peak memory is the growth of the process's peak resident memory during
one forward+backward with the gradient buffer already allocated, measured in a fresh process per implementation.
If jemalloc is installed (Debian `libjemalloc2`), everything is measured again with it preloaded.
With --save it writes benchmarks/results/bench_loss.csv and .json, the recorded run the docs page nbs/20_benchmarks.ipynb
shows and checks against the targets (without it, nothing is written: a run on another machine only prints).

    python benchmarks/bench_loss.py [--quick] [--save]
"""
import argparse, csv, json, os, platform, resource, statistics, subprocess, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
import fastai.losses as fl
from label_smoothing_fa.losses import label_smoothing_cross_entropy

EPS = 0.1
CASES = {  # name: (logits shape, class axis)
    '256x10': ((256, 10), 1),
    '4096x1000': ((4096, 1000), 1),
    '8192x32000': ((8192, 32000), 1),
    'seg 8x21x256x256': ((8, 21, 256, 256), 1),
}
IMPLS = {
    'ours': lambda x, y, axis: label_smoothing_cross_entropy(x, y, EPS, axis=axis),
    'torch': lambda x, y, axis: F.cross_entropy(x, y, label_smoothing=EPS),
    'fastai': lambda x, y, axis: (fl.LabelSmoothingCrossEntropy(EPS) if x.ndim == 2 else fl.LabelSmoothingCrossEntropyFlat(EPS, axis=axis))(x, y),
}
JEMALLOC = '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'
OUT = Path(__file__).parent/'results'/'bench_loss.csv'

def make(case, seed=0):
    "Logits (with an allocated, touched gradient buffer) and class targets for `case`"
    shape, axis = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_()
    x.grad = torch.full_like(x, 0.)
    tshape = shape[:axis] + shape[axis+1:]
    return x, torch.randint(0, shape[axis], tshape, generator=g), axis

def step(impl, x, y, axis):
    IMPLS[impl](x, y, axis).backward()

def medians(fns, reps, before=None):
    "Median seconds of each function in the dict `fns`, run in turns (the order rotating), `before()` ahead of each timing"
    times = {k: [] for k in fns}
    for r in range(reps):
        for k in list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]:
            if before: before()
            t0 = time.perf_counter(); fns[k](); times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(ts) for k, ts in times.items()}

def time_case(case, reps):
    "Median seconds of one forward+backward per implementation, runs interleaved"
    x, y, axis = make(case)
    for impl in IMPLS: step(impl, x, y, axis)  # warm-up
    return medians({impl: (lambda impl=impl: step(impl, x, y, axis)) for impl in IMPLS}, reps)

def peak_memory(impl, case):
    "In a fresh process: growth of peak RSS over one forward+backward, in multiples of the logits' size"
    code = f"""
import resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_loss import make, step
x, y, axis = make({case!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step({impl!r}, x, y, axis)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (x.numel() * x.element_size()))
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=os.environ.copy())
    if r.returncode: raise RuntimeError(r.stderr)
    return float(r.stdout.strip().splitlines()[-1])

def soft_check_share(reps=31):
    """Share of a soft-target forward+backward (4096x1000) spent on the passes that only validate the targets (the
    minimum over the N x C targets, the test on the N row sums), run as the loss runs them: after the row sums it needs.
    The caches are flushed before each timing, as the rest of a training step would."""
    x = torch.randn(4096, 1000).requires_grad_(); x.grad = torch.zeros_like(x)
    t = torch.softmax(torch.randn(4096, 1000), 1)
    flush = torch.empty(64 << 20)  # 256 MB, more than any cache
    def sums_and_checks(): tsum = t.sum(1); bool(t.amin() < 0) or bool((tsum - 1).abs().amax() > 1e-3)
    m = medians(dict(full=lambda: label_smoothing_cross_entropy(x, t, EPS).backward(), sums=lambda: t.sum(1),
                     checks=sums_and_checks), reps, before=lambda: flush.fill_(1.))
    return (m['checks'] - m['sums']) / m['full']

def compiled_ratios(reps=9):
    """Compiled ours against compiled `F.cross_entropy(label_smoothing=...)` (torch.compile, default backend,
    fullgraph): median forward+backward ms of each and their ratio, for the cases small enough to compile quickly"""
    out = {}
    for case in ('256x10', '4096x1000'):
        x, y, axis = make(case)
        fns = {impl: torch.compile(lambda x, y, impl=impl: IMPLS[impl](x, y, axis), fullgraph=True) for impl in ('ours', 'torch')}
        steps = {impl: (lambda f=f: f(x, y).backward()) for impl, f in fns.items()}
        for f in steps.values(): f(); f()  # compile, warm up
        m = medians(steps, reps)
        out[case] = dict(ours_ms=round(m['ours'] * 1e3, 2), torch_ms=round(m['torch'] * 1e3, 2),
                         ours_vs_torch=round(m['ours'] / m['torch'], 3))
    return out

def run(quick):
    # memory first: a child process starts with its parent's peak resident memory, so the parent must still be small
    mem = {} if quick else {impl: peak_memory(impl, '8192x32000') for impl in IMPLS}
    rows = []
    for case in CASES:
        reps = 3 if case == '8192x32000' else (5 if quick else 15)
        t = time_case(case, reps)
        rows.append(dict(case=case, **{f'{k}_ms': round(v * 1e3, 2) for k, v in t.items()},
                         ours_vs_torch=round(t['ours'] / t['torch'], 3), ours_vs_fastai=round(t['ours'] / t['fastai'], 3),
                         **{f'{k}_peak_x_logits': round(v, 2) for k, v in (mem.items() if case == '8192x32000' else ())}))
        print(json.dumps(rows[-1]), flush=True)
    return rows

def show(rows, title):
    print(f'\n{title}')
    print(f"{'case':<18}{'ours ms':>10}{'torch ms':>10}{'fastai ms':>11}{'vs torch':>10}{'vs fastai':>11}{'peak ours/torch/fastai (x logits)':>36}")
    for r in rows:
        peak = '/'.join(f"{r[k]:.2f}" for k in ('ours_peak_x_logits', 'torch_peak_x_logits', 'fastai_peak_x_logits') if k in r) or '-'
        print(f"{r['case']:<18}{r['ours_ms']:>10.2f}{r['torch_ms']:>10.2f}{r['fastai_ms']:>11.2f}{r['ours_vs_torch']:>9.2f}x{r['ours_vs_fastai']:>10.2f}x{peak:>36}")

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='fewer repetitions, no memory runs')
    p.add_argument('--save', action='store_true', help='record the results for the docs page (benchmarks/results/)')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    rows = run(a.quick)
    if a.child: sys.exit(0)
    allocator = 'jemalloc' if 'jemalloc' in os.environ.get('LD_PRELOAD', '') else 'glibc malloc'
    show(rows, f'forward+backward, float32, {torch.get_num_threads()} threads, {allocator} (ratios: ours / theirs, lower is faster)')
    share = soft_check_share()
    print(f'\nsoft-target validation: {share:.1%} of a soft-target forward+backward at 4096x1000')
    compiled = compiled_ratios(3 if a.quick else 9)
    for case, r in compiled.items():
        print(f"torch.compile, {case}: ours {r['ours_ms']:.2f} ms, torch {r['torch_ms']:.2f} ms, {r['ours_vs_torch']:.2f}x")
    for r in rows: r['allocator'] = allocator
    if os.path.exists(JEMALLOC) and 'LD_PRELOAD' not in os.environ:
        env = dict(os.environ, LD_PRELOAD=JEMALLOC)
        out = subprocess.run([sys.executable, __file__, '--child'] + (['--quick'] if a.quick else []), env=env,
                             capture_output=True, text=True, check=True).stdout
        jrows = [dict(json.loads(l), allocator='jemalloc') for l in out.splitlines() if l.startswith('{')]
        show(jrows, 'the same with jemalloc preloaded')
        rows += jrows
    else: print('\n(jemalloc not installed: apt-get install libjemalloc2 to see the figures with it)')
    if a.save and not a.quick:
        OUT.parent.mkdir(exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(OUT, 'w', newline='') as f:
            w = csv.DictWriter(f, keys); w.writeheader(); w.writerows(rows)
        (OUT.with_suffix('.json')).write_text(json.dumps(dict(machine=platform.processor() or platform.machine(), cores=os.cpu_count(),
                                                             torch=torch.__version__, threads=torch.get_num_threads(),
                                                             soft_check_share=round(share, 4), compiled=compiled), indent=1))
        print(f'\nwrote {OUT}')
