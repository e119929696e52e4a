//! Comet: a long-connection access gateway. Clients hold WebSocket connections to
//! thread-per-core shards; message servers push to them by conn_id through the push RPC.
//! See docs/ARCHITECTURE.md for the threads and who owns what.

// `unsafe` lives in `sys` alone, each use with its SAFETY comment
// (tests/architecture.rs checks it too).
#![deny(unsafe_code)]

pub mod app;
pub mod callback;
pub mod codec;
pub mod config;
pub mod control;
pub mod fault;
pub mod handover;
pub(crate) mod histogram;
pub mod link;
pub mod logging;
pub mod panics;
pub mod presence;
pub mod presence_gate;
pub mod recovery;
pub mod rpc;
pub mod session;
pub mod shard;
#[allow(unsafe_code)]
pub mod sys;
pub mod token;
pub mod transport;
