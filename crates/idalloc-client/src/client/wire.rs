//! One connection's calls: tarpc's wire protocol (length-delimited bincode 1.x
//! `ClientMessage` and `Response` frames) under a dispatch of our own, as the
//! daemon serves its side with its own loop (`src/server/connection.rs`).
//!
//! Why not tarpc's `Channel`: per call it makes a tracing span and a trace context
//! with a random span id, and sends the request through a channel to a dispatch
//! task that keeps, per request, a deadline timer, an in-flight map entry and a
//! cancellation entry, and writes and flushes frame by frame. A writer reserving one
//! range at a time pays all of that on every call: in the daemon bench the load
//! generator's CPU per reservation was as large as the daemon's
//! (docs/performance.md). Here a call encodes its frame into the connection's
//! outgoing buffer, registers a oneshot under its request id, and wakes the writer
//! task only if the buffer was empty; every frame queued meanwhile goes out in the
//! same write. The reader task decodes replies and completes their calls.
//!
//! Deadlines are the caller's: [`Client`](super::Client) bounds every call with a
//! timeout, and the daemon is told the deadline in the request's context as before.
//! A call dropped before its reply removes its entry, and the reply, if it comes,
//! is discarded: a reservation nobody receives is a gap. No cancel message is sent;
//! the daemon runs every request to its end anyway.
//!
//! What ends the connection (end of stream, a read or write error, a reply frame
//! over the limit or one that does not decode, the last handle dropped) fails
//! every call in flight and every later one with the same error, and `Client`
//! redials. A TLS refusal keeps its rustls error inside, for `tls_failure` to name.
//!
//! Invariant protected: a reply completes the call whose request id it carries
//! and no other, once; nothing here retries or repeats a request.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tarpc::client::stub::Stub;
use tarpc::client::RpcError;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_serde::{Deserializer, Serializer};
use tarpc::{context, ChannelError, ClientMessage, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::protocol::{IdAllocRequest, IdAllocResponse};

type Reply = Result<IdAllocResponse, RpcError>;
type Failure = ChannelError<dyn std::error::Error + Send + Sync + 'static>;

/// A connection's calls, shared by clones; the connection ends when the last clone
/// is dropped.
#[derive(Clone)]
pub(crate) struct Wire {
    handle: Arc<Handle>,
}

impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wire").finish_non_exhaustive()
    }
}

/// Owned by the [`Wire`] clones only (the tasks hold `Shared`): dropping the last
/// one ends the connection.
struct Handle {
    shared: Arc<Shared>,
    reader: AbortHandle,
    writer: AbortHandle,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Nobody can be waiting for a reply any more. Both tasks go, so that a
        // writer stuck on a daemon that stopped reading does not outlive the
        // connection; dropping both halves closes the socket.
        self.shared.end(Ended::Closed);
        self.reader.abort();
        self.writer.abort();
    }
}

struct Shared {
    next_id: AtomicU64,
    state: Mutex<State>,
    /// Wakes the writer: frames were queued into an empty buffer, or the
    /// connection ended.
    wake_writer: Notify,
}

#[derive(Default)]
struct State {
    /// Frames (length prefix and body) not yet handed to the writer.
    out: Vec<u8>,
    /// Calls waiting for their reply, by request id.
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Why the connection ended; set once, never cleared.
    ended: Option<Ended>,
}

#[derive(Clone)]
enum Ended {
    /// The daemon closed it, or this side dropped it.
    Closed,
    /// A read, write or decode failure.
    Failed(Failure),
}

