"""The Triton kernels on CPU tensors through Triton's interpreter, against the float64 reference: every
semantic of the coefficients (targets x priors x weight modes x reductions x ignore_index x dtypes), the
strided class axis, the extremes, re-entrant and double backward. Tiny shapes: the interpreter takes a few
milliseconds per program (the whole module runs in about 10 s on one thread)."""
import itertools, os, subprocess, sys
from pathlib import Path

import pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck

# triton jits its own functions (tl.max, tl.sum) for the interpreter or the device when it is first
# imported: here, unless something imported it before (then the tests run in a process of their own)
if 'triton' not in sys.modules and not torch.cuda.is_available(): os.environ['TRITON_INTERPRET'] = '1'
pytest.importorskip('triton')
import label_smoothing_fa.triton_kernels as TK
import label_smoothing_fa.losses as L
from label_smoothing_fa.losses import (LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, _f32_dtype,
                                       label_smoothing_cross_entropy as lsce, reference_label_smoothing_cross_entropy)

INTERPRETED = TK._interpreting() and os.environ.get('TRITON_INTERPRET') == '1'
in_process = pytest.mark.skipif(not INTERPRETED, reason="triton imported for the device: the "
                                 "interpreted tests run in a subprocess (test_in_subprocess)")
pytestmark = pytest.mark.filterwarnings('ignore::RuntimeWarning')  # the interpreter's numpy on inf, NaN

@pytest.mark.skipif(INTERPRETED, reason="triton imported for the interpreter: the tests run here")
def test_in_subprocess():
    "This module's tests in a process where triton is imported for the interpreter"
    env = {**os.environ, 'TRITON_INTERPRET': '1', 'OMP_NUM_THREADS': '1'}
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__],
                   check=True, env=env, cwd=root)

def close(a, b, tol):
    assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=True), \
        (a, b, (a.double() - b.double()).abs().max())

def check(x, target, reduction='mean', axis=1, tol=1e-5, **kwargs):
    "Loss and gradient (for a grad_output that differs by row) against the float64 reference"
    x = x.detach().requires_grad_()
    loss = lsce(x, target, reduction=reduction, axis=axis, backend='triton', **kwargs)
    x64 = x.detach().double().requires_grad_()
    ref = reference_label_smoothing_cross_entropy(x64, target, reduction=reduction, axis=axis,
                                                   **kwargs)
    assert loss.dtype == _f32_dtype(x.dtype) and loss.shape == ref.shape
    close(loss, ref.to(loss.dtype), tol)  # the reference's float64 can hold what float32 can't
    g_out = torch.linspace(-1, 2, loss.numel(), device=x.device).reshape(loss.shape) if loss.ndim \
        else torch.ones((), device=x.device)
    g, = torch.autograd.grad(loss, x, g_out)
    g64, = torch.autograd.grad(ref, x64, g_out.double())
    assert g.dtype == x.dtype and g.shape == x.shape
    close(g, g64, tol)

PRIORS = {'uniform': lambda K: None, 'others': lambda K: 'others',
          'vector': lambda K: torch.softmax(torch.randn(K), 0),
          'matrix': lambda K: torch.softmax(torch.randn(K, K) * 2, 1)}
# float64 logits: float64 arithmetic, the class weights normalised in float32 as the losses do;
# bfloat16: one ulp of the gradient, as the interpreter truncates float32 to bfloat16 (the device rounds)
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 3e-3), (torch.float16, 1e-3), (torch.float64, 1e-7)]

