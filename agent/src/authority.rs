//! Makes the agent's HTTP/2 server ignore the `:authority` of requests.
//!
//! A Unix socket has no authority, yet gRPC clients send one: gRPC C-core
//! (Python, C++, Ruby, PHP, C#) sends the percent-encoded socket path,
//! grpc-java and grpc-swift the raw path. The HTTP/2 layer under tonic
//! validates the value as a URI authority and resets such streams with
//! `PROTOCOL_ERROR` before any service runs. On this socket the value means
//! nothing, so it is replaced here, between the accepted socket and the
//! HTTP/2 server: every request header block the client sends is decoded
//! (HPACK, with the client's dynamic table), its `:authority` set to
//! `localhost`, and the block re-encoded without the dynamic table (so the
//! server's decoder never holds state of ours). Every other byte, and the
//! whole server-to-client direction, passes through untouched.
//!
//! [`AuthorityRewriter`] is the pure byte transform; [`IgnoreAuthority`]
//! applies it to the read side of a connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use citadel_identity::Escaped;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The authority every request is given.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// Largest header block (all HEADERS and CONTINUATION payloads of one
/// block) accepted. gRPC clients send a few hundred bytes.
pub const MAX_HEADER_BLOCK_BYTES: usize = 64 * 1024;
/// Largest decoded header list (RFC 7540 §6.5.2 size: name + value + 32
/// per field), bounding what a small block can expand to through the
/// dynamic table.
pub const MAX_HEADER_LIST_BYTES: usize = 64 * 1024;

const PREFACE_LEN: usize = 24;
/// Capacity of the rewritten-bytes buffer kept between reads; a larger one is released
/// once drained.
const KEEP_READY_CAPACITY: usize = 512;
const FRAME_HEADER_LEN: usize = 9;
/// The frame size every HTTP/2 server accepts (SETTINGS_MAX_FRAME_SIZE
/// default); re-encoded blocks are split into frames of at most this.
const MAX_OUT_FRAME_PAYLOAD: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE default: the server never announces another,
/// so a client may not grow its encoder's table past this.
const HEADER_TABLE_SIZE: usize = 4096;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Why a client's byte stream could not be rewritten. The connection is
/// closed: each of these would be a connection error for the server too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// A HEADERS frame's padding or priority fields exceed its length.
    #[error("malformed HEADERS frame on stream {0}")]
    MalformedHeaders(u32),
    /// A header block was interrupted by another frame.
    #[error("header block of stream {0} interrupted by a frame of type {1:#x}")]
    InterruptedBlock(u32, u8),
    /// The header block or its decoded list is too large.
    #[error("header block of stream {0} is larger than {1} bytes")]
    TooLarge(u32, usize),
    /// The block is not valid HPACK.
    #[error("header block of stream {0} cannot be decoded: {1}")]
    Hpack(u32, String),
}

impl From<RewriteError> for io::Error {
    fn from(e: RewriteError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where the rewriter is in the client's byte stream.
enum State {
    /// Copying the connection preface; this many bytes remain.
    Preface(usize),
    /// Between frames: collecting a frame header.
    FrameHeader,
    /// Copying the payload of a frame that is not part of a header block.
    Copy(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    Collect { frame: FrameHead, payload: Vec<u8> },
}

#[derive(Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8; FRAME_HEADER_LEN]) -> Self {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = *b;
        Self {
            len: usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2),
            kind,
            flags,
            stream: u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]),
        }
    }
}

/// A header block being assembled from HEADERS + CONTINUATION frames.
struct OpenBlock {
    stream: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The 5 priority bytes of the HEADERS frame, if it had them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The pure transform from the client's bytes to the bytes the HTTP/2
/// server reads: identical but for the `:authority` of header blocks.
pub struct AuthorityRewriter {
    state: State,
    header: Vec<u8>,
    block: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityRewriter {
    /// A rewriter at the start of a connection (before the preface).
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            state: State::Preface(PREFACE_LEN),
            header: Vec::with_capacity(FRAME_HEADER_LEN),
            block: None,
            decoder,
        }
    }

