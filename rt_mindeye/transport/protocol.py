"""Protocol constants of the rt-mindeye wire: topics, commands, timeouts, heartbeat and back-off intervals.

Every byte string and every interval the transport uses is named here (as ``MDP.py`` does in the zguide), so the
message codecs, the reliable channel, the publishers and the console agree on one table, and ``docs/transport.md``
can point at a single module. Nothing here imports numpy or zmq: the stand-alone stimulus client mirrors the few
constants it needs and a test checks that the copies agree.
"""

from __future__ import annotations

# --- schema --------------------------------------------------------------------------------------------------------

#: Version of the message schema. A receiver refuses a message with another version (MessageError("schema_version")).
SCHEMA_VERSION = 1

#: Magic of the JSON header: the header object's "proto" key.
PROTOCOL_NAME = "rtm"

# --- topics (frame 0 of every message) ------------------------------------------------------------------------------

TOPIC_VOLUME = b"volume"          # VolumeStatus: scanner -> console, once per volume
TOPIC_TRIAL = b"trial"            # TrialBetas: scanner -> decoder (reliable channel), and optionally to the console
TOPIC_RESULT = b"result"          # DecodeResult: decoder -> console
TOPIC_HEARTBEAT = b"hb"           # Heartbeat: every service, every stream, both directions
TOPIC_STIMULUS = b"stim"          # StimulusEvent: stimulus computer -> scanner host (and republished to the console)
TOPIC_TRIGGER = b"trigger"        # RunTrigger: stimulus computer saw the scanner trigger
TOPIC_DESIGN = b"design"          # DesignNotice: scanner -> console, the live events against the plan, the run's clock
TOPIC_ACK = b"ack"                # Ack: receiver -> sender acknowledgement (and catch-up request)
TOPIC_STATUS_REQUEST = b"status?"  # StatusRequest: Lazy Pirate request
TOPIC_STATUS_REPLY = b"status"    # StatusReply: its reply, echoing the request's seq
TOPIC_FEEDBACK = b"feedback"      # Feedback: decoder -> stimulus computer (reliable, journalled), and to the console

# Snapshot protocol of the late-join publishers (clone pattern: ICANHAZ? ... KTHXBAI).
SNAPSHOT_REQUEST = b"ICANHAZ?"
SNAPSHOT_END = b"KTHXBAI"

# --- heartbeats and liveness ----------------------------------------------------------------------------------------

#: Seconds between heartbeats on every stream.
HEARTBEAT_INTERVAL_S = 0.5
#: Heartbeat intervals without any message before a peer is declared dead (dead after interval * liveness seconds).
HEARTBEAT_LIVENESS = 3
#: First and largest wait before a reconnect (doubling in between), as in the Paranoid Pirate worker.
RECONNECT_INTERVAL_INIT_S = 0.25
RECONNECT_INTERVAL_MAX_S = 8.0

# --- request / reply (Lazy Pirate) ---------------------------------------------------------------------------------

REQUEST_TIMEOUT_S = 2.5
REQUEST_RETRIES = 3

# --- socket options ------------------------------------------------------------------------------------------------

#: High-water mark (messages) of the sending sockets. Beyond it a send fails with EAGAIN instead of blocking; the
#: reliable channel keeps the message in its journal-backed outbox and tries again later.
SEND_HWM = 1000
#: Milliseconds a closing socket may keep trying to deliver queued messages. The journal owns delivery, so 0.
LINGER_MS = 0
#: How long an agent thread waits on its sockets at most before it checks its clocks (seconds).
AGENT_POLL_S = 0.05
#: Late-join history a publisher keeps for its snapshot (messages).
SNAPSHOT_HISTORY = 5000

# --- default ports (one per service socket) ------------------------------------------------------------------------

PORT_TRIALS = 5555            # scanner host, ROUTER: reliable TrialBetas stream to the decoder
PORT_SCANNER_PUB = 5556       # scanner host, PUB: VolumeStatus, StimulusEvent, Heartbeat for the console
PORT_SCANNER_SNAPSHOT = 5557  # scanner host, ROUTER: late-join snapshot of the above
PORT_DECODER_PUB = 5558       # decoder host, PUB: DecodeResult, Heartbeat
PORT_DECODER_SNAPSHOT = 5559  # decoder host, ROUTER: late-join snapshot of the above
PORT_STIMULUS = 5560          # scanner host, ROUTER: stimulus events from the stimulus computer
PORT_DECODER_STATUS = 5561    # decoder host, REP: status / preflight ping / reload (Lazy Pirate)
PORT_FEEDBACK = 5562          # decoder host, ROUTER: reliable feedback stream to the stimulus computer
PORT_SCANNER_CONTROL = 5563   # scanner host, REP: status / reload (Lazy Pirate)

#: Hosts that count as loopback: a service may listen there without CURVE keys.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

# --- service states carried by heartbeats ---------------------------------------------------------------------------

STATE_STARTING = "starting"
STATE_READY = "ready"
STATE_BUSY = "busy"
STATE_STOPPING = "stopping"
#: Sent by a reliable sender to a receiver it holds no cursor for: "send me your catch-up request".
STATE_NEED_SYNC = "need-sync"
#: The last heartbeat of a publisher that is closing normally: the console shows "stopped", not "DEAD".
STATE_STOPPED = "stopped"
#: A service whose work is done (the scanner host after its live runs); also a normal end.
STATE_SESSION_DONE = "session-done"
#: Heartbeat states after which silence is a normal stop.
STOPPED_STATES = (STATE_STOPPED, STATE_SESSION_DONE)

#: Feedback.status: the result reached the decoder's feedback stream within the policy's deadline, or after it.
FEEDBACK_ON_TIME = "on_time"
FEEDBACK_LATE = "late"
FEEDBACK_STATUSES = (FEEDBACK_ON_TIME, FEEDBACK_LATE)

#: Replies to a control request (StatusReply.state): taken (and applied between runs) or refused (details["error"]).
STATE_ACCEPTED = "accepted"
STATE_REFUSED = "refused"

#: Reconstruction policies of the decoder (ReconstructionQueue), shown on the console.
RECON_POLICIES = ("newest", "skip", "fifo")
