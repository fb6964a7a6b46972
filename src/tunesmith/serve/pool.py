"""The served model: one base in memory, LoRA adapters loaded on demand, least recently used unloaded.

Adapters are applied per row by `serve.lora.MultiLora` (the base's Linear layers wrapped once, in
place), so the base never changes and a batch can mix adapters and the plain base.

Adapters are *servable* (known by name, on disk) or *loaded* (weights in memory). Requests may
name any servable adapter; the scheduler asks the pool to load what a batch needs, and the pool
unloads the least recently used adapters that no running row uses once `max_loaded` is reached.
Every method runs on the scheduler's thread, between decoding steps.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from tunesmith.adapters import ADAPTER_CONFIG, adapter_base, check_name, is_adapter_dir
from tunesmith.errors import TunesmithError
from tunesmith.models import resolve_base
from tunesmith.serve.lora import check_supported


class AdapterError(TunesmithError):
    """An adapter that cannot be served (not found, wrong base, unreadable)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def same_base(adapter_dir: Path, base_spec: str, base_folder: Path) -> str | None:
    """None when the adapter was trained on the served base, else the base it names."""
    named = adapter_base(adapter_dir).path
    if named == base_spec:
        return None
    try:
        folder = resolve_base(named)
    except TunesmithError:
        return named
    return None if Path(folder).resolve() == Path(base_folder).resolve() else named


class AdapterPool:
    def __init__(self, base: torch.nn.Module, base_spec: str, base_folder: Path, max_loaded: int = 16) -> None:
        if max_loaded < 1:
            raise TunesmithError("max_loaded_adapters: must be at least 1")
        from tunesmith.serve.lora import MultiLora

        self.base = self.model = base
        self.lora = MultiLora(base)
        self.base_spec, self.base_folder, self.max_loaded = base_spec, Path(base_folder), max_loaded
        self.servable: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.loads = self.evictions = 0

    def register(self, name: str, path: str | Path) -> None:
        """Make `name` servable from `path` after checking it is a PEFT adapter for this base."""
        try:
            check_name(name)
        except TunesmithError as e:
            raise AdapterError(str(e)) from None
        path = Path(path)
        if not is_adapter_dir(path):
            raise AdapterError(f"{path}: no {ADAPTER_CONFIG} here; give a PEFT adapter folder", 404)
        try:
            check_supported(path, json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")))
        except (TunesmithError, ValueError) as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
        other = same_base(path, self.base_spec, self.base_folder)
        if other is not None:
            raise AdapterError(f"adapter {name!r} was trained on base {other!r}, but this server serves "
                               f"{self.base_spec!r}; serve it with `tunesmith serve --model {other}`")
        if name in self.loaded and self.servable.get(name) != path:
            self._unload(name)  # re-registered from another folder: reload on next use
        self.servable[name] = path

    def unregister(self, name: str, busy: set[str]) -> None:
        if name not in self.servable:
            raise AdapterError(f"adapter {name!r} is not being served", 404)
        del self.servable[name]
        if name in self.loaded and name not in busy:
            self._unload(name)

    def collect(self, busy: set[str]) -> None:
        """Unload adapters that were unregistered while rows still used them."""
        for name in [n for n in self.loaded if n not in self.servable and n not in busy]:
            self._unload(name)

    def ensure(self, names: set[str], busy: set[str]) -> None:
        """Load `names` (evicting idle adapters as needed) and mark them most recently used."""
        for name in names:
            if name not in self.servable:
                raise AdapterError(f"adapter {name!r} is not being served", 404)
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= self.max_loaded:
                idle = next((n for n in self.loaded if n not in busy and n not in names), None)
                if idle is None:
                    raise AdapterError(f"more than {self.max_loaded} adapters in use at once", 429)
                self._unload(idle)
                self.evictions += 1
            self._load(name)

    def _load(self, name: str) -> None:
        path = self.servable[name]
        try:
            self.lora.load(name, path)
        except TunesmithError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
        except Exception as e:  # unreadable weights
            raise AdapterError(f"adapter {name!r} at {path} could not be loaded: {str(e).splitlines()[0]}") from None
        self.loaded[name] = None
        self.loads += 1

    def _unload(self, name: str) -> None:
        self.lora.unload(name)
        del self.loaded[name]
