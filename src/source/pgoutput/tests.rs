use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::Lsn;

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn tuple(b: &mut BytesMut, cols: &[Option<&[u8]>]) {
    b.put_i16(cols.len() as i16);
    for c in cols {
        match c {
            None => b.put_u8(b'n'),
            Some(v) if *v == b"\0toast" => b.put_u8(b'u'),
            Some(v) => {
                b.put_u8(b't');
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
        }
    }
}

fn relation_bytes(xid: Option<u32>) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    if let Some(x) = xid {
        b.put_u32(x);
    }
    b.put_u32(16384);
    cstr(&mut b, "public");
    cstr(&mut b, "stock_levels");
    b.put_u8(b'd');
    b.put_i16(2);
    b.put_u8(1);
    cstr(&mut b, "sku");
    b.put_u32(25);
    b.put_i32(-1);
    b.put_u8(0);
    cstr(&mut b, "qty_on_hand");
    b.put_u32(23);
    b.put_i32(-1);
    b.freeze()
}

#[test]
fn decodes_begin_and_commit() {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(0x16B3748);
    b.put_i64(1234);
    b.put_u32(777);
    let msg = PgOutputDecoder::new().decode(&b.freeze()).unwrap();
    assert_eq!(
        msg,
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(0x16B3748),
            commit_time_micros: 1234,
            xid: 777
        })
    );

    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(10);
    b.put_u64(20);
    b.put_i64(30);
    let msg = PgOutputDecoder::new().decode(&b.freeze()).unwrap();
    assert_eq!(
        msg,
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time_micros: 30
        })
    );
}

#[test]
fn decodes_relation_with_key_flags() {
    let msg = PgOutputDecoder::new()
        .decode(&relation_bytes(None))
        .unwrap();
    let LogicalMessage::Relation(r) = msg else {
        panic!("not a relation: {msg:?}")
    };
    assert_eq!(r.oid, 16384);
    assert_eq!(r.namespace, "public");
    assert_eq!(r.name, "stock_levels");
    assert_eq!(r.replica_identity, ReplicaIdentity::Default);
    assert_eq!(r.columns.len(), 2);
    assert!(r.columns[0].is_key);
    assert!(!r.columns[1].is_key);
    assert_eq!(r.columns[1].type_oid, 23);
}

#[test]
fn decodes_update_with_old_key_and_all_tuple_kinds() {
    let mut b = BytesMut::new();
    b.put_u8(b'U');
    b.put_u32(16384);
    b.put_u8(b'K');
    tuple(&mut b, &[Some(b"SKU-1"), None]);
    b.put_u8(b'N');
    tuple(&mut b, &[Some(b"SKU-2"), Some(b"\0toast")]);
    let msg = PgOutputDecoder::new().decode(&b.freeze()).unwrap();
    let LogicalMessage::Update(u) = msg else {
        panic!()
    };
    let Some(OldTuple::Key(old)) = &u.old else {
        panic!()
    };
    assert_eq!(old.get(0), Some(TupleValue::Text(b"SKU-1")));
    assert_eq!(old.get(1), Some(TupleValue::Null));
    assert_eq!(u.new.get(0), Some(TupleValue::Text(b"SKU-2")));
    assert_eq!(u.new.get(1), Some(TupleValue::UnchangedToast));
    assert_eq!(u.new.get(2), None);
}

#[test]
fn decodes_binary_columns() {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(1);
    b.put_u8(b'N');
    b.put_i16(1);
    b.put_u8(b'b');
    b.put_i32(4);
    b.put_i32(42);
    let LogicalMessage::Insert(i) = PgOutputDecoder::new().decode(&b.freeze()).unwrap() else {
        panic!()
    };
    assert_eq!(i.new.get(0), Some(TupleValue::Binary(&[0, 0, 0, 42])));
}

#[test]
fn decodes_delete_with_full_old_row() {
    let mut b = BytesMut::new();
    b.put_u8(b'D');
    b.put_u32(5);
    b.put_u8(b'O');
    tuple(&mut b, &[Some(b"a"), Some(b"1")]);
    let LogicalMessage::Delete(d) = PgOutputDecoder::new().decode(&b.freeze()).unwrap() else {
        panic!()
    };
    assert!(matches!(d.old, OldTuple::Full(_)));
    assert_eq!(d.old.tuple().len(), 2);
}

#[test]
fn decodes_truncate_options() {
    let mut b = BytesMut::new();
    b.put_u8(b'T');
    b.put_u32(2);
    b.put_u8(3);
    b.put_u32(10);
    b.put_u32(11);
    let LogicalMessage::Truncate(t) = PgOutputDecoder::new().decode(&b.freeze()).unwrap() else {
        panic!()
    };
    assert!(t.cascade && t.restart_identity);
    assert_eq!(t.relation_oids, vec![10, 11]);
}

#[test]
fn decodes_origin_type_and_message() {
    let mut b = BytesMut::new();
    b.put_u8(b'O');
    b.put_u64(99);
    cstr(&mut b, "node_a");
    assert_eq!(
        PgOutputDecoder::new().decode(&b.freeze()).unwrap(),
        LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(99),
            name: "node_a".into()
        })
    );
    let mut b = BytesMut::new();
    b.put_u8(b'Y');
    b.put_u32(70000);
    cstr(&mut b, "public");
    cstr(&mut b, "mood");
    let LogicalMessage::Type(t) = PgOutputDecoder::new().decode(&b.freeze()).unwrap() else {
        panic!()
    };
    assert_eq!((t.oid, t.name.as_str()), (70000, "mood"));

    let mut b = BytesMut::new();
    b.put_u8(b'M');
    b.put_u8(1);
    b.put_u64(5);
    cstr(&mut b, "inventorysync");
    b.put_u32(3);
    b.put_slice(b"abc");
    let LogicalMessage::Message(m) = PgOutputDecoder::new().decode(&b.freeze()).unwrap() else {
        panic!()
    };
    assert!(m.transactional);
    assert_eq!(m.prefix, "inventorysync");
    assert_eq!(&m.content[..], b"abc");
}

