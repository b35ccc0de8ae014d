"The main job as a user runs it, `python -m label_smoothing_fa.demo`, in each environment the suite runs in"
import re, subprocess, sys

def test_help_answers_without_torch_or_fastai():
    as_command = ("import runpy, sys\nsys.argv[1:] = ['--help']\n"
                  "try: runpy.run_module('label_smoothing_fa.demo', run_name='__main__')\nexcept SystemExit: pass\n"
                  "assert not {'torch', 'fastai'} & set(sys.modules), 'torch or fastai was imported'")
    r = subprocess.run([sys.executable, '-c', as_command], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '--epochs' in r.stdout and 'label smoothing' in r.stdout

def test_demo_runs_and_reports(tmp_path):
    cmd = [sys.executable, '-m', 'label_smoothing_fa.demo', '--out', str(tmp_path/'plots'), '--epochs', '3']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'On the 359 validation images:' in r.stdout  # 20% of the 1,797 digits
    row = re.compile(r'^(accuracy|nll|ece|confidence)\s+([\d.]+)\s+([\d.]+)$', re.M)
    rows = {m[1]: (float(m[2]), float(m[3])) for m in row.finditer(r.stdout)}
    assert set(rows) == {'accuracy', 'nll', 'ece', 'confidence'}, r.stdout
    (acc_ce, acc_ls), (conf_ce, conf_ls) = rows['accuracy'], rows['confidence']
    assert acc_ce > 0.8 and acc_ls > 0.8  # both runs learn the digits (chance: 0.1) in 3 epochs
    assert conf_ls < conf_ce  # label smoothing lowers the confidence of the predictions
    for f in ('entropy_curves.png', 'reliability.png'):
        assert (tmp_path/'plots'/f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
