//! Streaming a slot into change events: operations, identities, TOAST, types, DDL,
//! transactions, big transactions and the initial load.

use serde_json::json;

use crate::harness::{ops, pg};

const STOCK: &str = "CREATE TABLE stock_levels (sku text, location_code text, qty_on_hand int NOT NULL, \
                     reserved int DEFAULT 0, PRIMARY KEY (sku, location_code));";

async fn setup(prefix: &str, ddl: &str) -> crate::harness::TestDb {
    let db = pg().new_db(prefix).await;
    db.exec(ddl).await;
    db.exec("CREATE PUBLICATION inventorysync FOR ALL TABLES")
        .await;
    db
}

#[tokio::test]
async fn insert_update_delete_truncate_become_events() {
    let db = setup("crud", STOCK).await;
    let opts = db.options("s", "inventorysync");
    let mut create = opts.clone();
    create.create_slot = true;
    assert!(db.drain_now(create).await.is_empty());
    db.exec(
        "INSERT INTO stock_levels VALUES ('SKU-1','A-01',7,1);
         UPDATE stock_levels SET qty_on_hand = 5 WHERE sku = 'SKU-1';
         DELETE FROM stock_levels WHERE sku = 'SKU-1';",
    )
    .await;
    db.exec("INSERT INTO stock_levels VALUES ('SKU-2','A-02',1,0)")
        .await;
    db.exec("TRUNCATE stock_levels").await;
    let events = db.drain_now(opts).await;
    let got: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(got, ["c", "u", "d", "c", "t"]);
    let u = &events[1];
    assert_eq!(
        u["after"],
        json!({"sku":"SKU-1","location_code":"A-01","qty_on_hand":5,"reserved":1})
    );
    assert_eq!(
        u["before"],
        serde_json::Value::Null,
        "default identity sends no old row when the key did not change"
    );
    assert_eq!(
        events[2]["before"],
        json!({"sku":"SKU-1","location_code":"A-01"})
    );
    assert_eq!(events[2]["after"], serde_json::Value::Null);
    assert_eq!(events[4]["before"], serde_json::Value::Null);
    assert_eq!(events[4]["after"], serde_json::Value::Null);
    // One transaction: shared commit_lsn, sequence 0,1,2, transaction block.
    let (a, b) = (&events[0]["source"], &events[2]["source"]);
    assert_eq!(a["commit_lsn"], b["commit_lsn"]);
    assert_eq!(b["sequence"], 2);
    assert_eq!(events[2]["transaction"]["total_order"], 3);
    assert_eq!(
        events[2]["transaction"]["id"],
        format!("{}:{}", b["txId"], b["commit_lsn"])
    );
    assert_eq!(a["snapshot"], "false");
    assert_eq!(a["schema"], "public");
    assert_eq!(a["table"], "stock_levels");
    assert_eq!(a["connector"], "inventorysync");
    // Positions increase.
    let pos: Vec<(u64, u64)> = events
        .iter()
        .map(|e| {
            (
                e["source"]["commit_lsn"].as_u64().unwrap(),
                e["source"]["sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
}

#[tokio::test]
async fn replica_identities_shape_before_images_and_keys() {
    let db = setup(
        "ident",
        "CREATE TABLE d (id int PRIMARY KEY, v text);
         CREATE TABLE f (id int PRIMARY KEY, v text); ALTER TABLE f REPLICA IDENTITY FULL;
         CREATE TABLE i (id int PRIMARY KEY, code text NOT NULL, v text); CREATE UNIQUE INDEX i_code ON i(code);
         ALTER TABLE i REPLICA IDENTITY USING INDEX i_code;
         CREATE TABLE n (id int, v text); ALTER TABLE n REPLICA IDENTITY NOTHING;
         CREATE TABLE fk (a int, b text); ALTER TABLE fk REPLICA IDENTITY FULL;",
    )
    .await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    db.exec(
        "INSERT INTO d VALUES (1,'x'); UPDATE d SET v='y'; DELETE FROM d;
         INSERT INTO f VALUES (1,'x'); UPDATE f SET v='y'; DELETE FROM f;
         INSERT INTO i VALUES (1,'c1','x'); UPDATE i SET v='y'; DELETE FROM i;
         INSERT INTO n VALUES (1,'x');
         INSERT INTO fk VALUES (1,'x'); UPDATE fk SET b='y'; DELETE FROM fk;",
    )
    .await;
    let events = db.drain_now(db.options("s", "inventorysync")).await;
    let by_table = |t: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["source"]["table"] == t)
            .collect()
    };
    let d = by_table("d");
    assert_eq!(d[1]["before"], serde_json::Value::Null);
    assert_eq!(d[2]["before"], json!({"id":1}));
    let f = by_table("f");
    assert_eq!(f[1]["before"], json!({"id":1,"v":"x"}));
    assert_eq!(f[2]["before"], json!({"id":1,"v":"y"}));
    let i = by_table("i");
    assert_eq!(i[2]["before"], json!({"code":"c1"}));
    let n = by_table("n");
    assert_eq!(n.len(), 1);
    assert_eq!(n[0]["after"], json!({"id":1,"v":"x"}));
    let fk = by_table("fk");
    assert_eq!(fk[2]["before"], json!({"a":1,"b":"y"}));
    assert_eq!(fk.len(), 3);
}

#[tokio::test]
async fn event_keys_prefer_the_primary_key() {
    let db = setup(
        "keys",
        "CREATE TABLE f (id int PRIMARY KEY, v text); ALTER TABLE f REPLICA IDENTITY FULL;
         CREATE TABLE i (id int PRIMARY KEY, code text NOT NULL); CREATE UNIQUE INDEX ic ON i(code);
         ALTER TABLE i REPLICA IDENTITY USING INDEX ic;
         CREATE TABLE j (code text NOT NULL, v text); CREATE UNIQUE INDEX jc ON j(code);
         ALTER TABLE j REPLICA IDENTITY USING INDEX jc;
         CREATE TABLE w (a int, b text); ALTER TABLE w REPLICA IDENTITY FULL;",
    )
    .await;
    let mut opts = db.options("s", "inventorysync");
    opts.create_slot = true;
    db.drain_now(opts.clone()).await;
    db.exec("INSERT INTO f VALUES (1,'x'); INSERT INTO i VALUES (2,'c'); INSERT INTO j VALUES ('k','v'); INSERT INTO w VALUES (3,'z');").await;
    opts.create_slot = false;
    opts.endpos = Some(db.current_lsn().await);
    let keys = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = keys.clone();
    crate::harness::stream_with(opts, std::time::Duration::ZERO, move |ev| {
        let mut k = Vec::new();
        ev.write_key_json(&mut k);
        sink.lock().unwrap().push(String::from_utf8(k).unwrap());
    })
    .await
    .unwrap();
    let keys = keys.lock().unwrap().clone();
    let n = &db.name;
    assert_eq!(
        keys,
        [
            format!(r#"{{"warehouse_id":"{n}","table":"public.f","pk":{{"id":1}}}}"#),
            format!(r#"{{"warehouse_id":"{n}","table":"public.i","pk":{{"id":2}}}}"#),
            format!(r#"{{"warehouse_id":"{n}","table":"public.j","pk":{{"code":"k"}}}}"#),
            format!(r#"{{"warehouse_id":"{n}","table":"public.w","pk":{{"a":3,"b":"z"}}}}"#),
        ]
    );
}

#[tokio::test]
async fn unchanged_toast_is_never_null() {
    let db = setup(
        "toast",
        "CREATE TABLE d (id int PRIMARY KEY, qty int, notes text);
         ALTER TABLE d ALTER COLUMN notes SET STORAGE EXTERNAL;
         CREATE TABLE f (id int PRIMARY KEY, qty int, notes text);
         ALTER TABLE f ALTER COLUMN notes SET STORAGE EXTERNAL; ALTER TABLE f REPLICA IDENTITY FULL;",
    )
    .await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    db.exec(
        "INSERT INTO d SELECT 1, 1, string_agg(md5(g::text), '') FROM generate_series(1, 400) g;
         INSERT INTO f SELECT 1, 1, string_agg(md5(g::text), '') FROM generate_series(1, 400) g;",
    )
    .await;
    db.exec("UPDATE d SET qty = 2; UPDATE f SET qty = 2;").await;
    let events = db.drain_now(db.options("s", "inventorysync")).await;
    let upd: Vec<&serde_json::Value> = events.iter().filter(|e| e["op"] == "u").collect();
    assert_eq!(upd.len(), 2);
    let d = upd.iter().find(|e| e["source"]["table"] == "d").unwrap();
    assert!(
        d["after"].get("notes").is_none(),
        "default identity: left out, not null"
    );
    assert_eq!(d["after"]["qty"], 2);
    assert_eq!(d["source"]["unchanged_toast"], json!(["notes"]));
    let f = upd.iter().find(|e| e["source"]["table"] == "f").unwrap();
    assert_eq!(
        f["after"]["notes"].as_str().unwrap().len(),
        400 * 32,
        "full identity: filled from the old row"
    );
    assert_eq!(f["source"]["unchanged_toast"], json!([]));
}

#[tokio::test]
async fn every_type_converts_as_the_contract_says() {
    let db = setup(
        "types",
        "CREATE TYPE mood AS ENUM ('ok','sad');
         CREATE TABLE t (id int PRIMARY KEY, i2 int2, i8 int8, o oid, f4 float4, f8 float8, n numeric,
           b bool, j json, jb jsonb, tz timestamptz, ts timestamp, d date, tm time, u uuid, tx text,
           vc varchar(10), ch char(3), m mood, by bytea, ia int[], ta text[], fa float8[], ja jsonb[],
           na numeric[], ba bool[], other interval);",
    )
    .await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    db.exec(
        r#"INSERT INTO t VALUES (1, -2, 9223372036854775807, 4000000000, 1.5, 'NaN', 12.3400, true,
           '{"a" :
              [1, "x y"]}', '{"k": {"z": null}}', '2026-11-24 21:00:00.1234+02', '2026-11-24 21:00:00',
           '2026-11-24', '21:00:00.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'he said "hi"\n', 'v', 'ab',
           'sad', '\x00ff10', '{1,NULL,3}', '{"a b","c,d",NULL}', '{Infinity,-Infinity,0.5}',
           ARRAY['{"x":1}'::jsonb], '{1.10,NaN}', '{t,f}', '1 day 02:00:00');
           INSERT INTO t (id, f8, tz, d, n) VALUES (2, '-Infinity', 'infinity', '-infinity', 'NaN');
           INSERT INTO t (id) VALUES (3);"#,
    )
    .await;
    let events = db.drain_now(db.options("s", "inventorysync")).await;
    let a = &events[0]["after"];
    assert_eq!(a["i2"], -2);
    assert_eq!(a["i8"], json!(9223372036854775807i64));
    assert_eq!(a["o"], json!(4000000000u64));
    assert_eq!(a["f4"], 1.5);
    assert_eq!(a["f8"], "NaN");
    assert_eq!(a["n"], "12.3400");
    assert_eq!(a["b"], true);
    assert_eq!(a["j"], json!({"a":[1,"x y"]}));
    assert_eq!(a["jb"], json!({"k":{"z":null}}));
    assert_eq!(a["tz"], "2026-11-24T19:00:00.123400Z");
    assert_eq!(a["ts"], "2026-11-24T21:00:00");
    assert_eq!(a["d"], "2026-11-24");
    assert_eq!(a["tm"], "21:00:00.5");
    assert_eq!(a["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(a["tx"], "he said \"hi\"\\n");
    assert_eq!(a["vc"], "v");
    assert_eq!(a["ch"], "ab ");
    assert_eq!(a["m"], "sad");
    assert_eq!(a["by"], "AP8Q");
    assert_eq!(a["ia"], json!([1, null, 3]));
    assert_eq!(a["ta"], json!(["a b", "c,d", null]));
    assert_eq!(a["fa"], json!(["Infinity", "-Infinity", 0.5]));
    assert_eq!(a["ja"], json!([{"x":1}]));
    assert_eq!(a["na"], json!(["1.10", "NaN"]));
    assert_eq!(a["ba"], json!([true, false]));
    assert_eq!(a["other"], "1 day 02:00:00");
    let b = &events[1]["after"];
    assert_eq!(b["f8"], "-Infinity");
    assert_eq!(b["tz"], "infinity");
    assert_eq!(b["d"], "-infinity");
    assert_eq!(b["n"], "NaN");
    let c = &events[2]["after"];
    for col in ["i2", "f8", "n", "b", "j", "jb", "tz", "u", "by", "ia", "m"] {
        assert_eq!(c[col], serde_json::Value::Null, "{col} NULL");
    }
}

#[tokio::test]
async fn ddl_mid_stream_decodes_rows_by_their_own_relation() {
    let db = setup("ddl", "CREATE TABLE t (id int PRIMARY KEY, a int, b text);").await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    db.exec(
        "INSERT INTO t VALUES (1, 1, 'one');
         ALTER TABLE t ADD COLUMN c numeric DEFAULT 1.5;
         INSERT INTO t VALUES (2, 2, 'two', 2.5);
         ALTER TABLE t DROP COLUMN b;
         INSERT INTO t VALUES (3, 3, 3.5);
         ALTER TABLE t ALTER COLUMN a TYPE text;
         INSERT INTO t VALUES (4, 'four', 4.5);",
    )
    .await;
    let rows: Vec<serde_json::Value> = ops(&db.drain_now(db.options("s", "inventorysync")).await)
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        rows,
        [
            json!({"id":1,"a":1,"b":"one"}),
            json!({"id":2,"a":2,"b":"two","c":"2.5"}),
            json!({"id":3,"a":3,"c":"3.5"}),
            json!({"id":4,"a":"four","c":"4.5"}),
        ]
    );
}

#[tokio::test]
async fn a_transaction_over_several_tables_keeps_its_order() {
    let db = setup(
        "multi",
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);",
    )
    .await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    db.exec("BEGIN; INSERT INTO a VALUES (1); INSERT INTO b VALUES (1); INSERT INTO a VALUES (2); COMMIT;").await;
    let events = db.drain_now(db.options("s", "inventorysync")).await;
    let seen: Vec<(String, u64, u64, u64)> = events
        .iter()
        .map(|e| {
            (
                e["source"]["table"].as_str().unwrap().to_string(),
                e["source"]["sequence"].as_u64().unwrap(),
                e["transaction"]["total_order"].as_u64().unwrap(),
                e["transaction"]["data_collection_order"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("a".into(), 0, 1, 1),
            ("b".into(), 1, 2, 1),
            ("a".into(), 2, 3, 2)
        ]
    );
}

async fn rollbacks_emit_nothing(streaming: bool) {
    let db = setup(
        if streaming { "rbs" } else { "rb" },
        "CREATE TABLE t (id int PRIMARY KEY, pad text);",
    )
    .await;
    let mut opts = db.options("s", "inventorysync");
    opts.streaming = streaming;
    let mut create = opts.clone();
    create.create_slot = true;
    db.drain_now(create).await;
    db.exec("BEGIN; INSERT INTO t VALUES (1); ROLLBACK;").await;
    // Big enough to be streamed in progress when streaming is on.
    db.exec(
        "BEGIN;
         INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(10, 2000) g;
         SAVEPOINT sp;
         INSERT INTO t SELECT g, repeat('y', 200) FROM generate_series(3000, 5000) g;
         ROLLBACK TO SAVEPOINT sp;
         INSERT INTO t VALUES (2, 'kept');
         COMMIT;",
    )
    .await;
    db.exec("BEGIN; INSERT INTO t SELECT g, repeat('z', 200) FROM generate_series(6000, 9000) g; ROLLBACK;").await;
    let events = db.drain_now(opts).await;
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    let mut expected: Vec<i64> = (10..=2000).collect();
    expected.push(2);
    assert_eq!(ids, expected);
    assert!(
        events
            .iter()
            .all(|e| e["after"]["pad"] != "kept" || e["after"]["id"] == 2)
    );
}

#[tokio::test]
async fn rollback_and_rollback_to_savepoint_emit_nothing() {
    rollbacks_emit_nothing(false).await;
}

#[tokio::test]
async fn rollbacks_emit_nothing_with_streaming_on() {
    rollbacks_emit_nothing(true).await;
}

#[tokio::test]
async fn initial_load_racing_concurrent_writes_misses_and_doubles_nothing() {
    let db = setup(
        "race",
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);",
    )
    .await;
    db.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 20000) g")
        .await;
    let url = db.url_as("postgres");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = crate::harness::connect(&url).await;
            let mut n = 0i32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO t VALUES ({}, {n}); UPDATE t SET v = {n} WHERE id = {}; DELETE FROM t WHERE id = {}; COMMIT;",
                    100000 + n,
                    (n * 7) % 20000 + 1,
                    (n * 13) % 20000 + 1,
                ))
                .await
                .unwrap();
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    create.endpos = Some(inventorysync::Lsn(1));
    let snapshot = db.drain(create).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(
        writes > 10,
        "the writer ran during the load ({writes} transactions)"
    );
    let streamed = db.drain_now(db.options("s", "inventorysync")).await;
    assert_eq!(snapshot.last().unwrap()["source"]["snapshot"], "last");
    assert!(snapshot.iter().all(|e| e["op"] == "r"));
    // Replay the events into a map and compare with the table.
    let mut state = std::collections::BTreeMap::new();
    let mut inserts_seen = std::collections::HashMap::new();
    for e in snapshot.iter().chain(streamed.iter()) {
        match e["op"].as_str().unwrap() {
            "r" | "c" => {
                let id = e["after"]["id"].as_i64().unwrap();
                *inserts_seen.entry(id).or_insert(0) += 1;
                state.insert(id, e["after"]["v"].as_i64().unwrap());
            }
            "u" => {
                state.insert(
                    e["after"]["id"].as_i64().unwrap(),
                    e["after"]["v"].as_i64().unwrap(),
                );
            }
            "d" => {
                state.remove(&e["before"]["id"].as_i64().unwrap());
            }
            other => panic!("unexpected op {other}"),
        }
    }
    assert!(
        inserts_seen.values().all(|&n| n == 1),
        "a row was read or inserted twice"
    );
    let rows = db
        .client
        .query("SELECT id, v FROM t ORDER BY id", &[])
        .await
        .unwrap();
    let table: std::collections::BTreeMap<i64, i64> = rows
        .iter()
        .map(|r| (r.get::<_, i32>(0) as i64, r.get::<_, i32>(1) as i64))
        .collect();
    assert_eq!(state, table);
}

async fn big_transaction_streams(streaming: bool) {
    let db = setup(
        if streaming { "bigs" } else { "big" },
        "CREATE TABLE t (id bigint PRIMARY KEY, pad text);",
    )
    .await;
    let mut opts = db.options("s", "inventorysync");
    opts.streaming = streaming;
    opts.stream_memory_bytes = 4 << 20;
    let mut create = opts.clone();
    create.create_slot = true;
    db.drain_now(create).await;
    db.exec("INSERT INTO t SELECT g, repeat('p', 100) FROM generate_series(1, 200000) g")
        .await;
    opts.endpos = Some(db.current_lsn().await);
    // Count without keeping: memory of the source itself is what is measured by the CLI test.
    let seen = std::sync::Arc::new(std::sync::Mutex::new((0u64, None::<u64>)));
    let sink = seen.clone();
    crate::harness::stream_with(opts, std::time::Duration::ZERO, move |ev| {
        let mut s = sink.lock().unwrap();
        assert_eq!(
            ev.source.sequence,
            s.1.map_or(0, |q| q + 1),
            "sequence is gapless"
        );
        s.0 += 1;
        s.1 = Some(ev.source.sequence);
    })
    .await
    .unwrap();
    let n = seen.lock().unwrap().0;
    assert_eq!(n, 200_000);
}

#[tokio::test]
async fn a_200k_row_transaction_streams_through() {
    big_transaction_streams(false).await;
}

#[tokio::test]
async fn a_200k_row_transaction_streams_through_with_streaming_and_spill() {
    big_transaction_streams(true).await;
}

#[tokio::test]
async fn tls_connections_work_with_require_and_verify_full() {
    let db = setup("tls", "CREATE TABLE t (id int PRIMARY KEY);").await;
    db.exec("INSERT INTO t VALUES (1)").await;
    let ca = pg().dir.join("ca.crt");
    for (i, q) in [
        "sslmode=prefer".to_string(),
        "sslmode=require".to_string(),
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ]
    .iter()
    .enumerate()
    {
        let url = format!("postgres://postgres@localhost:{}/{}?{q}", db.port, db.name);
        let conn = inventorysync::config::ConnInfo::parse("test", &url).unwrap();
        let mut opts = inventorysync::source::stream::SourceOptions::new(
            &db.name,
            conn,
            &format!("s{i}"),
            "inventorysync",
        );
        opts.create_slot = true;
        opts.max_reconnects = Some(0);
        let events = db.drain_now(opts).await;
        assert_eq!(events.len(), 1, "{q}");
    }
}

#[tokio::test]
async fn a_terminated_walsender_is_reconnected_and_nothing_is_lost() {
    let db = setup(
        "reconnect",
        "CREATE TABLE t (id int PRIMARY KEY, pad text);",
    )
    .await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    for t in 0..100 {
        db.exec(&format!(
            "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series({}, {}) g",
            t * 1000,
            t * 1000 + 999
        ))
        .await;
    }
    let mut opts = db.options("s", "inventorysync");
    opts.max_reconnects = Some(10);
    opts.endpos = Some(db.current_lsn().await);
    let slot = db.slot("s");
    let url = db.url_as("postgres");
    let killer = tokio::spawn(async move {
        let c = crate::harness::connect(&url).await;
        for _ in 0..200 {
            let killed: Vec<tokio_postgres::Row> = c
                .query(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&slot],
                )
                .await
                .unwrap();
            if !killed.is_empty() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    });
    let events = db.drain(opts).await;
    assert!(
        killer.await.unwrap(),
        "the walsender was terminated while streaming"
    );
    let mut ids: Vec<i64> = events
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, (0..100_000).collect::<Vec<i64>>());
}

