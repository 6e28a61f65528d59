//! The router and the in-process service: [`start`] migrates the database,
//! binds (port 0 allowed), and serves in a task until
//! [`RunningService::shutdown`]. `dermascope-cloud serve` and the tests of
//! other crates use the same function.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use dermascope_cloud_api::{routes, RagAnswer, RagRequest, MAX_REQUEST_BYTES};
use sqlx::PgPool;

use crate::auth::{CredentialCache, Viewer};
pub use crate::config::{ServiceConfig, TlsFiles};
use crate::error::{ApiError, ApiJson, CloudError};
use crate::{cases, db, fleet, rag};

/// What every handler shares. Nothing here outlives a request's meaning:
/// the credential cache only saves argon2 work, the database decides.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub credentials: Arc<CredentialCache>,
    pub vlm: Option<Arc<rag::Vlm>>,
}

async fn rag_answer(
    State(state): State<AppState>,
    viewer: Viewer,
    ApiJson(request): ApiJson<RagRequest>,
) -> Result<Json<RagAnswer>, ApiError> {
    rag::answer(&state.pool, &viewer, state.vlm.as_deref(), request)
        .await
        .map(Json)
}

async fn no_route() -> ApiError {
    ApiError::not_found("no such route; the service's routes start with /v1")
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        dermascope_cloud_api::codes::BAD_REQUEST,
        "this route does not take that method",
    )
}

/// Every route, with the body limit whose refusal is a JSON 413.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(routes::HEALTH, get(cases::health))
        .route(routes::DEVICE, get(cases::device))
        .route(routes::CASES, post(cases::upload).get(cases::pull))
        .route(routes::RAG, post(rag_answer))
        .route(routes::UPDATE, post(fleet::device::report))
        .route(routes::UPDATE_RESULT, post(fleet::device::result))
        .route(routes::BUNDLE_ARCHIVE, get(fleet::device::archive))
        .merge(crate::web::router())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

/// A service serving in this process.
pub struct RunningService {
    addr: SocketAddr,
    tls: bool,
    pool: PgPool,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningService {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://127.0.0.1:PORT` (the loopback address when bound to all
    /// interfaces).
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let ip = if self.addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            self.addr.ip()
        };
        format!("{scheme}://{}", SocketAddr::new(ip, self.addr.port()))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Stops accepting, lets requests in flight finish (up to 10 s), and
    /// closes the pool.
    pub async fn shutdown(self) {
        self.stop(Some(Duration::from_secs(10))).await;
    }

    /// Stops at once, dropping connections mid-request, as a crash would
    /// (a request whose transaction had not committed is rolled back).
    pub async fn kill(self) {
        self.stop(None).await;
    }

    async fn stop(self, grace: Option<Duration>) {
        match grace {
            Some(g) => self.handle.graceful_shutdown(Some(g)),
            None => self.handle.shutdown(),
        }
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "server task failed"),
        }
        self.pool.close().await;
        tracing::info!(addr = %self.addr, "service stopped");
    }

    /// Waits until the server ends (a `serve` process: forever, or until
    /// Ctrl-C / SIGTERM through [`RunningService::shutdown`]).
    pub async fn wait_for_signal_then_stop(self) {
        wait_for_signal().await;
        tracing::info!("stopping: signal received");
        self.shutdown().await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn tls_config(files: &TlsFiles) -> Result<rustls::ServerConfig, CloudError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| CloudError::Tls(format!("{}: {e}", files.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| CloudError::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(CloudError::Tls(format!(
            "{}: no certificate in the file",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| CloudError::Tls(format!("{}: {e}", files.key.display())))?;
    // The provider is named, not taken from the process default, so a
    // second provider elsewhere in a build cannot make this ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CloudError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| CloudError::Tls(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Migrates the database, binds, and serves in a background task.
pub async fn start(config: ServiceConfig) -> Result<RunningService, CloudError> {
    let pool = db::connect(&config.database_url, &config.database).await?;
    db::migrate(&pool).await?;
    let vlm = match &config.vlm {
        Some(vlm) => Some(Arc::new(rag::Vlm::new(vlm).map_err(|e| {
            CloudError::Config {
                path: "[vlm]".into(),
                message: e.to_string(),
            }
        })?)),
        None => None,
    };
    let state = AppState {
        pool: pool.clone(),
        credentials: CredentialCache::new(),
        vlm,
    };
    let app = router(state).layer(axum::Extension(crate::web::Transport {
        tls: config.tls.is_some(),
    }));

    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| CloudError::io(format!("binding {}", config.listen), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| CloudError::io("making the listener non-blocking", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CloudError::io("reading the bound address", e))?;
    let handle = axum_server::Handle::<SocketAddr>::new();
    let service = app.into_make_service();
    let task = match &config.tls {
        Some(files) => {
            let tls =
                axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls_config(files)?));
            let server = axum_server::from_tcp_rustls(listener, tls)
                .map_err(|e| CloudError::io("serving the listener", e))?
                .handle(handle.clone());
            tokio::spawn(async move { server.serve(service).await })
        }
        None => {
            let server = axum_server::from_tcp(listener)
                .map_err(|e| CloudError::io("serving the listener", e))?
                .handle(handle.clone());
            tokio::spawn(async move { server.serve(service).await })
        }
    };
    tracing::info!(%addr, tls = config.tls.is_some(), "service listening");
    Ok(RunningService {
        addr,
        tls: config.tls.is_some(),
        pool,
        handle,
        task,
    })
}
