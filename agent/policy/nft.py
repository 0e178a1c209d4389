"""A thin asyncio runner for the `nft` command, limited to one table the agent owns.

Rules: every call names the agent's table (`inet <table>`); nothing here lists, flushes or
changes another table or the whole ruleset. Text goes to `nft -f -` on stdin (no file to clean
up, readable whatever user nft runs as), so nft's errors point at `/dev/stdin:line:column`.
`NftUnavailable` means nft cannot run at all (missing, or no CAP_NET_ADMIN); `NftError` carries
nft's own message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_TIMEOUT_S = 20.0


class NftError(Exception):
    """nft refused a command; `message` is what it printed."""

    def __init__(self, action: str, message: str) -> None:
        self.action = action
        self.message = message.strip() or "no message"
        super().__init__(f"{action}: {self.message}")


class NftUnavailable(NftError):
    """nft cannot run here: not installed, or not allowed (needs root or CAP_NET_ADMIN)."""


@dataclass(frozen=True, slots=True)
class RuleCounter:
    """The counters of every rule that carries one comment, summed (a flow can have several)."""

    rule: str
    verdict: Literal["accept", "drop", "jump", "other"]
    packets: int
    bytes: int


class Nft:
    def __init__(
        self,
        path: str = "nft",
        table: str = "campus_iot",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.table = table
        self.timeout_s = timeout_s

    # -- the table

    async def check(self, text: str) -> None:
        """`nft -c -f`: NftError with nft's message (file:line:column) unless it would apply."""
        await self._with_text(text, "check", "-c")

    async def apply(self, text: str) -> None:
        """`nft -f`: one transaction; when it fails nothing changed."""
        await self._with_text(text, "apply")

    async def list_table(self, *, stateless: bool = False) -> str | None:
        """The table as nft prints it (loadable again), or None when it does not exist."""
        args = ["-s"] if stateless else []
        try:
            return await self._run("list", *args, "list", "table", "inet", self.table)
        except NftUnavailable:
            raise
        except NftError as exc:
            if "No such file or directory" in exc.message:
                return None
            raise

    async def delete_table(self) -> None:
        """Removes the table if it exists (creating it empty first makes that one transaction)."""
        await self.apply(f"table inet {self.table} {{}}\ndelete table inet {self.table}\n")

    async def restore(self, listing: str | None) -> None:
        """Puts back what `list_table()` returned (None: no table)."""
        if listing is None:
            await self.delete_table()
            return
        await self.apply(f"table inet {self.table} {{}}\ndelete table inet {self.table}\n{listing}")

    async def counters(self) -> list[RuleCounter]:
        """Per-comment counters of the table's rules (none when the table does not exist)."""
        try:
            text = await self._run("counters", "-j", "list", "table", "inet", self.table)
        except NftUnavailable:
            raise
        except NftError as exc:
            if "No such file or directory" in exc.message:
                return []
            raise
        return counters_from_json(text)

    # -- set members

    async def add_element(self, set_name: str, value: str) -> None:
        """Adds a member to a named set now, without reloading anything (idempotent)."""
        await self._run(
            "add element",
            "add",
            "element",
            "inet",
            self.table,
            set_name,
            "{",
            value,
            "}",
        )

    async def delete_element(self, set_name: str, value: str) -> bool:
        """Removes a member; False when it was not there."""
        try:
            await self._run(
                "delete element",
                "delete",
                "element",
                "inet",
                self.table,
                set_name,
                "{",
                value,
                "}",
            )
        except NftUnavailable:
            raise
        except NftError as exc:
            if "No such file or directory" in exc.message:
                return False
            raise
        return True

    async def elements(self, set_name: str) -> list[str]:
        """The set's members as nft prints them (prefixes as `addr/len`, ranges `a-b`)."""
        text = await self._run("list set", "-j", "list", "set", "inet", self.table, set_name)
        for item in json.loads(text).get("nftables", []):
            if "set" in item:
                return [_element_text(e) for e in item["set"].get("elem", [])]
        return []

    # -- running nft

    def available(self) -> str | None:
        """Why nft cannot run here, or None when the binary is there (rights are seen later)."""
        if os.sep in self.path:
            if not os.access(self.path, os.X_OK):
                return f"{self.path} is missing or not executable"
            return None
        if shutil.which(self.path) is None:
            return f"{self.path} is not installed (Debian: apt-get install nftables)"
        return None

    async def _with_text(self, text: str, action: str, *flags: str) -> None:
        await self._run(action, *flags, "-f", "-", text=text)

    async def _run(self, action: str, *args: str, text: str | None = None) -> str:
        reason = self.available()
        if reason is not None:
            raise NftUnavailable(action, reason)
        try:
            process = await asyncio.create_subprocess_exec(
                self.path,
                *args,
                stdin=asyncio.subprocess.DEVNULL if text is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NftUnavailable(action, f"cannot run {self.path}: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await process.communicate(None if text is None else text.encode())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise NftError(action, f"nft did not finish within {self.timeout_s:.0f} s") from None
        message = err.decode(errors="replace")
        if process.returncode != 0:
            if "Operation not permitted" in message:
                raise NftUnavailable(
                    action,
                    f"{message.strip()} (the agent needs root or CAP_NET_ADMIN to use nft)",
                )
            raise NftError(action, message)
        return out.decode(errors="replace")


def counters_from_json(text: str) -> list[RuleCounter]:
    """Sums `nft -j` rule counters by comment; rules without a comment are left out."""
    totals: dict[str, list[Any]] = {}
    for item in json.loads(text).get("nftables", []):
        rule = item.get("rule")
        if not isinstance(rule, dict) or not rule.get("comment"):
            continue
        packets = bytes_ = 0
        verdict: str = "other"
        for expr in rule.get("expr", []):
            if "counter" in expr and isinstance(expr["counter"], dict):
                packets += int(expr["counter"].get("packets", 0))
                bytes_ += int(expr["counter"].get("bytes", 0))
            for name in ("accept", "drop", "jump"):
                if name in expr:
                    verdict = name
        entry = totals.setdefault(rule["comment"], [verdict, 0, 0])
        entry[1] += packets
        entry[2] += bytes_
    return [
        RuleCounter(comment, verdict, packets, bytes_)
        for comment, (verdict, packets, bytes_) in sorted(totals.items())
    ]


def _element_text(element: Any) -> str:
    if isinstance(element, dict):
        if "prefix" in element:
            return f"{element['prefix']['addr']}/{element['prefix']['len']}"
        if "range" in element:
            low, high = element["range"]
            return f"{low}-{high}"
        if "elem" in element:
            return _element_text(element["elem"].get("val"))
    return str(element)
