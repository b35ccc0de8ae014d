"The main job as a user runs it, `python -m label_smoothing_fa.demo`, in each environment the suite runs in"
import re, subprocess, sys

def test_demo_runs_and_reports(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'label_smoothing_fa.demo', '--out', str(tmp_path/'plots'), '--epochs', '3'],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'On the 359 validation images:' in r.stdout  # 20% of the 1,797 digits
    rows = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r'^(accuracy|nll|ece|confidence)\s+([\d.]+)\s+([\d.]+)$', r.stdout, re.M)}
    assert set(rows) == {'accuracy', 'nll', 'ece', 'confidence'}, r.stdout
    (acc_ce, acc_ls), (conf_ce, conf_ls) = rows['accuracy'], rows['confidence']
    assert acc_ce > 0.9 and acc_ls > 0.9  # both runs learn the digits
    assert conf_ls < conf_ce  # label smoothing lowers the confidence of the predictions
    for f in ('entropy_curves.png', 'reliability.png'):
        assert (tmp_path/'plots'/f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
