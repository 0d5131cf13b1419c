//! The proxy's first bytes and HTTP/1 parsing: `client_hello_alpn` (peeked TLS
//! bytes), `app_protocol` (protocol sniffing), the request-smuggling
//! `Tracker` fed the connection's bytes in fuzzer-chosen pieces, and each
//! request head httparse reads turned into `http` parts and through
//! `http_attributes`, which the authorization decision reads.
#![no_main]

use citadel_proxy::decide::http_attributes;
use citadel_proxy::detect::{app_protocol, client_hello_alpn};
use citadel_proxy::framing::{HeadVerdict, Tracker};
use libfuzzer_sys::fuzz_target;

fn attributes(head: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return;
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = path.parse::<http::Uri>() else {
        return;
    };
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) {
            map.append(name, value);
        }
    }
    let attrs = http_attributes(&method, &uri, &map);
    assert!(!attrs.path.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let _ = client_hello_alpn(rest);
    let _ = app_protocol(rest);
    // The same bytes, fed in two pieces, must give the same verdicts as in one
    // (below the line and head limits, where giving up depends on read sizes).
    let at = usize::from(split).min(rest.len());
    let mut whole = Tracker::new(8192);
    whole.feed(rest);
    let mut pieces = Tracker::new(8192);
    pieces.feed(&rest[..at]);
    pieces.feed(&rest[at..]);
    loop {
        let (a, b) = (whole.next_verdict(), pieces.next_verdict());
        if rest.len() <= 4096 {
            assert_eq!(a, b, "verdicts depend on how the bytes were split at {at}");
        }
        if a == HeadVerdict::Untracked {
            break;
        }
    }
    attributes(rest);
});
