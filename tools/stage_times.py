"""Wall time of each stage of `make test`, for the end of its output.

    python tools/stage_times.py run FILE NAME -- CMD...   # run CMD; on success add `NAME <seconds>` to FILE
    python tools/stage_times.py table FILE NAME           # the table of FILE's stages, when stage NAME failed
    python -m pytest -p stage_times ...                   # (tools/ on PYTHONPATH) the table of FILE's stages and of
                                                          # this pytest run, printed just before pytest's summary line

FILE is `$STAGE_TIMES`; without it the plugin prints nothing. The table comes before pytest's last line, so the
output still ends with pytest's summary line; a failed stage stops `make test`, after the table of the stages before it."""
import os, subprocess, sys, time

def read_times(path) -> list:
    "(name, seconds) of each stage recorded in `path`, in order"
    if not path or not os.path.exists(path): return []
    with open(path) as f: return [(n, float(s)) for n, s in (line.rsplit(None, 1) for line in f if line.strip())]

def table(times:list) -> list:
    "Lines of the stage table, with the total"
    w = max(len(n) for n, _ in times + [('total', 0)])
    lines = [f'  {n:<{w}} {s:7.1f} s' for n, s in times]
    return lines + [f"  {'total':<{w}} {sum(s for _, s in times):7.1f} s"]

_start = None

def pytest_sessionstart(session):
    global _start
    _start = time.monotonic()

def pytest_terminal_summary(terminalreporter):
    path = os.environ.get('STAGE_TIMES')
    if not path or _start is None: return
    name = os.environ.get('STAGE_NAME', 'pytest')
    times = read_times(path) + [(name, time.monotonic() - _start)]
    terminalreporter.section('wall time of each stage of make test')
    for line in table(times): terminalreporter.write_line(line)

if __name__ == '__main__':
    if sys.argv[1:2] == ['table'] and len(sys.argv) == 4:  # after a failed stage: the stages until then
        print(f'wall time of each stage of make test, until {sys.argv[3]} failed:', *table(read_times(sys.argv[2])),
              sep='\n')
        sys.exit()
    if len(sys.argv) < 5 or sys.argv[1] != 'run' or sys.argv[4] != '--': sys.exit(__doc__)
    path, name, cmd = sys.argv[2], sys.argv[3], sys.argv[5:]
    t = time.monotonic()
    rc = subprocess.call(cmd)
    if rc == 0:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(path, 'a') as f: f.write(f'{name} {time.monotonic() - t:.1f}\n')
    sys.exit(rc)