impl Ended {
    fn error(&self) -> RpcError {
        match self {
            Ended::Closed => RpcError::Shutdown,
            Ended::Failed(e) => RpcError::Channel(e.clone()),
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// End the connection (the first reason wins) and fail every waiting call.
    fn end(&self, why: Ended) {
        let (waiting, why) = {
            let mut st = self.lock();
            let why = st.ended.get_or_insert(why).clone();
            (std::mem::take(&mut st.waiting), why)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(why.error()));
        }
        self.wake_writer.notify_one();
    }
}

impl Wire {
    /// Serve calls over a connection's two halves, with replies of at most
    /// `max_frame` bytes. Spawns the reader and writer tasks on the current runtime.
    pub(crate) fn spawn<R, W>(read: R, write: W, max_frame: usize) -> Wire
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
        });
        let writer = tokio::spawn(write_loop(shared.clone(), write)).abort_handle();
        let reader = tokio::spawn(read_loop(shared.clone(), read, max_frame)).abort_handle();
        Wire {
            handle: Arc::new(Handle {
                shared,
                reader,
                writer,
            }),
        }
    }

    /// Split `io` and [`Wire::spawn`] over it.
    pub(crate) fn over<S>(io: S, max_frame: usize) -> Wire
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        Wire::spawn(read, write, max_frame)
    }
}

impl Stub for Wire {
    type Req = IdAllocRequest;
    type Resp = IdAllocResponse;

    async fn call(&self, ctx: context::Context, request: IdAllocRequest) -> Reply {
        let shared = &self.handle.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let body = Pin::new(&mut Bincode::<Response<IdAllocResponse>, _>::default())
            .serialize(&ClientMessage::Request(Request {
                context: ctx,
                id,
                message: request,
            }))
            .map_err(|e| RpcError::Send(Box::new(e)))?;
        let len = u32::try_from(body.len()).map_err(|_| {
            RpcError::Send(Box::new(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "request frame over 4 GiB",
            )))
        })?;
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut st = shared.lock();
            if let Some(ended) = &st.ended {
                return Err(ended.error());
            }
            st.waiting.insert(id, tx);
            let was_empty = st.out.is_empty();
            st.out.extend_from_slice(&len.to_be_bytes());
            st.out.extend_from_slice(&body);
            was_empty
        };
        if wake {
            shared.wake_writer.notify_one();
        }
        let mut waiting = Waiting {
            shared,
            id,
            answered: false,
        };
        let reply = rx.await;
        waiting.answered = true;
        // Every sender is either answered or failed by `end`; a dropped one would
        // mean the connection's state is gone, which is a closed connection.
        reply.unwrap_or(Err(RpcError::Shutdown))
    }
}

/// Removes a call's entry if the call is dropped before its reply.
struct Waiting<'a> {
    shared: &'a Shared,
    id: u64,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.lock().waiting.remove(&self.id);
        }
    }
}

/// Hand every queued frame to the socket, one write per batch, until the
/// connection ends; then close the write half.
async fn write_loop<W: AsyncWrite + Unpin>(shared: Arc<Shared>, mut write: W) {
    let mut batch = Vec::new();
    loop {
        let ended = {
            let mut st = shared.lock();
            std::mem::swap(&mut st.out, &mut batch);
            st.ended.is_some()
        };
        if ended {
            break;
        }
        if batch.is_empty() {
            shared.wake_writer.notified().await;
            continue;
        }
        let written = match write.write_all(&batch).await {
            Ok(()) => write
                .flush()
                .await
                .map_err(|e| ChannelError::Flush(shared_error(e))),
            Err(e) => Err(ChannelError::Write(shared_error(e))),
        };
        if let Err(e) = written {
            shared.end(Ended::Failed(e));
            break;
        }
        batch.clear();
    }
    let _ = write.shutdown().await;
}

