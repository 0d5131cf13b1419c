//! Request smuggling checks on HTTP/1 connections, pure.
//!
//! hyper refuses two different `Content-Length`s itself (400), but a request with
//! both `Content-Length` and `Transfer-Encoding` it reads as chunked, dropping the
//! length. That request must be refused instead (RFC 9112 §6.1 lets a server do
//! so; Envoy does). The length is gone by the time the request reaches the
//! service, so [`Tracker`] reads the bytes the connection receives, finds each
//! request head by following the message framing, and queues one
//! [`HeadVerdict`] per head. The service takes them in order, one per request.

use std::collections::VecDeque;

/// What the tracker found in one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadVerdict {
    /// Nothing wrong.
    Clean,
    /// A smuggling shape, named.
    Smuggling(&'static str),
    /// The tracker lost the framing (an upgrade, a head it cannot parse): the
    /// request is served, and the connection closed after it.
    Untracked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    Lost,
}

/// Follows HTTP/1 request framing over the bytes a connection receives.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    buf: Vec<u8>,
    verdicts: VecDeque<HeadVerdict>,
    max_head: usize,
}

const MAX_LINE: usize = 4096;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Judges one request head; returns the verdict and the framing of its body.
fn judge(head: &[u8]) -> (HeadVerdict, State) {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return (HeadVerdict::Untracked, State::Lost),
    }
    let mut lengths: Vec<Option<u64>> = Vec::new();
    let mut te: Option<&[u8]> = None;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|b| *b == b',') {
                let text = std::str::from_utf8(part).unwrap_or("").trim();
                lengths.push(text.parse::<u64>().ok());
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te.is_some() && !lengths.is_empty() {
        return (
            HeadVerdict::Smuggling("both Content-Length and Transfer-Encoding"),
            State::Lost,
        );
    }
    let first = lengths.first().copied();
    if lengths.iter().any(|l| l.is_none() || *l != first.flatten()) {
        return (
            HeadVerdict::Smuggling("Content-Length values that differ or do not parse"),
            State::Lost,
        );
    }
    if upgrade {
        return (HeadVerdict::Untracked, State::Lost);
    }
    if let Some(te) = te {
        let last = te.rsplit(|b| *b == b',').next().unwrap_or(te);
        let chunked = std::str::from_utf8(last)
            .map(|s| s.trim().eq_ignore_ascii_case("chunked"))
            .unwrap_or(false);
        return if chunked {
            (HeadVerdict::Clean, State::ChunkSize)
        } else {
            (HeadVerdict::Untracked, State::Lost)
        };
    }
    match first.flatten() {
        Some(n) if n > 0 => (HeadVerdict::Clean, State::Body(n)),
        _ => (HeadVerdict::Clean, State::Head),
    }
}

impl Tracker {
    /// A tracker that gives up on heads longer than `max_head` bytes (the server
    /// refuses those itself, with 431).
    pub fn new(max_head: usize) -> Self {
        Self {
            state: State::Head,
            buf: Vec::new(),
            verdicts: VecDeque::new(),
            max_head,
        }
    }

    /// The verdict of the next request, in order; `Untracked` when none is queued.
    pub fn next_verdict(&mut self) -> HeadVerdict {
        self.verdicts.pop_front().unwrap_or(HeadVerdict::Untracked)
    }