#[test]
fn streamed_block_messages_carry_xids() {
    let mut d = PgOutputDecoder::new();
    let mut b = BytesMut::new();
    b.put_u8(b'S');
    b.put_u32(900);
    b.put_u8(1);
    assert_eq!(
        d.decode(&b.freeze()).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid: 900,
            first_segment: true
        })
    );
    assert!(d.in_stream_block());
    let LogicalMessage::Relation(r) = d.decode(&relation_bytes(Some(901))).unwrap() else {
        panic!()
    };
    assert_eq!(r.xid, Some(901));
    assert_eq!(
        d.decode(&Bytes::from_static(b"E")).unwrap(),
        LogicalMessage::StreamStop
    );
    assert!(!d.in_stream_block());

    let mut b = BytesMut::new();
    b.put_u8(b'A');
    b.put_u32(900);
    b.put_u32(901);
    assert_eq!(
        d.decode(&b.freeze()).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 900,
            subxid: 901
        })
    );
    let mut b = BytesMut::new();
    b.put_u8(b'c');
    b.put_u32(900);
    b.put_u8(0);
    b.put_u64(1);
    b.put_u64(2);
    b.put_i64(3);
    let LogicalMessage::StreamCommit(c) = d.decode(&b.freeze()).unwrap() else {
        panic!()
    };
    assert_eq!((c.xid, c.end_lsn), (900, Lsn(2)));
}

#[test]
fn truncated_message_names_the_field() {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(1);
    let err = PgOutputDecoder::new().decode(&b.freeze()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "message 'B': field 'commit timestamp' needs 8 bytes at offset 9, only 0 left"
    );
}

#[test]
fn bad_tuple_kind_is_a_clear_error() {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(1);
    b.put_u8(b'X');
    let err = PgOutputDecoder::new().decode(&b.freeze()).unwrap_err();
    assert!(err.to_string().contains("field 'tuple kind'"), "{err}");
    assert!(err.to_string().contains("0x58"), "{err}");
}

#[test]
fn unknown_tag_is_reported() {
    let err = PgOutputDecoder::new()
        .decode(&Bytes::from_static(b"Z"))
        .unwrap_err();
    assert_eq!(err.to_string(), "unknown pgoutput message tag 0x5a (Z)");
    assert_eq!(
        PgOutputDecoder::new().decode(&Bytes::new()).unwrap_err(),
        DecodeError::Empty
    );
}

#[test]
fn decodes_xlogdata_and_keepalive_framing() {
    let mut b = BytesMut::new();
    b.put_u8(b'w');
    b.put_u64(1);
    b.put_u64(2);
    b.put_i64(3);
    b.put_slice(b"E");
    let ReplicationMessage::XLogData {
        wal_start, data, ..
    } = decode_replication_message(b.freeze()).unwrap()
    else {
        panic!()
    };
    assert_eq!(wal_start, Lsn(1));
    assert_eq!(&data[..], b"E");

    let mut b = BytesMut::new();
    b.put_u8(b'k');
    b.put_u64(7);
    b.put_i64(8);
    b.put_u8(1);
    assert_eq!(
        decode_replication_message(b.freeze()).unwrap(),
        ReplicationMessage::PrimaryKeepalive {
            wal_end: Lsn(7),
            send_time_micros: 8,
            reply_requested: true
        }
    );
}

#[test]
fn standby_status_update_layout() {
    let m = encode_standby_status_update(Lsn(1), Lsn(2), Lsn(3), 4, true);
    assert_eq!(m[0], b'r');
    assert_eq!(&m[9..17], &2u64.to_be_bytes());
    assert_eq!(m[33], 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// The decoder never panics, whatever the bytes, inside or outside a streamed block.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256), streamed in any::<bool>()) {
        let buf = Bytes::from(data);
        let _ = decode_logical_message(&buf, streamed);
        let _ = decode_replication_message(buf);
    }

    /// Valid tags followed by random bodies also never panic.
    #[test]
    fn known_tags_with_random_bodies_never_panic(
        tag in proptest::sample::select(b"BCOMRYIUDTSEcAwk".to_vec()),
        body in proptest::collection::vec(any::<u8>(), 0..128),
        streamed in any::<bool>(),
    ) {
        let mut v = vec![tag];
        v.extend(body);
        let buf = Bytes::from(v);
        let _ = decode_logical_message(&buf, streamed);
        let _ = decode_replication_message(buf);
    }

    /// Any insert built from random column values decodes back to those values.
    #[test]
    fn insert_round_trips(cols in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)), 0..20)) {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(42);
        b.put_u8(b'N');
        let refs: Vec<Option<&[u8]>> = cols.iter().map(|c| c.as_deref()).collect();
        tuple(&mut b, &refs);
        let LogicalMessage::Insert(i) = decode_logical_message(&b.freeze(), false).unwrap() else { panic!() };
        prop_assert_eq!(i.new.len(), cols.len());
        for (n, c) in cols.iter().enumerate() {
            let got = i.new.get(n).unwrap();
            match c {
                None => prop_assert_eq!(got, TupleValue::Null),
                Some(v) => prop_assert_eq!(got, TupleValue::Text(v)),
            }
        }
    }
}
