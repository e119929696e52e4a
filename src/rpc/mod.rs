//! The push RPC front (COMPAT.md section 6): accepts message servers' TCP connections on
//! `rpc_addr` and answers their calls in order, many per connection.
//!
//! Runs on the control thread's runtime. A malformed call gets an error reply and the
//! connection stays usable whenever the framing allows; only an oversized request or a
//! socket error closes it. Never touches a shard's state except through [`Node`].

pub mod codec;
pub mod methods;

use std::collections::VecDeque;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Node;
use codec::{Decoder, Frame};

/// Accepts RPC connections until the runtime stops.
pub async fn serve(node: Rc<Node>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, "rpc client connected");
                tokio::task::spawn_local(serve_connection(Rc::clone(&node), stream));
            }
            Err(err) => {
                tracing::warn!(error = %err, "rpc accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(node: Rc<Node>, mut stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let mut decoder = Decoder::default();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut replies = Vec::new();
    let mut calls = VecDeque::new();
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.extend(&chunk[..n]);
        // Every call that arrived together is started at once (a pipelining client gets
        // its pushes batched per shard) and answered in order. Tasks run in spawn order,
        // so two pushes to one client reach its shard in the order they were sent.
        let too_large = loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    calls.push_back(tokio::task::spawn_local(answer(Rc::clone(&node), frame)))
                }
                Ok(None) => break None,
                Err(err) => break Some(err),
            }
        };
        while let Some(call) = calls.pop_front() {
            replies.extend(call.await.unwrap_or_default());
        }
        if let Some(err) = too_large {
            tracing::warn!(peer = ?peer, error = %err, "rpc connection closed");
            replies.extend(codec::encode_reply(
                &serde_json::Value::Null,
                Err(err.to_string()),
            ));
            let _ = stream.write_all(&replies).await;
            return;
        }
        if !replies.is_empty() {
            if stream.write_all(&replies).await.is_err() {
                return;
            }
            replies.clear();
        }
    }
}

async fn answer(node: Rc<Node>, frame: Frame) -> Vec<u8> {
    let request = match frame {
        Frame::Value(value) => codec::parse_request(value),
        Frame::Malformed(why) => Err((serde_json::Value::Null, why)),
    };
    match request {
        Ok(request) => {
            let result = methods::dispatch(&node, &request.method, request.param).await;
            if let Err(error) = &result {
                tracing::debug!(method = %request.method, error = %error, "rpc call failed");
            }
            codec::encode_reply(&request.id, result)
        }
        Err((id, why)) => {
            tracing::info!(error = %why, "malformed rpc call");
            codec::encode_reply(&id, Err(why))
        }
    }
}
