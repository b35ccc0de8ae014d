"""Label smoothing for fastai: an exact, fused drop-in loss and callbacks that log and change the smoothing.

Every public name of the modules listed in `label_smoothing_fa/all.py` is importable from the package itself,
`from label_smoothing_fa import LabelSmoothingCrossEntropy, EntropyLogger`, or all at once in fastai's style,
`from label_smoothing_fa.all import *`. `import label_smoothing_fa` imports none of them: a name's module (and the
modules below it) is imported when the name is first asked for, so the losses never wait for the callbacks'
imports (fastai's `Learner`, scikit-learn)."""
from __future__ import annotations
__version__ = "0.1.0"
# Hand-written: `nbdev_export` keeps this file and updates only the version line above from settings.ini.

import ast as _ast, importlib as _importlib, inspect as _inspect, sys as _sys
from functools import lru_cache as _lru_cache
from importlib.machinery import PathFinder as _PathFinder, SourceFileLoader as _SourceFileLoader
from pathlib import Path as _Path


@_lru_cache(None)
def _api_modules() -> tuple:
    "The modules of the package's API, lowest first, read from the `from .module import *` lines of `all.py`"
    tree = _ast.parse((_Path(__file__).parent/'all.py').read_text(encoding='utf-8'))
    return tuple(n.module for n in tree.body if isinstance(n, _ast.ImportFrom) and n.level == 1
                 and n.module and [a.name for a in n.names] == ['*'])


def __getattr__(name: str):
    "A public name of the API's modules, importing only the modules up to the one that defines it"
    if name.startswith('_') and name != '__all__':
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    names = []
    for mod_name in _api_modules():
        mod = _importlib.import_module(f'{__name__}.{mod_name}')
        if name in mod.__all__:
            globals()[name] = value = getattr(mod, name)  # found once: the next look-up is a plain attribute
            return value
        names += mod.__all__
    if name == '__all__': return list(dict.fromkeys(names))  # `from label_smoothing_fa import *`
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__getattr__('__all__')))


# ---------------------------------------------------------------- `help()` shows the docments of `__init__`

def _annotation(p: _inspect.Parameter) -> str:
    a = p.annotation
    return '' if a is p.empty else a if isinstance(a, str) else _inspect.formatannotation(a)


def _init_doc(cls: type) -> str | None:
    """`cls.__init__`'s docstring built from its docments (the comments after its parameters, and those of the class
    it delegates its `**kwargs` to): one line per parameter with its annotation and default; `None` without any"""
    from fastcore.docments import docments
    init = cls.__dict__['__init__']
    docs = {k: v for k, v in docments(init).items() if v}
    # `@delegates(to)` on the method or on the class: the parameters taken from `to`
    delegate = getattr(init, '__delwrap__', None) or cls.__dict__.get('__delwrap__')
    if delegate is not None: docs = {**{k: v for k, v in docments(delegate).items() if v}, **docs}
    params = [p for p in _inspect.signature(cls).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not any(p.name in docs for p in params): return None
    lines = []
    for p in params:
        about = ', '.join(filter(None, [_annotation(p), '' if p.default is p.empty else f'default {p.default!r}']))
        lines.append(f"    {p.name}{f' ({about})' if about else ''}: {docs.get(p.name) or ''}".rstrip(': '))
    summary = (_inspect.getdoc(cls) or '').split('\n')[0]
    return f"{summary or cls.__name__}\n\nArgs:\n" + '\n'.join(lines)


def _document_inits(module) -> None:
    "Give each public class of `module` whose own `__init__` has no docstring one built from its docments"
    for name in getattr(module, '__all__', ()):
        cls = getattr(module, name, None)
        init = cls.__dict__.get('__init__') if isinstance(cls, type) and cls.__module__ == module.__name__ else None
        if _inspect.isfunction(init) and not init.__doc__: init.__doc__ = _init_doc(cls)


class _DocumentingLoader(_SourceFileLoader):
    "Python's loader of a source file, which then documents the module's classes' `__init__` (`_document_inits`)"
    def exec_module(self, module):
        super().exec_module(module)
        _document_inits(module)


class _DocumentingFinder:
    """Finds this package's modules as Python would and loads them with `_DocumentingLoader`: the classes get their
    `__init__` docstring however the module is imported (`from label_smoothing_fa.losses import ...` too)"""
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + '.'): return None
        spec = _PathFinder.find_spec(fullname, path, target)
        if spec is not None and type(spec.loader) is _SourceFileLoader:
            spec.loader = _DocumentingLoader(spec.loader.name, spec.loader.path)
        return spec


_sys.meta_path[:] = [f for f in _sys.meta_path if getattr(f, '__qualname__', None) != _DocumentingFinder.__qualname__
                     or getattr(f, '__module__', None) != __name__]  # once, also after `importlib.reload`
_sys.meta_path.insert(0, _DocumentingFinder)
