//! A load worker: one process holding up to ~19,000 client connections from one source
//! address (the per-process descriptor limit), recording the latency of every message it
//! receives. Driven by the orchestrator through stdin/stdout, one JSON object per line.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;

use crate::clock;
use crate::token;
use crate::ws::{self, Frame};

/// What a worker is told to do.
pub struct WorkerPlan {
    /// The gateway's client address.
    pub server: SocketAddr,
    /// Source address of every connection.
    pub source: IpAddr,
    /// conn_id prefix (ids are prefix + index).
    pub prefix: String,
    /// Connections to open.
    pub count: usize,
    /// Connections opened at once.
    pub concurrency: usize,
    /// Connections opened per second by this worker (0: as fast as `concurrency` allows).
    pub rate: u64,
    /// Signed-token secret.
    pub secret: String,
    /// Offer permessage-deflate (and inflate what comes compressed).
    pub deflate: bool,
    /// Opt in to recovery (`"recover": true`): messages come as `{"seq","epoch","msg"}`.
    pub recover: bool,
}

#[derive(Default)]
struct Received {
    latency_us: RefCell<Option<Histogram<u64>>>,
    last_receipt_us: RefCell<HashMap<u64, u64>>,
    messages: Cell<u64>,
    /// Bytes the clients read from their sockets (frame headers included).
    wire_bytes: Cell<u64>,
    /// Connections on which permessage-deflate was negotiated.
    negotiated: Cell<u64>,
    /// Connections whose reader stopped on an error (a frame it could not read or
    /// inflate, a reset), and the first few errors.
    read_errors: Cell<u64>,
    errors: RefCell<Vec<String>>,
    /// Recovery: seqs skipped (a gap in a connection's numbering), seqs seen again or out
    /// of order, messages that were not the `{"seq","epoch","msg"}` wrapper, and epoch
    /// changes within a connection.
    seq_gaps: Cell<u64>,
    seq_repeats: Cell<u64>,
    unwrap_errors: Cell<u64>,
    epoch_changes: Cell<u64>,
}

/// One numbered message of a recovering client.
#[derive(serde::Deserialize)]
struct Numbered<'a> {
    seq: u64,
    #[serde(borrow)]
    epoch: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    msg: std::borrow::Cow<'a, str>,
}

/// What a recovering connection has seen so far.
#[derive(Default)]
struct Numbering {
    last: u64,
    epoch: Option<String>,
}

impl Received {
    fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get() + n);
    }

    fn record(&self, payload: &[u8], now: u64, numbering: Option<&mut Numbering>) {
        let Some(numbering) = numbering else {
            for part in payload.split(|b| *b == b'\n') {
                self.record_one(part, now);
            }
            return;
        };
        // A JSON text never holds a raw newline, so coalesced texts split safely.
        for part in payload.split(|b| *b == b'\n') {
            let Ok(numbered) = serde_json::from_slice::<Numbered<'_>>(part) else {
                Self::add(&self.unwrap_errors, 1);
                Self::add(&self.messages, 1);
                continue;
            };
            match &numbering.epoch {
                Some(epoch) if *epoch != numbered.epoch => {
                    Self::add(&self.epoch_changes, 1);
                    numbering.epoch = Some(numbered.epoch.into_owned());
                }
                Some(_) => {}
                None => numbering.epoch = Some(numbered.epoch.into_owned()),
            }
            if numbered.seq > numbering.last {
                Self::add(&self.seq_gaps, numbered.seq - numbering.last - 1);
                numbering.last = numbered.seq;
            } else {
                Self::add(&self.seq_repeats, 1);
            }
            self.record_one(numbered.msg.as_bytes(), now);
        }
    }

    fn record_one(&self, part: &[u8], now: u64) {
        self.messages.set(self.messages.get() + 1);
        let Some(sent) = clock::publish_ns(part) else {
            return;
        };
        let us = now.saturating_sub(sent) / 1000;
        if let Some(h) = self.latency_us.borrow_mut().as_mut() {
            let _ = h.record(us.max(1));
        }
        if let Some(seq) = sequence(part) {
            let mut last = self.last_receipt_us.borrow_mut();
            let slot = last.entry(seq).or_default();
            *slot = (*slot).max(us);
        }
    }
}

/// The `s=<n>;` field of a stamped payload, or `"s":<n>,` of a stamped JSON one.
pub(crate) fn sequence(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    if text.starts_with('{') {
        let start = text.find(",\"s\":")? + 5;
        return text[start..].split(',').next()?.parse().ok();
    }
    let start = text.find(";s=")? + 3;
    text[start..].split(';').next()?.parse().ok()
}

/// Runs the worker until told to quit.
pub fn run(plan: WorkerPlan) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let received = Rc::new(Received::default());
        *received.latency_us.borrow_mut() = Some(Histogram::new_with_bounds(1, 60_000_000, 3)?);
        let mut readers = open(&plan, &plan.prefix, plan.count, &received).await;
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await? {
            let command: serde_json::Value = serde_json::from_str(&line)?;
            match command["cmd"].as_str().unwrap_or("") {
                "report" => report(&received)?,
                "close" => {
                    for reader in readers.drain(..) {
                        reader.abort();
                    }
                    emit(json!({"event": "closed"}));
                }
                "reopen" => readers = open(&plan, &plan.prefix, plan.count, &received).await,
                "churn" => churn(&plan, command["cycles"].as_u64().unwrap_or(1000) as usize).await,
                _ => break,
            }
        }
        Ok(())
    })
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