#[tokio::test]
async fn an_idle_published_table_next_to_a_busy_one_does_not_hold_wal() {
    let db = pg().new_db("idle").await;
    db.exec(
        "CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id int, pad text);
         CREATE PUBLICATION inventorysync FOR TABLE quiet;",
    )
    .await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = events.clone();
    let streaming = tokio::spawn(crate::harness::stream_until(
        db.options("s", "inventorysync"),
        std::time::Duration::ZERO,
        cancel.clone(),
        move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    ));
    for _ in 0..8 {
        db.exec("INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
            .await;
    }
    let mut lag = i64::MAX;
    for _ in 0..100 {
        lag = db.slot_lag_bytes("s").await;
        if lag < 1 << 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    cancel.cancel();
    streaming.await.unwrap().unwrap();
    assert!(
        lag < 1 << 20,
        "the slot retains {lag} bytes of WAL written by an unpublished table"
    );
    assert_eq!(events.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn heartbeats_advance_a_quiet_slot_and_are_never_events() {
    let db = setup("heartbeat", "CREATE TABLE t (id int PRIMARY KEY);").await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    let confirmed = || async {
        let s: String = db
            .client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.slot("s")],
            )
            .await
            .unwrap()
            .get(0);
        s.parse::<inventorysync::Lsn>().unwrap()
    };
    let before = confirmed().await;
    let mut opts = db.options("s", "inventorysync");
    opts.heartbeat_interval = Some(std::time::Duration::from_millis(300));
    let cancel = tokio_util::sync::CancellationToken::new();
    let events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = events.clone();
    let streaming = tokio::spawn(crate::harness::stream_until(
        opts,
        std::time::Duration::ZERO,
        cancel.clone(),
        move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    ));
    let mut after = before;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after = confirmed().await;
        if after > before {
            break;
        }
    }
    cancel.cancel();
    streaming.await.unwrap().unwrap();
    assert!(
        after > before,
        "heartbeat commits moved the slot ({before} -> {after})"
    );
    assert_eq!(
        events.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "heartbeats are not events"
    );
}

#[tokio::test]
async fn slot_health_is_read_and_published_while_streaming() {
    let db = setup("health", "CREATE TABLE t (id int PRIMARY KEY);").await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    db.drain_now(create).await;
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let mut opts = db.options("s", "inventorysync");
    opts.health_interval = std::time::Duration::from_millis(100);
    opts.health = Some(std::sync::Arc::new(tx));
    let cancel = tokio_util::sync::CancellationToken::new();
    let streaming = tokio::spawn(crate::harness::stream_until(
        opts,
        std::time::Duration::ZERO,
        cancel.clone(),
        |_| {},
    ));
    db.exec("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
        .await;
    let health = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            rx.changed().await.unwrap();
            if let Some(h) = rx.borrow_and_update().clone() {
                break h;
            }
        }
    })
    .await
    .expect("health published");
    cancel.cancel();
    streaming.await.unwrap().unwrap();
    assert_eq!(health.wal_status, "reserved");
    assert!(health.retained_wal_bytes > 0, "{health:?}");
    assert_eq!(
        health.safe_wal_size, None,
        "max_slot_wal_keep_size is unlimited here"
    );
}

