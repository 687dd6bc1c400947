"""The model registry: versions, aliases, tags, lineage, events and verified artifacts.

``open_registry(cfg_or_uri, workspace)`` returns the SQLite registry in the workspace (default) or the
MLflow-backed one (``registry.uri: http://host:port``); both implement :class:`ModelRegistry`.
"""

from tuneloop.registry.api import ModelRegistry, open_registry

__all__ = ["ModelRegistry", "open_registry"]