@in_process
@pytest.mark.parametrize('soft', [False, True], ids=['indices', 'soft'])
@pytest.mark.parametrize('prior', list(PRIORS))
def test_semantics(prior, soft, monkeypatch):
    "Each weight mode, reduction and dtype in turn, classes in blocks of 8 (the online softmax)"
    monkeypatch.setattr(TK, '_MAX_BLOCK', 8)
    torch.manual_seed(list(PRIORS).index(prior) * 2 + soft)
    N, K = 4, 19
    x = torch.randn(N, K) * 3
    target = torch.softmax(torch.randn(N, K) * 3, 1) if soft else torch.tensor([3, -100, 18, 5])  # class 5: weight 0
    w = torch.rand(K) + 0.1
    w[5] = 0  # a class of weight 0
    modes = [(None, 'sample', 'mean'), (w, 'sample', 'sum'), (w, 'torch', 'none'),
             (w, 'fastai', 'mean'), (w, 'torch', 'mean')]
    for i, (weight, mode, reduction) in enumerate(modes):
        dt, tol = DTYPES[i % len(DTYPES)]
        check(x.to(dt), target.to(dt) if soft else target, reduction, tol=tol, eps=0.2,
              prior=PRIORS[prior](K), weight=weight, weight_mode=mode,
              ignore_index=-1 if soft else -100)

BACKENDS = ('dense', 'fused', 'triton')

def backend_loss(f, x, target, g_out=None):
    "Loss and input gradient of `f` (for a grad_output that differs by row)"
    x = x.detach().clone().requires_grad_()
    loss = f(x, target)
    if g_out is None: g_out = torch.linspace(-1, 2, loss.numel()).reshape(loss.shape) if loss.ndim \
        else torch.ones(())
    g, = torch.autograd.grad(loss, x, g_out.to(loss.dtype))
    return loss, g

@in_process
@pytest.mark.parametrize('soft', [False, True], ids=['indices', 'soft'])
@pytest.mark.parametrize('prior', list(PRIORS))
def test_public_backends_agree(prior, soft):
    """`backend=` through the public function and both modules: 'triton' gives the value and the
    gradient of 'dense' and 'fused', all three the float64 reference's, for each weight mode, reduction
    and ignore_index"""
    torch.manual_seed(10 + list(PRIORS).index(prior) * 2 + soft)
    N, K = 5, 6
    x = torch.randn(N, K) * 3
    target = torch.softmax(torch.randn(N, K) * 3, 1) if soft else torch.tensor([3, -100, 5, 0, 2])
    w, pr = torch.rand(K) + 0.1, PRIORS[prior](K)
    for (weight, mode), reduction, ignore in itertools.product(
            ((None, 'sample'), (w, 'sample'), (w, 'torch'), (w, 'fastai')), ('mean', 'sum', 'none'),
            (-100, None)):
        kw = dict(eps=0.2, weight=weight, reduction=reduction, prior=pr, ignore_index=ignore,
                  weight_mode=mode)
        t = target if soft or ignore is not None else target.clamp_min(1)  # -100 is no class
        ref, g_ref = backend_loss(lambda x, t: reference_label_smoothing_cross_entropy(x, t, **kw),
                                  x.double(), t)
        g_out = torch.linspace(-1, 2, ref.numel()).reshape(ref.shape) if ref.ndim else None
        for backend in BACKENDS:
            loss, g = backend_loss(lambda x, t: lsce(x, t, backend=backend, **kw), x, t, g_out)
            close(loss, ref, 1e-5); close(g, g_ref, 1e-5)
            if reduction != 'none' or mode != 'sample': continue  # the modules: once per target kind
            args = (kw['eps'], weight, reduction)
            rest = dict(prior=pr, ignore_index=ignore, weight_mode=mode, backend=backend)
            module, g_m = backend_loss(LabelSmoothingCrossEntropy(*args, **rest), x, t, g_out)
            close(module, ref, 1e-5); close(g_m, g_ref, 1e-5)
            flat, g_f = backend_loss(LabelSmoothingCrossEntropyFlat(*args, axis=1, **rest), x, t, g_out)
            close(flat, ref, 1e-5); close(g_f, g_ref, 1e-5)

