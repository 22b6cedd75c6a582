#!/usr/bin/env python3
"""An order service in Python that publishes with Recheck — no Rust SDK, only the contract.

For each order, in this order (the one that survives a crash anywhere):
  1. publish the delayed CHECK (batched with concurrent orders) and wait for the broker's confirm;
  2. commit the order, with its message id, to the order table (SQLite);
  3. publish the business message (`order.created`), same message id, attempt 0.
A crash between 2 and 3 loses nothing: the CHECK comes due, the callback service finds no
confirm and calls this service's `ResendHook`, which republishes from the order table.
`--drop-every N` skips step 3 for every N-th order to show exactly that.

It also serves `recheck.v1.ResendHook` (stubs generated from proto/recheck/v1/hook.proto) on
`--grpc-addr` until SIGTERM / SIGINT.

    python producer.py --orders 100 --drop-every 10 --expect shipping
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sqlite3
import uuid
from pathlib import Path

import aio_pika
import grpc

import recheck_contract as rc

log = logging.getLogger("producer")

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    seq          INTEGER PRIMARY KEY,   -- order number, `order-<seq>` is the business key
    order_id     TEXT NOT NULL UNIQUE,
    message_id   TEXT NOT NULL UNIQUE,  -- the Recheck message id, committed with the order
    routing_key  TEXT NOT NULL,
    payload      BLOB NOT NULL,         -- exactly what was (or should have been) published
    created_at   INTEGER NOT NULL
)
"""


class OrderStore:
    """The producer's own database. Nothing Recheck-specific is written on the hot path beyond
    the message id column: the CHECK, not an outbox row, guarantees the publish.

    One connection, used only from the event loop thread; each call is short and synchronous, so
    no transaction spans an `await`."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(SCHEMA)

    def next_seq(self) -> int:
        (last,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM orders").fetchone()
        return last + 1

    def insert(self, seq: int, order_id: str, message_id: uuid.UUID, routing_key: str, payload: bytes) -> None:
        with self.db:  # BEGIN … COMMIT
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO orders (seq, order_id, message_id, routing_key, payload, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (seq, order_id, str(message_id), routing_key, payload, rc.now_ms()),
            )

    def payload(self, message_id: uuid.UUID) -> bytes | None:
        """The resend hook's one lookup: message id → payload, None if never committed."""
        row = self.db.execute("SELECT payload FROM orders WHERE message_id = ?", (str(message_id),)).fetchone()
        return row[0] if row else None


class CheckBatcher:
    """Group commit of CHECKs: checks submitted within `linger` (or until `max_items`) travel in
    one CHECK message, and every submitter returns once the broker confirmed that message. A
    batch of one is the degenerate case; batching is what keeps the pattern cheap."""

    def __init__(self, producer: "Producer", linger: float = 0.005, max_items: int = 500):
        self.producer = producer
        self.linger = linger
        self.max_items = max_items
        self.pending: list[tuple[dict, asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.flushes: set[asyncio.Task] = set()

    async def submit(self, check: dict) -> None:
        done = asyncio.get_running_loop().create_future()
        self.pending.append((check, done))
        if len(self.pending) >= self.max_items:
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.linger, self._flush)
        await done

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if batch:
            task = asyncio.create_task(self._publish(batch))
            self.flushes.add(task)
            task.add_done_callback(self.flushes.discard)

    async def _publish(self, batch: list[tuple[dict, asyncio.Future]]) -> None:
        try:
            await self.producer.publish_checks([check for check, _ in batch])
        except Exception as e:  # every submitter of the batch sees the failure
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
        else:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)