#[tokio::test]
async fn an_incremental_load_schedules_itself_and_never_reloads_the_slot_from_its_start() {
    use inventorysync::source::stream::{InitialLoad, LoadNeeded};
    let db = pg().new_db("incload").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'old' FROM generate_series(1, 5) g;
         CREATE PUBLICATION inventorysync FOR TABLE t;",
    )
    .await;
    let calls: std::sync::Arc<std::sync::Mutex<Vec<LoadNeeded>>> = Default::default();
    let seen = calls.clone();
    let hook: inventorysync::source::stream::LoadHook = std::sync::Arc::new(move |n| {
        seen.lock().unwrap().push(n);
        Box::pin(async { Ok(()) })
    });
    let mut opts = db.options("s", "inventorysync");
    opts.create_slot = true;
    opts.initial_load = InitialLoad::Incremental(hook);
    // A new slot: the load is scheduled, nothing is read in a snapshot, streaming starts.
    let events = db.drain_now(opts.clone()).await;
    assert!(events.is_empty(), "no snapshot rows: {events:?}");
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].reason, "the slot was created");
    }
    db.exec("DELETE FROM t WHERE id = 2; UPDATE t SET v = 'new' WHERE id = 3;")
        .await;
    // The slot exists but nothing downstream holds a checkpoint of it (the harness starts
    // from zero): the load is asked for again (the hook keeps one job), and the slot streams
    // from where it is, without reading the tables or replaying from its start.
    let events = db.drain_now(opts).await;
    let got: Vec<(String, i64)> = ops(&events)
        .into_iter()
        .map(|(op, row)| (op, row["id"].as_i64().unwrap()))
        .collect();
    assert_eq!(got, [("d".to_string(), 2), ("u".to_string(), 3)]);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].reason, "the slot has no checkpoint yet");
}

