"""CURVE keys for services that listen beyond loopback, and the loopback-only default.

A service binds to loopback unless configured otherwise. Binding any other interface requires CURVE: the server gets
its key pair and a folder of authorised client public keys (checked by ``zmq.auth.thread.ThreadAuthenticator``, as in
the zguide's ``ironhouse.py``), every client gets its own key pair and the server's public key. A bind beyond loopback
without keys raises :class:`InsecureBindError` before any socket is opened.

Key files are the ZeroMQ certificate files ``zmq.auth.create_certificates`` writes (``name.key`` public,
``name.key_secret`` public + secret); ``rt-mindeye`` never sends them over the wire.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from rt_mindeye.errors import ConfigError
from rt_mindeye.transport import protocol

__all__ = [
    "InsecureBindError", "KeyPair", "ServerSecurity", "ClientSecurity", "generate_keypair", "load_keypair",
    "load_public_key", "is_loopback", "check_bind", "bind", "connect", "generate_service_keys", "SERVICES",
]


class InsecureBindError(ConfigError):
    """A service was asked to listen beyond loopback without CURVE keys."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        super().__init__(None, "transport.endpoint",
                         f"{endpoint} listens beyond loopback: configure CURVE keys (transport.curve_keys_dir, "
                         "see docs/transport.md) or bind 127.0.0.1")


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 bytes (40 characters each)."""

    public: bytes
    secret: bytes = field(repr=False)


def generate_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` into ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    return Path(public_file), Path(secret_file)


SERVICES = ("scanner", "decoder", "console", "stimulus")


def generate_service_keys(directory: str | Path, services: tuple[str, ...] = SERVICES) -> Path:
    """One key pair per service in ``directory`` and every public key in ``directory/authorized_clients``.

    Every service may then act as a CURVE server (``ServerSecurity.from_dir(directory, name)``) and as a client
    of any other (``ClientSecurity.from_dir(directory, name, server)``). Copy to each host only its own
    ``.key_secret``, the public ``.key`` files and ``authorized_clients/``.
    """
    directory = Path(directory)
    clients = directory / "authorized_clients"
    clients.mkdir(parents=True, exist_ok=True)
    for name in services:
        public, _secret = generate_keypair(directory, name)
        (clients / public.name).write_bytes(public.read_bytes())
    return directory


def load_keypair(secret_file: str | Path) -> KeyPair:
    """The key pair stored in a ``.key_secret`` certificate file."""
    path = Path(secret_file)
    if not path.is_file():
        raise ConfigError(path, "transport.curve_keys_dir", "secret key file not found")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(path, "transport.curve_keys_dir", f"not a ZeroMQ certificate ({exc})") from None
    if secret is None:
        raise ConfigError(path, "transport.curve_keys_dir", "holds no secret key (a .key_secret file is needed)")
    return KeyPair(public=public, secret=secret)


def load_public_key(public_file: str | Path) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) certificate file."""
    path = Path(public_file)
    if not path.is_file():
        raise ConfigError(path, "transport.curve_keys_dir", "public key file not found")
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(path, "transport.curve_keys_dir", f"not a ZeroMQ certificate ({exc})") from None
    return public


@dataclass
class ServerSecurity:
    """Keys of a listening service and the folder of client public keys it accepts."""

    keys: KeyPair
    authorized_clients_dir: Path
    _authenticator: ThreadAuthenticator | None = field(default=None, repr=False)

    @classmethod
    def from_dir(cls, keys_dir: str | Path, name: str, clients_subdir: str = "authorized_clients") -> "ServerSecurity":
        """``keys_dir/name.key_secret`` plus the public keys in ``keys_dir/authorized_clients``."""
        keys_dir = Path(keys_dir)
        clients = keys_dir / clients_subdir
        if not clients.is_dir():
            raise ConfigError(clients, "transport.curve_keys_dir", "folder of authorised client keys not found")
        return cls(keys=load_keypair(keys_dir / f"{name}.key_secret"), authorized_clients_dir=clients)

    def apply(self, context: zmq.Context, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server; starts the context's authenticator on first use."""
        if self._authenticator is None:
            self._authenticator = ThreadAuthenticator(context)
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=str(self.authorized_clients_dir))
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_server = True

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


@dataclass(frozen=True)
class ClientSecurity:
    """Keys of a connecting service and the public key of the server it trusts."""

    keys: KeyPair
    server_public: bytes

    @classmethod
    def from_dir(cls, keys_dir: str | Path, name: str, server_name: str) -> "ClientSecurity":
        keys_dir = Path(keys_dir)
        return cls(keys=load_keypair(keys_dir / f"{name}.key_secret"),
                   server_public=load_public_key(keys_dir / f"{server_name}.key"))

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_serverkey = self.server_public


def is_loopback(endpoint: str) -> bool:
    """True for ``inproc://``, ``ipc://`` and tcp endpoints on 127.0.0.0/8, ::1 or localhost."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("inproc", "ipc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    if ";" in host:  # "source;dest" form of connect endpoints: judge the destination
        host = host.split(";", 1)[1]
    if host in protocol.LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name


def check_bind(endpoint: str, security: ServerSecurity | None) -> None:
    """Refuse to listen beyond loopback without CURVE keys."""
    if security is None and not is_loopback(endpoint):
        raise InsecureBindError(endpoint)


def bind(context: zmq.Context, socket: zmq.Socket, endpoint: str, security: ServerSecurity | None) -> None:
    """Bind ``socket`` to ``endpoint``, as a CURVE server when ``security`` is given; refuses insecure binds."""
    check_bind(endpoint, security)
    if security is not None:
        security.apply(context, socket)
    socket.bind(endpoint)


def connect(socket: zmq.Socket, endpoint: str, security: ClientSecurity | None) -> None:
    """Connect ``socket`` to ``endpoint``, as a CURVE client when ``security`` is given."""
    if security is not None:
        security.apply(socket)
    socket.connect(endpoint)

