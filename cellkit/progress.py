"""Progress bars that render in JupyterLab and a terminal, and stay quiet in CI logs."""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def disabled(enabled: bool = True) -> bool | None:
    """tqdm's ``disable`` for a bar: off when asked, or when ``CELLKIT_PROGRESS=0``; on in a
    notebook; elsewhere on only when stderr is a terminal (so CI logs stay quiet)."""
    if not enabled or os.environ.get("CELLKIT_PROGRESS", "1") == "0":
        return True
    if in_notebook():
        return False
    return None


def bar(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, enabled: bool = True,
        leave: bool = False, **kwargs: Any) -> "tqdm[T]":
    """A ``tqdm.auto`` bar with cellkit's display rules (see :func:`disabled`)."""
    return tqdm(iterable, desc=desc, total=total, disable=disabled(enabled), leave=leave, dynamic_ncols=True, **kwargs)
