//! The Postgres frontend/backend protocol, as much as a replication
//! connection needs: startup, authentication (SCRAM-SHA-256, MD5, cleartext,
//! trust), simple queries and CopyBoth framing.
//!
//! `tokio-postgres` has no replication mode and no CopyBoth, so this speaks
//! the protocol itself with `postgres-protocol`'s encoders and SCRAM.
//! See <https://www.postgresql.org/docs/current/protocol-flow.html>.
//!
//! Invariant: a frame is read whole or not at all (at most 1 GiB), and a
//! server error becomes a typed [`ServerError`] with its SQLSTATE.

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::conninfo::ConnInfo;
use super::SourceError;

/// Anything a connection can run over (TCP, Unix socket).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One backend message: its tag and body.
#[derive(Debug)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// The body, without tag and length.
    pub body: Bytes,
}

/// A frontend/backend protocol connection.
pub struct Wire {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// The largest backend message accepted (a guard against a garbled length).
const MAX_FRAME: usize = 1 << 30;

impl Wire {
    /// Opens the socket and runs startup and authentication with the given
    /// extra startup parameters (such as `replication=database`).
    pub async fn connect(info: &ConnInfo, params: &[(&str, &str)]) -> Result<Wire, SourceError> {
        let io: Box<dyn Io> = if info.is_unix_socket() {
            let path = info.socket_path();
            Box::new(
                tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| SourceError::connect(info, e))?,
            )
        } else {
            let connect = tokio::net::TcpStream::connect((info.host.as_str(), info.port));
            let tcp = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                .await
                .map_err(|_| {
                    SourceError::connect(
                        info,
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
                    )
                })?
                .map_err(|e| SourceError::connect(info, e))?;
            tcp.set_nodelay(true).map_err(SourceError::Io)?;
            negotiate_tls(info, tcp).await?
        };
        let mut wire = Wire {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
        };
        wire.startup(info, params).await?;
        Ok(wire)
    }

    async fn startup(
        &mut self,
        info: &ConnInfo,
        params: &[(&str, &str)],
    ) -> Result<(), SourceError> {
        let mut all: Vec<(&str, &str)> = vec![
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("application_name", info.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        all.extend_from_slice(params);
        frontend::startup_message(all.iter().copied(), &mut self.wbuf).map_err(SourceError::Io)?;
        self.flush().await?;
        self.authenticate(info).await?;
        // Parameter statuses and the backend key follow until ReadyForQuery.
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'Z' => return Ok(()),
                b'E' => return Err(SourceError::from_error_body(&f.body)),
                _ => {}
            }
        }
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<(), SourceError> {
        let password = || {
            info.password.as_ref().map(|p| p.expose().as_bytes()).ok_or_else(|| {
                SourceError::Definite(format!(
                    "the server asks for a password for {info} but none was given; put it in the URL, PGPASSWORD or WALGRAPH_PG_URL"
                ))
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'E' => return Err(SourceError::from_error_body(&f.body)),
                b'R' => {}
                other => {
                    return Err(SourceError::Protocol(format!(
                        "expected an authentication request, got message {:?}",
                        other as char
                    )))
                }
            }
            let mut body = f.body.clone();
            if body.len() < 4 {
                return Err(SourceError::Protocol("short authentication message".into()));
            }
            match body.get_i32() {
                0 => return Ok(()),
                3 => {
                    frontend::password_message(password()?, &mut self.wbuf).map_err(SourceError::Io)?;
                    self.flush().await?;
                }
                5 => {
                    if body.len() < 4 {
                        return Err(SourceError::Protocol("short MD5 salt".into()));
                    }
                    let mut salt = [0u8; 4];
                    body.copy_to_slice(&mut salt);
                    let hash = md5_hash(info.user.as_bytes(), password()?, salt);
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf).map_err(SourceError::Io)?;
                    self.flush().await?;
                }
                10 => {
                    let mechanisms = String::from_utf8_lossy(&body);
                    if !mechanisms.split('\0').any(|m| m == sasl::SCRAM_SHA_256) {
                        return Err(SourceError::Definite(format!(
                            "the server offers SASL mechanisms {mechanisms:?}, none of which walgraph speaks (SCRAM-SHA-256)"
                        )));
                    }
                    let s = sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut self.wbuf)
                        .map_err(SourceError::Io)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| SourceError::Protocol("SASL continue before SASL start".into()))?;
                    s.update(&body).map_err(|e| SourceError::Definite(format!("SCRAM failed: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf).map_err(SourceError::Io)?;
                    self.flush().await?;
                }
                12 => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| SourceError::Protocol("SASL final before SASL start".into()))?;
                    s.finish(&body).map_err(|e| {
                        SourceError::Definite(format!("the server's SCRAM signature did not verify: {e}"))
                    })?;
                }
                n => {
                    return Err(SourceError::Definite(format!(
                        "the server asks for authentication method {n}, which walgraph does not support; use scram-sha-256, md5, password or trust in pg_hba.conf"
                    )))
                }
            }
        }
    }

