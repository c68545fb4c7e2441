//! `inventorysync check`: what a DBA or an operator runs before (or instead of) starting the
//! service — the configuration and every connection it needs, each with what to do when it
//! is not right.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::{Config, WarehouseConfig};
use crate::pg::quote_ident;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but deserves a look.
    Warn,
    /// Must be fixed before the service can work.
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// What was checked (`warehouse wh-east`, `state DB`, …).
    pub target: String,
    /// The check (`wal_level`, `publication`, …).
    pub check: String,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when fine).
    pub fix: String,
}

/// Every check's line.
#[derive(Debug, Default)]
pub struct Report {
    /// In the order checked.
    pub lines: Vec<Line>,
}

impl Report {
    fn add(&mut self, target: &str, check: &str, status: Status, detail: impl Into<String>) {
        self.lines.push(Line {
            target: target.to_string(),
            check: check.to_string(),
            status,
            detail: detail.into(),
            fix: String::new(),
        });
    }

    fn fail(
        &mut self,
        target: &str,
        check: &str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.add_with_fix(target, check, Status::Fail, detail.into(), fix.into());
    }

    fn warn(
        &mut self,
        target: &str,
        check: &str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.add_with_fix(target, check, Status::Warn, detail.into(), fix.into());
    }

    fn add_with_fix(
        &mut self,
        target: &str,
        check: &str,
        status: Status,
        detail: String,
        fix: String,
    ) {
        self.add(target, check, status, detail);
        if let Some(l) = self.lines.last_mut() {
            l.fix = fix;
        }
    }

    /// Whether something must be fixed.
    pub fn failed(&self) -> bool {
        self.lines.iter().any(|l| l.status == Status::Fail)
    }

    /// The report as an aligned table, each fix under its line.
    pub fn render(&self) -> String {
        let w_target = self
            .lines
            .iter()
            .map(|l| l.target.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let w_check = self
            .lines
            .iter()
            .map(|l| l.check.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<w_target$}  {:<w_check$}  {:<6}  DETAIL",
            "TARGET", "CHECK", "STATUS"
        );
        for l in &self.lines {
            let _ = writeln!(
                out,
                "{:<w_target$}  {:<w_check$}  {:<6}  {}",
                l.target,
                l.check,
                l.status.as_str(),
                l.detail
            );
            if !l.fix.is_empty() {
                let _ = writeln!(
                    out,
                    "{:<w$}  fix: {}",
                    "",
                    l.fix,
                    w = w_target + w_check + 10
                );
            }
        }
        let (fails, warns) = (
            self.lines
                .iter()
                .filter(|l| l.status == Status::Fail)
                .count(),
            self.lines
                .iter()
                .filter(|l| l.status == Status::Warn)
                .count(),
        );
        let _ = writeln!(
            out,
            "\n{} check(s): {} to fix, {} warning(s)",
            self.lines.len(),
            fails,
            warns
        );
        out
    }
}

/// Runs every check of `config`.
pub async fn check(config: &Config) -> Report {
    let mut r = Report::default();
    let mapped: Vec<String> = {
        let mut m: Vec<String> = config.consumer.mappings.keys().cloned().collect();
        m.sort();
        m
    };
    if config.warehouses.is_empty() {
        r.fail(
            "configuration",
            "warehouses",
            "no [[warehouses]] configured",
            "add a [[warehouses]] section with id and url to the TOML file",
        );
    } else {
        r.add(
            "configuration",
            "warehouses",
            Status::Ok,
            format!("{} configured", config.warehouses.len()),
        );
    }
    if mapped.is_empty() {
        r.warn(
            "configuration",
            "mappings",
            "no [[mappings]]: changes are published but none is sent to central",
            "copy sql/demo_mapping.toml's sections and adapt them",
        );
    } else {
        r.add(
            "configuration",
            "mappings",
            Status::Ok,
            format!("{} table(s): {}", mapped.len(), mapped.join(", ")),
        );
    }
    if config.api_keys.is_empty() {
        r.warn(
            "configuration",
            "API_KEYS",
            "not set: the /sync routes answer 401",
            "set API_KEYS to one or more keys (or sha256:<hex> digests)",
        );
    } else {
        r.add("configuration", "API_KEYS", Status::Ok, "set");
    }
    // The state DB, when it answers, tells which relations the mappings are bound to (a
    // renamed table); its own check follows.
    let state = match &config.db_url {
        Some(url) => {
            tokio::time::timeout(Duration::from_secs(10), crate::store::StateDb::connect(url))
                .await
                .ok()
                .and_then(Result::ok)
        }
        None => None,
    };
    let slots: Vec<&str> = config.warehouses.iter().map(|w| w.slot.as_str()).collect();
    for w in &config.warehouses {
        check_warehouse(&mut r, w, &mapped, &config.consumer, state.as_ref()).await;
        check_other_slots(&mut r, w, &slots).await;
    }
    check_state_db(&mut r, config).await;
    check_kafka(&mut r, config).await;
    check_central(&mut r, config, mapped.is_empty()).await;
    r
}

