//! Comet: a long-connection access gateway. Clients hold WebSocket connections to
//! thread-per-core shards; message servers push to them by conn_id through the push RPC.
//! See docs/ARCHITECTURE.md for the threads and who owns what.

// `unsafe` lives in `sys` alone, each use with its SAFETY comment
// (tests/architecture.rs checks it too).
#![deny(unsafe_code)]
#![warn(unreachable_pub)]

pub mod app;
pub(crate) mod callback;
pub mod codec;
pub mod config;
pub mod control;
pub(crate) mod fault;
pub(crate) mod handover;
pub(crate) mod histogram;
pub(crate) mod link;
pub mod logging;
pub mod panics;
pub(crate) mod presence;
pub(crate) mod presence_gate;
pub mod recovery;
pub mod rpc;
pub(crate) mod session;
pub(crate) mod shard;
#[allow(unsafe_code)]
pub(crate) mod sys;
pub mod token;
pub mod transport;