@in_process
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_property(data):
    "Random shapes, class axis, eps, prior, weights, reduction and ignored rows"
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    K, N = data.draw(st.integers(2, 12), 'K'), data.draw(st.integers(0, 5), 'N')
    shape = data.draw(st.sampled_from([(N, K), (K, N), (N, K, 2)]), 'shape')
    axis = shape.index(K) if shape != (K, K) else data.draw(st.sampled_from([0, 1]), 'axis')
    x = torch.randn(shape) * data.draw(st.sampled_from([1., 10.]), 'scale')
    rows = shape[:axis] + shape[axis+1:]
    soft = data.draw(st.booleans(), 'soft')
    if soft: target = torch.softmax(torch.randn(shape) * 3, axis)
    else:
        target = torch.randint(0, K, rows)
        target[torch.rand(rows) < 0.3] = -100
    weight = data.draw(st.sampled_from([None, torch.rand(K) + 0.05]), 'weight')
    check(x, target, data.draw(st.sampled_from(['mean', 'sum', 'none']), 'reduction'), axis,
          eps=data.draw(st.sampled_from([0., 0.1, 1.]), 'eps'),
          prior=PRIORS[data.draw(st.sampled_from(list(PRIORS)), 'prior')](K), weight=weight,
          weight_mode=data.draw(st.sampled_from(['sample', 'torch', 'fastai']), 'mode'),
          ignore_index=-1 if soft else -100)

@in_process
def test_segmentation_in_place(monkeypatch):
    "(N, K, H, W): the class axis strided, read without a copy, several rows per program"
    xs, ys = torch.randn(2, 5, 3, 2), torch.randint(0, 5, (2, 3, 2))
    ys[0, 1, 1] = -100
    assert TK._layout(xs, 1) == TK._Layout(6, 30, 1, 6)
    assert TK._blocks(5, 12)[0] == 16  # the 12 rows in one program
    seen = []
    strided = TK._strided
    monkeypatch.setattr(TK, '_strided', lambda t, axis: seen.append(t.data_ptr()) or strided(t, axis))
    for reduction in ('mean', 'sum', 'none'): check(xs, ys, reduction, eps=0.2, prior='others')
    assert xs.data_ptr() in seen
    check(xs, torch.softmax(xs * 2, 1), 'none', ignore_index=None, prior=torch.softmax(torch.randn(5, 5), 1))
    check(xs.contiguous(memory_format=torch.channels_last), ys, 'none', prior=torch.rand(5).softmax(0))
    check(torch.randn(4, 4, 4, 5)[::2, ::2, ::2], torch.randint(0, 5, (2, 2, 2)), axis=3)  # copied

def check_extremes(device='cpu'):
    "+-inf and NaN show in kept rows as the reference's; -inf where B = 0 adds 0; ignored rows give 0"
    inf, nan = float('inf'), float('nan')
    x = torch.randn(8, 9)
    x[0, 3], x[1, 2], x[2, :4], x[3, 5], x[3, 1] = inf, nan, -inf, 3e38, -3e38
    x[4] = nan
    x[5, :] = -inf
    x[6, 4:] = -inf  # the last blocks all -inf, after finite ones
    x[7, :5] = -inf  # the first blocks all -inf, then finite ones
    x, y = x.to(device), torch.tensor([1, 0, 6, 5, -100, 2, 0, 6], device=device)
    for kwargs in (dict(eps=0.), {}, dict(prior='others'),
                   dict(eps=0.3, prior=torch.rand(9, device=device).softmax(0))):
        check(x, y, 'none', **kwargs)
    loss = lsce(x.requires_grad_(), y, 0., reduction='none', backend='triton')
    g, = torch.autograd.grad(loss.sum(), x)
    assert loss[4] == 0 and (g[4] == 0).all()  # an ignored row of NaN
    assert loss[2].isfinite() and (g[2, :4] == 0).all()  # -inf logits of classes without weight
    assert loss[7].isfinite()
    big = torch.tensor([[3e38, -3e38, 0.]], device=device)
    y0 = torch.tensor([0], device=device)
    assert lsce(big, y0, 0., backend='triton') == 0
    close(lsce(big, y0, 1e-30, backend='triton'), torch.tensor(1e-30 * 9e38 / 3), 1e-5)
    # confident rows: a loss of 1e-13 keeps its digits (lse - c = log1p of the other terms' sum;
    # the reference's float64 lse - x_y would not: 1e-16 of 30), uniform prior, the target the max
    sure = torch.tensor([[30., 0., 0.], [20., 5., -3.], [-3., 15., 18.]], device=device)
    ys = torch.tensor([0, 0, 2], device=device)
    z = sure.double() - sure.double().amax(1, keepdim=True)
    lse_c = torch.where(z == 0, 0., z.exp()).sum(1).log1p()
    for eps in (0., 1e-9):
        ref = (1 - eps) * lse_c + eps * (lse_c - z.mean(1))
        loss = lsce(sure, ys, eps, reduction='none', backend='triton').double()
        assert ((loss - ref).abs() <= 1e-6 * ref).all(), (loss, ref)

