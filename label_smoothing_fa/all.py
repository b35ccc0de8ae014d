"""Every public name of the package, as fastai's `all` modules give them: `from label_smoothing_fa.all import *`.

One line per module, lowest first; the package's own namespace (`from label_smoothing_fa import EntropyLogger`)
reads its modules from these lines (hand-written: `nbdev_export` leaves this file alone)."""
from .losses import *
from .multilabel import *
from .smoothing import *
from .calibration import *
from .callbacks import *
from .adaptive import *