    /// Accumulates into `buf` until `end` is found; returns the bytes after it.
    fn line<'a>(&mut self, data: &'a [u8], end: &[u8], limit: usize) -> Option<&'a [u8]> {
        let keep = self.buf.len();
        self.buf.extend_from_slice(data);
        // Only where the marker could newly end: bytes already searched are not
        // searched again, so a head dribbled a byte at a time costs linear time.
        let from = keep.saturating_sub(end.len() - 1);
        let found = self
            .buf
            .get(from..)
            .and_then(|tail| find(tail, end))
            .map(|at| at + from);
        match found {
            Some(at) => {
                let used = (at + end.len()).saturating_sub(keep);
                self.buf.truncate(at);
                Some(data.get(used..).unwrap_or_default())
            }
            None => {
                if self.buf.len() > limit {
                    self.state = State::Lost;
                    self.buf = Vec::new();
                }
                None
            }
        }
    }

    /// Feeds the bytes the connection received next.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Lost => {
                    self.buf = Vec::new();
                    return;
                }
                State::Head => {
                    // Empty lines before a request line are tolerated.
                    if self.buf.is_empty() {
                        let skip = data.iter().take_while(|b| **b == b'\r' || **b == b'\n');
                        let skip = skip.count();
                        data = data.get(skip..).unwrap_or_default();
                        if data.is_empty() {
                            return;
                        }
                    }
                    let Some(rest) = self.line(data, b"\r\n\r\n", self.max_head) else {
                        return;
                    };
                    self.buf.extend_from_slice(b"\r\n\r\n");
                    let (verdict, next) = judge(&self.buf);
                    self.verdicts.push_back(verdict);
                    self.buf.clear();
                    self.state = next;
                    data = rest;
                }
                State::Body(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    data = data.get(take..).unwrap_or_default();
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::ChunkSize => {
                    let Some(rest) = self.line(data, b"\r\n", MAX_LINE) else {
                        return;
                    };
                    let text = std::str::from_utf8(&self.buf).unwrap_or("");
                    let size = text.split(';').next().unwrap_or("").trim();
                    self.state = match u64::from_str_radix(size, 16) {
                        Ok(0) => State::Trailers,
                        Ok(n) => State::ChunkData(n),
                        Err(_) => State::Lost,
                    };
                    self.buf.clear();
                    data = rest;
                }
                State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    data = data.get(take..).unwrap_or_default();
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkEnd(n) => {
                    let take = usize::from(n).min(data.len());
                    data = data.get(take..).unwrap_or_default();
                    let left = n - take as u8;
                    self.state = if left == 0 {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(left)
                    };
                }
                State::Trailers => {
                    // Trailer lines end with an empty line.
                    let Some(rest) = self.line(data, b"\r\n", self.max_head) else {
                        return;
                    };
                    let empty = self.buf.is_empty();
                    self.buf.clear();
                    if empty {
                        self.state = State::Head;
                    }
                    data = rest;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(chunks: &[&[u8]]) -> Vec<HeadVerdict> {
        let mut t = Tracker::new(64 * 1024);
        for c in chunks {
            t.feed(c);
        }
        let mut out = Vec::new();
        while let Some(v) = t.verdicts.pop_front() {
            out.push(v);
        }
        out
    }

    #[test]
    fn content_length_with_transfer_encoding_is_smuggling_in_either_order() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
        ] {
            assert!(matches!(verdicts(&[head])[..], [HeadVerdict::Smuggling(_)]));
        }
    }

    #[test]
    fn two_different_content_lengths_are_smuggling_and_equal_ones_are_not() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(verdicts(&[two])[..], [HeadVerdict::Smuggling(_)]));
        let list = b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\nab";
        assert!(matches!(verdicts(&[list])[..], [HeadVerdict::Smuggling(_)]));
        let same = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(verdicts(&[same]), vec![HeadVerdict::Clean]);
    }

    #[test]
    fn heads_are_found_after_length_and_chunked_bodies_split_anywhere() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let want = vec![
            HeadVerdict::Clean,
            HeadVerdict::Clean,
            HeadVerdict::Clean,
            HeadVerdict::Smuggling("both Content-Length and Transfer-Encoding"),
        ];
        assert_eq!(verdicts(&[stream]), want);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdicts(&bytes), want);
        let threes: Vec<&[u8]> = stream.chunks(3).collect();
        assert_eq!(verdicts(&threes), want);
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_not_judged() {
        let body = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        stream.extend_from_slice(body);
        assert_eq!(verdicts(&[&stream]), vec![HeadVerdict::Clean]);
    }

    #[test]
    fn a_head_dribbled_a_byte_at_a_time_is_searched_in_linear_time() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        head.extend(std::iter::repeat_n(b"X-A: b\r\n".iter().copied(), 7000).flatten());
        head.extend_from_slice(b"\r\n");
        let mut t = Tracker::new(64 * 1024);
        let started = std::time::Instant::now();
        for b in head.chunks(1) {
            t.feed(b);
        }
        assert_eq!(t.next_verdict(), HeadVerdict::Untracked, "over 128 headers");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let mut t = Tracker::new(64 * 1024);
        for b in b"GET / HTTP/1.1\r\nA: b\r\n\r\nGET /2 HTTP/1.1\r\n\r\n".chunks(1) {
            t.feed(b);
        }
        assert_eq!(t.next_verdict(), HeadVerdict::Clean);
        assert_eq!(t.next_verdict(), HeadVerdict::Clean);
    }

    #[test]
    fn upgrades_and_oversized_heads_lose_the_framing() {
        let up = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(&[up]), vec![HeadVerdict::Untracked]);
        let mut t = Tracker::new(16);
        t.feed(b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaa");
        t.feed(b"\r\n\r\n");
        assert_eq!(t.next_verdict(), HeadVerdict::Untracked);
        assert_eq!(t.state, State::Lost);
    }
}
