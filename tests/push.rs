//! Pushes through the real push RPC to real WebSocket clients: both generations of
//! `SendToConnections`, fan-out to 1,000 clients, failures, slow consumers, and a
//! stalled message server that must not delay anyone else.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Comet, MessageServer, next_text, wait_until};
use serde_json::json;

fn connect_many(comet: &Comet, prefix: &str, n: usize) -> Vec<(String, Client)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            let client = comet.connect(&id, "t", "").unwrap();
            (id, client)
        })
        .collect()
}

/// Every client receives exactly `expected`, once: the next read after it times out.
fn assert_each_received_once(clients: &mut [(String, Client)], expected: &str) {
    for (id, client) in clients.iter_mut() {
        assert_eq!(next_text(client).as_deref(), Some(expected), "client {id}");
    }
    for (_, client) in clients.iter_mut() {
        client
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
    }
    for (id, client) in clients.iter_mut() {
        assert_eq!(next_text(client), None, "client {id} got a second copy");
    }
}

#[test]
fn first_generation_push_reaches_one_and_a_thousand_clients_exactly_once() {
    let comet = Comet::start(None, "");
    let mut rpc = comet.rpc();
    let mut one = connect_many(&comet, "one", 1);
    let param = json!({"to": ["one0"], "msg": "hello one"}).to_string();
    let reply = rpc.call("Server.SendToConnections", json!(param));
    assert!(reply["error"].is_null(), "{reply}");
    assert!(!reply["result"].as_str().unwrap().is_empty());
    assert_each_received_once(&mut one, "hello one");

    let mut many = connect_many(&comet, "k", 1000);
    let ids: Vec<&str> = many.iter().map(|(id, _)| id.as_str()).collect();
    let param = json!({"to": ids, "msg": "hello thousand"}).to_string();
    let reply = rpc.call("Server.SendToConnections", json!(param));
    assert!(reply["error"].is_null(), "{reply}");
    assert_each_received_once(&mut many, "hello thousand");
}

#[test]
fn second_generation_push_reaches_one_and_a_thousand_clients_exactly_once() {
    let comet = Comet::start(None, "comet_rpc_token=sesame");
    let mut rpc = comet.rpc();
    let mut one = connect_many(&comet, "solo", 1);
    let reply = rpc.call(
        "Server.SendToConnections",
        json!({"Connections": ["solo0"], "Msg": "hi solo", "Token": "sesame"}),
    );
    assert_eq!(
        reply["result"],
        json!("ok"),
        "field names match case-insensitively: {reply}"
    );
    assert_each_received_once(&mut one, "hi solo");

    let mut many = connect_many(&comet, "m", 1000);
    let ids: Vec<&str> = many.iter().map(|(id, _)| id.as_str()).collect();
    let reply = rpc.push(&ids, "hi thousand", "sesame");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_each_received_once(&mut many, "hi thousand");
}

#[test]
fn unknown_ids_are_reported_failed_in_both_generations() {
    let comet = Comet::start(None, "");
    let mut rpc = comet.rpc();
    let mut here = connect_many(&comet, "here", 1);

    let reply = rpc.push(&["here0", "nobody"], "partial", "");
    let error: serde_json::Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["ids"], json!(["nobody"]), "{reply}");
    assert_each_received_once(&mut here, "partial");

    let param = json!({"to": ["ghost"], "msg": "x"}).to_string();
    let reply = rpc.call("Server.SendToConnections", json!(param));
    let error: serde_json::Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["error_ids"], json!(["ghost"]), "{reply}");

    let reply = rpc.push(&[], "x", "");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("connections is empty"),
        "{reply}"
    );
    let reply = rpc.push(&["here0"], "", "");
    assert!(
        reply["error"].as_str().unwrap().contains("msg is empty"),
        "{reply}"
    );
}

