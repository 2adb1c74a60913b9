//! The command parser on arbitrary lines: never panics, and every parameter list it hands out
//! can be walked to its end.
#![no_main]

use gannet_smtp::parser::{parse_command, Command, Params};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let Ok(command) = parse_command(line) else {
        return;
    };
    match command {
        Command::Mail { params, .. } | Command::Rcpt { params, .. } => {
            let mut count = 0usize;
            for param in Params::new(params) {
                count += 1;
                assert!(count <= params.len() + 1, "the parameter iterator must end");
                let _ = param;
            }
        }
        Command::Bdat { size_bytes, .. } => assert!(line.len() > 5 || size_bytes == 0),
        _ => {}
    }
});
