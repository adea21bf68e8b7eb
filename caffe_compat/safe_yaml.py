"""The one YAML loader for text that comes from a model or config file.

A Python layer's ``param_str`` (py-faster-rcnn's ``'feat_stride': 16``) and py-faster-rcnn's
``--cfg`` files are YAML.  ``yaml.safe_load`` constructs no objects, but it still builds
whatever the text describes: anchors and aliases let a kilobyte expand into billions of
nodes ("billion laughs"), and thousands of nesting levels exhaust the recursion limit.  This
loader refuses, while composing and before anything is built:

- any anchor (``&a``) or alias (``*a``): Caffe model files never need them;
- nesting deeper than :data:`MAX_DEPTH`;
- text longer than the ``max_yaml_bytes`` limit.

It accepts YAML's safe types plus ``!!python/tuple`` (py-faster-rcnn's 4-scale COCO models
write ``'scales': !!python/tuple [4, 8, 16, 32]``).  Every refusal and every YAML syntax
error is one ``SchemaError`` naming the layer (or file), with quoted text cut short.
"""
from __future__ import annotations

from typing import Any, Optional

import yaml

from caffe_compat import limits
from caffe_compat.errors import LimitError, SchemaError, shorten

__all__ = ["MAX_DEPTH", "load"]

#: nesting of mappings and sequences (py-faster-rcnn's deepest is 2)
MAX_DEPTH = 64


class _Refused(Exception):
    """A structural refusal found while composing (turned into SchemaError by :func:`load`)."""

    def __init__(self, message: str, mark: Optional[yaml.Mark]):
        super().__init__(message)
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors or aliases, nesting at most :data:`MAX_DEPTH`,
    plus ``!!python/tuple``."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: D401 (PyYAML's hook)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"alias '*{shorten(event.anchor, 40)}' (anchors and aliases are not "
                           "allowed: they can expand a small text into an enormous one)", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(f"anchor '&{shorten(event.anchor, 40)}' (anchors and aliases are not "
                           "allowed: they can expand a small text into an enormous one)", event.start_mark)
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


_BoundedLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def _at(mark: Optional[yaml.Mark]) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def load(text: str, *, where: Optional[str] = None, layer: Optional[str] = None,
         source: Optional[str] = None) -> Any:
    """``text`` parsed as YAML (safe types and ``!!python/tuple``), refusing anchors, aliases,
    deep nesting (``SchemaError``) and text over ``max_yaml_bytes`` (``LimitError``), naming
    ``where`` and ``layer``; ``source`` says what the text is (``"param_str"``)."""
    of = f" in {source}" if source else ""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    limit = limits.get("max_yaml_bytes")
    if size > limit:
        raise LimitError(f"YAML{of} is {size} bytes, over the limit of {limit} "
                         f"({limits.how_to_raise('max_yaml_bytes')})", where=where, layer=layer)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a safe loader subclass)
    except _Refused as e:
        raise SchemaError(f"YAML{of}: {e}{_at(e.mark)}", where=where, layer=layer) from None
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise SchemaError(f"invalid YAML{of}: {shorten(msg, 300)}", where=where, layer=layer) from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. int() of a 5000-digit number
        raise SchemaError(f"invalid YAML{of}: {shorten(e, 200)}", where=where, layer=layer) from None
