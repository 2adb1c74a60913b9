//! The SASL decoders (PLAIN, LOGIN) on arbitrary responses, and a round trip: any user name and
//! password within the limits, encoded as a PLAIN response, decode to themselves.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use gannet_smtp::sasl::{self, PASSWORD_BYTES_MAX, USER_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = sasl::plain(data) {
        assert!(!c.user.is_empty() && c.user.len() <= USER_BYTES_MAX && !c.user.contains('\0'));
        assert!(c.password.len() <= PASSWORD_BYTES_MAX && !c.password.contains(&0));
    }
    let _ = sasl::login_user(data);
    let _ = sasl::login_password(data);

    // Round trip: the first byte splits the rest into user name and password.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(rest.len());
    let (user, password) = rest.split_at(cut);
    let mut response = vec![0u8];
    response.extend_from_slice(user);
    response.push(0);
    response.extend_from_slice(password);
    let encoded = STANDARD.encode(&response);
    let valid = !user.is_empty()
        && user.len() <= USER_BYTES_MAX
        && !user.contains(&0)
        && std::str::from_utf8(user).is_ok()
        && password.len() <= PASSWORD_BYTES_MAX
        && !password.contains(&0);
    match sasl::plain(encoded.as_bytes()) {
        Ok(c) => {
            assert!(valid);
            assert_eq!(c.user.as_bytes(), user);
            assert_eq!(c.password, password);
        }
        Err(_) => assert!(!valid, "a valid user and password were refused"),
    }
});
