//! The server side of one connection's byte stream: length-delimited bincode frames
//! (tarpc's wire format) with a *request* size limit, and a read half that can be
//! closed for graceful shutdown.
//!
//! Why not `tarpc::serde_transport::new`: it takes a `LengthDelimitedCodec`, whose one
//! `max_frame_length` bounds both directions, while replies (a `list_forks` page, a
//! `status`) are legitimately much larger than any request. [`AsymmetricCodec`]
//! keeps the small limit for what a client may make the daemon buffer and a large one
//! for what the daemon itself writes. The frame format on the wire is unchanged (a
//! 4-byte big-endian length, then the bincode body), so tarpc's stock client
//! transport talks to it.
//!
//! A frame that is too long or does not decode is a read error: the connection's
//! loop (`super::connection`) ends on it, which closes that connection and no other.
//!
//! Decoding is guarded against panics ([`GuardedBincode`]): tarpc turns a request's
//! deadline (a `Duration` on the wire) into `Instant::now() + deadline`, which
//! panics on overflow, so a frame carrying a deadline of `u64::MAX` seconds would
//! panic the connection's task (`tests/fuzz_decoders.rs` attacks it): such a frame
//! is a decode error like any other malformed frame.

use std::io;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, Sink, Stream};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::{ClientMessage, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// Largest reply frame the daemon writes. Far above any real reply (a 1000-fork page
/// is ~150 KiB); only a guard against a bug producing an unbounded reply.
pub const MAX_RESPONSE_FRAME_BYTES: usize = 16 << 20;

/// Length-delimited framing with separate limits for reading and writing.
#[derive(Debug)]
pub struct AsymmetricCodec {
    decode: LengthDelimitedCodec,
    encode: LengthDelimitedCodec,
}

impl AsymmetricCodec {
    /// Frames read may be at most `max_read` bytes, frames written `max_write`.
    pub fn new(max_read: usize, max_write: usize) -> Self {
        AsymmetricCodec {
            decode: LengthDelimitedCodec::builder()
                .max_frame_length(max_read)
                .new_codec(),
            encode: LengthDelimitedCodec::builder()
                .max_frame_length(max_write)
                .new_codec(),
        }
    }
}

impl Decoder for AsymmetricCodec {
    type Item = BytesMut;
    type Error = io::Error;
    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        self.decode.decode(src)
    }
}

impl Encoder<Bytes> for AsymmetricCodec {
    type Error = io::Error;
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> io::Result<()> {
        self.encode.encode(item, dst)
    }
}

/// tarpc's bincode format (bincode 1.x `DefaultOptions`, as its stock transport
/// uses) whose decoding cannot panic: a panic inside a `Deserialize` impl of a
/// tarpc type becomes an `InvalidData` error, which closes only that connection.
pub struct GuardedBincode<Req, Resp> {
    inner: Bincode<ClientMessage<Req>, Response<Resp>>,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Default for GuardedBincode<Req, Resp> {
    fn default() -> Self {
        GuardedBincode {
            inner: Bincode::default(),
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> tarpc::tokio_serde::Deserializer<ClientMessage<Req>> for GuardedBincode<Req, Resp>
where
    Req: for<'de> serde::Deserialize<'de> + Unpin,
    Resp: Unpin,
{
    type Error = io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> io::Result<ClientMessage<Req>> {
        let inner = Pin::new(&mut self.get_mut().inner);
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.deserialize(src))) {
            Ok(decoded) => decoded,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request frame has a field out of range (its decoder panicked)",
            )),
        }
    }
}

impl<Req, Resp> tarpc::tokio_serde::Serializer<Response<Resp>> for GuardedBincode<Req, Resp>
where
    Req: Unpin,
    Resp: serde::Serialize + Unpin,
{
    type Error = io::Error;

    fn serialize(self: Pin<&mut Self>, item: &Response<Resp>) -> io::Result<Bytes> {
        Pin::new(&mut self.get_mut().inner).serialize(item)
    }
}

type Inner<S, Req, Resp> = tarpc::tokio_serde::Framed<
    Framed<S, AsymmetricCodec>,
    ClientMessage<Req>,
    Response<Resp>,
    GuardedBincode<Req, Resp>,
>;

/// A tarpc server transport over `S`. When `shutdown` is cancelled the read half
/// reports end-of-stream: the connection's loop then stops taking requests, still
/// writes the replies of those in flight, and closes once they are all sent.
pub struct ServerTransport<S, Req, Resp> {
    inner: Inner<S, Req, Resp>,
    shutdown: BoxFuture<'static, ()>,
    read_closed: bool,
}

impl<S, Req, Resp> ServerTransport<S, Req, Resp>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Wrap a connected stream.
    pub fn new(io: S, max_request_frame: usize, shutdown: CancellationToken) -> Self {
        let framed = Framed::new(
            io,
            AsymmetricCodec::new(max_request_frame, MAX_RESPONSE_FRAME_BYTES),
        );
        ServerTransport {
            inner: tarpc::tokio_serde::Framed::new(framed, GuardedBincode::default()),
            shutdown: shutdown.cancelled_owned().boxed(),
            read_closed: false,
        }
    }
}

impl<S, Req, Resp> Stream for ServerTransport<S, Req, Resp>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Req: for<'de> serde::Deserialize<'de> + Unpin,
    Resp: serde::Serialize + Unpin,
{
    type Item = io::Result<ClientMessage<Req>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.read_closed || this.shutdown.poll_unpin(cx).is_ready() {
            this.read_closed = true;
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_next(cx)
    }
}

impl<S, Req, Resp> Sink<Response<Resp>> for ServerTransport<S, Req, Resp>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Req: for<'de> serde::Deserialize<'de> + Unpin,
    Resp: serde::Serialize + Unpin,
{
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Response<Resp>) -> io::Result<()> {
        Pin::new(&mut self.get_mut().inner).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_limit_is_independent_of_encode_limit() {
        let mut codec = AsymmetricCodec::new(16, 1024);
        let mut out = BytesMut::new();
        // A 100-byte reply may be written...
        codec.encode(Bytes::from(vec![7u8; 100]), &mut out).unwrap();
        assert_eq!(out.len(), 104);
        // ...but the same frame read back is over the request limit.
        let err = codec.decode(&mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut small = BytesMut::new();
        codec
            .encode(Bytes::from_static(b"hello"), &mut small)
            .unwrap();
        assert_eq!(&codec.decode(&mut small).unwrap().unwrap()[..], b"hello");
        assert!(codec
            .encode(Bytes::from(vec![0u8; 2048]), &mut out)
            .is_err());
    }
}
