"""The adapters a replica serves by name: an `adapters.bank.AdapterBank` over the engine's base model, at most
`capacity` adapters at once, the least recently used one evicted to make room (as vLLM's LoRA cache does).

A request takes a lease on its adapter's slot (`acquire`, on any thread) and gives it back when it ends
(`release`); an adapter with running requests is never evicted, and one unloaded while requests run keeps
its slot until the last of them ends. `load` and `unload` change tensors the model reads, so they run on the
engine's thread, between steps.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters.bank import AdapterBank
from adapters.lowrank import read_factors
from adapters.peft_format import is_peft_folder, read_peft
from workers.serving.requests import RequestError


@dataclass
class Entry:
    name: str
    path: str
    method: str
    rank: int
    slot: int
    running: int = 0
    last_used: int = 0
    unloaded: bool = False


class AdapterSlots:
    def __init__(self, model, capacity: int):
        self.bank = AdapterBank(model, capacity)
        self.model, self.capacity = model, capacity
        self.lock = threading.Lock()
        self.entries: dict[str, Entry] = {}
        self.by_slot: dict[int, Entry] = {}      # every slot in use, unloaded-but-running ones included
        self.clock = itertools.count(1)
        self.evictions = 0

    # -- any thread -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self.lock:
            return list(self.entries)

    def describe(self) -> list[dict]:
        with self.lock:
            return [{"name": e.name, "path": e.path, "method": e.method, "rank": e.rank, "running": e.running}
                    for e in self.entries.values()]

    def acquire(self, name: str) -> int | None:
        """The slot of adapter `name` for a new request (a lease); None if `name` is not an adapter here."""
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                return None
            entry.running += 1
            entry.last_used = next(self.clock)
            return entry.slot

    def release(self, slot: int) -> None:
        with self.lock:
            entry = self.by_slot[slot]
            entry.running -= 1
            if entry.unloaded and entry.running == 0:
                del self.by_slot[slot]   # free now; the next load overwrites the slot's tensors

    # -- the engine's thread ----------------------------------------------------------------------------
    def load(self, name: str, path: str) -> Entry:
        """Read the adapter at `path` (a sparta adapter folder, or a PEFT LoRA folder as vLLM takes) and serve it as
        `name`; RequestError (param lora_path / lora_name) when it cannot be, 503 when every slot holds an adapter
        with running requests."""
        with self.lock:
            if name in self.entries:
                raise RequestError(f"the adapter {name!r} is already loaded; unload it first", "lora_name")
        folder = Path(path)
        if not folder.is_dir():
            raise RequestError(f"{path} is not a folder on the replica's machine", "lora_path")
        try:
            if is_peft_folder(folder):
                method, factors = "peft_lora", read_peft(folder, self.model)
            else:
                config, factors = read_factors(folder, self.model)
                method = config.method
        except (OSError, ValueError, KeyError) as e:
            raise RequestError(f"cannot load {path}: {e}", "lora_path") from None
        with self.lock:
            slot = self._free_slot()
            entry = Entry(name, str(folder), method, max(f.rank for f in factors.values()), slot,
                          last_used=next(self.clock))
            self.by_slot[slot] = entry
        try:
            self.bank.put(slot, factors)
        except ValueError as e:
            with self.lock:
                del self.by_slot[slot]
            raise RequestError(f"cannot load {path}: {e}", "lora_path") from None
        with self.lock:
            if name in self.entries:   # loaded meanwhile by another call: keep that one
                del self.by_slot[slot]
                raise RequestError(f"the adapter {name!r} is already loaded; unload it first", "lora_name")
            self.entries[name] = entry
        return entry

    def _free_slot(self) -> int:
        """A slot nobody uses, evicting the least recently used idle adapter if need be (holding the lock)."""
        for slot in range(self.capacity):
            if slot not in self.by_slot:
                return slot
        idle = [e for e in self.entries.values() if e.running == 0]
        if not idle:
            raise RequestError(f"all {self.capacity} adapter slots hold adapters with running requests; retry "
                               "later", "lora_name", code="adapter_slots_busy", status=503)
        victim = min(idle, key=lambda e: e.last_used)
        del self.entries[victim.name]
        del self.by_slot[victim.slot]
        self.evictions += 1
        return victim.slot

    def unload(self, name: str) -> Entry:
        with self.lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                raise RequestError(f"no adapter {name!r} is loaded; loaded: {', '.join(self.entries) or 'none'}",
                                   "lora_name", code="model_not_found", status=404)
            entry.unloaded = True
            if entry.running == 0:
                del self.by_slot[entry.slot]
            return entry
