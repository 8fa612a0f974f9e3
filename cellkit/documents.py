"""Reading the JSON and YAML documents users hand in, with limits where the data enters.

Test indexes, submissions, prediction and ground-truth files, configs, ``--set`` values and grid
files are read through :func:`read_json` / :func:`loads_json` and :func:`read_yaml` /
:func:`loads_yaml`. A broken or hostile document is one :class:`~cellkit.errors.DataError` line
naming its file, never a traceback, minutes of work or a 58 MB message:

- **size**: a file larger than ``max_bytes`` is refused before it is parsed (YAML 1 MiB: configs
  and grids are a few KB; JSON 2 GiB);
- **integers** of more than :data:`MAX_INT_DIGITS` digits (ids, sizes and counts have at most 20;
  Python itself stops at 4300 digits with a ValueError);
- **depth**: JSON nested deeper than Python's parser recurses (a ``RecursionError`` otherwise),
  YAML nested deeper than :data:`MAX_YAML_DEPTH` levels;
- **YAML aliases**: a document whose aliases expand to more than :data:`MAX_YAML_NODES` nodes
  (a "billion laughs": a few lines that stand for a billion strings) or refer to themselves;
- **duplicate YAML keys** are an error (PyYAML keeps the last one silently);
- values quoted in messages are cut (:func:`short`), so an error stays one terminal line.

:class:`LimitError` marks a document refused by a limit and :class:`NotParsable` one that is not
JSON or YAML at all (both are :class:`~cellkit.errors.DataError`). No torch here.
"""
from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from .errors import DataError

PathLike = str | os.PathLike[str]

MAX_INT_DIGITS = 100
"""Digits an integer of a document may have (image ids, sizes and RLE counts need at most 20)."""
MAX_YAML_BYTES = 1 << 20
"""Size of a YAML file (configs and grid files are a few KB)."""
MAX_JSON_BYTES = 2 << 30
"""Size of a JSON file (a submission of the hw3 test set is tens of MB)."""
MAX_YAML_NODES = 100_000
"""Nodes a YAML document may hold once its aliases are expanded (a config has a few hundred)."""
MAX_YAML_DEPTH = 100
"""Nesting levels of a YAML document (a config has 3)."""
MAX_QUOTE = 60
"""Characters of a value that a message quotes (:func:`short`)."""


class LimitError(DataError):
    """A document refused by one of the limits (size, depth, integer digits, alias expansion),
    not because it is malformed."""


class NotParsable(DataError):
    """A document that is not JSON (or YAML) at all: a syntax error, or not UTF-8 text."""


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_QUOTE
_repr.maxlevel = 3


def short(value: Any, n: int = MAX_QUOTE) -> str:
    """``repr(value)`` of at most ``n`` characters (``...`` where cut), safe for values of any
    size or depth (reprlib: nested containers are cut at a few levels and items)."""
    return cut(_repr.repr(value), n)


def cut(text: str, n: int) -> str:
    """``text`` on one line and at most ``n`` characters (``...`` where cut)."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# JSON


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLong(len(text.lstrip("-")))
    return int(text)


class _TooLong(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def loads_json(data: str | bytes, source: PathLike = "<json>") -> Any:
    """Parse a JSON document.

    Args:
        source: the file (or a description) named in errors.

    Raises:
        NotParsable: not JSON or not UTF-8 (with line and column).
        LimitError: an integer of more than :data:`MAX_INT_DIGITS` digits, nesting deeper than
            Python's parser recurses.
    """
    try:
        return json.loads(data, parse_int=_bounded_int)
    except _TooLong as e:
        raise LimitError(source, f"holds an integer of {e.digits} digits (at most {MAX_INT_DIGITS} are read)") from None
    except RecursionError:
        raise LimitError(source, "nested too deeply to read (lists or objects inside each other about "
                                 "a thousand levels deep)") from None
    except json.JSONDecodeError as e:
        raise NotParsable(source, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise NotParsable(source, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except ValueError as e:  # anything else the decoder refuses (e.g. a float it cannot hold)
        raise DataError(source, f"not valid JSON ({cut(str(e), 80)})") from None


def read_json(path: PathLike, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse a JSON file (:func:`loads_json`).

    Args:
        what: how messages name the file (``"test index"``, ``"submission file"``).
        max_bytes: larger files are refused unread.

    Raises:
        DataError: missing, a folder, unreadable, not JSON.
        LimitError: larger than ``max_bytes``, or a limit of :func:`loads_json`.
    """
    p = Path(path).expanduser()
    return loads_json(_read_bytes(p, what, max_bytes), p)


