"""The last accepted BTHome encryption counter of each sensor, kept across agent restarts.

Rules: one small JSON file in the gateway's data directory, replaced atomically (temp file,
fsync, rename, fsync of the folder), written at most once per `save_interval_s` when something
changed, off the event loop, and once more on `close()`: an SD card sees at most one small write
a minute (not one per advert), and a crash loses at most the last interval's counters. A counter
is kept with a short fingerprint of the bind key it was checked with: a counter under another
key proves nothing.
A damaged file is renamed `.bad-<UTC time>` with a warning and the store starts empty. Without a
path the store lives in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

FILE_NAME = "ble-counters.json"
FORMAT = 1


class _Saved(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    counter: Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
    key: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT
    counters: dict[str, _Saved]


def key_id(bind_key: bytes) -> str:
    """A short fingerprint of a bind key (not the key: a hash of 128 random bits reveals
    nothing usable)."""
    return hashlib.sha256(b"campus-iot bthome counter\0" + bind_key).hexdigest()[:16]


class CounterStore:
    def __init__(self, path: Path | None, *, save_interval_s: float = 60.0) -> None:
        self.path = path
        self.save_interval_s = save_interval_s
        self.writes = 0  # files written, for tests and counters
        self._counters: dict[str, tuple[int, str]] = {}  # name -> (counter, key id)
        self._dirty = False
        self._last_save = -float("inf")  # the first change is saved at once: crash loops too
        self._flush: asyncio.Task[None] | None = None
        self._write_failed = False
        self._saving = False
        if path is not None:
            self._load(path)

    @staticmethod
    def _name(adapter: str, address: str) -> str:
        return f"{adapter}/{address.upper()}"

    def get(self, adapter: str, address: str, key: str) -> int | None:
        """The last counter accepted from this sensor under this key, or None."""
        saved = self._counters.get(self._name(adapter, address))
        return saved[0] if saved is not None and saved[1] == key else None

    def put(self, adapter: str, address: str, key: str, counter: int) -> None:
        """Records an accepted counter (on the event loop; quick); saved within
        `save_interval_s`."""
        name = self._name(adapter, address)
        if self._counters.get(name) == (counter, key):
            return
        self._counters[name] = (counter, key)
        self._dirty = True
        if self.path is not None and self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(
                self._flush_later(), name="ble-counters-save"
            )

    async def close(self) -> None:
        """Writes what changed since the last save."""
        flush, self._flush = self._flush, None
        if flush is not None:
            if not self._saving:  # waiting for its turn: nothing written yet
                flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flush
        await self._save()

    # file

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s: cannot read it (%s): BLE replay counters start empty", path, exc)
            return
        try:
            data = _File.model_validate_json(raw)
            if data.format != FORMAT:
                raise ValueError(f"format {data.format}, expected {FORMAT}")
        except (ValidationError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._set_aside(path, why)
            return
        self._counters = {name: (s.counter, s.key) for name, s in data.counters.items()}
        log.info("%s: last BTHome counters of %d sensors loaded", path, len(self._counters))

    def _set_aside(self, path: Path, why: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = path.with_name(f"{path.name}.bad-{stamp}")
        try:
            path.replace(target)
        except OSError as exc:
            log.warning("%s is damaged (%s) and cannot be set aside (%s)", path, why, exc)
            return
        log.warning(
            "%s is damaged (%s): set aside as %s; BLE replay counters start empty",
            path,
            why,
            target.name,
        )

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(max(0.0, self._last_save + self.save_interval_s - time.monotonic()))
            await self._save()
        finally:
            if self._flush is asyncio.current_task():
                self._flush = None

    async def _save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        self._last_save = time.monotonic()
        saved = {name: _Saved(counter=c, key=k) for name, (c, k) in self._counters.items()}
        payload = _File(counters=saved).model_dump_json(indent=1).encode()
        self._saving = True
        try:
            await asyncio.to_thread(_write_atomically, self.path, payload)
        except OSError as exc:
            self._dirty = True  # tried again at the next change or on close
            level = logging.DEBUG if self._write_failed else logging.WARNING
            log.log(level, "%s: cannot save BLE replay counters: %s", self.path, exc)
            self._write_failed = True
            return
        finally:
            self._saving = False
        self.writes += 1
        if self._write_failed:
            log.info("%s: BLE replay counters saved again", self.path)
            self._write_failed = False


def _write_atomically(path: Path, payload: bytes) -> None:
    """After a power cut the file holds either the old counters or the new ones, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
