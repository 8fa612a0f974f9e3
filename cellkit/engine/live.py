"""Live training curves in a notebook: one figure, redrawn in place after every epoch."""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from IPython.display import display

from ..viz.curves import plot_history
from .train_loop import Hook


class LiveCurves(Hook):
    """A Trainer hook that redraws the loss and AP50 curves in the notebook after each epoch.

    Works in JupyterLab (the figure updates in place) and under papermill (the last drawing stays
    in the executed notebook). The default hooks (:mod:`cellkit.engine.defaults`) include it when
    training runs inside a Jupyter kernel.
    """

    priority = 90
    main_process_only = True

    def __init__(self, title: str = "") -> None:
        self.title = title
        self._handle: Any = None

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        fig = plot_history(self.trainer.history, self.title or self.trainer.cfg.name)
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)