@in_process
def test_extremes(monkeypatch):
    monkeypatch.setattr(TK, '_MAX_BLOCK', 4)
    check_extremes()

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or TK._interpreting(),
                    reason='needs a GPU: the compiled kernels')
def test_cuda_device():
    "The compiled kernels on the device: one block and several, half precision, segmentation"
    torch.manual_seed(0)
    for K in (7, 40000):  # 40000 classes: 3 blocks of _MAX_BLOCK
        x = torch.randn(64, K, device='cuda') * 3
        y = torch.randint(0, K, (64,), device='cuda')
        y[::7] = -100
        soft = torch.softmax(torch.randn(64, K, device='cuda') * 3, 1)
        for prior in (None, 'others', torch.rand(K, device='cuda').softmax(0)):
            for dt, tol in DTYPES[:3]: check(x.to(dt), y, tol=tol, prior=prior)
            check(x, soft, 'none', prior=prior, ignore_index=None, weight_mode='torch',
                  weight=torch.rand(K, device='cuda'))
    P = torch.softmax(torch.randn(21, 21, device='cuda'), 1)
    xs, ys = torch.randn(4, 21, 32, 32, device='cuda'), torch.randint(0, 21, (4, 32, 32), device='cuda')
    check(xs, ys, 'none', prior=P)
    check(xs.to(torch.bfloat16), ys, 'mean', tol=3e-3, prior='others')
    check(xs, torch.softmax(xs, 1), 'sum', prior=P, ignore_index=None)
    check_extremes('cuda')

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or TK._interpreting(),
                    reason='needs a GPU: the compiled kernels')
def test_cuda_auto_is_triton(monkeypatch):
    "CUDA tensors: 'auto' takes the kernel; 'fused' and 'dense' still run there, with the same numbers"
    calls, apply = [], TK._TritonLabelSmoothing.apply
    monkeypatch.setattr(TK._TritonLabelSmoothing, 'apply', lambda *a: calls.append(1) or apply(*a))
    x, y = torch.randn(300, 1000, device='cuda'), torch.randint(0, 1000, (300,), device='cuda')
    auto = lsce(x, y)
    assert calls == [1]
    for backend in ('fused', 'dense'): close(lsce(x, y, backend=backend), auto, 1e-5)

@in_process
def test_empty_and_one_class():
    check(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), 'none')
    check(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), 'sum')
    check(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), 'none')
    check(torch.randn(5), torch.tensor(2), 'none', prior='others')  # no batch axis

@in_process
def test_reentrant_and_double_backward():
    "Two backwards through one graph: the same gradient, bit for bit; create_graph differentiates"
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    P = torch.softmax(torch.randn(6, 6), 1)
    for prior in ('others', P):
        loss = lsce(x, torch.tensor([1, 2, 3, -100]), prior=prior, backend='triton')
        g1, = torch.autograd.grad(loss, x, retain_graph=True)
        g2, = torch.autograd.grad(loss, x)
        assert torch.equal(g1, g2)
    y = torch.tensor([1, 2, 3, -100])
    g, = torch.autograd.grad(lsce(x, y, reduction='sum', prior=P, backend='triton'), x, create_graph=True)
    x64 = x.detach().double().requires_grad_()
    ref = reference_label_smoothing_cross_entropy(x64, y, reduction='sum', prior=P)
    g64, = torch.autograd.grad(ref, x64, create_graph=True)
    close(g, g64, 1e-6)
    h, = torch.autograd.grad((g ** 3).sum(), x)
    h64, = torch.autograd.grad((g64 ** 3).sum(), x64)
    close(h, h64, 1e-5)

