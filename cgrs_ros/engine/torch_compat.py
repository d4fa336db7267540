"""Make torchvision importable next to the CPU build of torch.

The torchvision 0.28.0 wheel on PyPI is a CUDA build; next to the CPU torch 2.13.0 wheel its
compiled ops do not load, and importing it fails in ``_meta_registrations`` with
"operator torchvision::nms does not exist". open_clip, transformers and sentence-transformers
all import torchvision, so every engine module that loads them calls
:func:`ensure_torchvision` first. We only register the two operator schemas that the import
needs (hand-written: no library does this), and only when that exact error is seen; the ops
themselves stay unavailable, which none of our code paths use.
"""

import sys
import threading

_lock = threading.Lock()
_library = None  # keeps the registered schemas alive for the life of the process


def ensure_torchvision():
    """Import torchvision, registering missing op schemas only on the known CPU/CUDA mismatch."""
    global _library
    with _lock:
        try:
            import torchvision  # noqa: F401
            return
        except ModuleNotFoundError:
            return  # no torchvision at all: the libraries that want it will say so themselves
        except RuntimeError as exc:
            if 'torchvision::nms does not exist' not in str(exc):
                raise
        # Drop the half-imported modules so the retry starts clean.
        for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
            del sys.modules[name]
        import torch
        _library = torch.library.Library('torchvision', 'DEF')
        _library.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
        _library.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
        import torchvision  # noqa: F401,F811
