-- One row per business message id. Times are ms since the Unix epoch.
CREATE TABLE messages (
    message_id        TEXT PRIMARY KEY,
    producer          TEXT NOT NULL DEFAULT '',
    routing_key       TEXT NOT NULL DEFAULT '',
    business_key      TEXT NOT NULL DEFAULT '',
    -- Comma-separated consumer names that must confirm; NULL = any one confirm.
    expect            TEXT,
    status            TEXT NOT NULL,
    -- The attempt whose check is awaited; bumped when a check is claimed.
    attempt           BIGINT NOT NULL DEFAULT 0,
    -- The highest attempt whose CHECK is known to be published.
    scheduled_attempt BIGINT NOT NULL DEFAULT 0,
    resend_count      BIGINT NOT NULL DEFAULT 0,
    next_check_at     BIGINT NOT NULL DEFAULT 0,
    last_error        TEXT,
    published_at      BIGINT NOT NULL DEFAULT 0,
    -- First RETRY_LATER / RPC failure since the last success: the unreachable deadline counts from it.
    first_failure_at  BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX messages_status ON messages (status, message_id);
CREATE INDEX messages_updated ON messages (updated_at);

-- One row per message id and consumer.
CREATE TABLE confirms (
    message_id   TEXT NOT NULL,
    consumer     TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    detail       TEXT,
    processed_at BIGINT NOT NULL,
    received_at  BIGINT NOT NULL,
    PRIMARY KEY (message_id, consumer)
);
CREATE INDEX confirms_received ON confirms (received_at);

-- Compact history: status changes and resends.
CREATE TABLE history (
    id          BIGSERIAL PRIMARY KEY,
    message_id  TEXT NOT NULL,
    at          BIGINT NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX history_message ON history (message_id);
CREATE INDEX history_at ON history (at);
