"""Name -> object registries: how configs select models, fusions, objectives, datasets,
backends.

A research fork adds an entry from its own file, without editing mmjax:

    from mmjax.registry import FUSIONS

    @FUSIONS.register("my_fusion")
    class MyFusion(nn.Module): ...

and selects it with `--config.model.fusion=my_fusion` (the file must be imported,
e.g. through `config.imports = ("my_fork.fusion",)`).
"""
from typing import Any, Callable, Dict, Iterator

from mmjax.errors import ConfigError


class Registry:
  """A named collection of objects, filled by the `register` decorator."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Any] = {}

  def register(self, name: str, *, override: bool = False) -> Callable[[Any], Any]:
    def decorator(obj):
      if name in self._entries and not override and self._entries[name] is not obj:
        raise ValueError(
            f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
            "pass override=True to replace it.")
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> Any:
    if name not in self._entries:
      raise ConfigError(
          f"Unknown {self.kind} {name!r}; expected one of {sorted(self._entries)}.")
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._entries))

  def names(self):
    return sorted(self._entries)


MODELS = Registry("model")
FUSIONS = Registry("fusion strategy")
ATTENTION_BACKENDS = Registry("attention implementation")
DATASETS = Registry("dataset")
OBJECTIVES = Registry("objective")  # of the multimodal model (mmjax/models/objectives/)
