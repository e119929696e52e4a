//! INI configuration text: never a panic, and what parses keeps the safety bounds.
#![no_main]

use comet::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok((config, _)) = Config::parse(text)
    {
        // Every signing secret, current or previous, is long enough to resist guessing.
        assert!(config.token_secrets.iter().all(|secret| secret.len() >= 16));
        assert!(config.rpc_max_connections >= 1);
        assert!(config.callback_queue_size >= 1);
    }
});
