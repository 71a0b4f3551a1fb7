"""Configuration of the transport (section ``transport`` of the session YAML).

Each service reads the same section, so the three services can run on one host (defaults: loopback) or on three
(set ``scanner_host`` / ``decoder_host`` to the addresses the others connect to, ``bind_host`` to the interface a
service listens on, and ``curve_keys_dir``: binding beyond loopback without keys is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rt_mindeye.config import setting
from rt_mindeye.transport import protocol

__all__ = ["TransportConfig", "server_security", "client_security"]

_ENDPOINT_PORTS = {
    "trials": ("scanner", "port_trials"),
    "scanner_pub": ("scanner", "port_scanner_pub"),
    "scanner_snapshot": ("scanner", "port_scanner_snapshot"),
    "stimulus": ("scanner", "port_stimulus"),
    "decoder_pub": ("decoder", "port_decoder_pub"),
    "decoder_snapshot": ("decoder", "port_decoder_snapshot"),
    "decoder_status": ("decoder", "port_decoder_status"),
    "feedback": ("decoder", "port_feedback"),
    "scanner_control": ("scanner", "port_scanner_control"),
}


@dataclass(frozen=True)
class TransportConfig:
    scanner_host: str = setting("127.0.0.1", "address the decoder, console and stimulus computer use to reach the "
                                             "scanner host")
    decoder_host: str = setting("127.0.0.1", "address the scanner host and console use to reach the decoder")
    bind_host: str = setting("127.0.0.1", "interface this service listens on; anything but loopback needs "
                                          "curve_keys_dir")
    port_trials: int = setting(protocol.PORT_TRIALS, "scanner ROUTER: reliable trial stream", min=1, max=65535)
    port_scanner_pub: int = setting(protocol.PORT_SCANNER_PUB, "scanner PUB: volume status, stimulus events",
                                    min=1, max=65535)
    port_scanner_snapshot: int = setting(protocol.PORT_SCANNER_SNAPSHOT, "scanner snapshot ROUTER", min=1,
                                         max=65535)
    port_stimulus: int = setting(protocol.PORT_STIMULUS, "scanner ROUTER for the stimulus computer", min=1,
                                 max=65535)
    port_decoder_pub: int = setting(protocol.PORT_DECODER_PUB, "decoder PUB: results", min=1, max=65535)
    port_decoder_snapshot: int = setting(protocol.PORT_DECODER_SNAPSHOT, "decoder snapshot ROUTER", min=1,
                                         max=65535)
    port_decoder_status: int = setting(protocol.PORT_DECODER_STATUS, "decoder REP: status / preflight ping / "
                                                                      "reload", min=1, max=65535)
    port_feedback: int = setting(protocol.PORT_FEEDBACK, "decoder ROUTER: feedback to the stimulus computer",
                                 min=1, max=65535)
    port_scanner_control: int = setting(protocol.PORT_SCANNER_CONTROL, "scanner REP: status / reload", min=1,
                                        max=65535)
    curve_keys_dir: Path | None = setting(None, "folder of CURVE certificates (scanner, decoder, console, stimulus "
                                                "*.key / *.key_secret and authorized_clients/); None = loopback only")
    heartbeat_interval_s: float = setting(protocol.HEARTBEAT_INTERVAL_S, "seconds between heartbeats", min=0.01,
                                          max=60.0)
    heartbeat_liveness: int = setting(protocol.HEARTBEAT_LIVENESS, "silent heartbeat intervals before a peer is "
                                                                   "dead", min=1, max=100)
    send_hwm: int = setting(protocol.SEND_HWM, "send high-water mark (messages)", min=1)
    journal_fsync: bool = setting(True, "fsync the trial journal before each send (survives power loss)")
    recon_policy: str = setting("newest", "reconstruction policy when the decoder falls behind",
                                choices=protocol.RECON_POLICIES)
    recon_max_pending: int = setting(2, "reconstructions allowed to wait (newest / skip policies)", min=1)

    def bind_endpoint(self, name: str) -> str:
        """``tcp://bind_host:port`` for the socket ``name`` (trials, scanner_pub, ..., decoder_status)."""
        _, port = _ENDPOINT_PORTS[name]
        return f"tcp://{_host(self.bind_host)}:{getattr(self, port)}"

    def connect_endpoint(self, name: str) -> str:
        """``tcp://<scanner_host or decoder_host>:port`` for the socket ``name``."""
        owner, port = _ENDPOINT_PORTS[name]
        host = self.scanner_host if owner == "scanner" else self.decoder_host
        return f"tcp://{_host(host)}:{getattr(self, port)}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def server_security(config: TransportConfig, name: str):
    """CURVE server keys of service ``name`` from ``curve_keys_dir`` (None when the config has no keys)."""
    from rt_mindeye.transport.security import ServerSecurity

    return None if config.curve_keys_dir is None else ServerSecurity.from_dir(config.curve_keys_dir, name)


def client_security(config: TransportConfig, name: str, server: str):
    """CURVE client keys of ``name`` trusting server ``server`` (None when the config has no keys)."""
    from rt_mindeye.transport.security import ClientSecurity

    return None if config.curve_keys_dir is None else ClientSecurity.from_dir(config.curve_keys_dir, name, server)
