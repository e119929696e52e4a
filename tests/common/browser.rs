//! Headless Chromium driven through its DevTools protocol: open a page, evaluate
//! JavaScript in it (the browser examples' tests).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{temp_dir, wait_until};

/// Kills the browser when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium with its DevTools endpoint, showing one page.
pub struct Browser {
    _process: Killed,
    devtools_port: u16,
}

impl Browser {
    pub fn open(url: &str) -> Browser {
        let profile = temp_dir("chromium");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed (scripts/install-deps.sh)");
        let active_port = profile.join("DevToolsActivePort");
        assert!(
            wait_until(Duration::from_secs(30), || active_port.exists()),
            "chromium did not start"
        );
        let mut port = String::new();
        assert!(wait_until(Duration::from_secs(5), || {
            port = std::fs::read_to_string(&active_port).unwrap_or_default();
            port.lines()
                .next()
                .is_some_and(|l| l.parse::<u16>().is_ok())
        }));
        Browser {
            _process: Killed(child),
            devtools_port: port.lines().next().unwrap().parse().unwrap(),
        }
    }

    /// The DevTools WebSocket URL of the page.
    fn page_socket(&self) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.devtools_port)).unwrap();
        write!(
            stream,
            "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        // Read by Content-Length: the DevTools server may keep the connection open.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let body = String::from_utf8(body).unwrap();
        let targets: Value = serde_json::from_str(&body).unwrap();
        targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with("file:"))
            })
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap()
            .to_owned()
    }

    /// A DevTools connection to the page (one at a time: a page has one debugger URL
    /// while a client is attached).
    pub fn attach(&self) -> super::Client {
        super::connect_url(&self.page_socket(), self.devtools_port).unwrap()
    }
}

/// Evaluates a JavaScript expression in the page; its string value.
pub fn evaluate(devtools: &mut super::Client, id: &mut u64, expression: &str) -> String {
    *id += 1;
    let call =
        json!({"id": *id, "method": "Runtime.evaluate", "params": {"expression": expression}});
    devtools
        .send(tungstenite::Message::text(call.to_string()))
        .unwrap();
    loop {
        let text = devtools.read().unwrap().into_text().unwrap();
        let reply: Value = serde_json::from_str(&text).unwrap();
        if reply["id"] == json!(*id) {
            return reply["result"]["result"]["value"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        }
    }
}

/// Asks the page until `check` holds (true) or 10 s pass (false).
pub fn poll_page(mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A page the test reads through its DevTools connection.
pub struct Page {
    devtools: super::Client,
    id: u64,
}

impl Page {
    /// The string value of a JavaScript expression in the page.
    pub fn read(&mut self, expression: &str) -> String {
        evaluate(&mut self.devtools, &mut self.id, expression)
    }

    /// The text of the element `element_id` once it contains `part` (or after 10 s).
    pub fn text_containing(&mut self, element_id: &str, part: &str) -> String {
        let expression = format!("document.getElementById('{element_id}').textContent");
        let mut shown = String::new();
        poll_page(|| {
            shown = self.read(&expression);
            shown.contains(part)
        });
        shown
    }
}

/// Opens `url` in headless Chromium and waits until `server` has seen `conn_id` online
/// and the page shows `connected` (the node reports `online` as soon as it has answered
/// the client; the page's `onopen` runs a moment later).
pub fn open_connected(url: &str, server: &super::MessageServer, conn_id: &str) -> (Browser, Page) {
    let browser = Browser::open(url);
    assert!(
        wait_until(Duration::from_secs(20), || server.count("online", conn_id)
            == 1),
        "the page did not connect"
    );
    let mut page = Page {
        devtools: browser.attach(),
        id: 0,
    };
    assert!(
        poll_page(|| page.read("document.getElementById('status').textContent") == "connected"),
        "the page never showed `connected`"
    );
    (browser, page)
}