#[test]
fn newest_generation_methods_answer_with_codes() {
    let comet = Comet::start(None, "comet_rpc_token=k");
    let mut rpc = comet.rpc();
    let mut clients = connect_many(&comet, "n", 3);

    let reply = rpc.call("Server.Broadcast", json!({"msg": "everyone", "token": "k"}));
    assert_eq!(reply["result"]["code"], json!(20000), "{reply}");
    assert_eq!(reply["result"]["data"]["delivered"], json!(3));
    assert_each_received_once(&mut clients, "everyone");

    let reply = rpc.call(
        "Server.CheckConnectionsOnline",
        json!({"connections": ["n0", "zz", "n2"], "token": "k"}),
    );
    assert_eq!(reply["result"]["data"], json!(["n0", "n2"]), "{reply}");

    let reply = rpc.call("Server.GetAllConnections", json!({"token": "k"}));
    let mut all: Vec<String> = serde_json::from_value(reply["result"]["data"].clone()).unwrap();
    all.sort();
    assert_eq!(all, vec!["n0", "n1", "n2"]);

    let reply = rpc.call("Server.GetAllConnections", json!({"token": "wrong"}));
    assert_eq!(reply["result"]["code"], json!(40100), "{reply}");
    let reply = rpc.call("Server.Broadcast", json!({"msg": "", "token": "k"}));
    assert_eq!(reply["result"]["code"], json!(40000), "{reply}");
}

#[test]
fn slow_consumer_is_disconnected_reported_failed_and_memory_stays_bounded() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "outbound_queue_size=16");
    // Connected and never read from: its socket buffers fill, then its queue.
    let _stuck = comet.connect("stuck", "t", "").unwrap();
    let mut healthy = connect_many(&comet, "ok", 1);
    let mut rpc = comet.rpc();
    let rss_before = comet.rss_kib();
    let message = "m".repeat(64 * 1024);

    let mut failed_at = None;
    for i in 0..2000 {
        let reply = rpc.push(&["stuck"], &message, "");
        if !reply["error"].is_null() {
            let error: serde_json::Value =
                serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
            assert_eq!(error["ids"], json!(["stuck"]), "{reply}");
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("the stuck client must be reported failed");
    assert!(
        failed_at > 16,
        "socket buffers and the queue absorb some first ({failed_at})"
    );
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "stuck")
        == 1));
    let grown_kib = comet.rss_kib().saturating_sub(rss_before);
    assert!(
        grown_kib < 16 * 1024,
        "RSS grew {grown_kib} KiB for one stuck client"
    );

    let reply = rpc.push(&["ok0"], "others unaffected", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_each_received_once(&mut healthy, "others unaffected");
}

/// Pushes `rounds` messages to every client, 100 ms apart, and returns each round's time
/// from the call to the last client's read, sorted.
fn push_rounds(
    rpc: &mut common::Rpc,
    clients: &mut [(String, Client)],
    rounds: usize,
) -> Vec<Duration> {
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let msg = format!("round {round}");
        let sent = Instant::now();
        let ids: Vec<&str> = clients.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(rpc.push(&ids, &msg, "")["result"], json!("ok"));
        for (_, client) in clients.iter_mut() {
            assert_eq!(next_text(client).as_deref(), Some(msg.as_str()));
        }
        times.push(sent.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    times.sort();
    times
}

#[test]
fn stalled_check_token_does_not_delay_pushes_to_other_clients() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "callback_timeout=10s");
    let mut clients = connect_many(&comet, "live", 4);
    let mut rpc = comet.rpc();
    // The same rounds with nothing stalled: the machine's own pace, busy or not.
    let quiet = push_rounds(&mut rpc, &mut clients, 10);
    // Longer than the 20 push rounds below (about 2 s), shorter than the clients' 5 s
    // read timeout, so that the winner's 101 cannot race the timeout.
    server.stall("checkToken", Duration::from_secs(3));
    let url = comet.ws_url("late", "t", "");
    let port = comet.ws_port;
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || common::connect_url(&url, port).ok())
        })
        .collect();
    thread::sleep(Duration::from_millis(200));

    let stalled = push_rounds(&mut rpc, &mut clients, 20);
    // A push queued behind the 3 s checkToken would take seconds; one that is not
    // keeps the quiet pace (a median within 3x + 20 ms; 50 ms on an idle machine).
    let worst = *stalled.last().unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "push took {worst:?} while checkToken stalled (quiet: {quiet:?})"
    );
    let median = |rounds: &[Duration]| rounds[rounds.len() / 2];
    assert!(
        median(&stalled) <= median(&quiet) * 3 + Duration::from_millis(20),
        "stalled {stalled:?} vs quiet {quiet:?}"
    );
    // Held until all are counted, so that a winner's close cannot free the conn_id.
    let outcomes: Vec<Option<Client>> = waiting.into_iter().map(|h| h.join().unwrap()).collect();
    let accepted = outcomes.iter().filter(|c| c.is_some()).count();
    assert_eq!(
        accepted, 1,
        "one of the four concurrent `late` clients wins, the rest are duplicates"
    );
}