async fn check_warehouse(
    r: &mut Report,
    w: &WarehouseConfig,
    mapped: &[String],
    consumer: &crate::consumer::settings::ConsumerSettings,
    state: Option<&crate::store::StateDb>,
) {
    let t = format!("warehouse {}", w.id);
    if let Some(why) = w.conn.unverified_remote() {
        r.warn(
            &t,
            "certificate",
            why,
            "add sslmode=verify-full&sslrootcert=<the CA's PEM file> to the warehouse's url",
        );
    }
    let sql = match tokio::time::timeout(Duration::from_secs(10), crate::pg::connect_sql(&w.conn))
        .await
    {
        Ok(Ok(s)) => {
            r.add(&t, "connection", Status::Ok, w.conn.redacted());
            s
        }
        Ok(Err(e)) => {
            r.fail(
                &t,
                "connection",
                e.to_string(),
                "check the url (host, port, database, user, password), the network and pg_hba.conf",
            );
            return;
        }
        Err(_) => {
            r.fail(
                &t,
                "connection",
                format!("{}: no answer within 10 s", w.conn.redacted()),
                "check the host and port, and that PostgreSQL is running",
            );
            return;
        }
    };
    let one = |q: &'static str| {
        let sql = &sql;
        async move { sql.query_one(q, &[]).await }
    };
    match one("SHOW wal_level").await {
        Ok(row) => {
            let level: String = row.get(0);
            if level == "logical" {
                r.add(&t, "wal_level", Status::Ok, "logical");
            } else {
                r.fail(
                    &t,
                    "wal_level",
                    format!("{level}; logical decoding needs logical"),
                    "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
                );
            }
        }
        Err(e) => r.fail(
            &t,
            "wal_level",
            e.to_string(),
            "grant the user access to SHOW wal_level",
        ),
    }
    match one("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").await {
        Ok(row) => {
            let (user, ok): (String, bool) = (row.get(0), row.get(1));
            if ok {
                r.add(&t, "REPLICATION privilege", Status::Ok, format!("{user} may replicate"));
            } else {
                r.fail(&t, "REPLICATION privilege", format!("{user} has no REPLICATION attribute"), format!("ALTER ROLE {} REPLICATION;", quote_ident(&user)));
            }
        }
        Err(e) => r.fail(&t, "REPLICATION privilege", e.to_string(), "grant access to pg_roles"),
    }
    let tables: Vec<String> = match sql
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&w.publication],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
        Err(e) => {
            r.fail(&t, "publication", e.to_string(), "grant access to pg_publication_tables");
            Vec::new()
        }
    };
    let exists = sql
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&w.publication],
        )
        .await
        .map(|o| o.is_some())
        .unwrap_or(false);
    if !exists {
        r.fail(
            &t,
            "publication",
            format!("{} does not exist", w.publication),
            format!(
                "CREATE PUBLICATION {} FOR TABLE {};",
                quote_ident(&w.publication),
                if mapped.is_empty() {
                    "<your tables>".to_string()
                } else {
                    mapped.join(", ")
                }
            ),
        );
    } else if tables.is_empty() {
        r.fail(
            &t,
            "publication",
            format!("{} publishes no table", w.publication),
            format!(
                "ALTER PUBLICATION {} ADD TABLE <table>;",
                quote_ident(&w.publication)
            ),
        );
    } else {
        r.add(
            &t,
            "publication",
            Status::Ok,
            format!("{}: {}", w.publication, tables.join(", ")),
        );
        let bound = match state {
            Some(s) => s.bindings(&w.id).await.unwrap_or_default(),
            None => Vec::new(),
        };
        for m in mapped.iter().filter(|m| !tables.contains(m)) {
            // Renamed or moved since the mapping was bound: its changes still flow.
            let renamed = bound
                .iter()
                .filter(|b| b.mapped_table == **m)
                .find(|b| tables.contains(&b.current_name) && b.current_name != **m);
            if let Some(b) = renamed {
                r.warn(
                    &t,
                    "mapped table published",
                    format!(
                        "{m} was renamed or moved to {}: the mapping follows the table (bound to its OID {}), its changes flow",
                        b.current_name, b.relation_oid
                    ),
                    format!(
                        "update the configuration: [[mappings]] table = {:?}",
                        b.current_name
                    ),
                );
                continue;
            }
            // A partitioned table whose partitions are published as themselves: its
            // changes carry the partitions' names, so the mapping never matches.
            let partitions: Vec<String> = sql
                .query(
                    "SELECT p.relid::regclass::text FROM pg_partition_tree(to_regclass($1)) p
                      JOIN pg_class c ON c.oid = p.relid
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                      JOIN pg_publication_tables pt ON pt.schemaname = n.nspname AND pt.tablename = c.relname
                     WHERE pt.pubname = $2 AND p.isleaf",
                    &[m, &w.publication],
                )
                .await
                .map(|rows| rows.iter().map(|row| row.get(0)).collect())
                .unwrap_or_default();
            if partitions.is_empty() {
                r.fail(
                    &t,
                    "mapped table published",
                    format!("{m} is mapped but not in {}", w.publication),
                    format!(
                        "ALTER PUBLICATION {} ADD TABLE {m};",
                        quote_ident(&w.publication)
                    ),
                );
            } else {
                r.fail(
                    &t,
                    "mapped table published",
                    format!(
                        "{m} is mapped, but {} publishes its partitions under their own names ({})",
                        w.publication,
                        partitions.join(", ")
                    ),
                    format!(
                        "ALTER PUBLICATION {} SET (publish_via_partition_root = true); or map the partitions",
                        quote_ident(&w.publication)
                    ),
                );
            }
        }
    }
    for table in tables
        .iter()
        .filter(|t| mapped.is_empty() || mapped.contains(t))
    {
        let Some((schema, name)) = table.split_once('.') else {
            continue;
        };
        let row = sql
            .query_opt(
                "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &name],
            )
            .await;
        let check = format!("replica identity {table}");
        match row {
            Ok(Some(row)) => {
                let (ident, pk): (String, bool) = (row.get(0), row.get(1));
                match (ident.as_str(), pk) {
                    ("d", true) => r.add(&t, &check, Status::Ok, "default (primary key)"),
                    ("f", _) => r.add(&t, &check, Status::Ok, "full"),
                    ("i", _) => r.add(&t, &check, Status::Ok, "index"),
                    ("d", false) => r.fail(&t, &check, "default without a primary key: updates and deletes carry no key", format!("add a primary key, or ALTER TABLE {table} REPLICA IDENTITY FULL; (a resync needs a primary key)")),
                    _ => r.fail(&t, &check, "nothing: updates and deletes are refused while published", format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT; (with a primary key)")),
                }
            }
            Ok(None) => r.fail(
                &t,
                &check,
                format!("{table} does not exist"),
                "create the table or fix the mapping",
            ),
            Err(e) => r.fail(&t, &check, e.to_string(), "grant access to pg_class"),
        }
        check_toast(r, &t, &sql, table, consumer).await;
    }
    match sql
        .query_opt(
            "SELECT active, coalesce(wal_status, 'unknown'),
                    coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn), 0)::bigint, plugin::text
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&w.slot],
        )
        .await
    {
        Ok(None) => {
            let free = one("SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int")
                .await
                .map(|row| row.get::<_, i32>(0))
                .unwrap_or(1);
            if free > 0 {
                r.add(&t, "slot", Status::Ok, format!("{} not created yet: the first run creates it and loads the tables", w.slot));
            } else {
                r.fail(&t, "slot", format!("{} does not exist and max_replication_slots is used up", w.slot), "raise max_replication_slots (restart) or drop an unused slot");
            }
        }
        Ok(Some(row)) => {
            let (active, status, retained, plugin): (bool, String, i64, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
            let detail = format!("{}: wal_status {status}, {} MB of WAL retained{}", w.slot, retained / (1 << 20), if active { ", in use" } else { "" });
            if plugin != "pgoutput" {
                r.fail(&t, "slot", format!("{} uses plugin {plugin}", w.slot), format!("SELECT pg_drop_replication_slot('{}'); (the next run creates a pgoutput slot)", w.slot));
            } else if status == "lost" {
                r.fail(&t, "slot", detail, format!("the slot lost WAL it needed: SELECT pg_drop_replication_slot('{}'); then start run (a new slot and a full load), or POST /sync/warehouses/{} once it streams", w.slot, w.id));
            } else if status == "unreserved" || status == "extended" {
                r.warn(&t, "slot", detail, "the slot holds more WAL than max_wal_size: make sure run is running and keeping up");
            } else {
                r.add(&t, "slot", Status::Ok, detail);
            }
        }
        Err(e) => r.fail(&t, "slot", e.to_string(), "grant access to pg_replication_slots"),
    }
    if w.failover {
        check_failover(r, &t, &sql, w).await;
    }
    check_standby(r, &t, &sql, w).await;
}