# --------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and integers of more than MAX_INT_DIGITS digits."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise ConstructorError(None, None, f"duplicate key {short(key)} (first given on line "
                                               f"{first[key] + 1}); give each key once", key_node.start_mark)
                    first[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    pass
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> Any:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise ConstructorError(None, None, f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are read)",
                                   node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _expanded_size(root: Any) -> tuple[int, int]:
    """(nodes once every alias is expanded, nesting depth) of a composed YAML node graph, counted
    without expanding anything (each shared node is counted once and multiplied by its uses).

    Raises:
        _Cycle: an alias inside the node it names.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    active: set[int] = set()
    # an explicit stack: the depth is not known to be small yet
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            active.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), 1 << 62)
            depths[key] = 1 + max((depths[id(c)] for c in children), default=0)
            continue
        if key in sizes:
            continue
        if key in active:
            raise _Cycle()
        active.add(key)
        stack.append((node, True))
        for c in children:
            if id(c) in active:
                raise _Cycle()
            if id(c) not in sizes:
                stack.append((c, False))
    return sizes[id(root)], depths[id(root)]


class _Cycle(Exception):
    pass


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def loads_yaml(text: str, source: PathLike = "<yaml>") -> Any:
    """Parse one YAML document safely (``yaml.safe_load`` with the limits of this module).

    Returns:
        the document (None for an empty one).

    Raises:
        NotParsable: not YAML (with line and column).
        DataError: a duplicate key or a value YAML cannot construct (with line and column).
        LimitError: more than :data:`MAX_YAML_NODES` nodes once aliases are expanded, an alias
            inside itself, nesting deeper than :data:`MAX_YAML_DEPTH`, an integer of more than
            :data:`MAX_INT_DIGITS` digits.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size, depth = _expanded_size(node)
        except _Cycle:
            raise LimitError(source, "an alias refers to the node it is part of (a recursive document)") from None
        if size > MAX_YAML_NODES:
            raise LimitError(source, f"its aliases expand to {size:.3g} nodes (at most {MAX_YAML_NODES}); "
                                     "a document that small cannot mean that much")
        if depth > MAX_YAML_DEPTH:
            raise LimitError(source, f"nested {depth} levels deep (at most {MAX_YAML_DEPTH})")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: " if e.problem_mark else ""
        problem = cut(str(e.problem or e.context or "not valid YAML"), 160)
        if isinstance(e, ConstructorError) and ("integer of" in problem):
            raise LimitError(source, f"{where}{problem}") from None
        if isinstance(e, ConstructorError):
            raise DataError(source, f"{where}{problem}") from None
        raise NotParsable(source, f"not valid YAML: {where}{problem}") from None
    except yaml.YAMLError as e:
        raise NotParsable(source, f"not valid YAML ({cut(str(e), 160)})") from None
    except RecursionError:
        raise LimitError(source, f"nested too deeply to read (at most {MAX_YAML_DEPTH} levels)") from None
    finally:
        loader.dispose()


def read_yaml(path: PathLike, what: str = "YAML file", max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Read and parse a YAML file (UTF-8; :func:`loads_yaml`).

    Raises:
        DataError: missing, a folder, unreadable, not UTF-8, not YAML, a duplicate key.
        LimitError: larger than ``max_bytes``, or a limit of :func:`loads_yaml`.
    """
    p = Path(path).expanduser()
    data = _read_bytes(p, what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotParsable(p, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                             f"save the {what} as UTF-8") from None
    return loads_yaml(text, p)


def _read_bytes(p: Path, what: str, max_bytes: int) -> bytes:
    if p.is_dir():
        raise DataError(p, f"is a folder, not a {what}")
    if not p.is_file():
        if p.is_symlink():
            raise DataError(p, f"broken symbolic link (it points to {os.readlink(p)}, which does not exist)")
        raise DataError(p, f"{what} not found")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)  # never more, whatever the file claims to be (a FIFO, /dev/zero)
    except OSError as e:
        raise DataError(p, f"cannot read the {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise LimitError(p, f"the {what} is larger than {_size(max_bytes)}; refusing to read it")
    return data


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"
