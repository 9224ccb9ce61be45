//! Connection settings in libpq's forms: a `postgres://` URL or
//! `key=value` pairs, with the `PG*` environment variables filling what the
//! string leaves out (as libpq does).
//!
//! Invariant: a string that is not a connection string is one sentence of
//! error, and the password never appears in what it prints.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::tls::SslMode;
use crate::config::Secret;

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnInfo {
    /// Host name, IP address, or a directory holding the server's Unix socket.
    pub host: String,
    /// TCP port (also names the Unix socket file).
    pub port: u16,
    /// Role name.
    pub user: String,
    /// Password, if any.
    pub password: Option<Secret>,
    /// Database name.
    pub dbname: String,
    /// `application_name` shown in `pg_stat_activity`.
    pub application_name: String,
    /// `sslmode` (or `PGSSLMODE`); `prefer` by default.
    pub ssl_mode: SslMode,
    /// `sslrootcert` (or `PGSSLROOTCERT`): the PEM file of trusted roots.
    pub ssl_root_cert: Option<PathBuf>,
    /// The primary, when this target is a hot standby walgraph streams
    /// from (`postgres.primary_url`): what writes goes there.
    pub primary: Option<Box<ConnInfo>>,
}

/// Removes `sslmode` and `sslrootcert` from a connection string (which
/// `tokio-postgres` either rejects or ignores) and returns them apart.
fn take_ssl_params(s: &str) -> (String, Option<String>, Option<String>) {
    let mut mode = None;
    let mut root = None;
    let trimmed = s.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = trimmed.split_once('?') else {
            return (trimmed.to_string(), None, None);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sslmode", v)) => mode = Some(percent_decode(v)),
                Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, mode, root);
    }
    // key=value pairs; values may be single-quoted with backslash escapes.
    let mut kept = Vec::new();
    let mut chars = trimmed.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut token = String::new();
        let mut value = String::new();
        let mut in_value = false;
        let mut quoted = false;
        while let Some(&c) = chars.peek() {
            if !quoted && c.is_whitespace() && in_value {
                break;
            }
            chars.next();
            token.push(c);
            if !in_value {
                if c == '=' {
                    in_value = true;
                }
                continue;
            }
            match c {
                '\\' if quoted => {
                    if let Some(n) = chars.next() {
                        token.push(n);
                        value.push(n);
                    }
                }
                '\'' => quoted = !quoted,
                _ => value.push(c),
            }
        }
        if token.is_empty() {
            break;
        }
        let key = token.split('=').next().unwrap_or("").trim().to_string();
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root = Some(value),
            _ => kept.push(token),
        }
    }
    (kept.join(" "), mode, root)
}

/// `%XX` → the byte; anything else, including a `%` before text that is no
/// two hexadecimal digits, stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                out.push(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why connection settings are unusable.
#[derive(Debug, thiserror::Error)]
#[error("the Postgres connection string is invalid ({0}); use a URL like postgres://user@host:5432/db or key=value pairs like host=... dbname=...")]
pub struct ConnInfoError(String);

impl ConnInfo {
    /// Parses a URL or `key=value` string; empty parts come from `PG*` variables,
    /// then from libpq's defaults.
    pub fn parse(s: &str) -> Result<Self, ConnInfoError> {
        Self::parse_with_env(s, |k| std::env::var(k).ok())
    }