/// Issue 14, item 11: a streamed transaction (logical_decoding_work_mem is 64kB on the test
/// server) whose first 5,000 rows are rolled back to a savepoint, with and without a table
/// created inside the aborted subtransaction: exactly the committed 5,000 rows arrive.
async fn aborted_subtransaction_of_a_streamed_transaction(create_table: bool) {
    let db = setup(
        if create_table { "subxddl" } else { "subx" },
        "CREATE TABLE t (id int PRIMARY KEY, pad text);",
    )
    .await;
    let mut opts = db.options("s", "inventorysync");
    opts.streaming = true;
    let mut create = opts.clone();
    create.create_slot = true;
    db.drain_now(create).await;
    let ddl = if create_table {
        "CREATE TABLE inside (id int PRIMARY KEY, v text);
         INSERT INTO inside SELECT g, repeat('i', 100) FROM generate_series(1, 2000) g;"
    } else {
        ""
    };
    db.exec(&format!(
        "BEGIN;
         SAVEPOINT a;
         {ddl}
         INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g;
         ROLLBACK TO SAVEPOINT a;
         INSERT INTO t SELECT g, repeat('y', 100) FROM generate_series(10001, 15000) g;
         COMMIT;"
    ))
    .await;
    let events = db.drain_now(opts).await;
    assert!(
        events.iter().all(|e| e["source"]["table"] == "t"),
        "nothing of the aborted table"
    );
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (10001..=15000).collect::<Vec<i64>>());
    assert!(
        events
            .iter()
            .all(|e| e["after"]["pad"].as_str().unwrap().starts_with('y'))
    );
}

