"""Reading YAML the way users write it: ``1e-3`` is a number, a repeated key is an error.

PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``), so ``lr: 1e-3`` arrives as the
string ``"1e-3"``; and a key given twice silently keeps the last value. Both are fixed here.
"""

import io
import re
from typing import Any

import yaml

# YAML 1.2's float pattern (exponent without a dot), plus the 1.1 forms PyYAML already knows.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping repeats a key (YAML keeps the last one silently)."""


class _Loader(yaml.SafeLoader):
    pass


# Replace SafeLoader's float resolver (a class-level table) on our subclass only.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *base``: SafeLoader merges it below; a key given next to it overrides the merged one
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKeyError(
                f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                f"YAML would silently keep the last one"
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-3``) and an error for a repeated key."""
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class NotUTF8Error(yaml.YAMLError):
    """The file is not UTF-8 text (the message names the first bad byte and its line)."""


def load_yaml_file(path: str) -> Any:
    """:func:`load_yaml` of a file, read as UTF-8; other bytes are a :class:`NotUTF8Error`."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise NotUTF8Error(
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} (save the file as UTF-8)"
        ) from None
    stream = io.StringIO(text)
    stream.name = path  # PyYAML names the file in its error marks
    return load_yaml(stream)
