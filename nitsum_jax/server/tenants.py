"""Tenants: API keys (stored as SHA-256 only), the classes each may claim, and its token rate.

The keys file (`--api-keys FILE`, TOML):

    [[tenant]]
    name = "acme"
    key_sha256 = "9f86d081..."      # hex SHA-256 of the bearer key: `printf %s KEY | sha256sum`
    classes = ["high", "low"]       # the priority classes it may claim
    tokens_per_minute = 60000       # optional: prompt + max_tokens + stop rules, per minute
    max_concurrent_calls = 32       # optional: its calls in flight (default: half the server's)
    cache_group = "acme"            # optional: tenants of one group share cached prompt prefixes

Clients send `authorization: Bearer <key>`. No grpc here: errors carry the status name the
service turns into a gRPC status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import time
import tomllib
from pathlib import Path
from typing import Callable, Iterable

ANONYMOUS = "anonymous"  # the tenant of every request on an open server (no keys file)


class TenantsFileError(ValueError):
    """The keys file is malformed (names the tenant, the field and the rule)."""


class AccessError(Exception):
    """A request is refused; `code` is a grpc.StatusCode name; `retry_after_s`, when set, is how
    long until a retry could pass (HTTP's Retry-After)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.retry_after_s = code, retry_after_s


@dataclasses.dataclass
class TokenBucket:
    """`tokens_per_minute` refilled continuously, holding at most one minute's worth."""

    tokens_per_minute: int
    clock: Callable[[], float] = time.monotonic
    level: float = dataclasses.field(init=False)
    stamp: float = dataclasses.field(init=False)

    def __post_init__(self):
        self.level, self.stamp = float(self.tokens_per_minute), self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(float(self.tokens_per_minute), self.level + (now - self.stamp) * self.tokens_per_minute / 60)
        self.stamp = now

    def take(self, tokens: int) -> float | None:
        """Take `tokens` now; None if taken, else the seconds until they would be there."""
        self._refill()
        if tokens <= self.level:
            self.level -= tokens
            return None
        return (tokens - self.level) * 60 / self.tokens_per_minute

    def give_back(self, tokens: int) -> None:
        self._refill()
        self.level = min(float(self.tokens_per_minute), self.level + tokens)


@dataclasses.dataclass
class Tenant:
    name: str
    key_sha256: str
    classes: tuple[str, ...]
    tokens_per_minute: int | None = None
    max_concurrent_calls: int | None = None
    bucket: TokenBucket | None = dataclasses.field(default=None, repr=False)
    cache_group: str | None = None  # tenants of one group share cached prompt prefixes (opt-in)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def cache_salt(self) -> str:
        """The prefix cache's namespace: the tenant's own, or its group's. A cache hit is a timing
        side channel, so tenants never share cached pages unless the keys file groups them."""
        return f"group:{self.cache_group}" if self.cache_group else f"tenant:{self.name}"

    def charge(self, tokens: int) -> None:
        """Reserve `tokens` (prompt + max_tokens) of the tenant's rate, or raise RESOURCE_EXHAUSTED."""
        if self.bucket is None:
            return
        if tokens > self.tokens_per_minute:
            raise AccessError("RESOURCE_EXHAUSTED",
                              f"request needs {tokens} tokens (prompt + max_tokens + stop rules), more than "
                              f"tenant {self.name!r}'s tokens_per_minute limit {self.tokens_per_minute}")
        with self.lock:
            wait_s = self.bucket.take(tokens)
        if wait_s is not None:
            raise AccessError("RESOURCE_EXHAUSTED",
                              f"tenant {self.name!r} is over its rate: request needs {tokens} tokens (prompt + "
                              f"max_tokens + stop rules), tokens_per_minute limit {self.tokens_per_minute}; "
                              f"retry in {wait_s:.1f}s", retry_after_s=wait_s)

    def refund(self, tokens: int) -> None:
        """Give back what a request reserved but did not use (max_tokens it did not generate)."""
        if self.bucket is not None and tokens > 0:
            with self.lock:
                self.bucket.give_back(tokens)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Tenants:
    """Who may call, and which classes each may claim. `Tenants.open()` lets everyone in."""

    def __init__(self, tenants: Iterable[Tenant] | None):
        self.by_hash = None if tenants is None else {t.key_sha256: t for t in tenants}

    @classmethod
    def open(cls) -> "Tenants":
        return cls(None)

    @property
    def is_open(self) -> bool:
        return self.by_hash is None

    @classmethod
    def load(cls, path: str | Path, known_classes: Iterable[str] | None = None,
             clock: Callable[[], float] = time.monotonic) -> "Tenants":
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TenantsFileError(f"{path}: not valid TOML: {e}") from None
        entries = doc.get("tenant")
        if not isinstance(entries, list) or not entries:
            raise TenantsFileError(f"{path}: expected one or more [[tenant]] tables")
        known = set(known_classes) if known_classes is not None else None
        tenants: list[Tenant] = []
        for i, entry in enumerate(entries):
            where = f"{path}: tenant #{i + 1} ({entry.get('name', 'unnamed')!r})"
            for field, kind in (("name", str), ("key_sha256", str), ("classes", list)):
                if not isinstance(entry.get(field), kind):
                    raise TenantsFileError(f"{where}: field {field!r} must be a {kind.__name__}, got {entry.get(field)!r}")
            digest = entry["key_sha256"].lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise TenantsFileError(f"{where}: key_sha256 must be 64 hex digits (the SHA-256 of the key, never "
                                       f"the key), got {len(entry['key_sha256'])} characters")
            classes = tuple(entry["classes"])
            if not classes or (known is not None and not set(classes) <= known):
                raise TenantsFileError(f"{where}: classes {list(classes)} must be a non-empty subset of "
                                       f"{sorted(known) if known is not None else 'the server classes'}")
            tpm, calls = entry.get("tokens_per_minute"), entry.get("max_concurrent_calls")
            for field, value in (("tokens_per_minute", tpm), ("max_concurrent_calls", calls)):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise TenantsFileError(f"{where}: {field} must be an integer >= 1, got {value!r}")
            if any(t.key_sha256 == digest for t in tenants) or any(t.name == entry["name"] for t in tenants):
                raise TenantsFileError(f"{where}: duplicate name or key_sha256")
            group = entry.get("cache_group")
            if group is not None and (not isinstance(group, str) or not group):
                raise TenantsFileError(f"{where}: cache_group must be a non-empty string, got {group!r}")
            tenants.append(Tenant(entry["name"], digest, classes, tpm, calls,
                                  TokenBucket(tpm, clock) if tpm is not None else None, cache_group=group))
        return cls(tenants)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `authorization` metadata value; None on an open server."""
        if self.by_hash is None:
            return None
        if not authorization:
            raise AccessError("UNAUTHENTICATED", "missing 'authorization' metadata: send 'authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AccessError("UNAUTHENTICATED", f"authorization must be 'Bearer <key>', got scheme {scheme!r}")
        tenant = self.by_hash.get(key_sha256(key.strip()))
        if tenant is None:
            raise AccessError("UNAUTHENTICATED", "unknown API key")
        return tenant

    @staticmethod
    def authorize(tenant: Tenant | None, priority_class: str) -> None:
        if tenant is not None and priority_class not in tenant.classes:
            raise AccessError("PERMISSION_DENIED", f"tenant {tenant.name!r} may not claim priority class "
                                                   f"{priority_class!r}; allowed: {list(tenant.classes)}")
