//! TLS for both Postgres connections, with libpq's `sslmode` meanings:
//!
//! | `sslmode` | encrypts | checks the certificate chain | checks the host name |
//! | --- | --- | --- | --- |
//! | `disable` | no | — | — |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes | no | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! The roots of trust are the PEM file named by `sslrootcert` (or
//! `PGSSLROOTCERT`), else the Mozilla roots built in. Over a Unix socket TLS
//! is never used, as with libpq.
//! See <https://www.postgresql.org/docs/current/libpq-ssl.html>.
//!
//! Invariant: TLS is only weaker than `verify-full` when `sslmode` says so.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without checking its certificate.
    #[default]
    Prefer,
    /// Always use TLS, without checking the certificate.
    Require,
    /// Always use TLS and check the certificate chain.
    VerifyCa,
    /// Always use TLS, check the chain and that the certificate names the host.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling.
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a server that refuses TLS must be refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// A rustls client configuration for `mode`.
pub fn client_config(mode: SslMode, root_cert: Option<&PathBuf>) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("cannot set up TLS: {e}")))?;
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                TlsError(format!("cannot read sslrootcert {}: {e}", path.display()))
            })?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    TlsError(format!("sslrootcert {} is not PEM: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    TlsError(format!(
                        "sslrootcert {} holds an unusable certificate: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let webpki =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError(format!("cannot set up certificate checks: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyFull => webpki,
        SslMode::VerifyCa => Arc::new(Relaxed {
            webpki,
            check_chain: true,
        }),
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(Relaxed {
            webpki,
            check_chain: false,
        }),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The name to check the certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string())
        .map_err(|_| TlsError(format!("`{host}` is not a valid host name for TLS")))
}

/// The modes below `verify-full`: `verify-ca` (`check_chain`: the chain must
/// lead to a trusted root; the name may differ), and `prefer` / `require`
/// (encryption without certificate checks, libpq's meaning). Handshake
/// signatures are verified either way.
#[derive(Debug)]
struct Relaxed {
    webpki: Arc<WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_spellings() {
        assert_eq!(SslMode::parse("verify-full"), Some(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("prefer"), Some(SslMode::Prefer));
        assert_eq!(SslMode::parse("sometimes"), None);
        assert!(SslMode::Require.requires_tls());
        assert!(!SslMode::Prefer.requires_tls());
    }

    #[test]
    fn a_missing_root_file_is_one_sentence() {
        let err = client_config(
            SslMode::VerifyFull,
            Some(&PathBuf::from("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(
            err.0
                .starts_with("cannot read sslrootcert /nonexistent/ca.pem"),
            "{}",
            err.0
        );
    }
}
