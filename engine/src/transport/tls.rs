//! TLS from PEM files (rustls): the gRPC listener's server configuration
//! (ALPN `h2`, client certificates required when a client CA is given:
//! mTLS), and the client configuration of calls forwarded to an upstream
//! (ALPN `h2`, its CA, an optional client certificate).
//!
//! Everything here runs once, at start-up: the files are read and checked
//! (PEM syntax, at least one certificate, a private key in PKCS#8, PKCS#1
//! or SEC1 form, the key matching the certificate, the client CA parsable
//! as trust anchors) and every failure is reported as one line naming the
//! file and the cause. The configuration carries its own crypto provider
//! (ring), so nothing process-wide is installed.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// Builds the server configuration: certificate chain and private key
/// from PEM files, and when `client_ca` is given, client certificates
/// required and checked against it. Errors name the file and the cause.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, String> {
    let chain = certificates(cert, "TLS certificate")?;
    let private_key = private_key(key)?;
    let roots = client_ca.map(|path| client_roots(path).map(|roots| (path, roots))).transpose()?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let builder = match roots {
        Some((path, roots)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("cannot use TLS client CA `{}`: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, private_key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("TLS key `{}` does not match the certificate `{}`", key.display(), cert.display())
        }
        rustls::Error::InvalidCertificate(e) => {
            format!("TLS certificate `{}` is not a valid certificate: {e}", cert.display())
        }
        // The rest comes from loading the key (malformed DER, an
        // unsupported algorithm).
        e => format!("TLS key `{}` is not a usable private key: {e}", key.display()),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The system's CA bundle, trusted by an upstream client given no CA.
const SYSTEM_CAS: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// Builds a client configuration for calls to an upstream: trusting the
/// CA certificates in `ca` (else the system's bundle), presenting the
/// client certificate and key of `identity` when given (mTLS), offering
/// ALPN `h2`. Errors name the file and the cause.
pub fn client_config(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<Arc<ClientConfig>, String> {
    let ca = match ca {
        Some(path) => path.to_path_buf(),
        None => SYSTEM_CAS.iter().map(Path::new).find(|p| p.exists()).map(Path::to_path_buf).ok_or_else(|| {
            format!(
                "no CA to check the upstream's certificate with: give `--upstream-ca` (none of {SYSTEM_CAS:?} exists)"
            )
        })?,
    };
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(&ca, "upstream CA")?);
    if added == 0 {
        return Err(format!("upstream CA `{}` holds no usable CA certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert, "upstream client certificate")?;
            let private = private_key(key).map_err(|e| e.replacen("TLS key", "upstream client key", 1))?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                format!("upstream client key `{}` is not usable with `{}`: {e}", key.display(), cert.display())
            })?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Reads a file for `what`, naming both in the error.
fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} `{}`: {e}", path.display()))
}

/// Every certificate in a PEM file, in order; at least one.
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot parse {what} `{}`: {}", path.display(), pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!("no certificate found in `{}` (expected PEM `BEGIN CERTIFICATE`)", path.display()));
    }
    Ok(chain)
}

/// The first private key in a PEM file: PKCS#8 (`PRIVATE KEY`), PKCS#1
/// (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, "TLS key")?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => {
            let encrypted = memchr::memmem::find(&pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----").is_some();
            Err(if encrypted {
                format!("no private key found in `{}`: encrypted keys are not supported", path.display())
            } else {
                format!(
                    "no private key found in `{}` (expected PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or \
                     `BEGIN EC PRIVATE KEY`)",
                    path.display()
                )
            })
        }
        Err(e) => Err(format!("cannot parse TLS key `{}`: {}", path.display(), pem_error(e))),
    }
}

/// The trust anchors client certificates are checked against.
fn client_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certificates(path, "TLS client CA")?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            format!("TLS client CA `{}`: certificate {} is not a valid CA certificate: {e}", path.display(), i + 1)
        })?;
    }
    Ok(roots)
}