#[tokio::test]
async fn a_streamed_transaction_keeps_only_what_survives_a_rollback_to_savepoint() {
    aborted_subtransaction_of_a_streamed_transaction(false).await;
}

#[tokio::test]
async fn a_table_created_in_an_aborted_subtransaction_of_a_streamed_transaction_emits_nothing() {
    aborted_subtransaction_of_a_streamed_transaction(true).await;
}

/// Issue 14, item 1: `tail`'s snapshot load of a partitioned table published through its
/// root reads the partitions' rows under the root's name, as the stream names its changes.
#[tokio::test]
async fn a_snapshot_load_reads_a_partitioned_table_published_through_its_root() {
    let db = pg().new_db("snaproot").await;
    db.exec(
        "CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE m_low PARTITION OF m FOR VALUES FROM (MINVALUE) TO (50);
         CREATE TABLE m_high PARTITION OF m FOR VALUES FROM (50) TO (MAXVALUE);
         INSERT INTO m SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION inventorysync FOR TABLE m WITH (publish_via_partition_root = true);",
    )
    .await;
    let mut create = db.options("s", "inventorysync");
    create.create_slot = true;
    create.endpos = Some(inventorysync::Lsn(1));
    let snapshot = db.drain(create).await;
    assert_eq!(snapshot.len(), 100, "{:?}", snapshot.first());
    assert!(
        snapshot
            .iter()
            .all(|e| e["op"] == "r" && e["source"]["table"] == "m"),
        "{:?}",
        snapshot.first()
    );
    db.exec("UPDATE m SET v = 'new' WHERE id = 70").await;
    let events = db.drain_now(db.options("s", "inventorysync")).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["source"]["table"], "m");
    assert_eq!(events[0]["op"], "u");
}

