//! InventorySync: change data capture from warehouse PostgreSQL databases.
pub mod lsn;
pub mod source;

pub use lsn::Lsn;
