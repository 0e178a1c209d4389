"""campus-fleet commands: bridge (the Mosquitto bridge from a school's broker to the cloud).

Rules: every argument is checked before anything is written (exit 2, naming the option); the
TLS files must be readable PEM, and the key must belong to the certificate. What would only
fail later at the cloud (a CN that is not the site id, a key the mosquitto user cannot read,
an expired certificate) is a warning. The text comes from fleet.bridge.render_bridge.
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import stat
import tempfile
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleet.bridge import (
    DEFAULT_NAME,
    DEFAULT_REMOTE_PREFIX,
    DEFAULT_UP,
    DOWN_CHANNELS,
    UP_CHANNELS,
    BridgeError,
    BridgeSpec,
    parse_cloud,
    parse_restart_timeout,
    render_bridge,
    split_names,
)
from fleet.clikit import EXIT_RUNTIME, EXIT_USAGE, emit_json, fail, json_option

MOSQUITTO_USER = "mosquitto"


def register(main: click.Group) -> None:
    """Adds this module's commands to the CLI."""
    main.add_command(bridge)


@click.group()
def bridge() -> None:
    """The MQTT bridge that carries a school's topics up to the central cloud."""


_tls_file = click.Path(
    exists=True, dir_okay=False, readable=True, resolve_path=True, path_type=Path
)


@bridge.command("render")
@click.option("--cloud", required=True, metavar="HOST:PORT", help="The cloud broker's TLS port.")
@click.option("--site", required=True, help="This school's site id.")
@click.option("--cafile", required=True, type=_tls_file, help="CA of the cloud's certificate.")
@click.option("--certfile", required=True, type=_tls_file, help="The school's client certificate.")
@click.option(
    "--keyfile", required=True, type=_tls_file, help="Its private key (PEM, no passphrase)."
)
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="Connection name.")
@click.option(
    "--remote-prefix",
    default=DEFAULT_REMOTE_PREFIX,
    show_default=True,
    help="Where campus/SITE/ lands at the cloud; {site} is replaced.",
)
@click.option(
    "--channels",
    default=",".join(DEFAULT_UP),
    show_default=True,
    help=f"What goes up, from: {', '.join(UP_CHANNELS)}.",
)
@click.option(
    "--downlink",
    default="",
    help=f"What may come DOWN from the cloud, from: {', '.join(DOWN_CHANNELS)} (default: none).",
)
@click.option(
    "--restart-timeout",
    default="5:60",
    show_default=True,
    metavar="BASE[:CAP]",
    help="Seconds between reconnection attempts (backs off from BASE to CAP).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the config to this file (e.g. /etc/mosquitto/conf.d/campus-cloud.conf).",
)
@json_option
def render(
    cloud: str,
    site: str,
    cafile: Path,
    certfile: Path,
    keyfile: Path,
    name: str,
    remote_prefix: str,
    channels: str,
    downlink: str,
    restart_timeout: str,
    out: Path | None,
    as_json: bool,
) -> None:
    """Print (or write) the Mosquitto bridge config of one school's broker.

    Telemetry, state and events of every gateway of the site, and its alerts, go up with QoS 1
    under cloud/SITE/; nothing comes down unless --downlink names it. The bridge keeps a
    persistent session, so messages wait on the school's broker while the cloud is away.

    \b
    Examples:
      campus-fleet bridge render --cloud mqtt.district.example:8883 --site school-42 \\
          --cafile /etc/mosquitto/certs/cloud-ca.pem \\
          --certfile /etc/mosquitto/certs/school-42.crt \\
          --keyfile /etc/mosquitto/certs/school-42.key \\
          --out /etc/mosquitto/conf.d/campus-cloud.conf
      campus-fleet bridge render --cloud [fd00::10]:8883 --site school-42 ... --json
    """
    try:
        spec = BridgeSpec(
            site=site,
            cloud=parse_cloud(cloud),
            cafile=cafile,
            certfile=certfile,
            keyfile=keyfile,
            name=name,
            remote_prefix_template=remote_prefix,
            channels=split_names(channels),
            downlink=split_names(downlink),
            restart_timeout=parse_restart_timeout(restart_timeout),
        )
        certificate = check_tls_files(cafile, certfile, keyfile)
    except BridgeError as exc:
        fail(str(exc), EXIT_USAGE)
    warnings = tls_warnings(certificate, spec.site, keyfile)
    text = render_bridge(spec)
    if out is not None:
        write_atomically(out, text)
    for warning in warnings:
        click.echo(f"campus-fleet: warning: {warning}", err=True)
    if as_json:
        emit_json(_as_json(spec, text, out, certificate, warnings))
    elif out is None:
        click.echo(text, nl=False)
    else:
        click.echo(str(out))


