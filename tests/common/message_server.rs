//! A real HTTP message server for the tests: answers Comet's callbacks with the
//! original's `{code, data, error}` body, records each one, and can be told to refuse
//! tokens, stall a method, or die (stop listening) and come back.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One recorded callback.
#[derive(Debug, Clone)]
pub struct Callback {
    pub method: String,
    pub args: Vec<Value>,
    pub user_agent: String,
    pub at: Instant,
}

impl Callback {
    /// The `i`th argument as a string.
    pub fn arg(&self, i: usize) -> &str {
        self.args.get(i).and_then(Value::as_str).unwrap_or("")
    }
}

#[derive(Default)]
struct Behaviour {
    refused_tokens: HashSet<String>,
    stall: Option<(String, Duration)>,
    /// A method answered 200 with a body of this many bytes (not JSON).
    huge: Option<(String, usize)>,
}

struct Shared {
    calls: Mutex<Vec<Callback>>,
    behaviour: Mutex<Behaviour>,
    alive: AtomicBool,
}

/// The message server. Stops when dropped.
pub struct MessageServer {
    port: u16,
    shared: Arc<Shared>,
}

impl MessageServer {
    /// Starts on a free loopback port.
    pub fn start() -> MessageServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            calls: Mutex::new(Vec::new()),
            behaviour: Mutex::new(Behaviour::default()),
            alive: AtomicBool::new(true),
        });
        spawn_acceptor(listener, Arc::clone(&shared));
        MessageServer { port, shared }
    }

    /// The callback URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/im/index/rpc", self.port)
    }

    /// checkToken with this token gets code 1.
    pub fn refuse_token(&self, token: &str) {
        self.shared
            .behaviour
            .lock()
            .unwrap()
            .refused_tokens
            .insert(token.into());
    }

    /// Every call of `method` (`"*"`: of any method) waits `delay` before answering.
    pub fn stall(&self, method: &str, delay: Duration) {
        self.shared.behaviour.lock().unwrap().stall = Some((method.into(), delay));
    }

    /// Every call of `method` is answered 200 with a valid `{"code":0,"data":"xx..."}`
    /// body about `bytes` long (streamed, never held whole): a hostile or broken message
    /// server. (Valid JSON, so that a streaming parser cannot stop at the first byte.)
    pub fn answer_huge(&self, method: &str, bytes: usize) {
        self.shared.behaviour.lock().unwrap().huge = Some((method.into(), bytes));
    }

    /// Stops listening and drops open connections: callbacks get connection refused.
    pub fn die(&self) {
        self.shared.alive.store(false, Ordering::SeqCst);
        // Wait until the acceptor has let go of the port.
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Listens again on the same port.
    pub fn revive(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.shared.alive.store(true, Ordering::SeqCst);
        spawn_acceptor(listener, Arc::clone(&self.shared));
    }

    /// Everything recorded so far.
    pub fn calls(&self) -> Vec<Callback> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// A view of the recorded calls that other threads can hold (it does not keep the
    /// server alive).
    pub fn recorded(&self) -> Recorded {
        Recorded(Arc::clone(&self.shared))
    }

    /// Recorded calls of one method.
    pub fn calls_of(&self, method: &str) -> Vec<Callback> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    /// Recorded calls of one method for one conn_id (first argument).
    pub fn count(&self, method: &str, conn_id: &str) -> usize {
        self.calls_of(method)
            .iter()
            .filter(|c| c.arg(0) == conn_id)
            .count()
    }
}

/// What a message server recorded, readable from any thread.
#[derive(Clone)]
pub struct Recorded(Arc<Shared>);

impl Recorded {
    /// Everything recorded so far.
    pub fn calls(&self) -> Vec<Callback> {
        self.0.calls.lock().unwrap().clone()
    }
}

impl Drop for MessageServer {
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::SeqCst);
    }
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>) {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while shared.alive.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    std::thread::spawn(move || serve(stream, &shared));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

fn serve(stream: TcpStream, shared: &Shared) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    while shared.alive.load(Ordering::SeqCst) {
        match read_request(&mut reader) {
            Ok(Some((user_agent, body))) => {
                if !shared.alive.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(bytes) = huge_answer(shared, &body) {
                    let (open, close) = (r#"{"code":0,"data":""#, r#""}"#);
                    let length = open.len() + bytes + close.len();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{open}"
                    );
                    if writer.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if writer.write_all(&chunk[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                    if writer.write_all(close.as_bytes()).is_err() {
                        return;
                    }
                    continue;
                }
                let reply = handle(shared, &user_agent, &body);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                if writer.write_all(response.as_bytes()).is_err() {
                    return;
                }
            }
            Ok(None) => continue,
            Err(()) => return,
        }
    }
}

/// One request: `Ok(None)` when nothing arrived within the poll interval.
fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<(String, Vec<u8>)>, ()> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => return Err(()),
        Ok(_) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            return Ok(None);
        }
        Err(_) => return Err(()),
    }
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut length = 0;
    let mut user_agent = String::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).map_err(|_| ())?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| ())?;
            } else if name.eq_ignore_ascii_case("user-agent") {
                user_agent = value.trim().to_owned();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|_| ())?;
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    Ok(Some((user_agent, body)))
}

/// The size of the huge answer this request gets, if its method was told to get one
/// (recorded like any other call).
fn huge_answer(shared: &Shared, body: &[u8]) -> Option<usize> {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let method = request["method"].as_str().unwrap_or("");
    let bytes = {
        let behaviour = shared.behaviour.lock().unwrap();
        behaviour
            .huge
            .as_ref()
            .filter(|(m, _)| m == method)
            .map(|(_, bytes)| *bytes)?
    };
    shared.calls.lock().unwrap().push(Callback {
        method: method.to_owned(),
        args: request["args"].as_array().cloned().unwrap_or_default(),
        user_agent: String::new(),
        at: Instant::now(),
    });
    Some(bytes)
}

fn handle(shared: &Shared, user_agent: &str, body: &[u8]) -> String {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let method = request["method"].as_str().unwrap_or("").to_owned();
    let args = request["args"].as_array().cloned().unwrap_or_default();
    let (stall, refused) = {
        let behaviour = shared.behaviour.lock().unwrap();
        let stall = behaviour
            .stall
            .as_ref()
            .filter(|(m, _)| *m == method || m == "*")
            .map(|(_, d)| *d);
        let refused = method == "checkToken"
            && args
                .get(1)
                .and_then(Value::as_str)
                .is_some_and(|t| behaviour.refused_tokens.contains(t));
        (stall, refused)
    };
    if let Some(delay) = stall {
        std::thread::sleep(delay);
    }
    shared.calls.lock().unwrap().push(Callback {
        method,
        args,
        user_agent: user_agent.to_owned(),
        at: Instant::now(),
    });
    if refused {
        r#"{"code":1,"data":null,"error":"token invalid"}"#.to_owned()
    } else {
        r#"{"code":0,"data":null,"error":""}"#.to_owned()
    }
}
