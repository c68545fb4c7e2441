//! How far the consumer stage got per warehouse (`consumer_progress`, `consumer_lanes`):
//! what it may have sent to central, and, per ordered stream and key lane, what already has
//! an outcome there, so that a replay after a restart sends nothing central already has.

use super::{StateDb, StoreError};

/// One lane's settled position to record (see [`StateDb::settle_lanes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneMark<'a> {
    /// The ordered stream: `""` for the embedded bus, `topic/partition` on Kafka.
    pub stream: &'a str,
    /// The key lane.
    pub lane: i32,
    /// The position of its last change with an outcome (`{version}/{index}`).
    pub settled: String,
}

impl StateDb {
    /// The highest version sent to central for `warehouse_id`, if any.
    pub async fn sent_version(&self, warehouse_id: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT sent_version FROM consumer_progress WHERE warehouse_id = $1")
                .bind(warehouse_id)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|r| r.0))
    }

    /// Raises the highest version sent to central for `warehouse_id` (never lowers it).
    pub async fn raise_sent_version(
        &self,
        warehouse_id: &str,
        version: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO consumer_progress (warehouse_id, sent_version) VALUES ($1, $2)
             ON CONFLICT (warehouse_id) DO UPDATE SET sent_version = EXCLUDED.sent_version, updated_at = now()
             WHERE consumer_progress.sent_version < EXCLUDED.sent_version",
        )
        .bind(warehouse_id)
        .bind(version)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The settled position per lane of `warehouse_id`'s `stream`, for a consumer of `lanes`
    /// lanes (rows of another lane count are ignored: their lanes hold other keys).
    pub async fn lane_marks(
        &self,
        warehouse_id: &str,
        stream: &str,
        lanes: i32,
    ) -> Result<Vec<(i32, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT lane, settled FROM consumer_lanes
              WHERE warehouse_id = $1 AND stream = $2 AND lanes = $3",
        )
        .bind(warehouse_id)
        .bind(stream)
        .bind(lanes)
        .fetch_all(self.pool())
        .await?)
    }

    /// Raises the settled positions of `marks` (never lowers one), in one statement.
    ///
    /// Its commit does not wait for the WAL flush (`synchronous_commit` off for this
    /// transaction alone): a lane position only spares central a replay, so one lost with a
    /// crash of the state DB costs some changes sent again, never a change, while waiting for
    /// the flush keeps what central answered meanwhile in doubt for a crash of the engine.
    pub async fn settle_lanes(
        &self,
        warehouse_id: &str,
        lanes: i32,
        marks: &[LaneMark<'_>],
    ) -> Result<(), StoreError> {
        let streams: Vec<&str> = marks.iter().map(|m| m.stream).collect();
        let lane: Vec<i32> = marks.iter().map(|m| m.lane).collect();
        let settled: Vec<&str> = marks.iter().map(|m| m.settled.as_str()).collect();
        sqlx::query(
            "INSERT INTO consumer_lanes (warehouse_id, stream, lanes, lane, settled)
             SELECT $1, s, $2, l, p FROM unnest($3::text[], $4::int[], $5::text[]) AS m(s, l, p),
                    -- SET LOCAL in the statement itself (one round trip): read at commit.
                    (SELECT set_config('synchronous_commit', 'off', true)) AS asynchronous
             ON CONFLICT (warehouse_id, stream, lanes, lane) DO UPDATE
                SET settled = EXCLUDED.settled, updated_at = now()
              WHERE consumer_lanes.settled < EXCLUDED.settled",
        )
        .bind(warehouse_id)
        .bind(lanes)
        .bind(&streams)
        .bind(&lane)
        .bind(&settled)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