class Producer:
    def __init__(self, args: argparse.Namespace, topology: rc.Topology, publisher: rc.Publisher, store: OrderStore):
        self.name = args.producer
        self.routing_key = args.routing_key
        self.expect = args.expect or None
        self.check_delay_ms = args.check_delay_ms
        self.topology = topology
        self.publisher = publisher
        self.store = store
        self.checks = CheckBatcher(self)

    async def publish_checks(self, checks: list[dict]) -> None:
        """One CHECK message into the delay tier of the check delay (rounded up to a tier)."""
        tier = self.topology.tier_for(self.check_delay_ms)
        body = rc.check_batch(self.name, checks)
        await self.publisher.publish(
            self.topology.delay_exchange, self.topology.tier_routing_key(tier), rc.json_message(body)
        )

    async def publish_business(
        self, message_id: uuid.UUID, routing_key: str, business_key: str, payload: bytes, attempt: int
    ) -> None:
        message = rc.business_message(message_id, self.name, business_key, payload, attempt)
        await self.publisher.publish(self.topology.events_exchange, routing_key, message)

    async def create_order(self, seq: int, drop: bool) -> None:
        order_id = f"order-{seq}"
        payload = json.dumps({"order_id": order_id, "amount_cents": random.randint(100, 99_999)}).encode()
        message_id = rc.uuid7()
        # 1. The CHECK first, broker-confirmed: from here on the message cannot be lost.
        check = rc.check_entry(message_id, self.routing_key, order_id, rc.now_ms(), expect=self.expect)
        await self.checks.submit(check)
        # 2. The business transaction, storing the message id with the order.
        self.store.insert(seq, order_id, message_id, self.routing_key, payload)
        # 3. The business message. Skipped on purpose to simulate a crash right after the commit.
        if drop:
            log.info("%s committed, business message dropped (simulated crash) id=%s", order_id, message_id)
            return
        try:
            await self.publish_business(message_id, self.routing_key, order_id, payload, attempt=0)
        except Exception as e:  # safe to move on: the CHECK will have it resent
            log.warning("%s: publish after commit failed (%r); the CHECK will resend it", order_id, e)


def make_servicer(hook_pb2, hook_pb2_grpc, producer: Producer, grace_ms: int):
    """`recheck.v1.ResendHook` over the order table."""
    Outcome = hook_pb2.ResendOutcome

    class ResendHook(hook_pb2_grpc.ResendHookServicer):
        async def Resend(self, request, context):
            try:
                message_id = uuid.UUID(request.message_id)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"message_id {request.message_id!r} is not a UUID")
            if request.producer != producer.name:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"this hook serves producer {producer.name!r}, not {request.producer!r}",
                )
            outcome, reason = await self.decide(request, message_id)
            log.info(
                "resend %s attempt=%d → %s %s", request.message_id, request.attempt, Outcome.Name(outcome), reason
            )
            return hook_pb2.ResendResponse(outcome=outcome, reason=reason)

        async def decide(self, request, message_id: uuid.UUID) -> tuple[int, str]:
            try:
                payload = producer.store.payload(message_id)
            except sqlite3.Error as e:
                return Outcome.RESEND_OUTCOME_RETRY_LATER, f"lookup failed: {e}"
            if payload is None:
                # Not committed. Maybe not *yet* (the CHECK is published before the commit), so
                # within the grace period ask again later; after it, the transaction is gone for
                # good and the callback service marks the message void.
                born = request.published_at or rc.uuid7_ms(message_id) or 0
                age_ms = rc.now_ms() - born
                if age_ms < grace_ms:
                    return Outcome.RESEND_OUTCOME_RETRY_LATER, f"not committed yet ({age_ms} ms old)"
                return Outcome.RESEND_OUTCOME_NOT_FOUND, f"not committed after {age_ms} ms"
            try:
                # Same message id, the attempt the callback service asked for, routing and
                # business key as in the CHECK; answer only once the broker confirmed it.
                await producer.publish_business(
                    message_id, request.routing_key, request.business_key, payload, request.attempt
                )
            except Exception as e:
                return Outcome.RESEND_OUTCOME_RETRY_LATER, f"republish failed: {e!r}"
            return Outcome.RESEND_OUTCOME_RESENT, ""

    return ResendHook()