/// Slots of this database with the engine's prefix that no configured warehouse uses: left
/// behind by a renamed or removed warehouse, they retain WAL for ever.
async fn check_other_slots(r: &mut Report, w: &WarehouseConfig, configured: &[&str]) {
    let t = format!("warehouse {}", w.id);
    let Ok(Ok(sql)) =
        tokio::time::timeout(Duration::from_secs(10), crate::pg::connect_sql(&w.conn)).await
    else {
        return;
    };
    let Ok(slots) = crate::source::slot::other_slots(&sql, configured).await else {
        return;
    };
    for slot in slots {
        r.warn(
            &t,
            "unused slot",
            slot.detail(),
            format!("if no other deployment uses it: {}", slot.drop_statement()),
        );
    }
}

/// A URL at a hot standby (decoding there, PostgreSQL 16+): whether `primary_url` is set and
/// is the standby's primary, which writes the logical messages a standby cannot.
async fn check_standby(r: &mut Report, t: &str, sql: &tokio_postgres::Client, w: &WarehouseConfig) {
    use crate::source::marker::Markers;
    match Markers::open(sql, w.primary.as_ref(), &w.id).await {
        Ok(Markers::Here) if w.primary.is_some() => r.warn(
            t,
            "standby",
            "the URL points at a primary: primary_url is not used",
            "remove primary_url, or point url at the standby that should decode",
        ),
        Ok(Markers::Here) => {}
        Ok(Markers::Primary(_)) => r.add(
            t,
            "standby",
            Status::Ok,
            "decoding on a standby; heartbeats, sync-cycle markers and chunk watermarks are written on primary_url",
        ),
        Ok(Markers::Refused) => r.warn(
            t,
            "standby",
            "the URL points at a standby and no primary_url is set: streaming works, but heartbeats are off and the initial load, forced resyncs and sync cycles fail",
            "set primary_url to the standby's primary (same database)",
        ),
        Err(e) => r.fail(
            t,
            "standby",
            e.to_string(),
            "point primary_url at the standby's primary, same database",
        ),
    }
}

