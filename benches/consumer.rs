//! The consumer stage's CPU per change, without the network: mapping an in-process event of
//! the demo `stock_levels` table to a central change's JSON (with every rule checked), parsing
//! and mapping the same event as a Kafka record, assembling a request of 500 from the JSON,
//! and the reference server decoding it.
//!
//! `scripts/bench-consumer` measures the whole path against a real PostgreSQL; this one shows
//! where the time of one change goes. Throughput is reported in changes per second on one core.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group};
use inventorysync::Lsn;
use inventorysync::central::{Change, ChangeBatch, Outgoing, batch_id, request_body};
use inventorysync::consumer::mapping::{
    Mapped, MappedChange, RawEvent, map_change_event, map_event,
};
use inventorysync::consumer::settings::ConsumerSettings;
use inventorysync::event::{
    ChangeEvent, Op, Row, SnapshotMarker, SourceInfo, TableSource, TransactionInfo, Value,
};

/// The same allocator as the binary (one thread: its arena count does not matter here).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const BATCH: usize = 500;

/// An insert into `stock_levels` as the source produces it.
fn event(table: &Arc<TableSource>, n: u64) -> ChangeEvent {
    let after = Row::from_pairs([
        ("sku", Value::String(format!("SKU-{}", n % 2000).into())),
        (
            "location_code",
            Value::String(format!("L-{}", n / 2000).into()),
        ),
        ("qty_on_hand", Value::Number((n % 50).to_string().into())),
        ("qty_reserved", Value::Number((n % 5).to_string().into())),
        (
            "updated_at",
            Value::String("2026-11-25T03:23:09.123456Z".into()),
        ),
    ]);
    ChangeEvent {
        before: None,
        key: Some(Row::from_pairs([
            ("sku", after.get("sku").cloned().unwrap_or(Value::Null)),
            (
                "location_code",
                after.get("location_code").cloned().unwrap_or(Value::Null),
            ),
        ])),
        after: Some(after),
        source: SourceInfo {
            table: table.clone(),
            ts_ms: 1_795_577_000_123,
            ts_us: 1_795_577_000_123_456,
            snapshot: SnapshotMarker::False,
            tx_id: Some(1000),
            lsn: Lsn(0x1_6B37_4800 + n * 120),
            commit_lsn: Lsn(0x1_6B37_4800 + 120 * 1000),
            sequence: n,
            unchanged_toast: Vec::new(),
        },
        op: Op::Create,
        ts_ms: 1_795_577_000_200,
        transaction: Some(TransactionInfo {
            total_order: n + 1,
            data_collection_order: n + 1,
        }),
    }
}

fn bench(c: &mut Criterion) {
    let settings = ConsumerSettings::from_toml(include_str!("../sql/demo_mapping.toml"))
        .expect("the demo mapping parses");
    let m = settings
        .mappings
        .get("public.stock_levels")
        .expect("stock_levels is mapped");
    let table = TableSource::new("wh-east", "inventory", "public", "stock_levels");
    let events: Vec<ChangeEvent> = (0..BATCH as u64).map(|n| event(&table, n)).collect();
    let map_all = |out: &mut Vec<u8>| -> Vec<MappedChange> {
        events
            .iter()
            .flat_map(|ev| match map_change_event(ev, m, &settings.rules, out) {
                Ok(Mapped::Changes(c)) => c,
                other => panic!("the bench event maps to changes: {other:?}"),
            })
            .collect()
    };
    let mut rendered = Vec::new();
    let mapped = map_all(&mut rendered);
    let changes: Vec<Change> = mapped
        .iter()
        .map(|c| c.full(&rendered[c.json.clone()]))
        .collect();
    let refs: Vec<_> = changes.iter().collect();
    let batch = ChangeBatch {
        warehouse_id: "wh-east".into(),
        batch_id: batch_id("wh-east", &refs),
        changes: changes.clone(),
    };
    let body = serde_json::to_vec(&batch).expect("encodes");
    let outgoing: Vec<Outgoing<'_>> = mapped
        .iter()
        .map(|c| Outgoing {
            version: &c.version,
            json: &rendered[c.json.clone()],
        })
        .collect();

    let mut g = c.benchmark_group("consumer");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("map and render 500 stock-level events", |b| {
        let mut out = Vec::with_capacity(BATCH * 320);
        b.iter(|| {
            out.clear();
            black_box(map_all(&mut out))
        })
    });
    // The Kafka path: each record's JSON envelope parsed in place, then mapped.
    let records: Vec<Vec<u8>> = events.iter().map(|ev| ev.to_json().into_bytes()).collect();
    g.bench_function("parse, map and render 500 Kafka records", |b| {
        b.iter(|| {
            let mut n = 0;
            let mut out = Vec::with_capacity(BATCH * 320);
            for r in &records {
                let ev = RawEvent::parse(black_box(r)).expect("parses");
                match map_event(&ev, m, &settings.rules, &mut out) {
                    Ok(Mapped::Changes(c)) => n += c.len(),
                    other => panic!("the bench record maps to changes: {other:?}"),
                }
            }
            black_box(n)
        })
    });
    g.bench_function("assemble a request of 500", |b| {
        b.iter(|| {
            black_box(request_body(
                "wh-east",
                &batch.batch_id,
                black_box(&outgoing),
            ))
        })
    });
    g.bench_function("central decodes a request of 500", |b| {
        b.iter(|| {
            black_box(
                inventorysync::central::server::Request::parse(black_box(&body)).expect("decodes"),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