/// A PEM error in words (the crate's own shows raw byte vectors).
fn pem_error(e: pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            format!("missing `-----END {}-----`", String::from_utf8_lossy(&end_marker).trim())
        }
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed line `{}`", String::from_utf8_lossy(&line).trim())
        }
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A PEM section with a body that is valid base64 but no valid DER.
    fn junk_pem(label: &str) -> String {
        format!("-----BEGIN {label}-----\nAAECAwQFBgcICQoLDA0ODw==\n-----END {label}-----\n")
    }

    /// A file with `contents` in a directory of its own, removed on drop.
    struct TempFile {
        dir: PathBuf,
        path: PathBuf,
    }

    impl TempFile {
        fn new(name: &str, contents: &str) -> TempFile {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("wirestub-tls-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            TempFile { dir, path }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn error(cert: &Path, key: &Path, ca: Option<&Path>) -> String {
        match server_config(cert, key, ca) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn missing_certificate_file_is_named() {
        let key = TempFile::new("key.pem", &junk_pem("PRIVATE KEY"));
        let missing = key.dir.join("nowhere.pem");
        let e = error(&missing, &key.path, None);
        assert!(e.starts_with(&format!("cannot read TLS certificate `{}`: ", missing.display())), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn missing_key_file_is_named() {
        let cert = TempFile::new("cert.pem", &junk_pem("CERTIFICATE"));
        let missing = cert.dir.join("nowhere.pem");
        let e = error(&cert.path, &missing, None);
        assert!(e.starts_with(&format!("cannot read TLS key `{}`: ", missing.display())), "{e}");
    }

    #[test]
    fn empty_or_garbage_certificate_file_has_no_certificate() {
        let key = TempFile::new("key.pem", &junk_pem("PRIVATE KEY"));
        for contents in ["", "this is not PEM\n", &junk_pem("PRIVATE KEY")] {
            let cert = TempFile::new("cert.pem", contents);
            let e = error(&cert.path, &key.path, None);
            assert!(e.starts_with(&format!("no certificate found in `{}`", cert.path.display())), "{e}");
        }
    }

    #[test]
    fn empty_or_garbage_key_file_has_no_key() {
        let cert = TempFile::new("cert.pem", &junk_pem("CERTIFICATE"));
        for contents in ["", "garbage\n", &junk_pem("CERTIFICATE"), &junk_pem("PUBLIC KEY")] {
            let key = TempFile::new("key.pem", contents);
            let e = error(&cert.path, &key.path, None);
            assert!(e.starts_with(&format!("no private key found in `{}`", key.path.display())), "{e}");
        }
    }

    #[test]
    fn encrypted_key_is_reported_as_such() {
        let cert = TempFile::new("cert.pem", &junk_pem("CERTIFICATE"));
        let key = TempFile::new("key.pem", &junk_pem("ENCRYPTED PRIVATE KEY"));
        let e = error(&cert.path, &key.path, None);
        assert_eq!(e, format!("no private key found in `{}`: encrypted keys are not supported", key.path.display()));
    }

    #[test]
    fn malformed_pem_is_reported_with_the_file() {
        let key = TempFile::new("key.pem", &junk_pem("PRIVATE KEY"));
        let cert = TempFile::new("cert.pem", "-----BEGIN CERTIFICATE-----\nAAEC\n");
        let e = error(&cert.path, &key.path, None);
        assert_eq!(
            e,
            format!("cannot parse TLS certificate `{}`: missing `-----END CERTIFICATE-----`", cert.path.display())
        );
        let cert = TempFile::new("cert.pem", "-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n");
        let e = error(&cert.path, &key.path, None);
        assert!(e.starts_with(&format!("cannot parse TLS certificate `{}`: ", cert.path.display())), "{e}");
    }

    #[test]
    fn every_key_form_is_read_and_junk_der_is_not_usable() {
        let cert = TempFile::new("cert.pem", &junk_pem("CERTIFICATE"));
        for label in ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"] {
            let key = TempFile::new("key.pem", &junk_pem(label));
            let e = error(&cert.path, &key.path, None);
            assert!(e.starts_with(&format!("TLS key `{}` is not a usable private key: ", key.path.display())), "{e}");
        }
    }

    #[test]
    fn client_ca_errors_name_the_file() {
        let cert = TempFile::new("cert.pem", &junk_pem("CERTIFICATE"));
        let key = TempFile::new("key.pem", &junk_pem("PRIVATE KEY"));
        let missing = cert.dir.join("ca.pem");
        let e = error(&cert.path, &key.path, Some(&missing));
        assert!(e.starts_with(&format!("cannot read TLS client CA `{}`: ", missing.display())), "{e}");
        let empty = TempFile::new("ca.pem", "");
        let e = error(&cert.path, &key.path, Some(&empty.path));
        assert!(e.starts_with(&format!("no certificate found in `{}`", empty.path.display())), "{e}");
        let junk = TempFile::new("ca.pem", &junk_pem("CERTIFICATE"));
        let e = error(&cert.path, &key.path, Some(&junk.path));
        assert!(
            e.starts_with(&format!(
                "TLS client CA `{}`: certificate 1 is not a valid CA certificate: ",
                junk.path.display()
            )),
            "{e}"
        );
    }
}
