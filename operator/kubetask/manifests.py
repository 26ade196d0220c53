"""Reading the YAML manifests that `kubetask functions apply -f` and `kubetask dev --functions`
send: what `kubectl apply` would accept, as JSON objects, and anything else a `ValueError`
that names the file, the document and where in it.

YAML holds what JSON cannot: dates and times (`2001-12-14` unquoted), `!!binary`, `!!set`,
`.nan` and `.inf`, aliases that expand without end. `kubectl` reads an unquoted date as the
string it is written as, and so does this; the others are refused before anything is sent
(a date was a `TypeError` traceback, `.nan` an error that said where in nothing).
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from . import text_files

YAML_KINDS = {str: "string", list: "list", int: "number", float: "number", bool: "boolean"}
MANIFEST_MAX_VALUES = 100_000
TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _ManifestLoader(yaml.SafeLoader):
    """A key given twice in one mapping is an error, as in `kubectl apply`, rather than the
    last one silently winning (the API refuses the same in JSON: `strict_json`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; a key written beside it overrides the merged one
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool | None):
                continue  # an unhashable key: the base class says so
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# An unquoted date or time stays the string it is written as (an explicit `!!timestamp` still
# makes a date, which `_checked` refuses).
_ManifestLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_NOT_JSON: dict[type, str] = {bytes: "binary (!!binary)", set: "a set (!!set)"}


def _not_json(value: object) -> str:
    return _NOT_JSON.get(type(value), f"a {type(value).__name__}")


def _where(path: list[str]) -> str:
    return "".join(path) or "the document"


def _checked(doc: object, source: str, index: int) -> int:
    """How many values a document holds once its YAML aliases are written out, as JSON writes
    them, and that each is one JSON can hold. Nine levels of nine aliases (a "billion laughs")
    load as a few objects, then took the CLI 12 s and 1.2 GB to send as 389 MB. Each shared
    object is counted once per use, but walked once."""
    sizes: dict[int, int] = {}
    walking: set[int] = set()
    where = f"document {index} of {source}"

    def size(value: object, path: list[str]) -> int:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {_where(path)} is {value}, which JSON cannot hold")
        if isinstance(value, str | int | float | bool | None):
            return 1
        if not isinstance(value, dict | list):
            raise ValueError(
                f"{where}: {_where(path)} is {_not_json(value)}, which JSON cannot hold"
            )
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in walking:
            raise ValueError(f"{where} holds itself (a YAML alias loop)")
        walking.add(key)
        if isinstance(value, dict):
            for k in value:
                if not isinstance(k, str | int | float | bool | None):
                    raise ValueError(f"{where}: a key in {_where(path)} is {_not_json(k)}")
            total = 1 + sum(size(v, [*path, f".{k}" if path else str(k)]) for k, v in value.items())
        else:
            total = 1 + sum(size(v, [*path, f"[{i}]"]) for i, v in enumerate(value))
        walking.discard(key)
        if total > MANIFEST_MAX_VALUES:
            raise ValueError(
                f"{where} holds over {MANIFEST_MAX_VALUES:,} values"
                " once its YAML aliases are written out"
            )
        sizes[key] = total
        return total

    return size(doc, [])


def read_objects(path: Path) -> list[dict[str, object]]:
    """The objects of a manifest (`-` for stdin), each a mapping with a mapping `metadata`."""
    source = text_files.named(str(path))
    try:
        text = text_files.read(str(path))
        docs = [d for d in yaml.load_all(text, Loader=_ManifestLoader) if d is not None]
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not a text (UTF-8) file") from None
    except OSError as err:
        raise ValueError(f"cannot read {source}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {err}") from None
    except RecursionError:
        raise ValueError(f"{source} nests too deeply to be read") from None
    if not docs:
        raise ValueError(f"{source} holds no objects to apply")
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            what = YAML_KINDS.get(type(doc), type(doc).__name__)
            raise ValueError(
                f"document {i} of {source} is a {what}, not an object"
                " (a TaskFunction or an AsyncConfig)"
            )
        if not isinstance(doc.get("metadata", {}), dict):
            raise ValueError(f"document {i} of {source}: metadata must be an object")
        try:
            _checked(doc, source, i)
        except RecursionError:
            raise ValueError(f"document {i} of {source} nests too deeply to be read") from None
    return docs
