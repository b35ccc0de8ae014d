"The main job as a user runs it, `python -m label_smoothing_fa.demo`, in each environment the suite runs in"
import re, subprocess, sys
from pathlib import Path
import pytest

def test_help_answers_without_torch_or_fastai():
    as_command = ("import runpy, sys\nsys.argv[1:] = ['--help']\n"
                  "try: runpy.run_module('label_smoothing_fa.demo', run_name='__main__')\nexcept SystemExit: pass\n"
                  "assert not {'torch', 'fastai'} & set(sys.modules), 'torch or fastai was imported'")
    r = subprocess.run([sys.executable, '-c', as_command], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '--epochs' in r.stdout and 'label smoothing' in r.stdout

def test_demo_runs_and_reports(tmp_path):
    cmd = [sys.executable, '-m', 'label_smoothing_fa.demo', '--out', str(tmp_path/'plots'), '--epochs', '2']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'Warning' not in r.stderr, r.stderr  # only the demo's own output (a dependency's FutureWarning is filtered)
    assert 'On the 359 validation images:' in r.stdout  # 20% of the 1,797 digits
    row = re.compile(r'^(accuracy|nll|ece|confidence)\s+([\d.]+)\s+([\d.]+)$', re.M)
    rows = {m[1]: (float(m[2]), float(m[3])) for m in row.finditer(r.stdout)}
    assert set(rows) == {'accuracy', 'nll', 'ece', 'confidence'}, r.stdout
    (acc_ce, acc_ls), (conf_ce, conf_ls) = rows['accuracy'], rows['confidence']
    assert acc_ce > 0.8 and acc_ls > 0.8  # both learn the digits in 2 epochs (0.91-0.95; chance: 0.1)
    assert conf_ls < conf_ce  # label smoothing lowers the confidence of the predictions
    for f in ('entropy_curves.png', 'reliability.png'):
        assert (tmp_path/'plots'/f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

BAD_OPTIONS = [  # (arguments, what argparse's message says about the option)
    (['--eps', '1.5'], 'argument --eps: must be in [0, 1]'), (['--eps', '-0.1'], '--eps: must be in [0, 1]'),
    (['--eps', 'nan'], 'argument --eps: must be in [0, 1]'), (['--eps', 'x'], '--eps: must be a number'),
    (['--epochs', '0'], 'argument --epochs: must be at least 1'), (['--epochs', '-2'], '--epochs: must be at least 1'),
    (['--epochs', '1.5'], 'argument --epochs: must be an integer'),
    (['--lr', '0'], 'argument --lr: must be a positive number'), (['--lr', 'inf'], '--lr: must be a positive number'),
    (['--lr', 'nan'], 'argument --lr: must be a positive number'), (['--lr', 'fast'], '--lr: must be a number'),
    (['--seed', '-1'], 'argument --seed: must be in [0, 2**32)'), (['--seed', str(2**32)], '--seed: must be in [0, 2**32)'),
    (['--seed', '4.2'], 'argument --seed: must be an integer'),
    (['--out', '{file}'], 'is not a folder'), (['--out', '{file}/plots'], '--out: cannot make or write the folder'),
    (['--color', 'red'], 'unrecognized arguments: --color red'),
]

@pytest.mark.parametrize('args,message', BAD_OPTIONS, ids=[' '.join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_refused_by_argparse(args, message, tmp_path):
    "argparse's own error: usage, the option named, exit status 2, no traceback, before torch or fastai load"
    (tmp_path/'file').write_text('not a folder')
    args = [a.format(file=tmp_path/'file') for a in args]
    as_command = ("import runpy, sys\nsys.argv[1:] = " + repr(args) + "\n"
                  "try: runpy.run_module('label_smoothing_fa.demo', run_name='__main__')\n"
                  "except SystemExit as e: code = e.code\n"
                  "assert not {'torch', 'fastai'} & set(sys.modules), 'torch or fastai was imported'\n"
                  "sys.exit(code)")
    r = subprocess.run([sys.executable, '-c', as_command], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith('usage: python -m label_smoothing_fa.demo'), r.stderr
    assert message in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert args[0] == '--color' or f'argument {args[0]}: ' in r.stderr, r.stderr
    assert r.stdout == ''

def test_good_options_are_parsed(tmp_path):
    from label_smoothing_fa.demo import _parser
    a = _parser().parse_args(['--out', str(tmp_path/'new'/'plots'), '--epochs', '1', '--lr', '1e-3', '--eps', '1',
                              '--seed', '0'])
    assert vars(a) == dict(out=tmp_path/'new'/'plots', epochs=1, lr=1e-3, eps=1.0, seed=0)
    assert not (tmp_path/'new').exists()  # checked, not made: `main` makes it
    d = _parser().parse_args([])
    assert vars(d) == dict(out=Path('demo_output'), epochs=5, lr=0.01, eps=0.1, seed=42)

@pytest.mark.parametrize('kwargs,message', [(dict(epochs=0), '`epochs` must be at least 1'),
                                            (dict(epochs=True), '`epochs` must be an integer'),
                                            (dict(eps=1.5), r'`eps` must be in \[0, 1\]'),
                                            (dict(lr=float('nan')), '`lr` must be a positive number'),
                                            (dict(seed=-1), r'`seed` must be in \[0, 2\*\*32\)')])
def test_main_refuses_what_the_command_line_refuses(kwargs, message, tmp_path):
    from label_smoothing_fa.demo import main
    with pytest.raises(ValueError, match=message): main(tmp_path/'plots', **kwargs)
    assert not (tmp_path/'plots').exists()  # refused before anything is made or trained
