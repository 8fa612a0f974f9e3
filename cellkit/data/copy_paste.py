"""Copy-paste augmentation: cells cut from other training images pasted onto the current crop.

The idea of Ghiasi et al. (Simple Copy-Paste, CVPR 2021; torchvision references'
``SimpleCopyPaste``, MMDetection's ``CopyPaste``), done for crowded cell images and rare classes:

- **Bank.** Every training image's cells form a per-dataset :class:`InstanceBank` (image index,
  instance id, class, box), built lazily from the decoded label maps the dataset caches
  (:meth:`cellkit.data.CellDataset.instance_bank`). Cells that touch their image's border are left
  out: a cut-off cell pasted whole would show a straight edge no real cell has.
- **Class-aware draw.** A cell is drawn with probability proportional to its class weight
  (``data.augment.copy_paste_class_weights``; default 1 / cells of the class, so each class is
  pasted equally often and the rare classes 3 and 4 about 12 times more per cell than their
  share), from images other than the current one, then turned by a random multiple of 90 degrees
  and maybe flipped.
- **Paste.** The cell's pixels are blended onto the crop through a soft alpha (its mask blurred
  with ``copy_paste_blur`` px sigma); its target mask is the exact binary mask at the new place.
  The covered pixels of the cells below leave their masks (every label-map layer), the pasted
  cell gets a new id after every existing one (no collisions). A position where the cell would
  hide an earlier pasted cell beyond ``copy_paste_max_covered`` of that cell's area is refused
  (a few random tries, else the cell is skipped), so no pasted cell ends up mostly hidden.
- **Occlusion.** A cell covered beyond ``copy_paste_max_covered`` of its *own* area in the crop
  is dropped from the target; less covered cells keep their visible part. Boxes are recomputed
  from the masks afterwards (:meth:`cellkit.structures.LabelMaps.to_target`), never carried.

Randomness comes from torch's global generator, like the v2 transforms, so seeds and DataLoader
workers behave the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import scipy.ndimage as ndi
import torch
from torchvision import tv_tensors

from ..config import AugmentConfig
from ..errors import ConfigError
from ..structures.label_maps import LabelMaps

Loader = Callable[[int], "tuple[np.ndarray, LabelMaps]"]


class CellSource(Protocol):
    """What copy-paste draws cells from: decoded samples and their bank (a :class:`~cellkit.data.CellDataset`)."""

    def load(self, index: int) -> tuple[np.ndarray, LabelMaps]: ...

    def instance_bank(self) -> "InstanceBank": ...


@dataclass
class InstanceBank:
    """The cells of a dataset that can be pasted: where each one is, not its pixels.

    Attributes (all ``(n,)`` int64 arrays over the cells):
        image: index of the cell's image in the dataset.
        instance_id: its id in that image's label maps.
        label: its class (1-based).
        top, left, height, width: its bounding box in the image (px).
    """

    image: np.ndarray
    instance_id: np.ndarray
    label: np.ndarray
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def build(cls, load: Loader, n_images: int) -> "InstanceBank":
        """Walk the label maps of images ``0 .. n_images - 1`` (``load(i) -> (image, LabelMaps)``)."""
        rows: list[tuple[int, int, int, int, int, int, int]] = []
        for i in range(n_images):
            _, maps = load(i)
            h, w = maps.shape
            for r in maps.regions():
                rh, rw = r.mask.shape
                if r.top == 0 or r.left == 0 or r.top + rh == h or r.left + rw == w:
                    continue  # cut off by the image border
                rows.append((i, r.instance_id, r.label, r.top, r.left, rh, rw))
        a = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
        return cls(*(a[:, k].copy() for k in range(7)))

    def class_counts(self, num_classes: int) -> np.ndarray:
        """``(num_classes,)`` int64 cells of each class in the bank."""
        return np.bincount(self.label, minlength=num_classes + 1)[1 : num_classes + 1]

    def cell(self, j: int, load: Loader, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``j`` cut from its image with ``pad`` px of context (clipped at the image border).

        Returns:
            pixels ``(h, w, 3)`` of the image's dtype and mask ``(h, w)`` bool of the cell.
        """
        image, maps = load(int(self.image[j]))
        H, W = maps.shape
        y0, x0 = max(0, int(self.top[j]) - pad), max(0, int(self.left[j]) - pad)
        y1 = min(H, int(self.top[j] + self.height[j]) + pad)
        x1 = min(W, int(self.left[j] + self.width[j]) + pad)
        mask = (maps.layers[:, y0:y1, x0:x1] == self.instance_id[j]).any(axis=0)
        return image[y0:y1, x0:x1], mask


