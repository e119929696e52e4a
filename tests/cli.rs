//! The command line beside the node: `--version`, `check` (what a node would run with,
//! failing on what it would only warn about) and `token` (a signed client token).

mod common;

use std::process::{Command, Output};

use common::{Comet, next_text};

fn comet(args: &[&str]) -> Output {
    Command::new(common::comet_binary())
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_prints_the_package_version() {
    let out = comet(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("comet {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Go's flag package took `-m=true`, `-m=1`, `-m=t`, `-m=T` and `-c=path`: each still picks
/// the monitor (which, with no etcd in the file, stops at once and says why).
#[test]
fn go_style_monitor_flags_pick_the_monitor() {
    let dir = common::temp_dir("cli-monitor");
    let ini = dir.join("comet.ini");
    std::fs::write(&ini, "rpc_api_url=http://127.0.0.1:9/rpc\n").unwrap();
    let config = format!("-c={}", ini.display());
    for flag in ["-m", "-m=true", "-m=1", "-m=t", "-m=T"] {
        let out = comet(&[flag, &config]);
        assert!(!out.status.success(), "{flag}");
        assert!(
            text(&out.stderr).contains("the monitor needs etcd"),
            "{flag}: {}",
            text(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_passes_a_good_file_fails_a_typo_and_refuses_a_bad_value() {
    let dir = common::temp_dir("cli-check");
    let good = dir.join("good.ini");
    std::fs::write(
        &good,
        "websocket_port=:8900\ncomet_rpc_token=hunter2hunter2\n",
    )
    .unwrap();
    let out = comet(&["check", "-c", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("websocket_port = 8900"), "{stdout}");
    assert!(
        stdout.contains("comet_rpc_token = (set)"),
        "secrets are masked: {stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");

    let typo = dir.join("typo.ini");
    std::fs::write(&typo, "etcd_adr=127.0.0.1:2379\n").unwrap();
    let out = comet(&["check", "-c", typo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("config line 1: unknown key `etcd_adr` ignored (did you mean `etcd_addr`?)"),
        "{}",
        text(&out.stderr)
    );

    let bad = dir.join("bad.ini");
    std::fs::write(&bad, "# sizes\nmax_proc=1\nmax_frame_size=lots\n").unwrap();
    let out = comet(&["check", "-c", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("config line 3: config key `max_frame_size`"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_token_from_the_cli_admits_its_client_and_only_it() {
    const SECRET: &str = "cli-secret-0123456789";
    let dir = common::temp_dir("cli-token");
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let out = comet(&[
        "token",
        "--secret-file",
        secret_file.to_str().unwrap(),
        "--conn-id",
        "alice",
        "--ttl",
        "10m",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    let comet_node = Comet::start(None, &format!("token_secret={SECRET}"));
    let mut alice = comet_node.connect("alice", &token, "").expect("admitted");
    assert!(
        comet_node.connect("bob", &token, "").is_err(),
        "another conn_id is refused"
    );
    comet_node.rpc().push(&["alice"], "signed in", "");
    assert_eq!(next_text(&mut alice).as_deref(), Some("signed in"));
    let out = comet(&["token", "--secret-file", "/nonexistent", "--conn-id", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}