async def create_orders(producer: Producer, args: argparse.Namespace, stop: asyncio.Event) -> None:
    first = producer.store.next_seq()
    slots = asyncio.Semaphore(args.concurrency)

    async def one(seq: int) -> None:
        async with slots:
            if stop.is_set():
                return
            drop = args.drop_every > 0 and seq % args.drop_every == 0
            await producer.create_order(seq, drop)

    results = await asyncio.gather(*(one(seq) for seq in range(first, first + args.orders)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    for error in failed[:5]:
        log.error("order failed: %r", error)
    log.info("created %d orders (order-%d … order-%d), %d failed", args.orders - len(failed), first,
             first + args.orders - 1, len(failed))


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    rc.install_stop_signals(stop)
    hook_pb2, hook_pb2_grpc = rc.load_stubs("hook", args.proto_dir)
    store = OrderStore(args.db)
    topology = rc.Topology(args.prefix, rc.parse_tiers(args.delay_tiers))

    connection = await aio_pika.connect_robust(args.amqp_url, client_properties={"connection_name": args.producer})
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = await topology.declare(channel)
        producer = Producer(args, topology, rc.Publisher(exchanges), store)

        server = grpc.aio.server()
        hook_pb2_grpc.add_ResendHookServicer_to_server(make_servicer(hook_pb2, hook_pb2_grpc, producer, args.grace_ms), server)
        port = server.add_insecure_port(args.grpc_addr)
        await server.start()
        log.info("producer %r serving recheck.v1.ResendHook on port %d", producer.name, port)

        creating = asyncio.create_task(create_orders(producer, args, stop)) if args.orders else None
        await stop.wait()
        log.info("stopping")
        if creating:
            await creating  # in-flight orders finish; no new ones start
        await server.stop(grace=5)
    finally:
        await connection.close()
    return 0


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amqp-url", default=env("RECHECK_AMQP_URL", rc.DEFAULT_AMQP_URL), help="env RECHECK_AMQP_URL")
    p.add_argument("--prefix", default=env("RECHECK_PREFIX", "recheck"), help="env RECHECK_PREFIX")
    p.add_argument("--delay-tiers", default=env("RECHECK_DELAY_TIERS", rc.DEFAULT_TIERS),
                   help="must match the callback service's (env RECHECK_DELAY_TIERS)")
    p.add_argument("--check-delay", dest="check_delay_ms", type=rc.parse_duration_ms,
                   default=env("RECHECK_CHECK_DELAY", "30s"), help="delay of the first check, rounded up to a tier")
    p.add_argument("--grace", dest="grace_ms", type=rc.parse_duration_ms, default=env("RECHECK_GRACE", "1m"),
                   help="an unknown message id younger than this answers RETRY_LATER, older NOT_FOUND")
    p.add_argument("--producer", default=env("RECHECK_PRODUCER", "orders"),
                   help="producer name, as registered in the callback service (RECHECK_PRODUCERS)")
    p.add_argument("--grpc-addr", default=env("RECHECK_GRPC_ADDR", "127.0.0.1:50071"), help="ResendHook listener")
    p.add_argument("--db", default=env("ORDERS_DB", "orders.db"), help="SQLite file of the order table")
    p.add_argument("--routing-key", default="order.created", help="event type of the business messages")
    p.add_argument("--expect", action="append", default=[], metavar="CONSUMER",
                   help="a consumer that must confirm (repeatable); none = any one confirm suffices")
    p.add_argument("--orders", type=int, default=0, help="orders to create at start (0 = only serve the hook)")
    p.add_argument("--concurrency", type=int, default=16, help="orders in flight at once (their CHECKs share batches)")
    p.add_argument("--drop-every", type=int, default=0, metavar="N",
                   help="skip the business publish of every N-th order (a crash after commit)")
    p.add_argument("--proto-dir", type=Path, default=None, help="the repository's proto/ (default: found from here)")
    return p.parse_args()


if __name__ == "__main__":
    rc.setup_logging("producer")
    raise SystemExit(asyncio.run(main(parse_args())))