/// `failover = true`: the server has failover slots (17+), the slot is one, and a standby
/// synchronizes it (its slot sync worker is connected, and the primary waits for the
/// standbys named in `synchronized_standby_slots`).
async fn check_failover(
    r: &mut Report,
    t: &str,
    sql: &tokio_postgres::Client,
    w: &WarehouseConfig,
) {
    let version = match sql
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
    {
        Ok(row) => row.get::<_, i32>(0) as u32,
        Err(e) => {
            return r.fail(
                t,
                "failover",
                e.to_string(),
                "grant access to the server's settings",
            );
        }
    };
    if version < crate::source::slot::FAILOVER_SINCE {
        return r.fail(
            t,
            "failover",
            format!(
                "failover = true needs PostgreSQL 17 or later; this server is PostgreSQL {}",
                crate::source::slot::version_text(version)
            ),
            "remove failover from this warehouse, or upgrade the server",
        );
    }
    let flag = sql
        .query_opt("SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s WHERE slot_name = $1", &[&w.slot])
        .await;
    match flag {
        Ok(None) => r.add(
            t,
            "failover",
            Status::Ok,
            format!("{} is created as a failover slot by the first run", w.slot),
        ),
        Ok(Some(row)) if row.get::<_, Option<bool>>(0) == Some(true) => r.add(
            t,
            "failover",
            Status::Ok,
            format!("{} is a failover slot", w.slot),
        ),
        Ok(Some(_)) => r.warn(
            t,
            "failover",
            format!("{} is not a failover slot yet", w.slot),
            "the next run makes it one (ALTER_REPLICATION_SLOT … (FAILOVER true))",
        ),
        Err(e) => {
            return r.fail(
                t,
                "failover",
                e.to_string(),
                "grant access to pg_replication_slots",
            );
        }
    }
    // A standby's slot sync worker: a plain connection named `… slotsync worker`, or after the
    // application_name of its primary_conninfo, which its physical stream (a walsender that
    // holds no logical slot) shares.
    let standby = sql
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_activity a
                      WHERE a.backend_type = 'client backend'
                        AND (a.application_name LIKE '%slotsync worker'
                             OR a.application_name IN (
                                  SELECT r.application_name FROM pg_stat_replication r
                                   WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots s
                                                      WHERE s.active_pid = r.pid AND s.slot_type = 'logical'))))::int,
                    current_setting('synchronized_standby_slots')",
            &[],
        )
        .await;
    match standby {
        Ok(row) => {
            let (workers, slots): (i32, String) = (row.get(0), row.get(1));
            if workers == 0 {
                r.warn(t, "failover standby", "no standby is synchronizing slots from this server", "on the standby: sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name, and dbname in primary_conninfo");
            } else if slots.trim().is_empty() {
                r.warn(t, "failover standby", format!("{workers} standby(s) synchronize slots, but synchronized_standby_slots is empty: this slot may confirm changes a standby has not received, and a failover to it would then skip them"), "on this server: synchronized_standby_slots = '<the standby\'s physical slot>'");
            } else {
                r.add(
                    t,
                    "failover standby",
                    Status::Ok,
                    format!("{workers} standby(s) synchronize slots; the slot waits for {slots}"),
                );
            }
        }
        Err(e) => r.fail(
            t,
            "failover standby",
            e.to_string(),
            "grant access to pg_stat_activity (pg_read_all_stats)",
        ),
    }
}