/// Issue 14, item 9: a transaction whose commit record precedes a chunk's low watermark but
/// that the chunk's SELECT cannot see yet (here: held in its wait for a synchronous standby;
/// in the wild: descheduled between writing its commit and leaving the process array). Its
/// update and delete are streamed before the window opens; the chunk must not emit the rows
/// as they were before them, at a newer version (that would undo both at central).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_never_undoes_a_change_committed_before_its_low_watermark_but_not_yet_visible() {
    use inventorysync::event::SnapshotMarker;
    use inventorysync::source::resync::ChunkRequest;
    let db = crate::harness::pg_sync_standby().new_db("visrace").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 10) g;
         CREATE PUBLICATION inventorysync FOR TABLE t;",
    )
    .await;
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        db.slot("s")
    ))
    .await;
    // The writer commits (its commit record is flushed and decoded) and then waits for the
    // standby: until the wait ends, no other session sees its changes.
    let writer = crate::harness::connect(&db.url_as("postgres")).await;
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let write = tokio::spawn(async move {
        let r = writer
            .batch_execute(
                "SET synchronous_commit = on;
                 BEGIN; UPDATE t SET v = 1 WHERE id = 5; DELETE FROM t WHERE id = 7; COMMIT;",
            )
            .await;
        (writer, r)
    });
    for _ in 0..200 {
        let waiting: Option<String> = db
            .client
            .query_one(
                "SELECT wait_event::text FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting.as_deref() == Some("SyncRep") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel(1);
    let mut opts = db.options("s", "inventorysync");
    opts.chunks = Some(std::sync::Arc::new(tokio::sync::Mutex::new(chunks_rx)));
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let stream = tokio::spawn(crate::harness::stream_until(
        opts,
        std::time::Duration::ZERO,
        cancel.clone(),
        move |ev| {
            sink.lock()
                .unwrap()
                .push(serde_json::from_str::<serde_json::Value>(&ev.to_json()).unwrap())
        },
    ));
    // The stream has decoded the writer's commit before the chunk is asked for.
    for _ in 0..200 {
        if events.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        events.lock().unwrap().len(),
        2,
        "the writer's update and delete"
    );
    let (reply, answer) = tokio::sync::oneshot::channel();
    chunks_tx
        .send(ChunkRequest {
            id: "visrace:t:0".into(),
            table: "public.t".into(),
            after: None,
            limit: 100,
            marker: SnapshotMarker::Incremental,
            reply,
        })
        .await
        .unwrap();
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), answer)
        .await
        .expect("the chunk is answered")
        .unwrap()
        .unwrap();
    // End the writer's wait: it is committed, now visible.
    db.exec(&format!("SELECT pg_cancel_backend({pid})")).await;
    let (_writer, _) = write.await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cancel.cancel();
    stream.await.unwrap().unwrap();
    // The last event of each key, in stream (= version) order, is the truth.
    let mut last = std::collections::BTreeMap::new();
    for e in events.lock().unwrap().iter() {
        let row = if e["op"] == "d" {
            &e["before"]
        } else {
            &e["after"]
        };
        last.insert(
            row["id"].as_i64().unwrap(),
            (e["op"].clone(), row["v"].clone()),
        );
    }
    assert_eq!(
        last[&5],
        (json!("u"), json!(1)),
        "the chunk undid the update"
    );
    assert_eq!(
        last[&7].0,
        json!("d"),
        "the chunk resurrected the deleted row"
    );
    assert_eq!(last[&1], (json!("r"), json!(0)));
    assert_eq!(done.read, 10);
    assert_eq!(done.emitted, 8, "{done:?}");
}
