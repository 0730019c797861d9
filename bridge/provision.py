"""Kiosk provisioning for hospital IT: credentials, ACL entries, agent config, certs.

``add`` creates a kiosk's MQTT password (printed once, stored only hashed), enters it
in the broker's password file (Mosquitto's PBKDF2-SHA512 format or amqtt's argon2
file), gives it its topic ACL where the broker cannot use patterns (amqtt), writes
the kiosk's ``agent.toml`` and, when a CA is given, a client certificate for mutual
TLS. ``revoke`` removes the credentials and ACL entries again.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from vitals_contract import Leaf, is_valid_kiosk_id, kiosk_topic

log = logging.getLogger(__name__)

MOSQUITTO_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.x writes
MOSQUITTO_SALT_BYTES = 12
PASSWORD_BYTES = 24
NEW_PASSWORD_FILE_MODE = 0o640
ACL_PLUGIN = "amqtt.plugins.topic_checking.TopicAccessControlListPlugin"
KIOSK_PUBLISHES = (
    Leaf.READINGS,
    Leaf.STATUS,
    Leaf.EVENTS,
    Leaf.HEARTBEAT,
    Leaf.COMMAND_RESULT,
)
KIOSK_SUBSCRIBES = (Leaf.COMMAND, Leaf.CONFIRM)


class ProvisionError(ValueError):
    """A provisioning request that cannot be carried out."""


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """Hash ``password`` the way ``mosquitto_passwd`` does (``$7$``, PBKDF2-SHA512)."""
    salt = salt or os.urandom(MOSQUITTO_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), salt, MOSQUITTO_PBKDF2_ITERATIONS
    )
    b64 = base64.b64encode
    return (
        f"$7${MOSQUITTO_PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"
    )


def amqtt_hash(password: str) -> str:
    """Hash ``password`` for amqtt's password file (argon2)."""
    return PasswordHash((Argon2Hasher(),)).hash(password)


def _set_password_line(path: Path, user: str, hashed: str | None) -> bool:
    """Replace (or with ``None`` remove) ``user``'s line; say whether it existed.

    An existing file keeps its owner, group and mode (the broker's user must still
    read it); a new one is created readable by its owner and group only.
    """
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.split(":", 1)[0] != user]
    existed = len(kept) != len(lines)
    if hashed is not None:
        kept.append(f"{user}:{hashed}")
    created = not path.exists()
    path.write_text("\n".join(kept) + ("\n" if kept else ""))
    if created:
        path.chmod(NEW_PASSWORD_FILE_MODE)
    return existed


def _amqtt_acl(config: Path, kiosk_id: str, root: str, grant: bool) -> None:
    """Add or remove a kiosk's entries in an amqtt config's topic ACL plugin."""
    data: dict[str, Any] = yaml.safe_load(config.read_text()) or {}
    plugin = data.setdefault("plugins", {}).setdefault(ACL_PLUGIN, {})
    subscribe = plugin.setdefault("acl", {})
    publish = plugin.setdefault("publish_acl", {})
    if grant:
        subscribe[kiosk_id] = [
            kiosk_topic(kiosk_id, leaf, root) for leaf in KIOSK_SUBSCRIBES
        ]
        publish[kiosk_id] = [
            kiosk_topic(kiosk_id, leaf, root) for leaf in KIOSK_PUBLISHES
        ]
    else:
        subscribe.pop(kiosk_id, None)
        publish.pop(kiosk_id, None)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What ``add_kiosk`` produced."""

    kiosk_id: str
    password: str
    agent_config: Path
    client_cert: Path | None


def add_kiosk(
    kiosk_id: str,
    *,
    broker_host: str,
    broker_port: int,
    out_dir: Path,
    mosquitto_passwd: Path | None = None,
    amqtt_passwd: Path | None = None,
    amqtt_config: Path | None = None,
    ca_cert: Path | None = None,
    ca_key: Path | None = None,
    root: str = "vitals/v1",
) -> Provisioned:
    """Create credentials and an agent config for ``kiosk_id``."""
    if not is_valid_kiosk_id(kiosk_id) or kiosk_id in {"bridge", "operator"}:
        raise ProvisionError(f"{kiosk_id!r} is not a usable kiosk id")
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    if mosquitto_passwd is not None:
        _set_password_line(mosquitto_passwd, kiosk_id, mosquitto_hash(password))
    if amqtt_passwd is not None:
        _set_password_line(amqtt_passwd, kiosk_id, amqtt_hash(password))
    if amqtt_config is not None:
        _amqtt_acl(amqtt_config, kiosk_id, root, grant=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = key_path = None
    if ca_cert is not None and ca_key is not None:
        from bridge.devcerts import issue_client_cert

        cert_path, key_path = issue_client_cert(kiosk_id, ca_cert, ca_key, out_dir)
    config = out_dir / f"{kiosk_id}.toml"
    lines = [
        f'kiosk_id = "{kiosk_id}"',
        "",
        "[mqtt]",
        f'host = "{broker_host}"',
        f"port = {broker_port}",
        f'username = "{kiosk_id}"',
        f'password = "{password}"',
    ]
    if ca_cert is not None:
        lines.append(f'tls_ca_file = "{ca_cert}"')
    if cert_path is not None and key_path is not None:
        lines += [f'tls_cert_file = "{cert_path}"', f'tls_key_file = "{key_path}"']
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)
    log.info("provisioned kiosk %s", kiosk_id)
    return Provisioned(kiosk_id, password, config, cert_path)


def revoke_kiosk(
    kiosk_id: str,
    *,
    mosquitto_passwd: Path | None = None,
    amqtt_passwd: Path | None = None,
    amqtt_config: Path | None = None,
) -> bool:
    """Remove a kiosk's credentials and ACL entries; say whether it was known."""
    known = False
    for path in (mosquitto_passwd, amqtt_passwd):
        if path is not None and path.exists():
            known |= _set_password_line(path, kiosk_id, None)
    if amqtt_config is not None:
        _amqtt_acl(amqtt_config, kiosk_id, "", grant=False)
    log.info("revoked kiosk %s", kiosk_id)
    return known
