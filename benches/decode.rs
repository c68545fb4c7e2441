//! Decode + normalize + JSON-encode throughput on a stream of ~150-byte rows.
//!
//! The input is built in pgoutput's exact wire format (the `XLogData` framing, Relation,
//! Begin, Insert, Commit), with the column types and text forms Postgres sends for the
//! benchmark table of `scripts/bench-drain`: bigserial, text, numeric, timestamptz, small jsonb.
//! Throughput is reported in rows per second on one core.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group};
use inventorysync::Lsn;
use inventorysync::source::assemble::{Assembler, Next, SourceIdentity, StreamItem};
use inventorysync::source::pgoutput::{
    LogicalMessage, PgOutputDecoder, ReplicationMessage, decode_replication_message,
};

const ROWS_PER_TX: usize = 1000;

/// The same allocator as the binary (one thread: its arena count does not matter here).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn xlog(lsn: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 25);
    b.put_u8(b'w');
    b.put_u64(lsn);
    b.put_u64(lsn);
    b.put_i64(0);
    b.put_slice(payload);
    b.freeze()
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn relation() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(16400);
    cstr(&mut b, "public");
    cstr(&mut b, "bench");
    b.put_u8(b'd');
    let cols = [
        ("id", 20, 1),
        ("name", 25, 0),
        ("price", 1700, 0),
        ("at", 1184, 0),
        ("attrs", 3802, 0),
    ];
    b.put_i16(cols.len() as i16);
    for (name, oid, key) in cols {
        b.put_u8(key);
        cstr(&mut b, name);
        b.put_u32(oid);
        b.put_i32(-1);
    }
    b.to_vec()
}

fn insert(id: u64) -> Vec<u8> {
    let values = [
        id.to_string(),
        format!("item-{id:08}-abcdefghijklmnopqrstuvwxyz-0123456789"),
        format!("{}.{:02}", id % 10_000, id % 100),
        "2026-11-24 21:00:00.123456+00".to_string(),
        format!("{{\"k\": {id}, \"tag\": \"abc\", \"ok\": true}}"),
    ];
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16400);
    b.put_u8(b'N');
    b.put_i16(values.len() as i16);
    for v in &values {
        b.put_u8(b't');
        b.put_i32(v.len() as i32);
        b.put_slice(v.as_bytes());
    }
    b.to_vec()
}

/// One transaction's CopyData payloads, Relation first.
fn recorded_stream() -> Vec<Bytes> {
    let mut lsn = 0x1000_0000u64;
    let commit_lsn = lsn + (ROWS_PER_TX as u64 + 2) * 200;
    let mut out = vec![xlog(lsn, &relation())];
    let mut begin = BytesMut::new();
    begin.put_u8(b'B');
    begin.put_u64(commit_lsn);
    begin.put_i64(0);
    begin.put_u32(777);
    out.push(xlog(lsn, &begin));
    for i in 0..ROWS_PER_TX as u64 {
        lsn += 200;
        out.push(xlog(lsn, &insert(i + 1)));
    }
    let mut commit = BytesMut::new();
    commit.put_u8(b'C');
    commit.put_u8(0);
    commit.put_u64(commit_lsn);
    commit.put_u64(commit_lsn + 48);
    commit.put_i64(0);
    out.push(xlog(commit_lsn, &commit));
    out
}

/// Decodes, assembles and encodes one recorded transaction; returns the bytes written.
fn run_once(stream: &[Bytes], out: &mut Vec<u8>, items: &mut Vec<StreamItem>) -> usize {
    let mut decoder = PgOutputDecoder::new();
    let mut asm = Assembler::new(
        SourceIdentity {
            warehouse_id: "wh-bench".into(),
            db: "bench".into(),
        },
        64 << 20,
    );
    out.clear();
    for frame in stream {
        let Ok(ReplicationMessage::XLogData {
            wal_start, data, ..
        }) = decode_replication_message(frame.clone())
        else {
            panic!("bad frame")
        };
        let msg = decoder.decode(&data).expect("decodes");
        if let LogicalMessage::Relation(r) = &msg {
            asm.relation(r, &["id".to_string()]);
            continue;
        }
        let next = asm
            .handle(msg, Lsn(wal_start.0), &data, items)
            .expect("assembles");
        assert!(matches!(next, Next::Done));
        for item in items.drain(..) {
            if let StreamItem::Change(ev) = item {
                ev.write_json(out);
                out.push(b'\n');
            }
        }
    }
    out.len()
}

fn bench(c: &mut Criterion) {
    let stream = recorded_stream();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(ROWS_PER_TX as u64));
    group.bench_function("decode_normalize_encode_1000_rows", |b| {
        let mut out = Vec::with_capacity(1 << 20);
        let mut items = Vec::with_capacity(ROWS_PER_TX + 1);
        b.iter(|| std::hint::black_box(run_once(&stream, &mut out, &mut items)))
    });
    group.finish();
}

criterion_group!(benches, bench);

/// `DECODE_BENCH_TRANSACTIONS=N` runs a fixed amount of work without criterion, for
/// instruction counts under `valgrind --tool=callgrind` (repeatable on a noisy machine).
fn main() {
    if let Some(n) = std::env::var("DECODE_BENCH_TRANSACTIONS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let stream = recorded_stream();
        let (mut out, mut items) = (Vec::with_capacity(1 << 20), Vec::new());
        let mut total = 0;
        for _ in 0..n {
            total += run_once(&stream, &mut out, &mut items);
        }
        println!("{} rows, {total} bytes of JSON", n * ROWS_PER_TX);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
