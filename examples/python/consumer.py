#!/usr/bin/env python3
"""A shipping service in Python that consumes Recheck business messages — only the contract.

Per delivery, in this order (the one that makes redelivery and resends harmless):
  1. one SQLite transaction: claim the message id in the inbox (`recheck_inbox`), and only if
     the claim is new, apply the effect (a row in `shipments`) — commit both or neither;
  2. publish a CONFIRM (`processed`, `duplicate` for a message seen before, or `rejected`) and
     wait for the broker's confirm;
  3. ack the delivery.
A crash anywhere before 3 means a redelivery, which the inbox turns into a `duplicate` confirm,
never a second shipment. A message without valid Recheck headers is parked (copied to the
parking exchange with the reason), then acked.

    python consumer.py --consumer shipping --queue shipping.order-created
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

import recheck_contract as rc

log = logging.getLogger("consumer")

SCHEMA = [
    # The inbox, the same table as the Rust SDK's `recheck::inbox`: one row per (consumer,
    # message id); `seen` counts deliveries, so duplicates absorbed are visible.
    """CREATE TABLE IF NOT EXISTS recheck_inbox (
        consumer TEXT NOT NULL,
        message_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT,
        seen BIGINT NOT NULL DEFAULT 1,
        processed_at BIGINT NOT NULL,
        PRIMARY KEY (consumer, message_id)
    )""",
    # The business effect. Deliberately no unique key on the order: exactly-once comes from the
    # inbox, and a double effect would show here as two rows.
    """CREATE TABLE IF NOT EXISTS shipments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,      -- the x-recheck-attempt of the delivery that shipped it
        amount_cents INTEGER NOT NULL,
        shipped_at BIGINT NOT NULL
    )""",
]


class Store:
    """Inbox + effect in one SQLite database. Used from the event loop thread only; `process`
    never awaits inside its transaction, so concurrent deliveries cannot interleave in it."""

    def __init__(self, path: str, consumer: str):
        self.consumer = consumer
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
            self.db.execute(statement)

    def process(self, headers: rc.BusinessHeaders, body: bytes) -> tuple[str, str | None]:
        """Step 1: returns the outcome to confirm and its detail."""
        with self.db:  # BEGIN … COMMIT, or ROLLBACK on an exception
            self.db.execute("BEGIN IMMEDIATE")
            # Claim first: a second delivery of the id only bumps `seen`.
            (seen,) = self.db.execute(
                "INSERT INTO recheck_inbox (consumer, message_id, outcome, processed_at) VALUES (?, ?, 'processed', ?)"
                " ON CONFLICT (consumer, message_id) DO UPDATE SET seen = recheck_inbox.seen + 1 RETURNING seen",
                (self.consumer, str(headers.message_id), rc.now_ms()),
            ).fetchone()
            if seen > 1:
                # Seen before: confirm again, never apply again. A rejection stays a rejection.
                outcome, detail = self.db.execute(
                    "SELECT outcome, detail FROM recheck_inbox WHERE consumer = ? AND message_id = ?",
                    (self.consumer, str(headers.message_id)),
                ).fetchone()
                return ("rejected", detail) if outcome == "rejected" else ("duplicate", None)
            try:
                order = json.loads(body)
                order_id, amount = str(order["order_id"]), int(order["amount_cents"])
            except (ValueError, KeyError, TypeError) as e:
                # A business refusal, not a transient failure: confirmed `rejected`, never resent.
                detail = f"not an order: {e!r}"
                self.db.execute(
                    "UPDATE recheck_inbox SET outcome = 'rejected', detail = ? WHERE consumer = ? AND message_id = ?",
                    (detail, self.consumer, str(headers.message_id)),
                )
                return "rejected", detail
            self.db.execute(
                "INSERT INTO shipments (order_id, message_id, attempt, amount_cents, shipped_at) VALUES (?, ?, ?, ?, ?)",
                (order_id, str(headers.message_id), headers.attempt, amount, rc.now_ms()),
            )
            return "processed", None


class Consumer:
    def __init__(self, args: argparse.Namespace, topology: rc.Topology, publisher: rc.Publisher, store: Store):
        self.name = args.consumer
        self.queue = args.queue
        self.topology = topology
        self.publisher = publisher
        self.store = store
        self.in_flight: set[asyncio.Task] = set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.in_flight.add(asyncio.current_task())
        try:
            await self.handle(message)
        finally:
            self.in_flight.discard(asyncio.current_task())

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            headers = rc.BusinessHeaders.parse(message)
        except ValueError as e:
            await self.park(message, str(e))
            return
        try:
            outcome, detail = self.store.process(headers, message.body)  # 1. inbox + effect, committed
            confirm = rc.confirm_entry(headers.message_id, outcome, detail)
            body = rc.confirm_batch(self.name, [confirm])
            await self.publisher.publish(self.topology.confirms_exchange, "", rc.json_message(body))  # 2. CONFIRM
        except Exception as e:
            # Transient (store busy, broker away): redeliver. The queue's delivery limit parks a
            # message that keeps failing; the inbox absorbs a redelivery of a committed one.
            log.warning("message %s failed (%r); redelivering", headers.message_id, e)
            await message.nack(requeue=True)
            return
        await message.ack()  # 3. only now
        level = logging.INFO if headers.attempt or outcome != "processed" else logging.DEBUG
        log.log(level, "%s %s attempt=%d → %s", headers.business_key, headers.message_id, headers.attempt, outcome)

    async def park(self, message: AbstractIncomingMessage, reason: str) -> None:
        """A copy to the parking exchange with the reason, then ack: nothing is dropped silently."""
        log.warning("parking a message from %s: %s", self.queue, reason)
        headers = dict(message.headers or {})
        headers[rc.HEADER_PARK_REASON] = reason
        headers[rc.HEADER_PARK_SOURCE] = self.queue
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
            timestamp=message.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self.publisher.publish(self.topology.parking_exchange, message.routing_key or "", copy)
        except Exception as e:
            log.warning("parking failed (%r); redelivering", e)
            await message.nack(requeue=True)
            return
        await message.ack()


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    rc.install_stop_signals(stop)
    store = Store(args.db, args.consumer)
    topology = rc.Topology(args.prefix, rc.parse_tiers(args.delay_tiers))

    connection = await aio_pika.connect_robust(args.amqp_url, client_properties={"connection_name": args.consumer})
    try:
        # One channel to publish CONFIRMs (and parked copies) with confirms, one to consume.
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = await topology.declare(publish_channel)
        consumer = Consumer(args, topology, rc.Publisher(exchanges), store)

        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=args.prefetch)
        queue = await topology.declare_consumer_queue(consume_channel, args.queue, args.routing_key)
        tag = await queue.consume(consumer.on_message, no_ack=False)
        log.info("consumer %r reading %s (%s)", args.consumer, args.queue, ", ".join(args.routing_key))

        await stop.wait()
        log.info("stopping")
        await queue.cancel(tag)  # no new deliveries; the unacked ones go back to the queue on close
        if consumer.in_flight:
            await asyncio.wait(consumer.in_flight, timeout=10)
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
    p.add_argument("--consumer", default=env("RECHECK_CONSUMER", "shipping"),
                   help="this consumer's name in CONFIRMs and the inbox (what producers --expect)")
    p.add_argument("--queue", default=env("RECHECK_QUEUE", "shipping.order-created"), help="its own queue")
    p.add_argument("--routing-key", action="append", default=None, metavar="KEY",
                   help="event type to bind (repeatable; default order.created)")
    p.add_argument("--db", default=env("SHIPPING_DB", "shipping.db"), help="SQLite file of the inbox and shipments")
    p.add_argument("--prefetch", type=int, default=64, help="unacked deliveries at once")
    args = p.parse_args()
    args.routing_key = args.routing_key or ["order.created"]
    return args


if __name__ == "__main__":
    rc.setup_logging("consumer")
    raise SystemExit(asyncio.run(main(parse_args())))
