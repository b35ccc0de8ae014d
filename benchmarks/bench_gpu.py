"""The one prepared GPU command (issue 18, part 5): the Triton kernel's loss and gradient against float64 on the
device (a few semantics, two dtypes), the tests marked `cuda`, then one forward+backward's time (CUDA events,
medians) and peak memory growth (over the logits, the gradient included) for ours (`triton`, `fused`),
`F.cross_entropy(label_smoothing=0.1)`, compiled `F.cross_entropy`, and Liger's `LigerCrossEntropyLoss` when
`liger-kernel` is installed. It writes benchmarks/results/bench_gpu.json.

    python benchmarks/bench_gpu.py            # on a GPU; without one it says so and exits 0
    python benchmarks/bench_gpu.py --dry-run  # tiny CPU shapes through Triton's interpreter (CI): writes nothing"""
import argparse, json, os, statistics, subprocess, sys, time, warnings
from pathlib import Path

EPS = 0.1
CASES = {  # name: (logits shape, class axis); the dry run's shapes are tiny
    'gpu': {'8192x32000': ((8192, 32000), 1), '16384x128256': ((16384, 128256), 1),
            'seg 16x21x512x512': ((16, 21, 512, 512), 1)},
    'dry': {'4x40': ((4, 40), 1), 'seg 2x5x3x2': ((2, 5, 3, 2), 1)},
}
OUT = Path(__file__).parent/'results'/'bench_gpu.json'
ROOT = Path(__file__).resolve().parent.parent

def implementations(L, F, torch, dry):
    "name: f(x, y, axis) -> loss, for each implementation that runs here"
    ours = lambda backend: lambda x, y, axis: L.label_smoothing_cross_entropy(x, y, EPS, axis=axis,
                                                                             backend=backend)
    impls = {'triton': ours('triton'), 'fused': ours('fused'),
             'torch': lambda x, y, axis: F.cross_entropy(x, y, label_smoothing=EPS)}
    if not dry:  # compiling on the CPU takes longer than the dry run is for
        compiled = torch.compile(F.cross_entropy)
        impls['torch compiled'] = lambda x, y, axis: compiled(x, y, label_smoothing=EPS)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss(label_smoothing=EPS)
        impls['liger'] = lambda x, y, axis: liger(x, y) if x.ndim == 2 else None
    except ImportError: pass
    return impls

def check_results(L, torch, device, dry) -> list:
    "Loss and gradient of the kernel against the float64 reference: a few semantics, two dtypes"
    N, K = (4, 40) if dry else (64, 4000)
    g = torch.Generator(device).manual_seed(0)
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(N, K, device=device, generator=g).to(dt)
        y = torch.randint(0, K, (N,), device=device, generator=g)
        y[0] = -100
        soft = torch.softmax(torch.randn(N, K, device=device, generator=g) * 3, 1)
        P = torch.softmax(torch.randn(K, K, device=device, generator=g), 1)
        for name, target, kw in (('uniform', y, {}), ('others', y, dict(prior='others')),
                                 ('K x K', y, dict(prior=P)), ('soft, K x K', soft, dict(prior=P))):
            xg = x.detach().requires_grad_()
            loss = L.label_smoothing_cross_entropy(xg, target, EPS, backend='triton', **kw)
            grad, = torch.autograd.grad(loss, xg)
            x64 = x.detach().double().requires_grad_()
            ref = L.reference_label_smoothing_cross_entropy(x64, target, EPS, **kw)
            grad64, = torch.autograd.grad(ref, x64)
            errs = [(loss.double() - ref).abs().item(), (grad.double() - grad64).abs().max().item()]
            # the gradient is stored in the logits' dtype: one bfloat16 ulp (8 bits), as the
            # interpreter truncates where the device rounds
            tol = (1e-5 if dt == torch.float32 else 2 ** -7) * grad64.abs().max().item()
            rows.append(dict(dtype=str(dt), semantics=name, loss_err=errs[0], grad_err=errs[1],
                             ok=errs[0] <= 1e-5 * max(1, ref.abs().item()) and errs[1] <= tol))
    return rows

