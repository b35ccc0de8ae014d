"The package's namespace: its public names, what `import label_smoothing_fa` costs, and what `help()` shows"
import configparser, importlib, inspect, json, pydoc, subprocess, sys
from pathlib import Path
import pytest
from fastcore.docments import docments
import label_smoothing_fa

PKG = Path(label_smoothing_fa.__file__).parent
NOT_API = {'__init__', '_modidx', 'all', 'demo', 'triton_kernels'}  # the demo is the main job (fastai.vision, scikit-learn),
# the Triton kernels a backend of the loss (`backend='triton'`): neither is API


def run_fresh(code: str) -> list:
    "Run `code` in a fresh interpreter; the `sys.modules` it had at each `snap()` it called"
    prelude = 'import json, sys\nsnaps = []\ndef snap(): snaps.append(list(sys.modules))\n'
    out = subprocess.run([sys.executable, '-W', 'ignore', '-c', prelude + code + '\nprint(json.dumps(snaps))'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [set(m) for m in json.loads(out.stdout.splitlines()[-1])]


def api_modules() -> list:
    return [importlib.import_module(f'label_smoothing_fa.{m}') for m in label_smoothing_fa._api_modules()]


def public_classes() -> list:
    return [getattr(m, n) for m in api_modules() for n in m.__all__ if isinstance(getattr(m, n), type)]


def test_every_module_is_in_the_api():
    "A new module of the library is one line in `all.py`, and this test says when it is missing"
    modules = {p.stem for p in PKG.glob('*.py')} - NOT_API
    assert set(label_smoothing_fa._api_modules()) == modules


def test_top_level_names():
    names = list(dict.fromkeys(n for m in api_modules() for n in m.__all__))
    owners = {}
    for m in api_modules():  # a name two modules export (a re-export) must be the same object in both
        for n in m.__all__: assert owners.setdefault(n, getattr(m, n)) is getattr(m, n), f'two different {n}'
    assert label_smoothing_fa.__all__ == names
    for m in api_modules():
        for n in m.__all__: assert getattr(label_smoothing_fa, n) is getattr(m, n)
    from label_smoothing_fa import LabelSmoothingCrossEntropy, EntropyLogger, EpsScheduler, LabelSmoothingBCEWithLogits
    from label_smoothing_fa.losses import LabelSmoothingCrossEntropy as L
    assert LabelSmoothingCrossEntropy is L
    ns = {}
    exec('from label_smoothing_fa.all import *', ns)
    assert set(ns) - {'__builtins__'} == set(names)
    ns = {}
    exec('from label_smoothing_fa import *', ns)
    assert set(ns) - {'__builtins__'} == set(names)
    assert set(names) <= set(dir(label_smoothing_fa))
    with pytest.raises(AttributeError, match='no_such_name'): label_smoothing_fa.no_such_name
    with pytest.raises(AttributeError): label_smoothing_fa._private
    cfg = configparser.ConfigParser()
    cfg.read(PKG.parent/'settings.ini')
    if cfg.has_option('DEFAULT', 'version'): assert label_smoothing_fa.__version__ == cfg['DEFAULT']['version']


def test_import_is_light():
    """`import label_smoothing_fa` imports nothing heavy; the loss imports what fastai's losses import, no more; the
    API never imports the demo; and a class imported from its module, first thing, has its `__init__` docstring"""
    bare, losses, loss, everything = run_fresh(
        "import label_smoothing_fa; snap()\n"
        "import fastai.losses; snap()\n"
        "from label_smoothing_fa.losses import LabelSmoothingCrossEntropy as C; snap()\n"
        "assert 'eps (float, default 0.1): share of probability moved to the prior' in C.__init__.__doc__\n"
        "assert C is __import__('label_smoothing_fa').LabelSmoothingCrossEntropy\n"
        "from label_smoothing_fa import *; snap()")
    heavy = {'torch', 'fastai.losses', 'fastai.learner', 'fastai.vision', 'sklearn', 'label_smoothing_fa.demo',
             'label_smoothing_fa.losses', 'label_smoothing_fa.callbacks'}
    assert not heavy & bare
    extra = {m for m in loss - losses if not m.startswith('label_smoothing_fa')}
    assert not extra, f'importing the loss imports more than fastai.losses: {sorted(extra)[:10]}'
    assert not {'sklearn', 'fastai.learner', 'label_smoothing_fa.callbacks'} & loss
    assert 'label_smoothing_fa.callbacks' in everything and 'label_smoothing_fa.demo' not in everything


def test_help_shows_the_argument_notes():
    "Each public class's own `__init__` shows its docments in `help()` (a module imported first: test_import_is_light)"
    checked = 0
    for cls in public_classes():
        init = cls.__dict__.get('__init__')
        if not inspect.isfunction(init): continue
        notes = {k: v for k, v in docments(init).items() if v}
        assert notes or cls.__dict__.get('__delwrap__'), f'{cls.__name__}.__init__ has no argument notes'
        page = pydoc.render_doc(cls, renderer=pydoc.plaintext)
        assert 'Initialize internal Module state' not in page, cls
        for name, note in notes.items():
            assert f'\n    {name}' in init.__doc__ and note in init.__doc__, (cls, name)
            assert note in ' '.join(page.split()), (cls, name)
        checked += 1
    assert checked >= 7
    # a delegated `**kwargs`: the notes come from the delegate's
    from label_smoothing_fa.multilabel import LabelSmoothingBCEWithLogitsFlat, LabelSmoothingBCEWithLogits
    assert docments(LabelSmoothingBCEWithLogits)['pos_weight'] in LabelSmoothingBCEWithLogitsFlat.__init__.__doc__


def test_init_doc_format():
    class Toy:
        "A toy"
        def __init__(self,
                     a:int=1, # the first
                     b=None, # the second
                     c='x'):
            pass
    assert label_smoothing_fa._init_doc(Toy) == ("A toy\n\nArgs:\n    a (int, default 1): the first\n"
                                                 "    b (default None): the second\n    c (default 'x')")
    class Bare:
        def __init__(self, a=1): pass
    assert label_smoothing_fa._init_doc(Bare) is None  # nothing to say: the docstring stays empty
