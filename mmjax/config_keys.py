"""Dotted config keys (`model.droppath_rate`): the one walker behind every key check.

Config validation, the command line's `--config.a.b=...`, sweep points and the data
pipeline's defaults all ask the same two questions, answered here:

  * does this key exist? `resolve(config, "a.b", schema)` walks the config and, where the
    config does not set a key, the schema of what it may set: a model's dataclass fields
    and a dataset's declared options. An unknown key is a `ConfigError` naming the valid
    keys at the level where the walk stopped.
  * what may a new key hold? Schema leaves are types (`float`, `Optional[int]`, ...), so
    a command-line string becomes a value of the field's type (`parse_value`).

A schema is a nested dict: a dict is a section to walk into, anything else a leaf's type.
"""
import ast
import contextlib
import typing
from typing import Any, Iterable, Mapping, Optional, Tuple

import ml_collections

from mmjax.errors import ConfigError


def check_known(given: Iterable[str], valid: Iterable[str], where: str,
                what: str = "keys") -> None:
  """Raises a ConfigError naming `where`'s unknown keys (or options) and its valid ones."""
  valid = set(valid)
  unknown = sorted(set(given) - valid)
  if unknown:
    raise ConfigError(f"Unknown {where} {what} {unknown}; valid {what} of {where}: "
                      f"{sorted(valid)}.")


def _keys(node) -> set:
  return set(node.keys()) if isinstance(node, (Mapping, ml_collections.ConfigDict)) else set()


def resolve(config: ml_collections.ConfigDict, dotted: str,
            schema: Optional[Mapping[str, Any]] = None) -> Tuple[Any, str, Any]:
  """(parent node in `config`, leaf name, schema type or None) of `dotted`.

  The type is None where `config` already holds the key (ConfigDict checks assignments
  to it); otherwise it is the schema's, and the key is new to the config.
  """
  node, walked, parts = config, "config", dotted.split(".")
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    in_config = isinstance(node, (ml_collections.ConfigDict, dict)) and part in node
    sub_schema = schema.get(part) if isinstance(schema, Mapping) else None
    if not in_config and part not in _keys(schema):
      valid = sorted(_keys(node) | _keys(schema))
      raise ConfigError(f"Unknown config key {walked}.{part} (from {dotted!r}); valid keys of "
                        f"{walked}: {valid}.")
    if last:
      return node, part, (None if in_config else sub_schema)
    if not in_config:
      if not isinstance(sub_schema, Mapping):
        raise ConfigError(f"{walked}.{part} is a field, not a section (from {dotted!r}).")
      with unlocked(node):
        node[part] = ml_collections.ConfigDict()
    node, schema, walked = node[part], sub_schema, f"{walked}.{part}"
  raise AssertionError("unreachable")


def set_value(config: ml_collections.ConfigDict, dotted: str, value: Any,
              schema: Optional[Mapping[str, Any]] = None, *, parse: bool = False) -> None:
  """config.<dotted> = value; a key only the schema knows is added, from text if `parse`
  ("None" unsets a key the config holds)."""
  node, leaf, new_type = resolve(config, dotted, schema)
  if new_type is None:
    if parse and value in ("None", "none"):  # unsetting a field the config sets
      value = None
    node[leaf] = value  # ConfigDict type-checks the new value against the old one
    return
  with unlocked(node):
    node[leaf] = parse_value(value, new_type, dotted) if parse else value


def parse_value(text: str, annotation: Any, where: str) -> Any:
  """A command-line string as a value of `annotation` (bool, int, float, str, Optional,
  tuples, lists, dicts); a string that is not one is a ConfigError."""
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin is typing.Union:
    if type(None) in args and text.strip() in ("None", "none", ""):
      return None
    others = [a for a in args if a is not type(None)]
    return parse_value(text, others[0] if len(others) == 1 else Any, where)
  try:
    if annotation is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if annotation in (int, float):
      return annotation(text)
    if annotation is str:
      return text
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    if annotation is Any:  # a bare word for a field of any type: the word itself
      return text
    name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    raise ConfigError(f"--config.{where}={text!r}: expected a {name}.") from e
  return value


def unlocked(node):
  """`node.unlocked()` for a (locked) ConfigDict, nothing for a plain dict."""
  if isinstance(node, ml_collections.ConfigDict):
    return node.unlocked()
  return contextlib.nullcontext()