@in_process
def test_clear_errors(monkeypatch):
    "No triton, or TRITON_INTERPRET changed since triton's import: an error that says what to do"
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(RuntimeError, match='before triton is first imported'):
        lsce(x, y, backend='triton')
    monkeypatch.setattr(TK, 'triton', None)
    with pytest.raises(RuntimeError, match='pip install triton'): lsce(x, y, backend='triton')

def run_python(code, **env):
    "Run `code` in a fresh Python with `env` added to the environment"
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **env}
    subprocess.run([sys.executable, '-c', code], check=True, env=env)

@in_process
def test_import_without_triton_or_interpreter():
    "The module imports where triton is missing; CPU tensors without the interpreter are refused"
    code = ("import importlib, sys, torch; sys.modules['triton'] = None\n"
            "import label_smoothing_fa.triton_kernels as TK\nassert TK.triton is None\n"
            "del sys.modules['triton']; TK = importlib.reload(TK)\n"
            "try: TK._check_triton(torch.zeros(1))\n"
            "except RuntimeError as e: assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "else: raise AssertionError('CPU tensors without the interpreter: not refused')")
    if torch.cuda.is_available(): code = code.split('\ndel ')[0]  # CPU tensors: no refusal to test
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TRITON_INTERPRET': '0'}
    subprocess.run([sys.executable, '-c', code], check=True, env=env)

COMPILE = '''
import itertools, os, subprocess, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import label_smoothing_fa.triton_kernels as TK
code = TK._label_smoothing_rows.__code__
kernel, names = triton.jit(TK._label_smoothing_rows), code.co_varnames[:code.co_argcount]
flags = ('SOFT', 'PRIOR', 'OTHERS', 'OTHERS_WEIGHTED', 'BACKWARD', 'ROWS', 'BLOCK', 'COMPUTE')
ints = ('x_outer', 'x_inner', 'x_class', 's_outer', 's_inner', 's_class', 'gx_outer', 'gx_inner',
        'gx_class')
cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump')
variants = [(soft, prior, others) for soft in (0, 1) for prior in (0, 1, 2, 3) for others in (0, 1)
            if not (others and prior) and prior != (2 if soft else 3)]
for (soft, prior, others), backward, (K, rows_in), (x, f) in itertools.product(
        variants, (0, 1), ((32000, 8), (21, 4096)), (('bf16', 'fp32'), ('fp64', 'fp64'))):
    if f == 'fp64' and (K, backward) != (21, 1): continue
    rows, block, warps = TK._blocks(K, rows_in)
    sig = {n: 'i64' if n in ints else 'i32' if n.startswith('n_') else '*i64' if n == 'Y' else
           '*' + (x if n in ('X', 'GX') else f) for n in names if n not in flags}
    sig.update({n: 'constexpr' for n in flags})
    src = ASTSource(kernel, sig, dict(SOFT=bool(soft), PRIOR=prior, OTHERS=bool(others),
                    OTHERS_WEIGHTED=bool(others), BACKWARD=bool(backward), ROWS=rows, BLOCK=block,
                    COMPUTE=tl.float64 if f == 'fp64' else tl.float32))
    k = triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=warps))
    if os.path.exists(cuobjdump) and f == 'fp32':
        with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
            cubin.write(k.asm['cubin']); cubin.flush()
            usage = subprocess.run([cuobjdump, '-res-usage', cubin.name], capture_output=True,
                                   text=True, check=True).stdout
        assert 'STACK:0 ' in usage and 'LOCAL:0 ' in usage, (soft, prior, others, backward, K, usage)
print('compiled')
'''

@in_process
def test_compiles_for_the_device():
    """Every variant of the kernel compiles for an H100 (sm_90) as the launches configure it, without
    a GPU (triton's bundled ptxas), and fits its registers without spilling"""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TRITON_INTERPRET': '0'}
    out = subprocess.run([sys.executable, '-c', COMPILE], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and 'compiled' in out.stdout, out.stderr[-3000:]
