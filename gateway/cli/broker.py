"""`iotgw broker`: a deployment's broker certificate and the gateway's login."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.adapters.certs import ensure_certificates
from gateway.adapters.mosquitto_auth import GATEWAY_USER, PasswordFile
from gateway.cli.terminal import console
from gateway.errors import IotgwError
from gateway.settings import load_settings

__all__ = ["broker_app"]

broker_app = typer.Typer(
    help="The MQTT broker's TLS certificate and the gateway's login (deployments).",
    no_args_is_help=True,
)


@broker_app.command("init")
def broker_init(
    certs_dir: Annotated[
        Path, typer.Option(help="Where ca.crt, ca.key, server.crt and server.key live.")
    ],
    host: Annotated[
        list[str], typer.Option(help="A name (or IP) devices reach the broker by; repeatable.")
    ],
    ca_key_dir: Annotated[
        Path | None,
        typer.Option(help="Keep ca.key here instead, out of what the broker mounts."),
    ] = None,
) -> None:
    """Make the CA (once) and the broker's server certificate, and store the gateway's login
    (the user and password of IOTGW_MQTT_URL) in IOTGW_MQTT_PASSWORD_FILE.

    The local stack does this itself; Docker Compose runs it before Mosquitto starts.
    """
    settings = load_settings()
    endpoint = settings.mqtt
    if settings.mqtt_password_file is None:
        raise IotgwError("set IOTGW_MQTT_PASSWORD_FILE: the broker's password file", exit_code=2)
    if endpoint.username != GATEWAY_USER or endpoint.password is None:
        raise IotgwError(
            f"IOTGW_MQTT_URL must log in as {GATEWAY_USER} with a password "
            f"(mqtts://{GATEWAY_USER}:PASSWORD@HOST:8883): the ACL gives that user "
            "the gateway's rights",
            exit_code=2,
        )
    files = ensure_certificates(certs_dir, host, key_folder=ca_key_dir)
    passwords = PasswordFile(settings.mqtt_password_file)
    password = endpoint.password.get_secret_value()
    if not passwords.check(GATEWAY_USER, password):
        passwords.set(GATEWAY_USER, password)
    console.print(
        f"CA {files.ca_cert} (give it to devices); server certificate for {', '.join(host)}; "
        f"gateway login {GATEWAY_USER} in {passwords.path}",
        highlight=False,
        soft_wrap=True,
    )
