//! Partitioned tables (issue 14, item 1): published through their root
//! (`publish_via_partition_root = true`) the initial load and a forced resync read the
//! partitions' rows under the root's name, as the stream names their changes; published as
//! partitions (the default) each partition is its own table, under its own name.

use crate::api::{run_with_api, seed_stock};
use crate::consumer::{Central, assert_converges, config, log_tail};
use crate::harness::{TestDb, pg};
use inventorysync::central::server::Faults;

/// The demo schema with `stock_levels` partitioned by location in three partitions.
async fn partitioned_warehouse(prefix: &str, via_root: bool) -> TestDb {
    let db = pg().new_db(prefix).await;
    db.exec(
        "CREATE TABLE products (sku text PRIMARY KEY, name text NOT NULL, unit_price numeric(12, 2),
                                attributes jsonb NOT NULL DEFAULT '{}', updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE locations (location_code text PRIMARY KEY, zone text NOT NULL,
                                 updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE stock_levels (
             sku text NOT NULL REFERENCES products (sku),
             location_code text NOT NULL REFERENCES locations (location_code),
             qty_on_hand integer NOT NULL, qty_reserved integer NOT NULL DEFAULT 0,
             updated_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (sku, location_code)) PARTITION BY HASH (location_code);
         CREATE TABLE stock_levels_p0 PARTITION OF stock_levels FOR VALUES WITH (MODULUS 3, REMAINDER 0);
         CREATE TABLE stock_levels_p1 PARTITION OF stock_levels FOR VALUES WITH (MODULUS 3, REMAINDER 1);
         CREATE TABLE stock_levels_p2 PARTITION OF stock_levels FOR VALUES WITH (MODULUS 3, REMAINDER 2);",
    )
    .await;
    db.exec(&format!(
        "CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels
           WITH (publish_via_partition_root = {via_root})"
    ))
    .await;
    db
}

/// Mappings of the three partitions as stock levels (when they are published as themselves).
fn partition_mappings() -> String {
    (1..3)
        .map(|p| {
            format!(
                "[[mappings]]\ntable = 'public.stock_levels_p{p}'\nentity = 'stock_level'\n\
                 key = {{ sku = 'sku', location = 'location_code' }}\n\
                 data = {{ on_hand = 'qty_on_hand', reserved = 'qty_reserved' }}\n"
            )
        })
        .collect()
}

async fn load_and_resync_a_partitioned_table(via_root: bool) {
    let name = if via_root { "partroot" } else { "partleaf" };
    let db = partitioned_warehouse(name, via_root).await;
    // Rows before the slot exists: only the initial load can deliver them.
    seed_stock(&db, 400, 9).await;
    let state = pg().new_db(&format!("{name}state")).await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = if via_root {
        String::new()
    } else {
        partition_mappings()
    };
    let cfg = config(dir.path(), &db, "wh-part", &extra);
    if !via_root {
        // The demo mapping names the root, whose changes never come under that name here:
        // `check` says so and names both ways out.
        let text = std::fs::read_to_string(&cfg).unwrap();
        let (code, out) = crate::cli::run_check(&text, &[]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("public.stock_levels is mapped, but inventorysync publishes its partitions under their own names (stock_levels_p0, stock_levels_p1, stock_levels_p2)")
                && out.contains("publish_via_partition_root = true"),
            "{out}"
        );
        // The partitions are the published tables: the demo's stock_levels mapping names the
        // first one (the root is not published, `check` refuses a mapping of it).
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text = text.replace("\"public.stock_levels\"", "\"public.stock_levels_p0\"");
        std::fs::write(&cfg, text).unwrap();
    }
    let log = dir.path().join("run.log");
    let (_run, api) = run_with_api(&cfg, &state, &central, log.clone(), &[]);
    // The load read every partition's rows (3,600 stock levels), under the names the
    // stream uses for their changes.
    assert_converges(&central, &db, "wh-part", &log).await;
    db.exec(
        "UPDATE stock_levels SET qty_on_hand = 7 WHERE sku = 'SKU-3';
         DELETE FROM stock_levels WHERE sku = 'SKU-4';",
    )
    .await;
    assert_converges(&central, &db, "wh-part", &log).await;
    // A forced resync of a wiped central reads them again.
    central.damage("wh-part", false).await;
    let (status, v) = api.post("/sync/warehouses/wh-part", "").await;
    assert_eq!(status, 202, "{v}");
    let job = api.finished(v["jobId"].as_str().unwrap(), &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    assert_converges(&central, &db, "wh-part", &log).await;
    let tables: Vec<String> = state
        .client
        .query(
            "SELECT DISTINCT table_name FROM sync_resync_progress ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: &[&str] = if via_root {
        &["public.locations", "public.products", "public.stock_levels"]
    } else {
        &[
            "public.locations",
            "public.products",
            "public.stock_levels_p0",
            "public.stock_levels_p1",
            "public.stock_levels_p2",
        ]
    };
    assert_eq!(tables, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_published_through_its_partition_root_is_loaded_and_resynced_under_the_root() {
    load_and_resync_a_partitioned_table(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_published_as_its_partitions_is_loaded_and_resynced_per_partition() {
    load_and_resync_a_partitioned_table(false).await;
}
