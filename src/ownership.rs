//! Which warehouses this `run` process owns when several share one state DB.
//!
//! Every process writes a heartbeat row (`sync_workers`) every [`HEARTBEAT_EVERY`] with an
//! expiry of [`HEARTBEAT_EXPIRY`] and the warehouses it owns, reads everyone's, and takes or
//! gives up warehouses until each live process owns ⌊N/P⌋ or ⌈N/P⌉ of the N (the ones that
//! own more now keep the extra, so a join moves only what it must). The advisory locks on each
//! process's lease connection ([`crate::store::Leases`]) make ownership exclusive whatever the
//! rows say; the rows only balance. A process that dies counts until its row expires, so one
//! restarted under the same worker id within the expiry takes its warehouses back and nothing
//! else moves; one that does not come back has its share taken over within about
//! `HEARTBEAT_EXPIRY + HEARTBEAT_EVERY`.

use std::time::Duration;

/// How often a process renews its heartbeat and balances.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A heartbeat older than this means the process is gone.
pub const HEARTBEAT_EXPIRY: Duration = Duration::from_secs(10);
/// At SIGTERM, how long a process waits for the others to own what it handed over.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(15);

/// This process's worker id: `WORKER_ID`, or `{host}:{API port}` (stable across restarts on
/// one host, distinct between processes there).
pub fn worker_id(configured: Option<&str>, host: &str, api: std::net::SocketAddr) -> String {
    match configured.map(str::trim).filter(|v| !v.is_empty()) {
        Some(id) => id.to_string(),
        None => format!("{host}:{}", api.port()),
    }
}

/// The host name (the kernel's), or `localhost`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// How many of `n` warehouses `me` should own, given every live process with how many it
/// owns now (`me` among them): ⌊n/p⌋, plus one for the `n mod p` processes that own the most
/// (ties by worker id), so that whoever holds an extra one keeps it.
pub fn target(me: &str, live: &[(&str, usize)], n: usize) -> usize {
    let p = live.len().max(1);
    let (q, r) = (n / p, n % p);
    let mut order: Vec<&(&str, usize)> = live.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let rank = order.iter().position(|(id, _)| *id == me).unwrap_or(p);
    q + usize::from(rank < r)
}

/// How much `worker` prefers `warehouse` (rendezvous hashing): each process prefers its own
/// spread of warehouses, so processes taking warehouses at once rarely reach for the same one,
/// and a process restarted under the same id reaches for the ones it had.
pub fn preference(worker: &str, warehouse: &str) -> u64 {
    // FNV-1a: the same in every process and version (std's hasher is seeded per process).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in worker.bytes().chain([0]).chain(warehouse.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(live: &[(&str, usize)], n: usize) -> Vec<usize> {
        live.iter().map(|(id, _)| target(id, live, n)).collect()
    }

    #[test]
    fn every_process_owns_the_floor_or_the_ceiling_and_they_add_up() {
        for n in 0..40 {
            for p in 1..8 {
                let ids: Vec<String> = (0..p).map(|i| format!("w{i}")).collect();
                let live: Vec<(&str, usize)> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| (id.as_str(), (i * 7) % 5))
                    .collect();
                let t = targets(&live, n);
                assert_eq!(t.iter().sum::<usize>(), n, "n={n} p={p}: {t:?}");
                assert!(t.iter().all(|&x| x == n / p || x == n.div_ceil(p)), "{t:?}");
            }
        }
    }

    #[test]
    fn a_join_moves_only_what_it_must() {
        // 10 on three processes (4/3/3); a fourth joins: 3/3/2/2, from the one that had 4
        // and one that had 3, and the next balance keeps it so.
        let t = targets(&[("a", 4), ("b", 3), ("c", 3), ("d", 0)], 10);
        assert_eq!(t, [3, 3, 2, 2]);
        let t = targets(&[("a", 3), ("b", 3), ("c", 2), ("d", 2)], 10);
        assert_eq!(t, [3, 3, 2, 2]);
        // Twelve on three, then four.
        assert_eq!(targets(&[("a", 0), ("b", 0), ("c", 0)], 12), [4, 4, 4]);
        assert_eq!(
            targets(&[("a", 4), ("b", 4), ("c", 4), ("d", 0)], 12),
            [3, 3, 3, 3]
        );
    }

    #[test]
    fn a_worker_id_is_configured_or_host_and_port() {
        let api = "127.0.0.1:8081".parse().expect("address");
        assert_eq!(worker_id(None, "box", api), "box:8081");
        assert_eq!(worker_id(Some("  "), "box", api), "box:8081");
        assert_eq!(worker_id(Some("east-1"), "box", api), "east-1");
    }

    #[test]
    fn preferences_differ_between_workers_and_never_change() {
        assert_eq!(preference("a", "wh-1"), preference("a", "wh-1"));
        assert_ne!(preference("a", "wh-1"), preference("b", "wh-1"));
        // Pinned: stored nowhere, but processes of two versions must agree while they run
        // side by side.
        assert_eq!(preference("a", "wh-1"), 0x95e1_ab80_ef20_4251);
    }
}
