//! The server side of a TLS connection over rustls's unbuffered API, holding no buffer while the
//! connection is idle.
//!
//! Why not `tokio_rustls::server::TlsStream`: its connection keeps a 4 KiB receive buffer for
//! as long as the connection lives (rustls resizes it before every read and never below 4 KiB),
//! and a SIP server holds thousands of connections that are silent between a REGISTER refresh
//! and the next (issue 22: 15 KiB per idle TLS connection, target 8 KiB). Here the received TLS
//! bytes, the decrypted bytes not yet read, and the encrypted bytes not yet sent each live in a
//! buffer of ours that is released as soon as it is empty.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
#[cfg(test)]
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read. A partial record grows the buffer by this much per read.
const READ_SIZE: usize = 4096;
/// TLS allows handshake messages of 16 MB; as rustls does for its own buffer, we refuse to hold
/// more than 64 KiB of not yet processed bytes.
const MAX_INCOMING: usize = 0x1_0000 + 5;

/// A server TLS connection on `io`; see the module documentation.
pub(crate) struct ServerTlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes: `incoming[..received]` wait to be processed.
    incoming: Vec<u8>,
    received: usize,
    /// Encrypted bytes: `outgoing[sent..]` wait to be written to `io`.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted bytes: `plain[taken..]` wait to be read.
    plain: Vec<u8>,
    taken: usize,
    /// The peer sent close_notify or closed its side: reads return end of stream.
    read_closed: bool,
    /// We queued close_notify.
    close_queued: bool,
    /// A write or flush is waiting for the socket to take `outgoing`. A socket wakes one task
    /// per direction, so the reading side (another task, with `tokio::io::split`) must then
    /// leave writing to the writer instead of taking the wake-up from it.
    writer_waiting: bool,
}

/// Where the connection stands after processing what was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The handshake needs more bytes from the peer.
    Handshaking,
    /// Application data can be sent; more can be received.
    Open,
    /// Both sides sent close_notify.
    Closed,
}

