//! Client transports. Each turns a socket accepted on a shard into a registered
//! [`crate::session::Session`] and runs it until it closes.

pub mod ws;
