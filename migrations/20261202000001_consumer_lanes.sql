-- Per warehouse, per ordered stream of its changes (the embedded bus's queue: ''; a Kafka
-- partition: 'topic/partition') and per key lane (of `lanes` lanes), the position of the
-- last change that has an outcome at central. The lane's changes reach central in order, so
-- every change of the stream and lane at or below it has one: a replay after a restart skips
-- them instead of sending them again (DESIGN §3: "a replayed version that central already
-- has from the engine is not sent again").
CREATE TABLE IF NOT EXISTS consumer_lanes (
    warehouse_id text        NOT NULL,
    stream       text        NOT NULL,
    lanes        integer     NOT NULL,
    lane         integer     NOT NULL,
    -- `{version}/{index}`: the change's version and its index among its event's changes (a
    -- key move gives two changes one version), fixed width, so text order = source order.
    settled      text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (warehouse_id, stream, lanes, lane)
);
