//! Fuzz target `config`: arbitrary bytes, read as text (lossy UTF-8, as a
//! file's contents would be after the UTF-8 check), go to
//! `echod::config::Config::parse`, the parser the master runs at start and
//! at every `SIGHUP`. It must never panic; an error must be one line that
//! names the file and a position; a success must survive the round trip
//! through `Config::to_toml` (what `echod --check-config` prints):
//! `parse(to_toml(c)) == c`.

#![no_main]

use std::path::Path;

use echod::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/fuzz/echod.toml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new(PATH);
    match Config::parse(&text, path) {
        Ok(config) => {
            let printed = config.to_toml();
            match Config::parse(&printed, path) {
                Ok(again) => assert_eq!(
                    again, config,
                    "to_toml does not round-trip; it printed:\n{printed}"
                ),
                Err(e) => panic!("to_toml printed a config that does not parse ({e}):\n{printed}"),
            }
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(
                shown.starts_with(PATH),
                "the error does not name the file: {shown:?}"
            );
            assert!(
                !shown.contains('\n'),
                "the error is not one line: {shown:?}"
            );
            match e {
                ConfigError::Invalid { line, column, .. } => {
                    assert!(
                        line >= 1 && column >= 1,
                        "position {line}:{column}: {shown:?}"
                    );
                    let lines = text.split('\n').count();
                    assert!(
                        line <= lines,
                        "line {line} of a {lines}-line text: {shown:?}"
                    );
                }
                ConfigError::Read { .. } => panic!("parse read a file: {shown:?}"),
                ConfigError::Checked { .. } => panic!("parse checked the system: {shown:?}"),
            }
        }
    }
});
