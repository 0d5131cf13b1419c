//! The codec of every generated client and server: tonic's prost codec with small
//! per-call buffers.
//!
//! tonic allocates an encode and a decode buffer for every call up front (8 KiB each by
//! default) and keeps them for the call's life. Citadel's messages are a few KiB at most,
//! and its long calls are streams that sit idle for hours (an SDS stream per workload on
//! the node agent), so the default made most of the agent's memory per workload. Buffers
//! start at [`CALL_BUFFER_BYTES`] and grow in steps of that size when a message needs more.

use std::marker::PhantomData;

use tonic::codec::BufferSettings;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// First size (and growth step) of each call's encode and decode buffer, bytes.
pub const CALL_BUFFER_BYTES: usize = 1024;
/// Encoded bytes a streaming response gathers before handing them to HTTP/2 (tonic's
/// default).
pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// Prost encoding with small call buffers (see the module docs).
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codec::{Codec, Decoder, Encoder};

    #[test]
    fn calls_start_with_small_buffers() {
        let mut codec = SmallBufferCodec::<prost_types::Duration, prost_types::Duration>::default();
        // BufferSettings has no getters; its Debug form names the size.
        let small = format!("buffer_size: {CALL_BUFFER_BYTES},");
        let encoder = format!("{:?}", codec.encoder().buffer_settings());
        let decoder = format!("{:?}", codec.decoder().buffer_settings());
        assert!(encoder.contains(&small), "{encoder}");
        assert!(decoder.contains(&small), "{decoder}");
    }
}