@dataclass
class Pasted:
    """One cell pasted by the last call of :meth:`CopyPaste.paste` (for tests, figures, debugging).

    Attributes:
        instance_id: its id in the crop's label maps.
        label: its class.
        top, left: where ``mask[0, 0]`` landed in the crop.
        mask: ``(h, w)`` bool, the cell as pasted (turned, with its context padding).
        pixels: ``(h, w, 3)`` the source pixels as pasted.
        source: index of the cell in the bank (-1 when pasted by hand).
    """

    instance_id: int
    label: int
    top: int
    left: int
    mask: np.ndarray
    pixels: np.ndarray
    source: int = -1


def _to_unit(a: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1] (uint8 / 255, uint16 / 65535, floats as they are)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return a.astype(np.float32)


class CopyPaste:
    """Paste cells from a dataset's :class:`InstanceBank` onto one of its augmented crops.

    Args:
        prob: probability that a crop gets cells at all.
        max_cells: cells per crop, drawn uniformly from 1 to this.
        class_weights: one weight per class (None: 1 / cells of the class in the bank).
        max_covered: cells covered beyond this fraction of their own area are dropped.
        blur: sigma (px) of the soft edge; 0: hard edge.
        num_classes: number of classes (the length ``class_weights`` must have).
        tries: random positions tried per cell before it is skipped.

    Raises:
        ConfigError: ``class_weights`` of the wrong length.
    """

    def __init__(self, prob: float = 0.5, max_cells: int = 8, class_weights: Sequence[float] | None = None,
                 max_covered: float = 0.5, blur: float = 1.0, *, num_classes: int, tries: int = 10) -> None:
        if class_weights is not None and len(class_weights) != num_classes:
            raise ConfigError(f"data.augment.copy_paste_class_weights: needs one weight per class ({num_classes}), "
                              f"got {len(class_weights)}: {list(class_weights)}")
        self.prob = prob
        self.max_cells = max_cells
        self.class_weights = None if class_weights is None else np.asarray(class_weights, dtype=np.float64)
        self.max_covered = max_covered
        self.blur = blur
        self.num_classes = num_classes
        self.tries = tries
        self.pad = math.ceil(2 * blur) if blur > 0 else 0
        self.last: list[Pasted] = []
        """The cells the last call pasted (in order; later ones lie on top)."""

    def cell_weights(self, bank: InstanceBank) -> np.ndarray:
        """``(len(bank),)`` float64 draw weight of every cell (its class weight, not normalised)."""
        if self.class_weights is not None:
            per_class = np.concatenate([[0.0], self.class_weights])
        else:
            counts = bank.class_counts(self.num_classes).astype(np.float64)
            per_class = np.concatenate([[0.0], np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)])
        return per_class[np.clip(bank.label, 0, self.num_classes)]

    def __call__(self, image: torch.Tensor, layers: torch.Tensor, labels: np.ndarray, dataset: CellSource,
                 index: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """With probability ``prob``, paste cells of other images of ``dataset`` onto image ``index``'s crop.

        Args:
            image: ``(3, H, W)`` uint8 or float32 tensor (a ``tv_tensors.Image``), the augmented crop.
            layers: ``(L, H, W)`` integer tensor of instance ids (a ``tv_tensors.Mask``).
            labels: ``(N + 1,)`` int64 class of each id (``labels[0] = 0``).

        Returns:
            the new image (same dtype), layers ``(L, H, W)`` int32 and labels ``(N + 1 + k,)``
            with the ``k`` pasted cells as ids ``N + 1 ..``; unchanged when nothing is pasted.
        """
        self.last = []
        if self.prob <= 0 or float(torch.rand(())) >= self.prob:
            return image, layers, labels
        bank = dataset.instance_bank()
        weights = self.cell_weights(bank)
        weights[bank.image == index] = 0.0  # cells come from other images
        if len(bank) == 0 or weights.sum() <= 0:
            return image, layers, labels
        n = int(torch.randint(1, self.max_cells + 1, ()))
        picks = torch.multinomial(torch.from_numpy(weights), n, replacement=True).tolist()
        img = image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy().copy()  # (H, W, 3)
        lay = layers.as_subclass(torch.Tensor).numpy().astype(np.int32, copy=True)
        out_img, lay, labels = self.paste(img, lay, np.asarray(labels, dtype=np.int64),
                                          [bank.cell(j, dataset.load, self.pad) + (int(bank.label[j]),) for j in picks],
                                          sources=picks)
        new_image = tv_tensors.Image(torch.from_numpy(out_img).permute(2, 0, 1).contiguous())
        return new_image, tv_tensors.Mask(torch.from_numpy(lay)), labels

    def paste(self, image: np.ndarray, layers: np.ndarray, labels: np.ndarray,
              cells: Sequence[tuple[np.ndarray, np.ndarray, int]], sources: Sequence[int] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Paste ``cells`` (pixels ``(h, w, 3)``, mask ``(h, w)`` bool, class) onto one crop, in order.

        Each cell is turned at random and placed at a random position (see the module docstring);
        what was pasted where is left in :attr:`last`.

        Args:
            image: ``(H, W, 3)`` uint8 / uint16 / float32 crop (not modified).
            layers: ``(L, H, W)`` int32 instance ids, modified in place.
            labels: ``(N + 1,)`` int64.
            sources: bank index of each cell (recorded in :attr:`last`).

        Returns:
            image ``(H, W, 3)`` of the input dtype, ``layers`` and labels extended by the pasted cells.
        """
        self.last = []
        H, W = layers.shape[-2:]
        n0 = len(labels)
        area_before = _areas(layers, n0)
        out = _to_unit(image)
        new_labels = list(labels)
        pasted_area: list[int] = []
        for c, (pixels, mask, label) in enumerate(cells):
            pixels, mask = _random_turn(pixels, mask)
            h, w = mask.shape
            if h > H or w > W or not mask.any():
                continue
            spot = self._find_spot(layers[0], mask, n0, pasted_area, H, W)
            if spot is None:
                continue
            y, x = spot
            win = (slice(y, y + h), slice(x, x + w))
            alpha = mask.astype(np.float32)
            if self.blur > 0:
                alpha = ndi.gaussian_filter(alpha, self.blur, mode="constant", truncate=2.0)
            a = alpha[..., None]
            out[win] = a * _to_unit(pixels) + (1.0 - a) * out[win]
            new_id = len(new_labels)
            region = layers[:, win[0], win[1]]
            region[:, mask] = 0
            region[0][mask] = new_id
            new_labels.append(label)
            pasted_area.append(int(mask.sum()))
            self.last.append(Pasted(new_id, label, y, x, mask, pixels, -1 if sources is None else int(sources[c])))
        if len(new_labels) == n0:
            return image, layers, labels
        self._drop_covered(layers, area_before, n0)
        return _from_unit(out, image.dtype), layers, np.asarray(new_labels, dtype=np.int64)

    def _find_spot(self, layer0: np.ndarray, mask: np.ndarray, n0: int, pasted_area: list[int],
                   H: int, W: int) -> tuple[int, int] | None:
        """A random top-left corner where ``mask`` hides no earlier pasted cell beyond ``max_covered``."""
        h, w = mask.shape
        visible = _visible(layer0, n0, len(pasted_area))
        for _ in range(self.tries):
            y = int(torch.randint(0, H - h + 1, ()))
            x = int(torch.randint(0, W - w + 1, ()))
            if not pasted_area:
                return y, x
            under = layer0[y : y + h, x : x + w][mask]
            covered = np.bincount(under[under >= n0] - n0, minlength=len(pasted_area))
            if np.all(visible - covered >= (1.0 - self.max_covered) * np.asarray(pasted_area)):
                return y, x
        return None

    def _drop_covered(self, layers: np.ndarray, area_before: np.ndarray, n0: int) -> None:
        """Remove the cells (ids < n0) covered beyond ``max_covered`` of their area before pasting."""
        after = _areas(layers, n0)
        covered = area_before - after
        drop = np.flatnonzero((area_before > 0) & (covered > self.max_covered * area_before))
        drop = drop[drop > 0]
        if len(drop):
            layers[np.isin(layers, drop)] = 0


def _areas(layers: np.ndarray, n: int) -> np.ndarray:
    """``(n,)`` pixels of ids ``0 .. n - 1`` over every layer."""
    return np.bincount(layers.ravel(), minlength=n)[:n] if layers.size else np.zeros(n, np.int64)


def _visible(layer0: np.ndarray, n0: int, k: int) -> np.ndarray:
    """``(k,)`` visible pixels of the pasted ids ``n0 .. n0 + k - 1`` (pasted cells live in layer 0)."""
    v = layer0[layer0 >= n0] - n0
    return np.bincount(v, minlength=k)[:k]


def _random_turn(pixels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same random multiple of 90 degrees and maybe a flip, on pixels and mask."""
    k = int(torch.randint(0, 4, ()))
    pixels, mask = np.rot90(pixels, k), np.rot90(mask, k)
    if float(torch.rand(())) < 0.5:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(pixels), np.ascontiguousarray(mask)


def _from_unit(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.clip(np.rint(a * 65535.0), 0, 65535).astype(np.uint16)
    return a.astype(dtype)


def build_copy_paste(aug: AugmentConfig, num_classes: int) -> CopyPaste | None:
    """The :class:`CopyPaste` of ``data.augment`` (None when ``copy_paste`` is 0)."""
    if aug.copy_paste <= 0:
        return None
    return CopyPaste(aug.copy_paste, aug.copy_paste_max, aug.copy_paste_class_weights, aug.copy_paste_max_covered,
                     aug.copy_paste_blur, num_classes=num_classes)
