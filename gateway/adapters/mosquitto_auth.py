"""Device credentials in Mosquitto's password file (DESIGN.md, "Security").

Only a salted hash of each password is stored, in the format `mosquitto_passwd` writes
(`$7$`: PBKDF2-HMAC-SHA512), so the broker checks logins itself. The broker reads the
file at start and again on SIGHUP; whoever changes the file makes it reload.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.adapters.files import write_atomically
from gateway.errors import IotgwError

__all__ = ["GATEWAY_USER", "PasswordFile", "generate_password", "hash_password", "verify_password"]

# The gateway's own user on the secure listener; `compose/mosquitto/acl` lets it read all
# telemetry and write all commands, so no device may have this name as its login.
GATEWAY_USER = "iotgw"

# Mosquitto 2.0's `$7$` hash: PBKDF2-HMAC-SHA512 over a 12-byte salt, as mosquitto_passwd
# makes it. Passwords are 32 random bytes, so the iteration count guards nothing a guess
# could reach; 101 is Mosquitto's own default and keeps each login cheap for the broker.
_ITERATIONS = 101
_SALT_BYTES = 12


def generate_password() -> str:
    """A new device password: 256 random bits, URL-safe, fit for a command line."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The password file entry's hash part for `password`."""
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return f"$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True when `hashed` (a `$7$` entry) is the hash of `password`."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        expected = base64.b64decode(digest, validate=True)
        computed = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt, validate=True), int(iterations)
        )
    except ValueError:
        return False
    return kind == "7" and secrets.compare_digest(expected, computed)


class PasswordFile:
    """Mosquitto's password file: one `user:hash` line per login.

    Every change reads, edits and replaces the whole file under an exclusive lock, so
    concurrent commands never lose each other's entries and the broker never reads half
    a file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def users(self) -> set[str]:
        return set(self._read())

    def set(self, user: str, password: str) -> None:
        """Store the hash of `password` for `user` (replacing an older one)."""
        with self._locked() as entries:
            entries[user] = hash_password(password)

    def remove(self, user: str) -> bool:
        """Delete `user`'s entry; True when there was one."""
        with self._locked() as entries:
            return entries.pop(user, None) is not None

    def check(self, user: str, password: str) -> bool:
        hashed = self._read().get(user)
        return hashed is not None and verify_password(password, hashed)

    def _read(self) -> dict[str, str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise IotgwError(f"cannot read the password file {self.path}: {exc.strerror}") from None
        entries = {}
        for line in text.splitlines():
            user, sep, hashed = line.partition(":")
            if sep and user and not line.startswith("#"):
                entries[user] = hashed
        return entries

    @contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = (self.path.parent / f".{self.path.name}.lock").open("a")
        except OSError as exc:
            raise IotgwError(
                f"cannot write the password file {self.path}: {exc.strerror}"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            yield entries
            text = "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))
            write_atomically(self.path, text.encode())
