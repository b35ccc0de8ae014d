"""Fail when the committed library, notebooks or README.md are out of step with the notebooks.

Runs `nbdev_export`, `nbdev_clean` and the README build, and reports every file they changed."""
import hashlib, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ['label_smoothing_fa', 'nbs', 'README.md', 'pyproject.toml']

def snapshot():
    "Hash of every watched file"
    files = [p for w in WATCHED for p in ([ROOT/w] if (ROOT/w).is_file() else (ROOT/w).rglob('*'))
             if p.is_file() and '__pycache__' not in p.parts and '.ipynb_checkpoints' not in p.parts]
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

if __name__ == '__main__':
    bin_ = Path(sys.executable).parent
    before = snapshot()
    for cmd in ([bin_/'nbdev_export'], [bin_/'nbdev_clean'], [sys.executable, 'tools/build_docs.py', '--readme-only']):
        subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        sys.exit('Out of sync with the notebooks (run nbdev_export, nbdev_clean and tools/build_docs.py --readme-only, '
                 'then commit):\n  ' + '\n  '.join(changed))
    print(f'sync: {len(after)} files already match the notebooks')
