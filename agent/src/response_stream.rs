//! The response side of the agent's long-lived streams (SDS, Workload API):
//! one message in flight, each boxed.
//!
//! Every open stream holds its channel for as long as the workload lives. Tokio's
//! bounded channel allocates its slots 32 at a time whatever its capacity, so a slot
//! the size of a `Result<DiscoveryResponse, Status>` cost about 4 KiB per open
//! stream; a boxed slot is one pointer, and the message's own allocation lives only
//! while it is in flight.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// What a streaming RPC answers.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The stream went away: the client is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

/// Sends a stream's messages; at most one waits to be taken.
#[derive(Debug)]
pub struct ResponseSender<T>(mpsc::Sender<Box<Result<T, Status>>>);

impl<T> ResponseSender<T> {
    /// Waits until the client has room for `item`.
    pub async fn send(&self, item: Result<T, Status>) -> Result<(), ClientGone> {
        self.0.send(Box::new(item)).await.map_err(|_| ClientGone)
    }

    /// Resolves once the client has gone away.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// A sender and the stream that hands its messages to tonic.
pub fn response_channel<T: Send + 'static>() -> (ResponseSender<T>, ResponseStream<T>) {
    let (tx, rx) = mpsc::channel(1);
    (
        ResponseSender(tx),
        Box::pin(ReceiverStream::new(rx).map(|item| *item)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_and_a_dropped_stream_is_seen() {
        let (tx, mut rx) = response_channel::<u32>();
        let sender = tokio::spawn(async move {
            tx.send(Ok(1)).await.unwrap();
            tx.send(Err(Status::unavailable("bye"))).await.unwrap();
            tx
        });
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        assert_eq!(
            rx.next().await.unwrap().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        let tx = sender.await.unwrap();
        drop(rx);
        tx.closed().await;
        assert_eq!(tx.send(Ok(3)).await, Err(ClientGone));
    }
}
