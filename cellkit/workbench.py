"""What the notebooks call, so they stay thin: config from parameters, tables, results, browsers.

A finished run is opened with :func:`cellkit.runs.open_run`.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping

import yaml

from .config import Config, load_config
from .data import CellDataset
from .errors import ConfigError
from .evaluation.analysis import ErrorAnalysis
from .outputs import write_json
from .viz.browser import BrowserItem, MaskBrowser
from .viz.overlay import instances_from_coco


def notebook_config(config: str | Path | None, overrides: Mapping[str, Any] | str | None = None,
                    data: str | Path | None = None) -> Config:
    """The config of a notebook's parameters: a recipe name or YAML path, dotted overrides, a dataset folder.

    ``overrides`` may also be a YAML/JSON string (``papermill -p overrides '{"train.lr": 0.001}'``).
    """
    merged = parse_overrides(overrides)
    if data:
        merged["data.root"] = str(data)
    return load_config(config, merged)


def parse_overrides(overrides: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A notebook's ``overrides`` parameter as a dict: a mapping, a YAML/JSON string
    (``papermill -p overrides '{"train.lr": 0.001}'``) or None."""
    if isinstance(overrides, str):
        parsed = yaml.safe_load(overrides) if overrides.strip() else {}
        if not isinstance(parsed, dict):
            raise ConfigError(f"overrides: expected a mapping of config keys, got {overrides!r}")
        return parsed
    return dict(overrides or {})


def config_table(cfg: Config, only_changed: bool = True) -> str:
    """HTML table of the config's keys (by default only those that differ from the defaults)."""
    default = Config().flat()
    rows = [(k, v, default.get(k)) for k, v in cfg.flat().items() if not only_changed or v != default.get(k)]
    body = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(repr(v))}</td>"
                   f"<td style='color:grey'>{html.escape(repr(d))}</td></tr>" for k, v, d in rows)
    return f"<table><tr><th>key</th><th>value</th><th>default</th></tr>{body}</table>"


def table(rows: list[Mapping[str, Any]], columns: list[str] | None = None, floats: str = "{:.4f}") -> str:
    """A small HTML table of dict rows (no pandas needed)."""
    if not rows:
        return "<p>(no rows)</p>"
    columns = columns or list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return floats.format(v)
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def save_results(obj: Any, path: str | Path | None) -> None:
    """Write a notebook's key numbers as JSON (what tests and the ablation read back); None: skip."""
    if path:
        write_json(obj, path, indent=1, default=float)  # atomic: the ablation may read it any time


def error_browser(dataset: CellDataset, analysis: ErrorAnalysis, image_ids: list[int], score_thresh: float = 0.5,
                  notes: Mapping[int, str] | None = None) -> MaskBrowser:
    """A :class:`~cellkit.viz.browser.MaskBrowser` over ``image_ids`` of ``dataset`` whose predictions
    are drawn by status: true positives green, false positives red, missed cells (FN) blue.

    Args:
        analysis: the :class:`~cellkit.evaluation.ErrorAnalysis` of the predictions (its matching
            at ``score_thresh`` is computed once and shared by every image).
    """
    index = {s.image_id: i for i, s in enumerate(dataset.samples)}
    items = []
    for image_id in image_ids:
        i = index[image_id]
        items.append(BrowserItem(
            dataset.samples[i].name,
            lambda i=i: dataset.load(i)[0],
            lambda i=i: list(dataset.load(i)[1].regions()),
            lambda image_id=image_id: instances_from_coco(analysis.status_entries(image_id, score_thresh)),
            (notes or {}).get(image_id, ""),
        ))
    browser = MaskBrowser(items, num_classes=analysis.num_classes)
    browser.state.update(color_by="status", min_score=0.0, layout="side by side")
    return browser
