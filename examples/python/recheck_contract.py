"""Recheck's wire contract (version 1), in Python.

Everything a producer or consumer in another language must get exactly right is here: the
broker topology (names and queue arguments), the business-message headers, the CHECK and CONFIRM
batch formats, and the gRPC stubs of `recheck.v1.ResendHook`, generated at run time from the
repository's `.proto` files. The reference is the Rust SDK (`recheck/src/broker/topology.rs`,
`recheck/src/wire/message.rs`, `recheck/src/producer/`): the callback service accepts what it writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType
from aio_pika.exceptions import AMQPError, PublishError

log = logging.getLogger("recheck")

VERSION = 1
CONTENT_TYPE_JSON = "application/json"

# Business message headers. The AMQP `message_id` property carries the message id itself.
HEADER_PRODUCER = "x-recheck-producer"
HEADER_BUSINESS_KEY = "x-recheck-business-key"
# 0 = the original, n = the n-th resend (an integer; any AMQP integer width is accepted).
HEADER_ATTEMPT = "x-recheck-attempt"
# Set on a copy sent to the parking exchange: why, and from which queue.
HEADER_PARK_REASON = "x-recheck-park-reason"
HEADER_PARK_SOURCE = "x-recheck-park-source"

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
DEFAULT_TIERS = "5s,30s,2m,10m,1h"
# Redeliveries of one message on a guarded queue before the broker parks it (Topology::delivery_limit).
DELIVERY_LIMIT = 10


def now_ms() -> int:
    """Milliseconds since the Unix epoch: the one clock unit on the wire."""
    return time.time_ns() // 1_000_000


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits.

    Message ids are UUIDv7 so they sort by creation time and carry it (the hook falls back to
    it when a request has no `published_at`). Python has `uuid.uuid7` only from 3.14.
    """
    value = (now_ms() & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def uuid7_ms(message_id: uuid.UUID) -> int | None:
    """The creation time a UUIDv7 carries, ms since the epoch."""
    return message_id.int >> 80 if message_id.version == 7 else None


# ─── durations and delay tiers ────────────────────────────────────────────────────────────────

_SCALE_MS = {"ms": 1, "": 1_000, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """`250ms`, `5s`, `2m`, `1h`, `7d` (a bare number is seconds), as milliseconds."""
    text = text.strip()
    digits = len(text) - len(text.lstrip("0123456789"))
    number, unit = text[:digits], text[digits:]
    if not number or unit not in _SCALE_MS:
        raise ValueError(f"invalid duration {text!r} (use ms, s, m, h or d)")
    return int(number) * _SCALE_MS[unit]


def parse_tiers(text: str) -> list[int]:
    """A tier list such as `1s,30s,2m`, as sorted, distinct milliseconds."""
    return sorted({parse_duration_ms(t) for t in text.split(",") if t.strip()})


def tier_name(ms: int) -> str:
    """`1500ms`, `5s`, `2m`, `1h`: a tier's name, as in `recheck.checks.delay.<name>`."""
    for unit, scale in (("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if ms and ms % scale == 0:
            return f"{ms // scale}{unit}"
    return f"{ms}ms"


# ─── topology ─────────────────────────────────────────────────────────────────────────────────


def _quorum() -> dict:
    return {"x-queue-type": "quorum"}


def _dead_letter_to(args: dict, exchange: str) -> dict:
    # At-least-once dead-lettering: a message leaves its queue only once the target confirmed
    # it. RabbitMQ requires `reject-publish` overflow for that strategy.
    args.update(
        {
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    )
    return args


@dataclass
class Topology:
    """The exchanges and queues of one Recheck installation (`Topology` in the Rust SDK).

    Every component declares all of it at start; the arguments must be exactly those of the
    Rust SDK, or the broker refuses the declaration (PRECONDITION_FAILED). All queues are
    durable quorum queues.
    """

    prefix: str = "recheck"
    tiers_ms: list[int] = field(default_factory=lambda: parse_tiers(DEFAULT_TIERS))

    @property
    def events_exchange(self) -> str:  # topic: business messages, routing key = event type
        return f"{self.prefix}.events"

    @property
    def delay_exchange(self) -> str:  # direct: routing key = tier name → that tier's queue
        return f"{self.prefix}.checks.delay"

    @property
    def checks_exchange(self) -> str:  # fanout: due checks (the callback service consumes them)
        return f"{self.prefix}.checks"

    @property
    def confirms_exchange(self) -> str:  # fanout: CONFIRM messages
        return f"{self.prefix}.confirms"

    @property
    def parking_exchange(self) -> str:  # fanout: poison / malformed messages, with a reason
        return f"{self.prefix}.parking"

    def tier_queue(self, tier_ms: int) -> str:
        return f"{self.prefix}.checks.delay.{tier_name(tier_ms)}"

    def tier_for(self, delay_ms: int) -> int:
        """The smallest tier ≥ the delay (the largest tier when the delay exceeds them all)."""
        return next((t for t in self.tiers_ms if t >= delay_ms), self.tiers_ms[-1])

    def tier_routing_key(self, tier_ms: int) -> str:
        """Routing key on the delay exchange that selects a tier's queue (the tier's name)."""
        return tier_name(tier_ms)

    def _poison_guarded(self) -> dict:
        """Queues whose consumer may fail on a message: park it after `DELIVERY_LIMIT` redeliveries."""
        return _dead_letter_to(_quorum() | {"x-delivery-limit": DELIVERY_LIMIT}, self.parking_exchange)

    async def declare(self, channel: AbstractChannel) -> dict[str, AbstractExchange]:
        """Declares every exchange and queue (idempotent); returns the exchanges by name."""
        exchanges = {}
        for name, kind in (
            (self.events_exchange, ExchangeType.TOPIC),
            (self.delay_exchange, ExchangeType.DIRECT),
            (self.checks_exchange, ExchangeType.FANOUT),
            (self.confirms_exchange, ExchangeType.FANOUT),
            (self.parking_exchange, ExchangeType.FANOUT),
        ):
            exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
        # Parking keeps what it gets: no limit, no dead-lettering.
        await _bound_queue(channel, self.parking_exchange, exchanges[self.parking_exchange], "", _quorum())
        for name in (self.checks_exchange, self.confirms_exchange):
            await _bound_queue(channel, name, exchanges[name], "", self._poison_guarded())
        # One queue per delay tier, with a queue TTL (never a per-message TTL, which blocks at
        # the head of a queue), dead-lettered into the checks exchange when it expires.
        for tier in self.tiers_ms:
            args = _dead_letter_to(_quorum() | {"x-message-ttl": tier}, self.checks_exchange)
            await _bound_queue(
                channel, self.tier_queue(tier), exchanges[self.delay_exchange], self.tier_routing_key(tier), args
            )
        return exchanges

    async def declare_consumer_queue(
        self, channel: AbstractChannel, queue: str, routing_keys: list[str]
    ) -> AbstractQueue:
        """A consumer's own queue, bound to the events exchange by event type, poison-guarded."""
        events = await channel.declare_exchange(self.events_exchange, ExchangeType.TOPIC, durable=True)
        declared = None
        for key in routing_keys:
            declared = await _bound_queue(channel, queue, events, key, self._poison_guarded())
        assert declared is not None, "a consumer queue needs at least one routing key"
        return declared


async def _bound_queue(
    channel: AbstractChannel, name: str, exchange: AbstractExchange, routing_key: str, args: dict
) -> AbstractQueue:
    queue = await channel.declare_queue(name, durable=True, arguments=args)
    await queue.bind(exchange, routing_key)
    return queue


# ─── messages ─────────────────────────────────────────────────────────────────────────────────


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def check_entry(
    message_id: uuid.UUID,
    routing_key: str,
    business_key: str,
    published_at: int,
    attempt: int = 0,
    expect: list[str] | None = None,
) -> dict:
    """One check of a CHECK batch. `expect` names the consumers that must confirm (None = any)."""
    entry = {
        "message_id": str(message_id),
        "routing_key": routing_key,
        "business_key": business_key,
        "attempt": attempt,
        "published_at": published_at,  # ms since the epoch, when the producer prepared it
    }
    if expect:
        entry["expect"] = list(expect)
    return entry


def check_batch(producer: str, checks: list[dict]) -> bytes:
    """A CHECK message body: `{"v":1,"producer":…,"checks":[…]}`, each message id at most once."""
    return _json({"v": VERSION, "producer": producer, "checks": checks})


def confirm_entry(message_id: uuid.UUID, outcome: str, detail: str | None = None) -> dict:
    """One confirm: outcome `processed`, `duplicate` or `rejected` (stop resending, surface it)."""
    assert outcome in ("processed", "duplicate", "rejected"), outcome
    entry = {"message_id": str(message_id), "outcome": outcome, "processed_at": now_ms()}
    if detail is not None:
        entry["detail"] = detail
    return entry


def confirm_batch(consumer: str, confirms: list[dict]) -> bytes:
    """A CONFIRM message body: `{"v":1,"consumer":…,"confirms":[…]}`, each id at most once."""
    return _json({"v": VERSION, "consumer": consumer, "confirms": confirms})


def json_message(body: bytes) -> aio_pika.Message:
    """A CHECK or CONFIRM message: JSON, persistent, its own (batch) message id."""
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE_JSON,
        message_id=str(uuid7()),
        timestamp=time.time(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def business_message(
    message_id: uuid.UUID, producer: str, business_key: str, payload: bytes, attempt: int
) -> aio_pika.Message:
    """A business message: the payload as is, the message id as the AMQP `message_id` (the same
    for the original and every resend), and the Recheck headers."""
    return aio_pika.Message(
        payload,
        message_id=str(message_id),
        headers={HEADER_PRODUCER: producer, HEADER_BUSINESS_KEY: business_key, HEADER_ATTEMPT: attempt},
        timestamp=time.time(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


@dataclass
class BusinessHeaders:
    """The Recheck identity of a delivered business message."""

    message_id: uuid.UUID
    producer: str
    business_key: str
    attempt: int

    @classmethod
    def parse(cls, message: aio_pika.abc.AbstractIncomingMessage) -> BusinessHeaders:
        """Raises ValueError naming what is wrong (the consumer parks such a message)."""
        if not message.message_id:
            raise ValueError("missing message_id")
        try:
            message_id = uuid.UUID(message.message_id)
        except ValueError:
            raise ValueError(f"message id {message.message_id!r} is not a UUID") from None
        headers = message.headers or {}
        producer = _text(headers.get(HEADER_PRODUCER))
        if not producer:
            raise ValueError(f"missing header {HEADER_PRODUCER}")
        attempt = headers.get(HEADER_ATTEMPT, 0)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt < 2**32:
            raise ValueError(f"header {HEADER_ATTEMPT} is invalid: {attempt!r}")
        return cls(message_id, producer, _text(headers.get(HEADER_BUSINESS_KEY)) or "", attempt)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


# ─── publishing ───────────────────────────────────────────────────────────────────────────────


class Publisher:
    """Broker-confirmed publishing: every publish waits for the broker's ack, is mandatory (an
    unroutable message is an error, never a success) and is retried on a nack, a confirm
    timeout or a lost connection until `publish_timeout`. Publishing is therefore
    at-least-once; consumers dedupe by message id.

    The channel must be opened with `publisher_confirms=True, on_return_raises=True`.
    """

    def __init__(
        self,
        exchanges: dict[str, AbstractExchange],
        confirm_timeout: float = 10.0,
        publish_timeout: float = 60.0,
    ):
        self.exchanges = exchanges
        self.confirm_timeout = confirm_timeout
        self.publish_timeout = publish_timeout

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        backoff = 0.05
        while True:
            try:
                await self.exchanges[exchange].publish(
                    message, routing_key, mandatory=True, timeout=self.confirm_timeout
                )
                return
            except PublishError:
                raise  # returned as unroutable: a topology problem, retrying will not help
            except (AMQPError, ConnectionError, asyncio.TimeoutError) as e:
                if loop.time() + backoff >= deadline:
                    raise
                log.warning("publish to %s failed (%r); republishing", exchange, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


# ─── gRPC stubs from the .proto ───────────────────────────────────────────────────────────────


def default_proto_dir() -> Path:
    """`proto/` of the repository this file is in (`examples/python/` → `../../proto`)."""
    return Path(os.environ.get("RECHECK_PROTO_DIR") or Path(__file__).resolve().parents[2] / "proto")


def load_stubs(name: str = "hook", proto_dir: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """`(recheck.v1.<name>_pb2, recheck.v1.<name>_pb2_grpc)`, generated from
    `proto/recheck/v1/<name>.proto` with grpcio-tools' bundled protoc (no system protoc, nothing
    committed) into a cache directory keyed by the .proto's content."""
    from grpc_tools import protoc  # imported here: only the producer (and admin clients) need it

    proto_dir = Path(proto_dir or default_proto_dir())
    relative = f"recheck/v1/{name}.proto"
    source = proto_dir / relative
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"recheck-python-stubs-{name}-{digest}"
    if not out.is_dir():
        # Generate beside the final place, then rename: concurrent processes never see half.
        staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        include = Path(protoc.__file__).parent / "_proto"  # the well-known types
        argv = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={staging}", f"--grpc_python_out={staging}"]
        if protoc.main([*argv, str(source)]) != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"protoc failed on {source}")
        try:
            staging.rename(out)
        except OSError:  # another process was first: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return (
        importlib.import_module(f"recheck.v1.{name}_pb2"),
        importlib.import_module(f"recheck.v1.{name}_pb2_grpc"),
    )


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`: the service finishes what it holds and exits cleanly."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def setup_logging(name: str) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s {name}: %(message)s",
        stream=sys.stderr,
    )
    # aio-pika / aiormq log every reconnect attempt at length; warnings are enough here.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