/// Complete each call as its reply arrives, until the connection ends.
async fn read_loop<R: AsyncRead + Unpin>(shared: Arc<Shared>, read: R, max_frame: usize) {
    let mut frames = FramedRead::new(
        read,
        LengthDelimitedCodec::builder()
            .max_frame_length(max_frame)
            .new_codec(),
    );
    let why = loop {
        let frame = match frames.next().await {
            None => break Ended::Closed,
            Some(Err(e)) => break Ended::Failed(ChannelError::Read(shared_error(e))),
            Some(Ok(frame)) => frame,
        };
        let decoded: std::io::Result<Response<IdAllocResponse>> =
            Pin::new(&mut Bincode::<_, ClientMessage<IdAllocRequest>>::default())
                .deserialize(&frame);
        let response = match decoded {
            Ok(r) => r,
            Err(e) => break Ended::Failed(ChannelError::Read(shared_error(e))),
        };
        let caller = shared.lock().waiting.remove(&response.request_id);
        if let Some(tx) = caller {
            let _ = tx.send(response.message.map_err(RpcError::Server));
        }
    };
    shared.end(why);
}

fn shared_error(e: std::io::Error) -> Arc<dyn std::error::Error + Send + Sync + 'static> {
    Arc::new(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::Kind;
    use crate::protocol::{IdAllocClient, IdRange};
    use std::time::Duration;
    use tokio::io::DuplexStream;
    use tokio_util::codec::Framed;

    type ServerSide = Framed<DuplexStream, LengthDelimitedCodec>;

    /// A client over an in-memory pipe, and the raw server end of it.
    fn pair(max_frame: usize) -> (IdAllocClient<Wire>, ServerSide) {
        let (client, server) = pair_with_wire(max_frame);
        (client.0, server)
    }

    fn pair_with_wire(max_frame: usize) -> ((IdAllocClient<Wire>, Wire), ServerSide) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let wire = Wire::over(client, max_frame);
        (
            (IdAllocClient::from(wire.clone()), wire),
            Framed::new(server, LengthDelimitedCodec::new()),
        )
    }

    /// The next request frame: its id and `count` (every request here is a reserve).
    async fn next_request(server: &mut ServerSide) -> (u64, u64) {
        let frame = server.next().await.expect("a frame").unwrap();
        let msg: ClientMessage<IdAllocRequest> =
            Pin::new(&mut Bincode::<_, Response<IdAllocResponse>>::default())
                .deserialize(&frame)
                .unwrap();
        match msg {
            ClientMessage::Request(Request {
                id,
                message: IdAllocRequest::Reserve { count, .. },
                ..
            }) => (id, count),
            _ => panic!("expected a reserve request"),
        }
    }

    async fn answer(server: &mut ServerSide, request_id: u64, start: u64, count: u64) {
        use futures::SinkExt;
        let body = Pin::new(&mut Bincode::<ClientMessage<IdAllocRequest>, _>::default())
            .serialize(&Response {
                request_id,
                message: Ok(IdAllocResponse::Reserve(Ok(IdRange {
                    start,
                    end: start + count,
                }))),
            })
            .unwrap();
        server.send(body).await.unwrap();
    }

    fn reserve(
        c: &IdAllocClient<Wire>,
        count: u64,
    ) -> tokio::task::JoinHandle<Result<Result<IdRange, crate::error::ServiceError>, RpcError>>
    {
        let c = c.clone();
        tokio::spawn(async move { c.reserve(context::current(), None, Kind::Vid, count).await })
    }

    /// Replies answered in the reverse order of their requests each reach the call
    /// that made them, and calls made together share the pipe.
    #[tokio::test]
    async fn each_reply_reaches_the_call_whose_id_it_carries() {
        let (client, mut server) = pair(1 << 20);
        let calls: Vec<_> = (1..=20).map(|n| reserve(&client, n)).collect();
        let mut requests = Vec::new();
        for _ in 0..20 {
            requests.push(next_request(&mut server).await);
        }
        // Answer in reverse, each range sized by the request's own count.
        for (i, (id, count)) in requests.iter().rev().enumerate() {
            answer(&mut server, *id, 1000 * i as u64, *count).await;
        }
        for (n, call) in (1..=20u64).zip(calls) {
            let r = call.await.unwrap().unwrap().unwrap();
            assert_eq!(r.len(), n, "call {n} got another call's reply");
        }
    }

    /// A call dropped before its reply leaves no entry behind; its late reply is
    /// discarded, and the connection goes on serving.
    #[tokio::test]
    async fn a_dropped_call_late_reply_is_discarded() {
        let ((client, wire), mut server) = pair_with_wire(1 << 20);
        let abandoned = reserve(&client, 7);
        let (id, _) = next_request(&mut server).await;
        abandoned.abort();
        let _ = abandoned.await;
        // Gone before any reply: a daemon that never answers leaks nothing.
        assert!(wire.handle.shared.lock().waiting.is_empty());
        answer(&mut server, id, 0, 7).await;
        let next = reserve(&client, 3);
        let (id2, count) = next_request(&mut server).await;
        assert_ne!(id, id2);
        answer(&mut server, id2, 7, count).await;
        assert_eq!(
            next.await.unwrap().unwrap().unwrap(),
            IdRange { start: 7, end: 10 }
        );
        assert!(wire.handle.shared.lock().waiting.is_empty());
    }

    /// The daemon going away fails the calls in flight and every later call at
    /// once, as a closed connection (the client then redials).
    #[tokio::test]
    async fn a_closed_connection_fails_calls_in_flight_and_later() {
        let (client, mut server) = pair(1 << 20);
        let in_flight = reserve(&client, 1);
        next_request(&mut server).await;
        drop(server);
        assert!(matches!(in_flight.await.unwrap(), Err(RpcError::Shutdown)));
        let later = tokio::time::timeout(Duration::from_secs(5), reserve(&client, 1))
            .await
            .expect("a later call fails at once")
            .unwrap();
        assert!(matches!(later, Err(RpcError::Shutdown)), "{later:?}");
    }

    /// A reply over the frame limit ends the connection with a read error.
    #[tokio::test]
    async fn a_reply_over_the_limit_is_a_channel_error() {
        use futures::SinkExt;
        let (client, mut server) = pair(64);
        let call = reserve(&client, 1);
        let (id, _) = next_request(&mut server).await;
        // A well-formed reply to this very call, only too long: without the limit
        // it would complete the call with the daemon's error.
        let body = Pin::new(&mut Bincode::<ClientMessage<IdAllocRequest>, _>::default())
            .serialize(&Response::<IdAllocResponse> {
                request_id: id,
                message: Err(tarpc::ServerError::new(
                    std::io::ErrorKind::Other,
                    "x".repeat(100),
                )),
            })
            .unwrap();
        assert!(body.len() > 64);
        server.send(body).await.unwrap();
        let r = call.await.unwrap();
        assert!(
            matches!(r, Err(RpcError::Channel(ChannelError::Read(_)))),
            "{r:?}"
        );
    }

    /// A reply that does not decode ends the connection rather than completing a
    /// call with garbage.
    #[tokio::test]
    async fn an_undecodable_reply_is_a_channel_error() {
        use futures::SinkExt;
        let (client, mut server) = pair(1 << 20);
        let call = reserve(&client, 1);
        next_request(&mut server).await;
        server
            .send(tokio_util::bytes::Bytes::from_static(&[0xff; 9]))
            .await
            .unwrap();
        let r = call.await.unwrap();
        assert!(matches!(r, Err(RpcError::Channel(_))), "{r:?}");
    }

    /// Dropping the last handle closes the write half: the daemon sees the end of
    /// the stream.
    #[tokio::test]
    async fn dropping_the_last_handle_closes_the_connection() {
        let (client, mut server) = pair(1 << 20);
        let other = client.clone();
        drop(client);
        let call = reserve(&other, 2);
        let (id, count) = next_request(&mut server).await;
        answer(&mut server, id, 0, count).await;
        call.await.unwrap().unwrap().unwrap();
        drop(other);
        let end = tokio::time::timeout(Duration::from_secs(5), server.next())
            .await
            .expect("the write half is closed");
        assert!(end.is_none());
    }
}
