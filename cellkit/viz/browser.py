"""The mask browser: look at images with their ground truth and predictions.

In JupyterLab, :meth:`MaskBrowser.widget` gives an ipywidgets view with an image picker, class
toggles, outline/fill, zoom and pan, and for predictions a score slider and ground truth and
prediction side by side or overlaid. In batch runs (papermill), :meth:`MaskBrowser.figure` draws
the same view as a static matplotlib figure. :func:`comparison_browser` shows two runs compared
cell by cell (:mod:`cellkit.evaluation.compare`): every ground-truth cell coloured by whether run A,
run B, both or neither found it, with a toggle per category.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from ..evaluation.inputs import gt_rle
from ..structures.label_maps import MaskRegion
from .overlay import COMPARE_COLORS, STATUS_COLORS, class_color, instances_from_coco, render


@dataclass
class BrowserItem:
    """One image of the browser; pixels and instances are loaded when first shown.

    Attributes:
        name: shown in the picker.
        load_image: returns ``(H, W, 3)`` uint8/uint16.
        load_gt: returns the ground-truth instances (None: no ground truth).
        load_pred: returns the predicted instances (None: no predictions).
        note: extra text shown under the image (e.g. per-image scores).
    """

    name: str
    load_image: Callable[[], np.ndarray]
    load_gt: Callable[[], list[MaskRegion]] | None = None
    load_pred: Callable[[], list[MaskRegion]] | None = None
    note: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def _get(self, key: str, load: Callable[[], Any] | None) -> Any:
        if load is None:
            return None
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def image(self) -> np.ndarray:
        return self._get("image", self.load_image)

    def gt(self) -> list[MaskRegion] | None:
        return self._get("gt", self.load_gt)

    def pred(self) -> list[MaskRegion] | None:
        return self._get("pred", self.load_pred)


def items_from_dataset(dataset: Any, predictions: Iterable[dict[str, Any]] | None = None,
                       notes: dict[int, str] | None = None) -> list[BrowserItem]:
    """Browser items of a :class:`~cellkit.data.CellDataset`, with COCO result entries as predictions.

    Args:
        predictions: COCO results (any images; matched by ``image_id``), or None for ground truth only.
        notes: image_id -> text shown under the image.
    """
    by_image: dict[int, list[dict[str, Any]]] | None = None
    if predictions is not None:
        by_image = {}
        for p in predictions:
            by_image.setdefault(int(p["image_id"]), []).append(p)
    items = []
    for i, sample in enumerate(dataset.samples):
        def load_image(i: int = i) -> np.ndarray:
            return dataset.load(i)[0]

        def load_gt(i: int = i) -> list[MaskRegion]:
            return list(dataset.load(i)[1].regions())

        load_pred = None
        if by_image is not None:
            def load_pred(image_id: int = sample.image_id) -> list[MaskRegion]:
                return instances_from_coco(by_image.get(image_id, []))

        items.append(BrowserItem(sample.name, load_image, load_gt, load_pred, (notes or {}).get(sample.image_id, "")))
    return items


class MaskBrowser:
    """Browse :class:`BrowserItem` s: ground truth, predictions, or both.

    Args:
        items: the images.
        num_classes: classes with a toggle.
        max_side: the view's longer side in pixels (zoomed crops are enlarged to fill it).
        palette: status -> colour of the instances' ``status`` (default: TP/FP/FN,
            :data:`~cellkit.viz.overlay.STATUS_COLORS`); given, the browser colours by status and
            has a toggle per status.
        status_names: status -> legend label.
    """

    def __init__(self, items: Sequence[BrowserItem], num_classes: int, max_side: int = 720,
                 palette: dict[str, tuple[int, int, int]] | None = None,
                 status_names: dict[str, str] | None = None) -> None:
        if not items:
            raise ValueError("MaskBrowser needs at least one image")
        self.items = list(items)
        self.num_classes = num_classes
        self.max_side = max_side
        self.palette = dict(palette) if palette is not None else None
        self.status_names = dict(status_names or {})
        self.state: dict[str, Any] = {
            "index": 0, "classes": set(range(1, num_classes + 1)), "mode": "outline", "layout": "side by side",
            "min_score": 0.5, "zoom": 1.0, "cx": 0.5, "cy": 0.5, "color_by": "class",
            "statuses": set(self.palette) if self.palette else None,
        }
        if self.palette:
            self.state.update(color_by="status", mode="fill")
        self._widget: Any = None

    @property
    def has_pred(self) -> bool:
        return any(it.load_pred is not None for it in self.items)

    @property
    def has_gt(self) -> bool:
        return any(it.load_gt is not None for it in self.items)

    def names(self) -> list[str]:
        return [it.name for it in self.items]

    # -- drawing --------------------------------------------------------------------------------
    def _crop(self, arr: np.ndarray) -> np.ndarray:
        z = max(1.0, float(self.state["zoom"]))
        if z == 1.0:
            return arr
        h, w = arr.shape[:2]
        ch, cw = max(1, int(h / z)), max(1, int(w / z))
        y0 = int(np.clip(self.state["cy"] * h - ch / 2, 0, h - ch))
        x0 = int(np.clip(self.state["cx"] * w - cw / 2, 0, w - cw))
        return arr[y0 : y0 + ch, x0 : x0 + cw]

    def panels(self, index: int | None = None) -> list[tuple[str, np.ndarray]]:
        """The drawn panels of the current view: ``[(title, (h, w, 3) uint8), ...]``."""
        s = self.state
        item = self.items[s["index"] if index is None else index]
        image = item.image()
        gt, pred = item.gt(), item.pred()
        if s.get("statuses") is not None:
            gt = None if gt is None else [i for i in gt if i.status in s["statuses"]]
            pred = None if pred is None else [i for i in pred if i.status in s["statuses"]]
        kw = dict(mode=s["mode"], classes=s["classes"], color_by=s["color_by"], palette=self.palette)
        if pred is not None and gt is not None and s["layout"] == "overlay":
            both = render(render(image, gt, **{**kw, "mode": "outline"}), pred, min_score=s["min_score"],
                          **{**kw, "mode": "fill"})
            out = [("ground truth (outline) + prediction (fill)", both)]
        else:
            out = []
            if gt is not None:
                shown = [i for i in gt if i.label in s["classes"]]
                counts = ""
                if self.palette:
                    counts = " (" + ", ".join(f"{self.status_names.get(k, k)} {sum(i.status == k for i in shown)}"
                                              for k in self.palette if s["statuses"] is None or k in s["statuses"]) + ")"
                out.append((f"ground truth: {len(shown)} cells{counts}", render(image, gt, **kw)))
            if pred is not None:
                n = sum(i.label in s["classes"] and i.score >= s["min_score"] for i in pred)
                out.append((f"prediction: {n} cells with score >= {s['min_score']:.2f}",
                            render(image, pred, min_score=s["min_score"], **kw)))
            if not out:
                out.append(("image", render(image, [], **kw)))
        return [(title, self._crop(arr)) for title, arr in out]

    def view(self) -> np.ndarray:
        """The current view as one ``(H, W, 3)`` uint8 array (panels side by side, enlarged to ``max_side``)."""
        panels = [arr for _, arr in self.panels()]
        h = max(p.shape[0] for p in panels)
        gap = np.full((h, 4, 3), 255, np.uint8)
        row = []
        for k, p in enumerate(panels):
            pad = np.full((h, p.shape[1], 3), 255, np.uint8)
            pad[: p.shape[0]] = p
            row += [gap, pad] if k else [pad]
        out = np.concatenate(row, axis=1)
        f = max(1, int(self.max_side // max(out.shape[:2])))
        return np.repeat(np.repeat(out, f, axis=0), f, axis=1) if f > 1 else out

    def figure(self, index: int | None = None, size: float = 5.0) -> Figure:
        """The view of image ``index`` (default: the current one) as a static matplotlib figure."""
        panels = self.panels(index)
        fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
        item = self.items[self.state["index"] if index is None else index]
        for ax, (title, arr) in zip(axes[0], panels):
            ax.imshow(arr)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        colors: dict[Any, tuple[int, int, int]] = {k: class_color(k) for k in range(1, self.num_classes + 1)}
        if self.state["color_by"] == "status":
            colors = self.palette or STATUS_COLORS
        handles = [plt.Line2D([], [], color=np.array(c) / 255, lw=3,
                              label=(f"class {k}" if isinstance(k, int) else self.status_names.get(k, k.upper())))
                   for k, c in colors.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
        fig.suptitle(f"{item.name}\n{item.note}" if item.note else item.name, fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 0.95))
        return fig

    # -- the widget -----------------------------------------------------------------------------
    def widget(self) -> Any:
        """The interactive view (ipywidgets): picker, class toggles, outline/fill, zoom, pan, score."""
        if self._widget is not None:
            return self._widget
        s = self.state
        picker = W.Dropdown(options=[(n, i) for i, n in enumerate(self.names())], value=s["index"], description="image")
        toggles = [W.ToggleButton(value=True, description=f"class {k}", layout=W.Layout(width="80px"),
                                  style={"text_color": "#%02x%02x%02x" % class_color(k),
                                         "font_weight": "bold"})
                   for k in range(1, self.num_classes + 1)]
        mode = W.ToggleButtons(options=["outline", "fill", "both"], value=s["mode"], description="draw")
        zoom = W.FloatSlider(value=1.0, min=1.0, max=8.0, step=0.5, description="zoom")
        cx = W.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.02, description="pan x")
        cy = W.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.02, description="pan y")
        score = W.FloatSlider(value=s["min_score"], min=0.0, max=1.0, step=0.05, description="min score")
        layout = W.ToggleButtons(options=["side by side", "overlay"], value=s["layout"], description="layout")
        color_by = W.ToggleButtons(options=["class", "status"], value=s["color_by"], description="colour by")
        image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        note = W.HTML()
        status_toggles = [W.ToggleButton(value=True, description=self.status_names.get(k, k),
                                         layout=W.Layout(width="auto"),
                                         style={"text_color": "#%02x%02x%02x" % c, "font_weight": "bold"})
                          for k, c in (self.palette or {}).items()]
        if self.palette:
            color_by.options = ["status", "class"]
            color_by.value = "status"

        def redraw(*_: Any) -> None:
            s.update(index=picker.value, mode=mode.value, zoom=zoom.value, cx=cx.value, cy=cy.value,
                     min_score=score.value, layout=layout.value, color_by=color_by.value,
                     classes={k + 1 for k, t in enumerate(toggles) if t.value})
            if self.palette:
                s["statuses"] = {k for k, t in zip(self.palette, status_toggles) if t.value}
            image.value = _png(self.view())
            note.value = f"<b>{self.items[s['index']].name}</b> {self.items[s['index']].note}"

        for w in [picker, mode, zoom, cx, cy, score, layout, color_by, *toggles, *status_toggles]:
            w.observe(redraw, names="value")
        rows = [picker, W.HBox(toggles), mode, W.HBox([zoom, cx, cy])]
        if self.palette:
            rows += [W.HBox(status_toggles), color_by]
        if self.has_pred:
            rows.append(score)
            if self.has_gt:
                rows.append(layout)
            rows.append(color_by)
        redraw()
        self._widget = W.VBox([*rows, note, image])
        self._widget.add_class("cellkit-mask-browser")
        self._picker = picker
        return self._widget

    def show(self, name_or_index: str | int) -> None:
        """Open an image (by name or index) in the widget."""
        index = name_or_index if isinstance(name_or_index, int) else self.names().index(name_or_index)
        self.state["index"] = index
        if self._widget is not None:
            self._picker.value = index


def comparison_browser(dataset: Any, comparison: Any, image_ids: Sequence[int] | None = None,
                       max_images: int | None = None) -> MaskBrowser:
    """A :class:`MaskBrowser` of two runs compared cell by cell: the ground-truth cells of each image
    filled by category (found by A only orange, by B only blue, by both green, by neither red;
    :data:`~cellkit.viz.overlay.COMPARE_COLORS`), with a toggle per category.

    Args:
        dataset: the validation images (a :class:`~cellkit.data.CellDataset`: ``samples`` with
            ``image_id`` and ``name``, ``load(i)`` -> image, label maps).
        comparison: a :class:`~cellkit.evaluation.compare.RunComparison` of that split.
        image_ids: the images to browse (default: every image, most differing cells first).
        max_images: keep only this many of them.
    """
    index = {int(smp.image_id): i for i, smp in enumerate(dataset.samples)}
    diffs = {d.image_id: d for d in comparison.by_image()}
    order = [d.image_id for d in comparison.by_image()] if image_ids is None else [int(i) for i in image_ids]
    order = [i for i in order if i in index][:max_images]
    if not order:
        raise ValueError("comparison_browser: none of the compared images is in the dataset (another split?)")
    a, b = comparison.names
    images = comparison.ground.images
    items = []
    for image_id in order:
        i, d = index[image_id], diffs.get(image_id)

        def load_gt(image_id: int = image_id) -> list[MaskRegion]:
            cells = comparison.cells(image_id)
            return instances_from_coco({**c, "segmentation": gt_rle(c, images)} for c in cells)

        note = (f"{a} only {d.a_only}, {b} only {d.b_only}, both {d.both}, neither {d.neither}" if d else "")
        items.append(BrowserItem(dataset.samples[i].name, lambda i=i: dataset.load(i)[0], load_gt, None, note))
    names = {"both": "both", "a_only": f"{a} only", "b_only": f"{b} only", "neither": "neither"}
    return MaskBrowser(items, num_classes=comparison.ground.num_classes, palette=COMPARE_COLORS,
                       status_names=names)


def gallery(browser: MaskBrowser, indices: Sequence[int], thumb: int = 220) -> Any:
    """Thumbnails of ``browser``'s images ``indices``; clicking one's button opens it in the browser."""
    tiles = []
    for i in indices:
        item = browser.items[i]
        saved = dict(browser.state)
        browser.state.update(index=i, zoom=1.0)
        panels = browser.panels(i)
        browser.state.update(saved)
        arr = panels[-1][1]
        f = max(1, thumb // max(arr.shape[:2]))
        arr = np.repeat(np.repeat(arr, f, 0), f, 1) if f > 1 else arr
        button = W.Button(description=f"open {item.name[:10]}", tooltip=item.note, layout=W.Layout(width=f"{thumb}px"))
        button.on_click(lambda _b, i=i: browser.show(i))
        tiles.append(W.VBox([W.Image(value=_png(arr), format="png", layout=W.Layout(width=f"{thumb}px")),
                             W.HTML(f"<small>{item.note}</small>"), button]))
    return W.GridBox(tiles, layout=W.Layout(grid_template_columns=f"repeat(auto-fill, {thumb + 10}px)"))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