/// Warns for a mapped table whose mapped columns can be TOASTed while its replica identity
/// is not FULL: an update that leaves such a column alone does not carry its value, so the
/// consumer reads it back from the warehouse (one query per table and batch).
async fn check_toast(
    r: &mut Report,
    t: &str,
    sql: &tokio_postgres::Client,
    table: &str,
    consumer: &crate::consumer::settings::ConsumerSettings,
) {
    let Some(m) = consumer.mappings.get(table) else {
        return;
    };
    let Some((schema, name)) = table.split_once('.') else {
        return;
    };
    let columns: Vec<String> = m.data.iter().map(|(_, f)| f.column.clone()).collect();
    let rows = sql
        .query(
            "SELECT a.attname::text FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relreplident <> 'f'
                AND a.attnum > 0 AND NOT a.attisdropped AND a.attstorage <> 'p'
                AND a.attname = ANY($3) ORDER BY a.attnum",
            &[&schema, &name, &columns],
        )
        .await;
    let check = format!("unchanged TOAST {table}");
    match rows {
        Ok(rows) if rows.is_empty() => {}
        Ok(rows) => {
            let names: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
            r.warn(
                t,
                &check,
                format!(
                    "mapped column(s) {} can be TOASTed and the replica identity is not FULL: an update that leaves them alone does not carry their value, so the consumer reads them back from the warehouse (one query per table and batch with such updates)",
                    names.join(", ")
                ),
                format!(
                    "ALTER TABLE {table} REPLICA IDENTITY FULL; carries them in the WAL instead (more WAL per update), or keep the default and the read-back"
                ),
            );
        }
        Err(e) => r.warn(t, &check, e.to_string(), "grant access to pg_attribute"),
    }
}

async fn check_state_db(r: &mut Report, config: &Config) {
    let t = "state DB";
    let Some(url) = &config.db_url else {
        r.fail(
            t,
            "DB_URL",
            "not set",
            "set DB_URL to the state DB (postgres://user:password@host:5432/db)",
        );
        return;
    };
    if let Some(why) = url.unverified_remote() {
        r.warn(
            t,
            "certificate",
            why,
            "add sslmode=verify-full&sslrootcert=<the CA's PEM file> to DB_URL",
        );
    }
    match tokio::time::timeout(Duration::from_secs(10), crate::store::StateDb::connect(url)).await {
        Ok(Ok(db)) => {
            r.add(t, "connection", Status::Ok, url.redacted());
            let known = sqlx::migrate!("./migrations").migrations.len() as i64;
            let applied: Result<(i64,), _> =
                sqlx::query_as("SELECT count(*) FROM _sqlx_migrations WHERE success")
                    .fetch_one(db.pool())
                    .await;
            match applied {
                Ok((n,)) if n >= known => {
                    r.add(t, "migrations", Status::Ok, format!("{n} applied"))
                }
                Ok((n,)) => r.warn(
                    t,
                    "migrations",
                    format!("{n} of {known} applied"),
                    "run `inventorysync migrate` (run also migrates at start)",
                ),
                Err(_) => r.warn(
                    t,
                    "migrations",
                    "none applied yet",
                    "run `inventorysync migrate` (run also migrates at start)",
                ),
            }
        }
        Ok(Err(e)) => r.fail(
            t,
            "connection",
            e.to_string(),
            "check DB_URL, the network and pg_hba.conf",
        ),
        Err(_) => r.fail(
            t,
            "connection",
            "no answer within 10 s",
            "check DB_URL's host and port",
        ),
    }
}