    /// Consumes `input` (any split of the stream) and appends what the
    /// server should read to `out`. After an error the rewriter is unusable
    /// and the connection must be closed.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Preface(remaining) | State::Copy(remaining) => {
                    let n = (*remaining).min(input.len());
                    let (now, rest) = input.split_at(n);
                    out.extend_from_slice(now);
                    input = rest;
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::FrameHeader;
                    }
                }
                State::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.header.len()).min(input.len());
                    let (now, rest) = input.split_at(n);
                    self.header.extend_from_slice(now);
                    input = rest;
                    if let Ok(bytes) = <[u8; FRAME_HEADER_LEN]>::try_from(self.header.as_slice()) {
                        self.header.clear();
                        self.begin_frame(FrameHead::parse(&bytes), &bytes, out)?;
                    }
                }
                State::Collect { frame, payload } => {
                    let n = (frame.len - payload.len()).min(input.len());
                    let (now, rest) = input.split_at(n);
                    payload.extend_from_slice(now);
                    input = rest;
                    if payload.len() == frame.len {
                        let frame = *frame;
                        let payload = std::mem::take(payload);
                        self.state = State::FrameHeader;
                        self.end_frame(frame, &payload, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn begin_frame(
        &mut self,
        frame: FrameHead,
        raw_header: &[u8; FRAME_HEADER_LEN],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let in_block = self.block.as_ref().map(|b| b.stream);
        let part_of_block = match (in_block, frame.kind) {
            (None, TYPE_HEADERS) => true,
            (Some(stream), TYPE_CONTINUATION) if stream == frame.stream => true,
            (Some(stream), kind) => return Err(RewriteError::InterruptedBlock(stream, kind)),
            // Anything else, including a stray CONTINUATION, is the
            // server's to judge.
            (None, _) => false,
        };
        if part_of_block {
            let held = self.block.as_ref().map_or(0, |b| b.fragment.len());
            if held + frame.len > MAX_HEADER_BLOCK_BYTES {
                return Err(RewriteError::TooLarge(frame.stream, MAX_HEADER_BLOCK_BYTES));
            }
            self.state = State::Collect {
                frame,
                payload: Vec::with_capacity(frame.len),
            };
            if frame.len == 0 {
                self.state = State::FrameHeader;
                self.end_frame(frame, &[], out)?;
            }
        } else {
            out.extend_from_slice(raw_header);
            self.state = if frame.len == 0 {
                State::FrameHeader
            } else {
                State::Copy(frame.len)
            };
        }
        Ok(())
    }

    fn end_frame(
        &mut self,
        frame: FrameHead,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let block = match self.block.as_mut() {
            Some(block) => {
                block.fragment.extend_from_slice(payload);
                block
            }
            None => {
                let (priority, fragment) = split_headers_payload(frame, payload)?;
                self.block.insert(OpenBlock {
                    stream: frame.stream,
                    end_stream: frame.flags & FLAG_END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                })
            }
        };
        if frame.flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let stream = block.stream;
        let block = self
            .block
            .take()
            .ok_or(RewriteError::MalformedHeaders(stream))?;
        let fields = decode_replacing_authority(&mut self.decoder, &block)?;
        write_block(&block, &encode_without_indexing(&fields), out);
        Ok(())
    }
}

/// The priority bytes and the header block fragment of a HEADERS payload,
/// with padding removed.
fn split_headers_payload(
    frame: FrameHead,
    payload: &[u8],
) -> Result<(Option<[u8; 5]>, &[u8]), RewriteError> {
    let malformed = || RewriteError::MalformedHeaders(frame.stream);
    let mut rest = payload;
    if frame.flags & FLAG_PADDED != 0 {
        let (&pad, after) = rest.split_first().ok_or_else(malformed)?;
        let keep = after
            .len()
            .checked_sub(usize::from(pad))
            .ok_or_else(malformed)?;
        rest = after.get(..keep).ok_or_else(malformed)?;
    }
    let mut priority = None;
    if frame.flags & FLAG_PRIORITY != 0 {
        let (p, after) = rest.split_first_chunk::<5>().ok_or_else(malformed)?;
        priority = Some(*p);
        rest = after;
    }
    Ok((priority, rest))
}

type Field = (Vec<u8>, Vec<u8>);

fn decode_replacing_authority(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &OpenBlock,
) -> Result<Vec<Field>, RewriteError> {
    let mut fields = Vec::new();
    let mut list_size = 0usize;
    decoder
        .decode_with_cb(&block.fragment, |name, value| {
            list_size = list_size.saturating_add(name.len() + value.len() + 32);
            if list_size <= MAX_HEADER_LIST_BYTES {
                let value = if name.as_ref() == b":authority" {
                    REPLACEMENT_AUTHORITY.to_vec()
                } else {
                    value.into_owned()
                };
                fields.push((name.into_owned(), value));
            }
        })
        .map_err(|e| RewriteError::Hpack(block.stream, e.to_string()))?;
    if list_size > MAX_HEADER_LIST_BYTES {
        return Err(RewriteError::TooLarge(block.stream, MAX_HEADER_LIST_BYTES));
    }
    Ok(fields)
}

/// HPACK "literal header field without indexing, new name" for every
/// field, strings not Huffman-coded: stateless, so the server's dynamic
/// table stays empty.
fn encode_without_indexing(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        for s in [name, value] {
            // Writing to a Vec cannot fail.
            let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, &mut out);
            out.extend_from_slice(s);
        }
    }
    out
}

