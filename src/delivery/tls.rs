//! TLS for https:// endpoints: rustls, with the system's CA certificates
//! (rustls-native-certs: `/etc/ssl/certs`, or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR`). Reading and parsing them costs milliseconds, so the
//! parent does it once before it forks ([`warm_up`]) and every child
//! inherits the parsed store in its memory; the config is data only (no
//! thread, descriptor or lock), so it crosses the fork safely.

use std::sync::{Arc, OnceLock};

use rustls::ClientConfig;

static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();

/// Loads the CA certificates now, in the parent, so children do not.
pub fn warm_up() {
    if let Err(e) = config() {
        log::warn!("https endpoints will fail: {e}");
    }
}

/// The client config every https connection uses.
pub(super) fn config() -> Result<Arc<ClientConfig>, String> {
    CONFIG.get_or_init(build).clone()
}

fn build() -> Result<Arc<ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or(String::new(), |e| format!(" ({e})"));
        return Err(format!(
            "no CA certificates found{why}: install ca-certificates, or set SSL_CERT_FILE"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