async fn check_kafka(r: &mut Report, config: &Config) {
    let t = "kafka";
    let Some(brokers) = &config.kafka_brokers else {
        r.add(
            t,
            "bus",
            Status::Ok,
            "KAFKA_BROKERS not set: the embedded bus (one node)",
        );
        return;
    };
    let settings = match crate::config::kafka_settings(brokers) {
        Ok(s) => s,
        Err(e) => {
            r.fail(
                t,
                "configuration",
                e.to_string(),
                "fix the KAFKA_* variables",
            );
            return;
        }
    };
    let progress = match crate::consumer::kafka::GroupProgress::new(&settings) {
        Ok(p) => p,
        Err(e) => {
            r.fail(
                t,
                "configuration",
                e.to_string(),
                "fix KAFKA_BROKERS and KAFKA_PROPERTY_*",
            );
            return;
        }
    };
    match tokio::task::spawn_blocking(move || progress.lag()).await {
        Ok(Ok(topics)) => r.add(t, "brokers", Status::Ok, format!("{brokers} reachable; {} change topic(s)", topics.len())),
        Ok(Err(e)) => r.fail(t, "brokers", e, "check KAFKA_BROKERS, the network and the security properties (KAFKA_PROPERTY_SECURITY_PROTOCOL, …)"),
        Err(e) => r.fail(t, "brokers", e.to_string(), "retry"),
    }
}

async fn check_central(r: &mut Report, config: &Config, nothing_mapped: bool) {
    let t = "central";
    let Some(endpoint) = &config.warehouse_api_endpoint else {
        if nothing_mapped {
            r.add(
                t,
                "endpoint",
                Status::Ok,
                "WAREHOUSE_API_ENDPOINT not set and nothing mapped",
            );
        } else {
            r.fail(
                t,
                "endpoint",
                "WAREHOUSE_API_ENDPOINT is not set but tables are mapped",
                "set WAREHOUSE_API_ENDPOINT to the central inventory API's base URL",
            );
        }
        return;
    };
    let Some(w) = config.warehouses.first() else {
        return;
    };
    // An empty batch: harmless, and it exercises the route, the token and the answer's shape.
    let url = format!(
        "{}/{}/changes",
        endpoint.as_str().trim_end_matches('/'),
        w.id
    );
    // What is printed: never the credentials a URL may carry.
    let shown = crate::config::redacted_url(endpoint);
    let shown_url = format!("{}/{}/changes", shown.trim_end_matches('/'), w.id);
    let body = serde_json::json!({"warehouse_id": w.id, "batch_id": format!("{}:check", w.id), "changes": []});
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            r.fail(t, "endpoint", e.to_string(), "retry");
            return;
        }
    };
    let mut req = client.post(&url).json(&body);
    if let Some(token) = &config.warehouse_api_token {
        use secrecy::ExposeSecret;
        req = req.bearer_auth(token.expose_secret());
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => {
            r.add(t, "endpoint", Status::Ok, format!("{} answers an empty batch", shown))
        }
        Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => r.fail(
            t,
            "credentials",
            format!("{} answered {}", shown, resp.status().as_u16()),
            "set WAREHOUSE_API_TOKEN to a valid token",
        ),
        Ok(resp) => r.fail(
            t,
            "endpoint",
            format!("POST {shown_url} answered {}", resp.status().as_u16()),
            "check WAREHOUSE_API_ENDPOINT (the base URL; the engine appends /{warehouse_id}/changes)",
        ),
        Err(e) => r.fail(t, "endpoint", format!("{}: {}", shown, e.without_url()), "check WAREHOUSE_API_ENDPOINT and the network"),
    }
}