def measure(fn, x, y, axis, torch, cuda, reps) -> dict:
    "Median milliseconds of one forward+backward, and the peak memory growth over the logits"
    def step():
        x.grad = None
        loss = fn(x, y, axis)
        if loss is None: return False
        loss.backward()
        return True
    if not step(): return dict(ms=None, peak_growth=None, note='not applicable')
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); step(); end.record(); torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter(); step(); times.append((time.perf_counter() - t0) * 1e3)
    growth = None
    if cuda:
        x.grad = None
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(); torch.cuda.synchronize()
        growth = (torch.cuda.max_memory_allocated() - base) / (x.numel() * x.element_size())
    return dict(ms=statistics.median(times), peak_growth=growth)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--dry-run', action='store_true', help='tiny CPU shapes through the interpreter')
    ap.add_argument('--reps', type=int, default=10, help='timed forward+backward runs per case')
    args = ap.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_gpu: no GPU here, nothing measured (--dry-run runs the kernels on tiny CPU shapes "
              "through Triton's interpreter)")
        return 0
    if args.dry_run:
        os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported (by the kernels' module)
        warnings.filterwarnings('ignore', category=RuntimeWarning)  # the interpreter's numpy on inf
    import torch.nn.functional as F
    import label_smoothing_fa.losses as L, label_smoothing_fa.triton_kernels as TK
    device = 'cpu' if args.dry_run else 'cuda'
    report = dict(device=torch.cuda.get_device_name() if cuda and not args.dry_run else 'cpu (interpreter)',
                  torch=torch.__version__, triton=getattr(TK.triton, '__version__', None))
    report['checks'] = check_results(L, torch, device, args.dry_run)
    for r in report['checks']:
        print(f"check {r['dtype']:15} {r['semantics']:12} loss err {r['loss_err']:.2e}  "
              f"grad err {r['grad_err']:.2e}  {'ok' if r['ok'] else 'FAILED'}")
    if args.dry_run: print("tests marked cuda: not run (no GPU in a dry run)")
    else:
        rc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', 'tests'], cwd=ROOT).returncode
        report['cuda_tests'] = {0: 'passed', 5: 'none collected'}.get(rc, f'failed (exit {rc})')
    impls = implementations(L, F, torch, args.dry_run)
    report['cases'] = []
    dtypes = (torch.bfloat16, torch.float32)
    for case, (shape, axis) in CASES['dry' if args.dry_run else 'gpu'].items():
        for dt in dtypes if len(shape) == 2 else dtypes[:1]:
            g = torch.Generator(device).manual_seed(0)
            x = torch.randn(shape, device=device, generator=g, dtype=dt).requires_grad_()
            y = torch.randint(0, shape[axis], shape[:axis] + shape[axis+1:], device=device, generator=g)
            for name, fn in impls.items():
                try: m = measure(fn, x, y, axis, torch, cuda and not args.dry_run,
                                 1 if args.dry_run else args.reps)
                except torch.cuda.OutOfMemoryError: m = dict(ms=None, peak_growth=None, note='out of memory')
                report['cases'].append(dict(case=case, dtype=str(dt), impl=name, **m))
                ms, peak = m['ms'], m['peak_growth']
                print(f"{case:18} {str(dt):15} {name:15} " + (m.get('note') or
                      f"{ms:9.3f} ms" + (f"  peak growth {peak:.3f} x logits" if peak is not None else '')))
                torch.cuda.empty_cache() if cuda else None
            del x
    if not args.dry_run:
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(report, indent=1))
        print(f'written {OUT}')
    return 0 if all(r['ok'] for r in report['checks']) else 1

if __name__ == '__main__': sys.exit(main())