/// Writes `encoded` as a HEADERS frame (with the original END_STREAM and
/// priority, without padding) followed by CONTINUATION frames as needed.
fn write_block(block: &OpenBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let mut first_payload = Vec::with_capacity(5 + encoded.len().min(MAX_OUT_FRAME_PAYLOAD));
    let mut flags = 0u8;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if let Some(p) = block.priority {
        flags |= FLAG_PRIORITY;
        first_payload.extend_from_slice(&p);
    }
    let first_len = (MAX_OUT_FRAME_PAYLOAD - first_payload.len()).min(encoded.len());
    let (first, mut rest) = encoded.split_at(first_len);
    first_payload.extend_from_slice(first);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame(out, TYPE_HEADERS, flags, block.stream, &first_payload);
    while !rest.is_empty() {
        let n = MAX_OUT_FRAME_PAYLOAD.min(rest.len());
        let (chunk, after) = rest.split_at(n);
        rest = after;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame(out, TYPE_CONTINUATION, flags, block.stream, chunk);
    }
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    // Payloads are at most MAX_OUT_FRAME_PAYLOAD, so the length fits 24 bits.
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A connection whose reads pass through an [`AuthorityRewriter`]; writes
/// go to the inner stream unchanged.
pub struct IgnoreAuthority<S> {
    inner: S,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet handed to the reader.
    ready: Vec<u8>,
    ready_from: usize,
    failed: bool,
}

impl<S> IgnoreAuthority<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: AuthorityRewriter::new(),
            ready: Vec::new(),
            ready_from: 0,
            failed: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IgnoreAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let pending = &this.ready[this.ready_from..];
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending[..n]);
                this.ready_from += n;
                if this.ready_from == this.ready.len() {
                    // An idle connection (an open SDS stream) keeps nothing: the buffer of
                    // its last read would otherwise stay allocated for the stream's life.
                    if this.ready.capacity() > KEEP_READY_CAPACITY {
                        this.ready = Vec::new();
                    } else {
                        this.ready.clear();
                    }
                    this.ready_from = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(io::ErrorKind::InvalidData.into()));
            }
            let mut raw = [0u8; 8192];
            let mut raw_buf = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw_buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let read = raw_buf.filled();
                    if read.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    if let Err(e) = this.rewriter.feed(read, &mut this.ready) {
                        tracing::warn!(error = %Escaped(&e), "closing a connection whose HTTP/2 headers cannot be read");
                        this.failed = true;
                        return Poll::Ready(Err(e.into()));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IgnoreAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, flags, stream, payload);
        out
    }

    /// Parses `bytes` (after the preface) into frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let head: [u8; 9] = bytes[..9].try_into().unwrap();
            let f = FrameHead::parse(&head);
            out.push((f.kind, f.flags, f.stream, bytes[9..9 + f.len].to_vec()));
            bytes = &bytes[9 + f.len..];
        }
        out
    }

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn request_block(encoder: &mut loona_hpack::Encoder<'_>, authority: &str) -> Vec<u8> {
        encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", authority.as_bytes()),
            (b"workload.spiffe.io", b"true"),
        ])
    }

    fn rewrite_in_pieces(input: &[u8], piece: usize) -> Vec<u8> {
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            r.feed(chunk, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn replaces_a_percent_encoded_socket_path_authority() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let settings = frame(0x4, 0, 0, &[]);
        input.extend_from_slice(&settings);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(&mut enc, "%2Ftmp%2Fagent.sock"),
        ));
        let data = frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0");
        input.extend_from_slice(&data);
        for piece in [1, 3, 9, 1000] {
            let out = rewrite_in_pieces(&input, piece);
            assert_eq!(&out[..24], PREFACE);
            let f = frames(&out[24..]);
            assert_eq!(f.len(), 3);
            assert_eq!(f[0].0, 0x4, "SETTINGS passes untouched");
            assert_eq!(
                (f[1].0, f[1].1, f[1].2),
                (TYPE_HEADERS, FLAG_END_HEADERS, 1)
            );
            let fields = decode(&f[1].3);
            assert!(fields.contains(&(":authority".into(), "localhost".into())));
            assert!(fields.contains(&("workload.spiffe.io".into(), "true".into())));
            assert_eq!(fields.len(), 5);
            assert_eq!(frame(f[2].0, f[2].1, f[2].2, &f[2].3), data);
        }
    }

    #[test]
    fn follows_the_clients_dynamic_table_across_requests() {
        // The second request is encoded with references to the first's
        // dynamic-table entries; the rewriter must decode it with them.
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        for stream in [1u32, 3, 5] {
            input.extend(frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                stream,
                &request_block(&mut enc, "/run/agent.sock"),
            ));
        }
        let out = rewrite_in_pieces(&input, 7);
        let f = frames(&out[24..]);
        assert_eq!(f.len(), 3);
        // The output never uses the dynamic table, so each block decodes
        // on its own.
        for (i, (_, flags, stream, block)) in f.iter().enumerate() {
            assert_eq!(*stream, [1, 3, 5][i]);
            assert_eq!(*flags, FLAG_END_HEADERS | FLAG_END_STREAM);
            let fields = decode(block);
            assert!(fields.contains(&(":authority".into(), "localhost".into())));
            assert!(fields.contains(&("workload.spiffe.io".into(), "true".into())));
        }
    }

    #[test]
    fn joins_continuations_and_drops_padding_keeping_priority() {
        let mut enc = loona_hpack::Encoder::new();
        let block = request_block(&mut enc, "anything at all");
        let (a, b) = block.split_at(10);
        let mut headers = vec![3u8]; // pad length
        headers.extend_from_slice(&[0, 0, 0, 0, 15]); // priority
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            7,
            &headers,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 7, b));
        let f = frames(&rewrite_in_pieces(&input, 5)[24..]);
        assert_eq!(f.len(), 1);
        let (kind, flags, stream, payload) = &f[0];
        assert_eq!((*kind, *stream), (TYPE_HEADERS, 7));
        assert_eq!(*flags, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 15]);
        let fields = decode(&payload[5..]);
        assert_eq!(fields[3], (":authority".into(), "localhost".into()));
    }

    #[test]
    fn splits_large_blocks_into_continuation_frames() {
        let big = "x".repeat(40_000);
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":path"[..], &b"/a"[..]), (b"big", big.as_bytes())]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &block[..16_000]));
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &block[16_000..32_000]));
        input.extend(frame(
            TYPE_CONTINUATION,
            FLAG_END_HEADERS,
            1,
            &block[32_000..],
        ));
        let f = frames(&rewrite_in_pieces(&input, 4096)[24..]);
        assert!(f.len() >= 3);
        assert!(
            f.iter()
                .all(|(_, _, _, p)| p.len() <= MAX_OUT_FRAME_PAYLOAD)
        );
        assert_eq!(f[0].0, TYPE_HEADERS);
        assert!(f[1..].iter().all(|(k, _, _, _)| *k == TYPE_CONTINUATION));
        assert_eq!(f.last().unwrap().1, FLAG_END_HEADERS);
        let joined: Vec<u8> = f.iter().flat_map(|(_, _, _, p)| p.clone()).collect();
        assert_eq!(decode(&joined)[1].1, big);
    }

    #[test]
    fn rejects_a_header_block_interrupted_by_another_frame() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"data"));
        let mut out = Vec::new();
        assert_eq!(
            AuthorityRewriter::new().feed(&input, &mut out),
            Err(RewriteError::InterruptedBlock(1, 0x0))
        );
    }

    #[test]
    fn rejects_a_block_that_expands_past_the_list_limit() {
        // One 4 KiB dynamic-table entry referenced many times: a small block
        // that would decode to megabytes.
        let value = "v".repeat(4000);
        let mut block = vec![0x40];
        let _ = loona_hpack::encoder::encode_integer_into(1, 7, 0, &mut block);
        block.push(b'k');
        let _ = loona_hpack::encoder::encode_integer_into(value.len(), 7, 0, &mut block);
        block.extend_from_slice(value.as_bytes());
        block.extend(std::iter::repeat_n(0x80 | 62, 5000));
        assert!(block.len() < MAX_OUT_FRAME_PAYLOAD);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let mut out = Vec::new();
        assert!(matches!(
            AuthorityRewriter::new().feed(&input, &mut out),
            Err(RewriteError::TooLarge(1, MAX_HEADER_LIST_BYTES))
        ));
    }

    #[test]
    fn rejects_invalid_hpack_and_malformed_padding() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0xff]));
        let mut out = Vec::new();
        assert!(matches!(
            AuthorityRewriter::new().feed(&input, &mut out),
            Err(RewriteError::Hpack(1, _))
        ));
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED,
            1,
            &[200, 1],
        ));
        assert_eq!(
            AuthorityRewriter::new().feed(&input, &mut out),
            Err(RewriteError::MalformedHeaders(1))
        );
    }

    #[test]
    fn passes_anything_that_is_not_a_header_block_through() {
        // Garbage after the preface is copied frame by frame for the
        // server to refuse; the rewriter never buffers a whole large frame.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0, 0, 0, 0, 1]);
        input.extend(std::iter::repeat_n(0xab, 100_000));
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(8192) {
            r.feed(chunk, &mut out).unwrap();
        }
        assert_eq!(out, input);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), split in 1usize..64) {
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&bytes);
            let mut r = AuthorityRewriter::new();
            let mut out = Vec::new();
            for chunk in input.chunks(split) {
                if r.feed(chunk, &mut out).is_err() {
                    break;
                }
            }
        }
    }
}