    /// Runs a simple query and returns its rows as text (NULL as `None`).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        frontend::query(sql, &mut self.wbuf).map_err(SourceError::Io)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'D' => rows.push(parse_data_row(&f.body)?),
                b'E' => error = Some(SourceError::from_error_body(&f.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Sends a query that starts CopyBoth mode and waits for the
    /// CopyBothResponse (`W`, which `postgres-protocol`'s parser does not know).
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<(), SourceError> {
        frontend::query(sql, &mut self.wbuf).map_err(SourceError::Io)?;
        self.flush().await?;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'W' => return Ok(()),
                b'E' => {
                    let err = SourceError::from_error_body(&f.body);
                    // Drain to ReadyForQuery so the connection stays usable.
                    while self.read_frame().await?.tag != b'Z' {}
                    return Err(err);
                }
                b'N' | b'S' => {}
                other => {
                    return Err(SourceError::Protocol(format!(
                        "expected CopyBothResponse, got message {:?}",
                        other as char
                    )))
                }
            }
        }
    }

    /// Queues one CopyData message holding `payload`.
    pub fn queue_copy_data(&mut self, payload: &[u8]) -> Result<(), SourceError> {
        frontend::CopyData::new(payload)
            .map_err(SourceError::Io)?
            .write(&mut self.wbuf);
        Ok(())
    }

    /// Queues CopyDone.
    pub fn queue_copy_done(&mut self) {
        frontend::copy_done(&mut self.wbuf);
    }

    /// Writes what is queued.
    pub async fn flush(&mut self) -> Result<(), SourceError> {
        if !self.wbuf.is_empty() {
            self.io
                .write_all(&self.wbuf)
                .await
                .map_err(SourceError::Io)?;
            self.wbuf.clear();
        }
        self.io.flush().await.map_err(SourceError::Io)
    }

    /// Reads the next backend message. Cancel-safe: a partly read message
    /// stays buffered for the next call.
    pub async fn read_frame(&mut self) -> Result<Frame, SourceError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(SourceError::Io)?;
            if n == 0 {
                return Err(SourceError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    fn try_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|l| (4..=MAX_FRAME).contains(l))
            .ok_or_else(|| SourceError::Protocol(format!("invalid message length {len}")))?;
        if self.rbuf.len() < 1 + len {
            self.rbuf.reserve(1 + len - self.rbuf.len());
            return Ok(None);
        }
        let mut frame = self.rbuf.split_to(1 + len);
        let tag = frame[0];
        frame.advance(5);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }
}

/// The SSLRequest code (1234 << 16 | 5679).
const SSL_REQUEST: i32 = 80_877_103;

/// Asks for TLS as `sslmode` says and, if the server agrees, completes the
/// handshake. See <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>.
async fn negotiate_tls(
    info: &ConnInfo,
    mut tcp: tokio::net::TcpStream,
) -> Result<Box<dyn Io>, SourceError> {
    use super::tls::SslMode;
    if info.ssl_mode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let mut req = BytesMut::with_capacity(8);
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await.map_err(SourceError::Io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(SourceError::Io)?;
    match answer[0] {
        b'S' => {}
        b'N' if !info.ssl_mode.requires_tls() => return Ok(Box::new(tcp)),
        b'N' => {
            return Err(SourceError::Definite(format!(
                "Postgres at {info} does not offer TLS, but sslmode is {:?}; enable ssl on the server or lower sslmode",
                info.ssl_mode
            )))
        }
        other => {
            return Err(SourceError::Protocol(format!(
                "unexpected answer {other:#04x} to the TLS request"
            )))
        }
    }
    let config = info.tls_config().map_err(|e| SourceError::Definite(e.0))?;
    let name = super::tls::server_name(&info.host).map_err(|e| SourceError::Definite(e.0))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tls = connector.connect(name, tcp).await.map_err(|e| {
        SourceError::Definite(format!(
            "the TLS handshake with Postgres at {info} failed: {e}; check sslmode and sslrootcert"
        ))
    })?;
    Ok(Box::new(tls))
}

fn parse_data_row(body: &Bytes) -> Result<Vec<Option<String>>, SourceError> {
    let bad = || SourceError::Protocol("malformed DataRow".into());
    let mut b = body.clone();
    if b.len() < 2 {
        return Err(bad());
    }
    let n = b.get_i16();
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        if b.len() < 4 {
            return Err(bad());
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| bad())?;
        if b.len() < len {
            return Err(bad());
        }
        out.push(Some(String::from_utf8_lossy(&b.split_to(len)).into_owned()));
    }
    Ok(out)
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// Severity (`ERROR`, `FATAL`, ...).
    pub severity: String,
    /// SQLSTATE code.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Detail, if any.
    pub detail: Option<String>,
    /// Hint, if any.
    pub hint: Option<String>,
}

impl ServerError {
    /// Parses the body of an `E` or `N` message.
    pub fn parse(body: &[u8]) -> ServerError {
        let mut e = ServerError::default();
        for field in body.split(|&b| b == 0) {
            let Some((&kind, value)) = field.split_first() else {
                continue;
            };
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'V' => e.severity = value,
                b'S' if e.severity.is_empty() => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        e
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        write!(f, " [SQLSTATE {}]", self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_are_read() {
        let body =
            b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0HCreate it.\0\0";
        let e = ServerError::parse(body);
        assert_eq!(e.code, "42704");
        assert_eq!(e.severity, "ERROR");
        assert_eq!(
            e.to_string(),
            "replication slot \"x\" does not exist; hint: Create it. [SQLSTATE 42704]"
        );
    }

    #[test]
    fn data_rows_parse_nulls_and_text() {
        let mut b = BytesMut::new();
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(b"ok");
        assert_eq!(
            parse_data_row(&b.freeze()).unwrap(),
            vec![None, Some("ok".to_string())]
        );
        assert!(parse_data_row(&Bytes::from_static(&[0, 1, 0, 0, 0, 9])).is_err());
    }
}
