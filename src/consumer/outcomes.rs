//! Outcomes: what the stage records for each change that is not simply applied. Central's
//! answer (applied, duplicate, stale, rejected, refused), a rule a change breaks before it
//! is sent, dead letters (the Kafka topic and `sync_dead_letters`) and conflict rows, each
//! written until it is stored, since only an outcome lets the bus count a change as
//! delivered (DESIGN §4).

use super::*;

impl Stage {
    /// Records the outcome of one delivered change; `sent_high` is the highest version that
    /// may be at central from us. Returns the outcome's metric label (counted per request by
    /// the caller, not per change).
    pub(super) async fn settle(
        &self,
        warehouse_id: &str,
        item: &Incoming,
        mapped: &MappedChange,
        json: &[u8],
        verdict: Verdict,
        sent_high: &str,
    ) -> Result<&'static str, Cancelled> {
        let outcome;
        // 413 for the change alone: the change itself is too large for central.
        let mut rule = "central_rejected";
        let result = match verdict {
            Verdict::Result(r) => r,
            Verdict::Invalid { status, message } => {
                let size = if status == 413 {
                    rule = "too_large";
                    format!(" (the change is {} bytes as JSON)", json.len())
                } else {
                    String::new()
                };
                ChangeResult {
                    status: ResultStatus::Rejected,
                    reason: Some(format!(
                        "central answered {status} for this change alone{size}: {message}"
                    )),
                    current_version: None,
                    current: None,
                }
            }
        };
        let reason = result.reason.clone().unwrap_or_default();
        let superseded = match (&result.status, result.current_version.as_deref()) {
            (ResultStatus::Stale, Some(v)) => {
                v <= sent_high || self.sent_by_another(warehouse_id, v).await?
            }
            _ => false,
        };
        match result.status {
            ResultStatus::Applied => {
                outcome = "applied";
            }
            ResultStatus::Duplicate => {
                outcome = "duplicate";
            }
            ResultStatus::Stale if superseded => {
                // Central holds a newer version we sent before (a replay after a restart, or
                // after a rebalance moved the partition from another consumer).
                outcome = "superseded";
            }
            ResultStatus::Stale => {
                outcome = "stale";
                let change = &mapped.full(json);
                let central = result
                    .current_version
                    .clone()
                    .unwrap_or_else(|| "unknown".into());
                let conflict = NewConflict {
                    warehouse_id: warehouse_id.to_string(),
                    table_name: change.source.table.clone(),
                    entity: Some(change.entity.as_str().to_string()),
                    entity_key: Value::Object(change.key.clone()),
                    kind: "stale_version",
                    rule: None,
                    reason: if reason.is_empty() {
                        format!(
                            "central holds version {central}, newer than {}",
                            change.version
                        )
                    } else {
                        reason
                    },
                    source_version: change.version.clone(),
                    central_version: result.current_version.clone(),
                    source_value: change.data.clone().map(Value::Object),
                    central_value: result.current.clone(),
                    dead_lettered: false,
                    hint: format!(
                        "central holds version {central} of {} {}, newer than the warehouse's {}. If the warehouse row is the truth, run a forced resync (POST /sync/warehouses/{warehouse_id}); if central is right, nothing to do — mark the row resolved.",
                        change.entity.as_str(),
                        Value::Object(change.key.clone()),
                        change.version
                    ),
                };
                self.conflict(&conflict).await?;
            }
            ResultStatus::Rejected => {
                outcome = "rejected";
                let change = &mapped.full(json);
                let violation = Violation {
                    rule,
                    field: None,
                    reason: if reason.is_empty() {
                        "central rejected the change".into()
                    } else {
                        reason
                    },
                };
                self.dead_letter(
                    warehouse_id,
                    item,
                    &change.source.table,
                    &change.version,
                    &violation,
                )
                .await?;
                let conflict = NewConflict {
                    warehouse_id: warehouse_id.to_string(),
                    table_name: change.source.table.clone(),
                    entity: Some(change.entity.as_str().to_string()),
                    entity_key: Value::Object(change.key.clone()),
                    kind: "rejected",
                    rule: Some(violation.rule.to_string()),
                    reason: violation.reason.clone(),
                    source_version: change.version.clone(),
                    central_version: result.current_version.clone(),
                    source_value: change.data.clone().map(Value::Object),
                    central_value: result.current.clone(),
                    dead_lettered: true,
                    hint: format!(
                        "central refused {} {}: {}. Fix the row in {} at the warehouse (its next change is sent again) or central's rule, then run a forced resync (POST /sync/warehouses/{warehouse_id}); the event is kept in {}.",
                        change.entity.as_str(),
                        Value::Object(change.key.clone()),
                        violation.reason,
                        change.source.table,
                        self.dead_letter_place()
                    ),
                };
                self.conflict(&conflict).await?;
            }
        }
        Ok(outcome)
    }

    /// A change that broke a rule before sending: dead letter and conflict row.
    pub(super) async fn refuse(
        &self,
        warehouse_id: &str,
        item: &Incoming,
        table: &str,
        mapped: Option<(&str, Value, String)>,
        value: Option<Value>,
        v: Violation,
    ) -> Result<(), Cancelled> {
        crate::metrics::metrics()
            .changes_delivered
            .with_label_values(&[warehouse_id, "invalid"])
            .inc();
        let (entity, key, version) = match mapped {
            Some((e, k, ver)) => (Some(e.to_string()), k, ver),
            None => (
                None,
                Value::Object(Default::default()),
                String::from("unknown"),
            ),
        };
        tracing::warn!(warehouse = %warehouse_id, table, version = %version, rule = v.rule, field = ?v.field, reason = %v.reason, "change breaks a rule; dead-lettered");
        self.dead_letter(warehouse_id, item, table, &version, &v)
            .await?;
        let reason = match &v.field {
            Some(f) => format!("field {f}: {}", v.reason),
            None => v.reason.clone(),
        };
        let conflict = NewConflict {
            warehouse_id: warehouse_id.to_string(),
            table_name: table.to_string(),
            entity,
            entity_key: key,
            kind: "invalid",
            rule: Some(v.rule.to_string()),
            reason: reason.clone(),
            source_version: version,
            central_version: None,
            // A 1 MB text is not copied into the conflict row: the dead letter keeps it.
            source_value: value.filter(|v| v.to_string().len() <= 64 * 1024),
            central_value: None,
            dead_lettered: true,
            hint: format!(
                "the row breaks rule {} ({reason}); fix it in {table} at the warehouse — its next change is sent again — or relax [rules]; the event is kept in {}.",
                v.rule,
                self.dead_letter_place()
            ),
        };
        self.conflict(&conflict).await
    }

    /// Dead-letters a record on a change topic that is not a change event of ours (no
    /// `warehouse_id`/`table` headers): rule `event_format`, no warehouse, no conflict row.
    pub async fn dead_letter_foreign(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        reason: String,
    ) -> Result<(), Cancelled> {
        let item = Incoming::Record {
            table: std::sync::Arc::from(""),
            oid: 0,
            key,
            value,
            stream: std::sync::Arc::from(""),
        };
        let v = Violation {
            rule: "event_format",
            field: None,
            reason,
        };
        self.dead_letter("", &item, "", "unknown", &v).await
    }

    pub(super) fn dead_letter_place(&self) -> String {
        match &self.dead_letters {
            DeadLetters::Kafka { topic, .. } => format!("the {topic} topic"),
            DeadLetters::StateDb => "sync_dead_letters".into(),
        }
    }

    pub(super) async fn dead_letter(
        &self,
        warehouse_id: &str,
        item: &Incoming,
        table: &str,
        version: &str,
        v: &Violation,
    ) -> Result<(), Cancelled> {
        crate::metrics::metrics()
            .dead_letters
            .with_label_values(&[warehouse_id, v.rule])
            .inc();
        let value = item.value();
        if let DeadLetters::Kafka { bus, topic } = &self.dead_letters {
            let key = item.key();
            let op = match item {
                Incoming::Event(ev) => ev.op.code().to_string(),
                Incoming::Record { .. } => RawEvent::parse(&value)
                    .map(|e| e.op.into_owned())
                    .unwrap_or_default(),
            };
            let field = v.field.clone().unwrap_or_default();
            let headers = [
                ("warehouse_id", warehouse_id),
                ("table", table),
                ("op", op.as_str()),
                ("version", version),
                ("dlq_rule", v.rule),
                ("dlq_field", field.as_str()),
                ("dlq_reason", v.reason.as_str()),
            ];
            self.retry("cannot write to the dead-letter topic", || {
                bus.send_and_wait(topic, &key, &value, &headers)
            })
            .await?;
        }
        // Also in the state DB with either bus: `GET /sync/dead-letters` lists it and
        // `POST /sync/dead-letters/{id}/replay` sends it again.
        let d = NewDeadLetter {
            warehouse_id: warehouse_id.to_string(),
            table_name: table.to_string(),
            source_version: version.to_string(),
            rule: v.rule.to_string(),
            reason: v.reason.clone(),
            raw_event: value.into_owned(),
        };
        self.persist(|| self.state.record_dead_letter(&d)).await
    }

    /// Records a conflict (counted in the metrics) until it is stored.
    pub(super) async fn conflict(&self, c: &NewConflict) -> Result<(), Cancelled> {
        crate::metrics::metrics()
            .conflicts
            .with_label_values(&[c.warehouse_id.as_str(), c.kind])
            .inc();
        self.persist(|| self.state.record_conflict(c)).await
    }

    /// Runs a state DB write until it succeeds (or cancel): an outcome must be recorded
    /// before it counts.
    pub(super) async fn persist<'a, F, Fut>(&'a self, write: F) -> Result<(), Cancelled>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>> + 'a,
    {
        self.retry("cannot record an outcome in the state DB", write)
            .await
    }

    /// Runs `attempt` until it succeeds, waiting with backoff between failures (logged with
    /// `what`); only `cancel` ends it early.
    pub(super) async fn retry<'a, T, E, F, Fut>(
        &'a self,
        what: &str,
        attempt: F,
    ) -> Result<T, Cancelled>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + 'a,
    {
        let mut backoff = Backoff::new();
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let wait = backoff.next_delay(std::time::Duration::ZERO);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.cancel.cancelled() => return Err(Cancelled),
                    }
                }
            }
        }
    }
}