def check_tls_files(cafile: Path, certfile: Path, keyfile: Path) -> x509.Certificate:
    """The client certificate, after checking that all three files are what they claim."""
    try:
        if not x509.load_pem_x509_certificates(cafile.read_bytes()):
            raise ValueError("no certificate")
    except ValueError:
        raise BridgeError("--cafile", f"{cafile} holds no PEM certificate") from None
    try:
        certificate = x509.load_pem_x509_certificate(certfile.read_bytes())
    except ValueError:
        raise BridgeError("--certfile", f"{certfile} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(keyfile.read_bytes(), password=None)
    except TypeError:
        raise BridgeError(
            "--keyfile", f"{keyfile} is encrypted; a broker cannot ask for its passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise BridgeError("--keyfile", f"{keyfile} holds no PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        raise BridgeError("--keyfile", f"{keyfile} is not the key of {certfile}")
    return certificate


def common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def tls_warnings(certificate: x509.Certificate, site: str, keyfile: Path) -> list[str]:
    warnings: list[str] = []
    cn = common_name(certificate)
    if cn != site:
        warnings.append(
            f"the certificate's CN is {cn!r}, not the site id {site!r}: the cloud's ACL "
            f"must name it (user {cn}), a 'pattern … cloud/%u/#' rule will not match"
        )
    now = datetime.datetime.now(datetime.UTC)
    if certificate.not_valid_after_utc < now:
        warnings.append(f"the certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    elif certificate.not_valid_before_utc > now:
        warnings.append(
            f"the certificate is valid only from {certificate.not_valid_before_utc:%Y-%m-%d}"
        )
    if not readable_by(keyfile, MOSQUITTO_USER):
        warnings.append(
            f"the user {MOSQUITTO_USER!r} cannot read {keyfile}, and Mosquitto reads bridge keys "
            "after dropping to that user (unless its config says `user root`): "
            f"chgrp {MOSQUITTO_USER} {keyfile}; chmod 0640 {keyfile}"
        )
    return warnings


def readable_by(path: Path, user: str) -> bool:
    """By the file's mode bits; True when there is no such user (the broker runs as another)."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return True
    if account.pw_uid == 0:
        return True
    info = path.stat()
    if info.st_uid == account.pw_uid:
        return bool(info.st_mode & stat.S_IRUSR)
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def write_atomically(path: Path, text: str) -> None:
    """A broker restarting meanwhile reads the old file or the new one, never half of one."""
    if not path.parent.is_dir():
        fail(f"--out: directory {path.parent} does not exist", EXIT_USAGE)
    tmp: Path | None = None
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        tmp = Path(name)
        with os.fdopen(handle, "w") as file:
            file.write(text)
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        fail(f"cannot write {path}: {exc.strerror or exc}", EXIT_RUNTIME)


def _as_json(
    spec: BridgeSpec,
    text: str,
    out: Path | None,
    certificate: x509.Certificate,
    warnings: list[str],
) -> dict[str, Any]:
    return {
        "connection": spec.name,
        "site": spec.site,
        "cloud": {
            "host": spec.cloud.host,
            "port": spec.cloud.port,
            "address": spec.cloud.config_address,
        },
        "remote_clientid": spec.remote_clientid,
        "state_topic": spec.state_topic,
        "up": [
            {"local": m.local, "remote": m.remote} for m in spec.mappings() if m.direction == "out"
        ],
        "down": [
            {"remote": m.remote, "local": m.local} for m in spec.mappings() if m.direction == "in"
        ],
        "qos": 1,
        "certificate": {
            "subject_cn": common_name(certificate),
            "not_after": certificate.not_valid_after_utc.isoformat(),
        },
        "warnings": warnings,
        "out": str(out) if out is not None else None,
        "config": text,
    }
