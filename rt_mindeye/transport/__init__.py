"""rt_mindeye.transport: ZeroMQ messages and channels between the scanner host, the decoder and the console.

No torch here (the console host does not need it). See docs/transport.md for the wire format.
"""

from rt_mindeye.transport.channel import PeerEvent, ReliableReceiver, ReliableSender
from rt_mindeye.transport.config import TransportConfig, client_security, server_security
from rt_mindeye.transport.journal import Journal, JournalError, read_journal
from rt_mindeye.transport.messages import (
    SCHEMA_VERSION, Ack, DecodeResult, Heartbeat, Message, RunTrigger, StatusReply, StatusRequest, StimulusEvent,
    TrialBetas, VolumeStatus, decode, encode,
)
from rt_mindeye.transport.policy import ReconstructionQueue
from rt_mindeye.transport.pubsub import Delivery, SnapshotPublisher, SnapshotSubscriber, Source
from rt_mindeye.transport.reqrep import LazyPirateClient, StatusServer
from rt_mindeye.transport.security import (
    ClientSecurity, InsecureBindError, ServerSecurity, generate_keypair, generate_service_keys,
)
from rt_mindeye.transport.stimulus import StimulusEventServer
from rt_mindeye.transport.stimulus_client import StimulusClient

__all__ = [
    "SCHEMA_VERSION", "Message", "VolumeStatus", "TrialBetas", "DecodeResult", "Heartbeat", "StimulusEvent",
    "RunTrigger", "Ack", "StatusRequest", "StatusReply", "encode", "decode", "Journal", "JournalError",
    "read_journal", "ReliableSender", "ReliableReceiver", "PeerEvent", "SnapshotPublisher", "SnapshotSubscriber",
    "Source", "Delivery", "LazyPirateClient", "StatusServer", "ServerSecurity", "ClientSecurity",
    "InsecureBindError", "generate_keypair", "ReconstructionQueue", "StimulusEventServer", "StimulusClient",
    "TransportConfig", "server_security", "client_security", "generate_service_keys",
]
