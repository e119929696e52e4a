//! The admin HTTP listener (`admin_addr`, off by default): `/healthz`, `/readyz`,
//! `/status` and `/metrics` for load balancers, operators and Prometheus.
//!
//! Runs on the control thread's runtime; one short-lived task per request, bounded in
//! size and time, and in number (256 open at once, 16 from one address). `/status` and
//! `/metrics` require `admin_token` (as `Authorization: Bearer <token>` or `?token=`)
//! when one is set; the health endpoints never do, so that probes need no secret. Never touches shard state except through [`Node`].

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ahash::AHashMap;

use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Node;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections open at once, over every source. Each waits up to
/// `REQUEST_TIMEOUT` for its request: with no bound, a stranger holding idle connections
/// took a descriptor each until the node had none left for its clients.
const MAX_CONNECTIONS: usize = 256;
/// Admin connections open at once from one address: a load balancer's probes and a
/// Prometheus scrape need one or two each, so one source cannot take every slot.
const MAX_PER_SOURCE: usize = 16;
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Open admin connections, in all and per source address.
#[derive(Default)]
struct Open {
    total: usize,
    by_source: AHashMap<IpAddr, usize>,
}

/// One connection's place in [`Open`], given back when its task ends.
struct Slot {
    open: Rc<RefCell<Open>>,
    source: IpAddr,
}

impl Slot {
    /// A place for a connection from `source`; `None` at either bound.
    fn take(open: &Rc<RefCell<Open>>, source: IpAddr) -> Option<Slot> {
        let mut counts = open.borrow_mut();
        let from_source = counts.by_source.get(&source).copied().unwrap_or(0);
        if counts.total >= MAX_CONNECTIONS || from_source >= MAX_PER_SOURCE {
            return None;
        }
        counts.total += 1;
        counts.by_source.insert(source, from_source + 1);
        Some(Slot {
            open: Rc::clone(open),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.open.borrow_mut();
        counts.total -= 1;
        if let Some(count) = counts.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

/// Serves admin requests until the runtime stops.
pub(crate) async fn serve(node: Rc<Node>, listener: TcpListener) {
    let open = Rc::new(RefCell::new(Open::default()));
    let mut refusals = crate::logging::Throttle::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = Slot::take(&open, peer.ip()) else {
                    drop(stream);
                    if let Some(refused) = refusals.note(REFUSAL_LOG_INTERVAL, Instant::now()) {
                        tracing::warn!(
                            refused,
                            last_peer = %peer,
                            limit = MAX_CONNECTIONS,
                            per_source = MAX_PER_SOURCE,
                            "admin connections over their bound closed at once (logged at most every 10 s)"
                        );
                    }
                    continue;
                };
                // Held until answered: a process that handed over waits for it.
                let in_flight = node.admin_request();
                let node = Rc::clone(&node);
                tokio::task::spawn_local(async move {
                    let _in_flight = in_flight;
                    let _slot = slot;
                    answer(node, stream).await;
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

async fn answer(node: Rc<Node>, mut stream: TcpStream) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => route(&node, &head).await,
        Ok(None) => Response::text("400 Bad Request", "malformed request"),
        Err(_) => return,
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    // Bounded too: a client that never reads a large `/metrics` body would otherwise hold
    // its connection, and its slot, for good.
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(response.body.as_bytes()).await
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, write).await;
}

/// A request's method, path (with query) and `Authorization` header.
struct Head {
    method: String,
    target: String,
    authorization: Option<String>,
}

async fn read_head(stream: &mut TcpStream) -> Option<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        // As for a client's upgrade: parsed again only once a line has ended.
        if !chunk[..n].contains(&b'\n') && buf.len() < MAX_REQUEST {
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let authorization = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_owned);
                return Some(Head {
                    method: request.method?.to_owned(),
                    target: request.path?.to_owned(),
                    authorization,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => continue,
            _ => return None,
        }
    }
}

async fn route(node: &Node, head: &Head) -> Response {
    if head.method != "GET" {
        return Response::text("405 Method Not Allowed", "only GET");
    }
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    match path {
        "/healthz" => Response::text("200 OK", "ok"),
        "/readyz" => match node.readiness().await {
            None => Response::text("200 OK", "ready"),
            Some(why) => Response::text("503 Service Unavailable", &why),
        },
        "/status" | "/metrics" if !authorised(node, head, query) => {
            Response::text("401 Unauthorized", "admin token required")
        }
        "/status" => Response {
            status: "200 OK",
            content_type: "application/json",
            body: node.status().await.to_string(),
        },
        "/metrics" => Response {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: node.metrics().await,
        },
        _ => Response::text(
            "404 Not Found",
            "try /healthz, /readyz, /status or /metrics",
        ),
    }
}

fn authorised(node: &Node, head: &Head, query: &str) -> bool {
    let expected = node.config.admin_token.as_bytes();
    if expected.is_empty() {
        return true;
    }
    let bearer = head.authorization.as_deref().and_then(bearer_token);
    let from_query = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="));
    [bearer, from_query]
        .into_iter()
        .flatten()
        .any(|given| bool::from(expected.ct_eq(given.as_bytes())))
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 7235 §2.1): `bearer x` and `BEARER x` are the same credentials.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc ", "bEaReR abc"] {
            assert_eq!(bearer_token(value), Some("abc"), "{value:?}");
        }
        for value in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