/// What to do once application data may be sent.
enum Send<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerTlsStream<IO> {
    /// Runs the handshake on `io`. The stream is boxed from the start, so the future of the
    /// task that serves the connection holds a pointer to it, not its kilobyte of state.
    pub(crate) async fn accept(io: IO, config: Arc<ServerConfig>) -> io::Result<Box<Self>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = Box::new(Self {
            io,
            conn,
            incoming: Vec::new(),
            received: 0,
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            taken: 0,
            read_closed: false,
            close_queued: false,
            writer_waiting: false,
        });
        std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let stage = match self.process(Send::Nothing) {
                Ok(stage) => stage,
                Err(e) => {
                    // The alert goes out if the socket takes it now.
                    let _ = self.poll_write_out(cx);
                    return Poll::Ready(Err(e));
                }
            };
            // Every flight must be out before we wait for the peer's answer to it.
            ready!(self.poll_write_out(cx))?;
            match stage {
                Stage::Open => return Poll::Ready(Ok(())),
                Stage::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Stage::Handshaking => {}
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Processes the received bytes: decrypted data goes to `plain`, handshake and alert
    /// records to `outgoing`; `send` is encrypted once the connection is open.
    fn process(&mut self, mut send: Send<'_>) -> io::Result<Stage> {
        loop {
            let status = self
                .conn
                .process_tls_records(&mut self.incoming[..self.received]);
            let mut discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    self.queue_alert();
                    return Err(tls_error(e));
                }
            };
            let stage = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        if self.taken == self.plain.len() {
                            self.plain.clear();
                            self.taken = 0;
                        }
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut record) => {
                    fill_with(&mut self.outgoing, |out| encode_result(record.encode(out)))?;
                    None
                }
                // Encoded records are in `outgoing`, which is written out in order before
                // anything we encode later: for the connection they are as good as sent.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Stage::Handshaking),
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.read_closed = true;
                    Some(Stage::Closed)
                }
                ConnectionState::WriteTraffic(mut w) => {
                    match std::mem::replace(&mut send, Send::Nothing) {
                        Send::Nothing => {}
                        Send::Data(data) => {
                            fill_with(&mut self.outgoing, |out| {
                                encrypt_result(w.encrypt(data, out))
                            })?;
                        }
                        Send::CloseNotify => {
                            fill_with(&mut self.outgoing, |out| {
                                encrypt_result(w.queue_close_notify(out))
                            })?;
                        }
                    }
                    Some(Stage::Open)
                }
                // Early data is not enabled in our configuration; anything else is a state this
                // code does not know.
                _ => {
                    return Err(io::Error::other(
                        "TLS connection reached a state this server does not handle",
                    ));
                }
            };
            self.discard(discard);
            if let Some(stage) = stage {
                return Ok(stage);
            }
        }
    }

    /// After an error, encodes the alert rustls queued for the peer (a client is told why,
    /// not just disconnected).
    fn queue_alert(&mut self) {
        while let Ok(ConnectionState::EncodeTlsData(mut record)) =
            self.conn.process_tls_records(&mut []).state
        {
            if fill_with(&mut self.outgoing, |out| encode_result(record.encode(out))).is_err() {
                return;
            }
        }
    }

    fn discard(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.incoming.copy_within(n..self.received, 0);
        self.received -= n;
        if self.received == 0 {
            self.incoming = Vec::new();
        }
    }

    /// Reads from the socket into `incoming`; the number of bytes read (0: end of stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.received >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS record or handshake message larger than 64 KiB",
            )));
        }
        let want = (self.received + READ_SIZE).min(MAX_INCOMING);
        if self.incoming.len() < want {
            self.incoming.resize(want, 0);
        }
        let mut buf = ReadBuf::new(&mut self.incoming[self.received..]);
        let polled = Pin::new(&mut self.io).poll_read(cx, &mut buf);
        let n = buf.filled().len();
        self.received += n;
        if self.received == 0 {
            // Nothing arrived: an idle connection keeps no buffer while it waits.
            self.incoming = Vec::new();
        }
        ready!(polled)?;
        Poll::Ready(Ok(n))
    }

    /// [`Self::poll_write_out`] for the writing side.
    fn poll_writer_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.poll_write_out(cx);
        self.writer_waiting = polled.is_pending();
        polled
    }

    /// [`Self::poll_write_out`] for the reading side, when no writer waits: the records its
    /// reading produced (a key update, an alert) go out if the socket takes them now, and the
    /// reader is woken to retry otherwise. Only an error is reported.
    fn reader_write_out(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.writer_waiting {
            return Ok(());
        }
        match self.poll_write_out(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Writes `outgoing` to the socket; ready once all of it is written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.taken);
                buf.put_slice(&this.plain[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plain.len() {
                    this.plain = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.process(Send::Nothing) {
                let _ = this.reader_write_out(cx);
                return Poll::Ready(Err(e));
            }
            this.reader_write_out(cx)?;
            if this.taken < this.plain.len() || this.read_closed {
                continue;
            }
            if ready!(this.poll_fill(cx))? == 0 {
                // The peer closed without close_notify: for SIP the end of the stream all the
                // same (what it sent before was authenticated record by record).
                this.read_closed = true;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What is still unsent is written first, so a peer that does not read holds at most
        // one write of ours.
        ready!(this.poll_writer_out(cx))?;
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        match this.process(Send::Data(data))? {
            Stage::Open => {}
            // The handshake ended before this stream was handed out.
            Stage::Handshaking | Stage::Closed => {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            }
        }
        // The data is taken; a socket that cannot take it all yet gets the rest with the next
        // write or flush.
        if let Poll::Ready(Err(e)) = this.poll_writer_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_writer_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            ready!(this.poll_writer_out(cx))?;
            this.close_queued = true;
            // A connection that is not open has no close_notify to send: the socket is just
            // closed.
            this.process(Send::CloseNotify)?;
        }
        ready!(this.poll_writer_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Why encoding into `outgoing` stopped: it needs this many bytes, or it failed.
enum Fatal {
    Needs(usize),
    Failed(io::Error),
}

fn encode_result(r: Result<usize, EncodeError>) -> Result<usize, Fatal> {
    match r {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Err(Fatal::Needs(required_size))
        }
        Err(e) => Err(Fatal::Failed(io::Error::other(e.to_string()))),
    }
}

fn encrypt_result(r: Result<usize, EncryptError>) -> Result<usize, Fatal> {
    match r {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Err(Fatal::Needs(required_size))
        }
        Err(e) => Err(Fatal::Failed(io::Error::other(e.to_string()))),
    }
}

/// Appends to `out` what `encode` writes into a slice, growing it to the size `encode` asks
/// for.
fn fill_with(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Fatal>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = 256;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Fatal::Needs(n)) if n > room => room = n,
            Err(Fatal::Needs(_)) => {
                out.truncate(start);
                return Err(io::Error::other(
                    "TLS record encoder asked for no more room",
                ));
            }
            Err(Fatal::Failed(e)) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{TlsServer, ensure_self_signed};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::client::TlsStream as ClientTls;

    struct Pair {
        server: Box<ServerTlsStream<TcpStream>>,
        client: ClientTls<TcpStream>,
        _dir: tempfile::TempDir,
    }

    async fn pair(version: &'static rustls::SupportedProtocolVersion) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let (settings, _) = ensure_self_signed(dir.path(), "sip.example.com").unwrap();
        let server = TlsServer::new(settings.clone()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&settings.cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server.config.clone();
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            ServerTlsStream::accept(tcp, config).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("sip.example.com").unwrap();
        let client = connector.connect(name, tcp).await.unwrap();
        let server = accepting.await.unwrap().unwrap();
        Pair {
            server,
            client,
            _dir: dir,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn holds_no_buffer(s: &ServerTlsStream<TcpStream>) -> bool {
        s.incoming.capacity() == 0 && s.outgoing.capacity() == 0 && s.plain.capacity() == 0
    }

    #[tokio::test]
    async fn carries_data_both_ways_over_tls13_and_tls12() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let Pair {
                mut server,
                mut client,
                _dir,
            } = pair(version).await;
            // Small messages as SIP sends them, then 300 kB: many records, reads that end
            // inside a record, writes the socket takes in parts.
            for len in [1, 500, 300_000] {
                let sent = pattern(len);
                let (mut cr, mut cw) = tokio::io::split(&mut client);
                let to_server = async {
                    cw.write_all(&sent).await.unwrap();
                    cw.flush().await.unwrap();
                };
                let mut got = vec![0u8; len];
                let (_, read) = tokio::join!(to_server, server.read_exact(&mut got));
                read.unwrap();
                assert!(got == sent, "{version:?}: client to server, {len} bytes");

                let to_client = async {
                    server.write_all(&sent).await.unwrap();
                    server.flush().await.unwrap();
                };
                let mut back = vec![0u8; len];
                let (_, read) = tokio::join!(to_client, cr.read_exact(&mut back));
                read.unwrap();
                assert!(back == sent, "{version:?}: server to client, {len} bytes");
            }
            assert!(
                holds_no_buffer(&server),
                "{version:?}: idle stream holds a buffer"
            );
        }
    }

    #[tokio::test]
    async fn an_idle_stream_waiting_for_data_holds_no_buffer() {
        let Pair {
            mut server,
            mut client,
            _dir,
        } = pair(&rustls::version::TLS13).await;
        client.write_all(b"REGISTER").await.unwrap();
        let mut got = [0u8; 8];
        server.read_exact(&mut got).await.unwrap();
        // A read that finds nothing leaves no receive buffer behind.
        let mut more = [0u8; 16];
        let pending = tokio::time::timeout(Duration::from_millis(50), server.read(&mut more));
        assert!(pending.await.is_err(), "nothing was sent");
        assert!(holds_no_buffer(&server));
    }

    #[tokio::test]
    async fn a_client_key_update_is_followed() {
        let Pair {
            mut server,
            mut client,
            _dir,
        } = pair(&rustls::version::TLS13).await;
        client.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"after").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
        // The client asked us to update ours too; what we send next must still be readable.
        server.write_all(b"answer").await.unwrap();
        server.flush().await.unwrap();
        let mut back = [0u8; 6];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"answer");
    }

    #[tokio::test]
    async fn a_write_blocked_by_a_full_socket_resumes_while_the_reader_works() {
        let Pair {
            server,
            mut client,
            _dir,
        } = pair(&rustls::version::TLS13).await;
        // As a connection is served: reading and writing in two tasks over one stream.
        let (mut rd, mut wr) = tokio::io::split(*server);
        let big = pattern(4_000_000);
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&big).await.unwrap();
            wr.flush().await.unwrap();
            wr
        });
        let reader = tokio::spawn(async move {
            let mut got = [0u8; 8];
            rd.read_exact(&mut got).await.unwrap();
            got
        });
        // The client reads nothing yet, so the server's writes fill the socket; meanwhile its
        // reader receives a message and a key update (which calls for records of ours).
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"REGISTER").await.unwrap();
        client.flush().await.unwrap();
        let mut back = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back))
            .await
            .expect("the server's writer was woken and finished")
            .unwrap();
        assert!(back == expected);
        assert_eq!(&reader.await.unwrap(), b"REGISTER");
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer finished")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_sends_close_notify_and_the_peer_sees_a_clean_end() {
        let Pair {
            mut server,
            mut client,
            _dir,
        } = pair(&rustls::version::TLS13).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut all = Vec::new();
        // tokio-rustls reports an end without close_notify as an error.
        client.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"bye");
        assert!(server.write_all(b"more").await.is_err());
    }

    #[tokio::test]
    async fn the_peer_closing_ends_the_stream_with_or_without_close_notify() {
        let Pair {
            mut server,
            mut client,
            _dir,
        } = pair(&rustls::version::TLS13).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last");

        let Pair {
            mut server, client, ..
        } = pair(&rustls::version::TLS12).await;
        let (tcp, _) = client.into_inner();
        drop(tcp);
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert!(all.is_empty());
    }

    #[tokio::test]
    async fn a_client_that_does_not_speak_tls_fails_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, _) = ensure_self_signed(dir.path(), "sip.example.com").unwrap();
        let server = TlsServer::new(settings).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tcp.write_all(b"OPTIONS sip:x SIP/2.0\r\n\r\n")
            .await
            .unwrap();
        let e = ServerTlsStream::accept(accepted, server.config.clone())
            .await
            .err()
            .expect("plain SIP is not a TLS handshake");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // The client is told why (an alert), not just disconnected.
        let mut alert = Vec::new();
        tcp.read_to_end(&mut alert).await.unwrap();
        assert_eq!(alert.first(), Some(&21), "an alert record: {alert:?}");
    }
}