/// Opens `count` connections (at most `concurrency` handshakes in flight) and reports.
async fn open(
    plan: &WorkerPlan,
    prefix: &str,
    count: usize,
    received: &Rc<Received>,
) -> Vec<JoinHandle<()>> {
    let started = Instant::now();
    let next = Rc::new(Cell::new(0usize));
    let failures: Rc<RefCell<Vec<String>>> = Rc::default();
    let readers: Rc<RefCell<Vec<JoinHandle<()>>>> = Rc::default();
    let mut lanes = Vec::new();
    for _ in 0..plan.concurrency.max(1) {
        let (next, failures, readers, received) = (
            next.clone(),
            failures.clone(),
            readers.clone(),
            received.clone(),
        );
        let (server, source, secret, prefix, rate) = (
            plan.server,
            plan.source,
            plan.secret.clone(),
            prefix.to_owned(),
            plan.rate,
        );
        let (deflate, recover) = (plan.deflate, plan.recover);
        lanes.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= count {
                    break;
                }
                next.set(i + 1);
                if rate > 0 {
                    let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let id = format!("{prefix}{i}");
                let path = token::ws_path(&id, &token::sign(&secret, &id), recover);
                match ws::connect(source, server, &path, deflate).await {
                    Ok(client) => {
                        if client.deflate() {
                            Received::add(&received.negotiated, 1);
                        }
                        readers.borrow_mut().push(tokio::task::spawn_local(read_all(
                            client,
                            received.clone(),
                            recover,
                        )))
                    }
                    Err(err) => failures.borrow_mut().push(err.to_string()),
                }
            }
        }));
    }
    let progress = {
        let (readers, failures) = (readers.clone(), failures.clone());
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let done = readers.borrow().len() + failures.borrow().len();
                emit(json!({"event": "progress", "done": done, "of": count}));
            }
        })
    };
    for lane in lanes {
        let _ = lane.await;
    }
    progress.abort();
    let failed = failures.borrow();
    emit(json!({
        "event": "connected",
        "ok": readers.borrow().len(),
        "failed": failed.len(),
        "secs": started.elapsed().as_secs_f64(),
        "errors": failed.iter().take(5).collect::<Vec<_>>(),
        "negotiated": received.negotiated.get(),
    }));
    std::mem::take(&mut *readers.borrow_mut())
}

async fn read_all(mut client: ws::Client, received: Rc<Received>, recover: bool) {
    let mut numbering = recover.then(Numbering::default);
    loop {
        let next = client.next().await;
        Received::add(&received.wire_bytes, client.take_read_bytes());
        match next {
            Ok(Frame::Message(payload)) => {
                received.record(&payload, clock::now_ns(), numbering.as_mut())
            }
            Ok(Frame::Close) => break,
            Err(err) => {
                Received::add(&received.read_errors, 1);
                let mut errors = received.errors.borrow_mut();
                if errors.len() < 5 {
                    errors.push(err.to_string());
                }
                break;
            }
        }
    }
}

fn report(received: &Received) -> anyhow::Result<()> {
    let histogram = received
        .latency_us
        .borrow_mut()
        .replace(Histogram::new_with_bounds(1, 60_000_000, 3)?);
    let mut bytes = Vec::new();
    if let Some(histogram) = histogram {
        V2Serializer::new().serialize(&histogram, &mut bytes)?;
    }
    let last: HashMap<u64, u64> = std::mem::take(&mut *received.last_receipt_us.borrow_mut());
    emit(json!({
        "event": "report",
        "messages": received.messages.replace(0),
        "latency_hist": base64::engine::general_purpose::STANDARD.encode(bytes),
        "last_receipt_us": last,
        "wire_bytes": received.wire_bytes.replace(0),
        "read_errors": received.read_errors.replace(0),
        "errors": std::mem::take(&mut *received.errors.borrow_mut()),
        "seq_gaps": received.seq_gaps.replace(0),
        "seq_repeats": received.seq_repeats.replace(0),
        "unwrap_errors": received.unwrap_errors.replace(0),
        "epoch_changes": received.epoch_changes.replace(0),
    }));
    Ok(())
}

/// Connect-then-close cycles, `concurrency` at a time; reports the rate.
async fn churn(plan: &WorkerPlan, cycles: usize) {
    let started = Instant::now();
    let next = Rc::new(Cell::new(0usize));
    let failed = Rc::new(Cell::new(0usize));
    let mut lanes = Vec::new();
    for _ in 0..plan.concurrency.max(1) {
        let (next, failed) = (next.clone(), failed.clone());
        let (server, source, secret, prefix) = (
            plan.server,
            plan.source,
            plan.secret.clone(),
            plan.prefix.clone(),
        );
        let (deflate, recover) = (plan.deflate, plan.recover);
        lanes.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= cycles {
                    break;
                }
                next.set(i + 1);
                let id = format!("{prefix}churn{i}");
                let path = token::ws_path(&id, &token::sign(&secret, &id), recover);
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    ws::connect(source, server, &path, deflate),
                )
                .await
                {
                    Ok(Ok(client)) => client.close().await,
                    _ => failed.set(failed.get() + 1),
                }
            }
        }));
    }
    for lane in lanes {
        let _ = lane.await;
    }
    emit(
        json!({"event": "churned", "cycles": cycles, "failed": failed.get(), "secs": started.elapsed().as_secs_f64()}),
    );
}