    /// As [`ConnInfo::parse`], reading variables through `env` (for tests).
    pub fn parse_with_env(
        s: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConnInfoError> {
        let (s, mode, root) = take_ssl_params(s);
        let s = s.as_str();
        let mode_text = mode.or_else(|| env("PGSSLMODE"));
        let ssl_mode = match mode_text.as_deref() {
            None | Some("") => SslMode::default(),
            Some(m) => SslMode::parse(m).ok_or_else(|| {
                ConnInfoError(format!(
                    "sslmode `{m}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            })?,
        };
        let ssl_root_cert = root
            .or_else(|| env("PGSSLROOTCERT"))
            .filter(|r| !r.is_empty())
            .map(PathBuf::from);
        let cfg = if s.trim().is_empty() {
            tokio_postgres::Config::new()
        } else {
            tokio_postgres::Config::from_str(s).map_err(|e| ConnInfoError(e.to_string()))?
        };
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => env("PGHOST").unwrap_or_else(|| "localhost".into()),
        };
        let port = match cfg.get_ports().first() {
            Some(p) => *p,
            None => match env("PGPORT") {
                Some(p) => p
                    .parse()
                    .map_err(|_| ConnInfoError(format!("PGPORT `{p}` is not a port number")))?,
                None => 5432,
            },
        };
        let user = cfg
            .get_user()
            .map(str::to_string)
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .ok_or_else(|| ConnInfoError("no user given and PGUSER is not set".into()))?;
        let password = match cfg.get_password() {
            Some(p) => Some(
                String::from_utf8(p.to_vec())
                    .map_err(|_| ConnInfoError("the password is not UTF-8".into()))?,
            ),
            None => env("PGPASSWORD"),
        }
        .map(Secret::new);
        let dbname = cfg
            .get_dbname()
            .map(str::to_string)
            .or_else(|| env("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        let application_name = cfg
            .get_application_name()
            .map(str::to_string)
            .unwrap_or_else(|| "walgraph".into());
        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            application_name,
            ssl_mode,
            ssl_root_cert,
            primary: None,
        })
    }

    /// The target of `[postgres]`: `url`, with `primary_url` as its
    /// primary when set.
    pub fn of(pg: &crate::config::PostgresConfig) -> Result<Self, ConnInfoError> {
        let mut info = Self::parse(pg.url.as_deref().unwrap_or(""))?;
        // A password file counts where neither the URL nor PGPASSWORD gives one.
        if info.password.is_none() {
            info.password.clone_from(&pg.password);
        }
        if let Some(p) = &pg.primary_url {
            let mut primary = Self::parse(p)
                .map_err(|e| ConnInfoError(format!("postgres.primary_url: {}", e.0)))?;
            if primary.password.is_none() {
                primary.password.clone_from(&pg.password);
            }
            info.primary = Some(Box::new(primary));
        }
        Ok(info)
    }

    /// Where writes go: the primary when one is set, else this target.
    pub fn writer(&self) -> &ConnInfo {
        self.primary.as_deref().unwrap_or(self)
    }

    /// True when `host` names a Unix socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The Unix socket path libpq would use.
    pub fn socket_path(&self) -> PathBuf {
        PathBuf::from(&self.host).join(format!(".s.PGSQL.{}", self.port))
    }

    /// Settings for a regular (non-replication) `tokio-postgres` connection.
    pub fn to_tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .options(super::sql::output_style_options())
            .connect_timeout(std::time::Duration::from_secs(10));
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c.ssl_mode(match self.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        c
    }

    /// The TLS configuration for this target's `sslmode`.
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, super::tls::TlsError> {
        super::tls::client_config(self.ssl_mode, self.ssl_root_cert.as_ref())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ConnInfo {
    /// The target without the password, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_key_value_forms_agree() {
        let none = |_: &str| None;
        let a = ConnInfo::parse_with_env("postgres://u:p%40ss@127.0.0.1:5433/app", none).unwrap();
        let b = ConnInfo::parse_with_env(
            "host=127.0.0.1 port=5433 user=u password=p@ss dbname=app",
            none,
        )
        .unwrap();
        for c in [a, b] {
            assert_eq!(
                (c.host.as_str(), c.port, c.user.as_str()),
                ("127.0.0.1", 5433, "u")
            );
            assert_eq!(c.password.as_ref().unwrap().expose(), "p@ss");
            assert_eq!(c.dbname, "app");
        }
    }

    #[test]
    fn pg_variables_fill_the_gaps() {
        let env = |k: &str| match k {
            "PGHOST" => Some("/run/pg".into()),
            "PGPORT" => Some("6000".into()),
            "PGUSER" => Some("alice".into()),
            "PGPASSWORD" => Some("pw".into()),
            _ => None,
        };
        let c = ConnInfo::parse_with_env("", env).unwrap();
        assert!(c.is_unix_socket());
        assert_eq!(c.socket_path(), PathBuf::from("/run/pg/.s.PGSQL.6000"));
        assert_eq!(c.dbname, "alice");
        assert!(!format!("{c}").contains("pw"));
    }

    #[test]
    fn ssl_settings_come_out_of_both_forms() {
        let none = |_: &str| None;
        let a = ConnInfo::parse_with_env(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
            none,
        )
        .unwrap();
        let b = ConnInfo::parse_with_env(
            "host=h user=u dbname=db sslmode=verify-full sslrootcert='/etc/ca.pem'",
            none,
        )
        .unwrap();
        for c in [a, b] {
            assert_eq!(c.ssl_mode, SslMode::VerifyFull);
            assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
            assert_eq!(c.host, "h");
        }
        let d = ConnInfo::parse_with_env("host=h user=u", |k| {
            (k == "PGSSLMODE").then(|| "require".into())
        })
        .unwrap();
        assert_eq!(d.ssl_mode, SslMode::Require);
        let e = ConnInfo::parse_with_env("host=h user=u password='a b\\'c'", none).unwrap();
        assert_eq!(e.password.unwrap().expose(), "a b'c");
        assert_eq!(
            ConnInfo::parse_with_env("host=h user=u", none)
                .unwrap()
                .ssl_mode,
            SslMode::Prefer
        );
        let err = ConnInfo::parse_with_env("host=h user=u sslmode=sometimes", none).unwrap_err();
        assert!(err.to_string().contains("sslmode `sometimes`"));
    }

    #[test]
    fn garbage_is_refused_with_a_sentence() {
        let err = ConnInfo::parse_with_env("postgres://[::1", |_| None).unwrap_err();
        assert!(err.to_string().contains("connection string is invalid"));
    }

    #[test]
    fn a_percent_before_non_ascii_is_kept_as_it_is() {
        let root = |url: &str| {
            ConnInfo::parse_with_env(url, |_| None)
                .unwrap()
                .ssl_root_cert
                .unwrap()
                .display()
                .to_string()
        };
        assert_eq!(root("postgres://u@h/db?sslrootcert=%aé%€x"), "%aé%€x");
        assert_eq!(root("postgres://u@h/db?sslrootcert=/c%41%4"), "/cA%4");
    }

    proptest::proptest! {
        /// Whatever the text, parsing answers Ok or one sentence, never a panic.
        #[test]
        fn any_connection_string_parses_or_is_refused_without_a_panic(
            s in "(postgres(ql)?://)?([ -~é€@:/?=&'\\[\\]]|%[0-9a-fA-Fé€]{0,2}){0,40}",
            raw in proptest::collection::vec(proptest::prelude::any::<char>(), 0..40),
        ) {
            let raw: String = raw.iter().collect();
            for text in [
                s.clone(),
                raw.clone(),
                format!("postgres://u:{s}@h/d"),
                format!("postgres://u@h/d?sslrootcert={s}&sslmode={raw}"),
            ] {
                if let Err(e) = ConnInfo::parse_with_env(&text, |_| None) {
                    proptest::prop_assert!(e.to_string().contains("connection string is invalid"), "{e}");
                }
            }
        }
    }
}
