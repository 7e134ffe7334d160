"""Loading the compiled extension ``flashdml._C`` (optional: the package imports without it)."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch / libc10, which _C links against, before _C is imported)

C_LOADED = False
C_ERROR = ""
C_HAS_CUDA = False

try:
    from . import _C  # noqa: F401  (registers the flashdml:: ops)

    C_LOADED = True
except Exception as exc:  # ImportError, or an undefined-symbol OSError after a torch upgrade
    C_ERROR = f"flashdml._C could not be imported ({type(exc).__name__}: {exc}); build it with `make build` or `pip install -e . --no-build-isolation`"

if C_LOADED:
    try:
        C_HAS_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("flashdml::batch_softmax_fwd", "CUDA")
    except Exception:  # pragma: no cover
        C_HAS_CUDA = False
