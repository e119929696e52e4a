//! A minimal Comet WebSocket client: connects with a conn_id and token, prints every
//! pushed message on its own line, answers the server's pings.
//!
//! `cargo run --example client -- <conn_id> [token] [ws://127.0.0.1:8900]`

use std::net::TcpStream;

fn main() {
    let mut args = std::env::args().skip(1);
    let conn_id = args.next().unwrap_or_else(|| "user-1".to_owned());
    let token = args.next().unwrap_or_else(|| "any".to_owned());
    let base = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8900".to_owned());
    let t = serde_json::json!({"conn_id": conn_id, "token": token, "info": ""}).to_string();
    let encoded = percent_encoding::utf8_percent_encode(&t, percent_encoding::NON_ALPHANUMERIC);
    let url = format!("{base}/ws?t={encoded}");
    let host = base.trim_start_matches("ws://");
    let stream = TcpStream::connect(host).unwrap_or_else(|e| panic!("cannot reach {host}: {e}"));
    let (mut socket, _) = tungstenite::client::client(url.as_str(), stream)
        .unwrap_or_else(|e| panic!("upgrade refused: {e}"));
    eprintln!("connected as {conn_id}; waiting for pushes (Ctrl-C to quit)");
    loop {
        match socket.read() {
            Ok(tungstenite::Message::Text(text)) => println!("{text}"),
            Ok(tungstenite::Message::Close(frame)) => {
                eprintln!("closed by server: {frame:?}");
                return;
            }
            Ok(_) => {}
            Err(err) => {
                eprintln!("connection ended: {err}");
                return;
            }
        }
    }
}
