//! gRPC clients of the partners: a channel (TLS with a CA file, or plain http on
//! loopback), a bearer token, a deadline per call, retries with backoff, and a pause after
//! a call gave up so a partner's outage does not hold up the node's other mail.

use crate::config::{RemoteService, RetryConfig};
use crate::{Error, Result};
use backon::{ExponentialBuilder, Retryable};
use caretwin_proto::v1::field_service_client::FieldServiceClient;
use caretwin_proto::v1::parts_supplier_client::PartsSupplierClient;
use caretwin_proto::v1::{
    BookFieldAppointmentRequest, BookFieldAppointmentResponse, CancelFieldAppointmentRequest,
    CancelFieldAppointmentResponse, GetOrderRequest, PlaceOrderRequest, PlaceOrderResponse,
    SupplierOrder,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Why a call brought no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Not now: the partner is unavailable or slow and the retries are used up (or calls
    /// to it are paused after such a failure). The same request may succeed later.
    Unavailable(String),
    /// The partner refused the request itself (bad argument, key reused for another
    /// request, credentials): sending the same again will not help.
    Refused {
        /// The gRPC status code.
        code: Code,
        /// The partner's message.
        message: String,
    },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unavailable(why) => write!(f, "unavailable: {why}"),
            CallError::Refused { code, message } => write!(f, "{code:?}: {message}"),
        }
    }
}

/// Whether a status means "try again": the partner is down, overloaded or slow, or the
/// call was cut (tonic reports its own deadline as CANCELLED, a dropped connection as
/// UNKNOWN).
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
    )
}

/// Adds `authorization: Bearer <token>` to every call, when a token is configured.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> tonic::Result<tonic::Request<()>> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to one partner with its retry policy.
pub struct Link {
    name: &'static str,
    channel: Channel,
    bearer: Bearer,
    timeout: Duration,
    retry: RetryConfig,
    /// Calls fail fast until then, after one gave up.
    paused_until: Mutex<Option<Instant>>,
}

impl Link {
    /// A link to a partner's endpoint. It connects lazily: a partner down at start is
    /// retried like one that goes down later.
    pub fn remote(name: &'static str, remote: &RemoteService, retry: &RetryConfig) -> Result<Self> {
        remote.validate(name)?;
        let bad = |why: String| Error::Config(format!("integrations.{name}: {why}"));
        let mut endpoint = Endpoint::from_shared(remote.endpoint.clone())
            .map_err(|e| bad(format!("endpoint {:?}: {e}", remote.endpoint)))?
            .connect_timeout(remote.timeout)
            .timeout(remote.timeout);
        if remote.endpoint.starts_with("https://") {
            let ca_path = remote.ca.as_ref().expect("validated: https has a ca");
            let pem = std::fs::read(ca_path)
                .map_err(|e| bad(format!("cannot read {}: {e}", ca_path.display())))?;
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| bad(format!("TLS: {e}")))?;
        }
        let bearer = match &remote.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| bad("token holds characters not allowed in a header".into()))?,
            ),
            None => None,
        };
        Ok(Self {
            name,
            channel: endpoint.connect_lazy(),
            bearer: Bearer(bearer),
            timeout: remote.timeout,
            retry: retry.clone(),
            paused_until: Mutex::new(None),
        })
    }

    /// A link to a stand-in served on this machine (plain http on loopback, no token).
    pub fn loopback(name: &'static str, addr: SocketAddr, retry: &RetryConfig) -> Result<Self> {
        let remote = RemoteService {
            endpoint: format!("http://{addr}"),
            ca: None,
            token: None,
            timeout: Duration::from_secs(2),
        };
        Self::remote(name, &remote, retry)
    }

    /// Like [`Link::loopback`], connected before it returns: the first call then does not
    /// pay for the connection inside a mail delivery (in the demo's fast time tens of
    /// milliseconds are minutes).
    pub async fn loopback_connected(
        name: &'static str,
        addr: SocketAddr,
        retry: &RetryConfig,
    ) -> Result<Self> {
        let mut link = Self::loopback(name, addr, retry)?;
        link.channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Config(format!("integrations.{name}: {e}")))?
            .connect_timeout(link.timeout)
            .timeout(link.timeout)
            .connect()
            .await
            .map_err(|e| {
                Error::Config(format!("integrations.{name}: connecting to {addr}: {e}"))
            })?;
        Ok(link)
    }

    /// Runs `call` with retries: transient failures are retried with exponential backoff
    /// and jitter, each try under the link's deadline; other failures are returned at once.
    async fn call<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T, CallError>
    where
        F: Fn(Channel, Bearer) -> Fut,
        Fut: Future<Output = tonic::Result<T>>,
    {
        if let Some(until) = *self.paused_until.lock().expect("pause lock")
            && Instant::now() < until
        {
            return Err(CallError::Unavailable(format!(
                "calls to the {} are paused after failures",
                self.name
            )));
        }
        let backoff = ExponentialBuilder::new()
            .with_min_delay(self.retry.first)
            .with_max_delay(self.retry.max)
            .with_max_times(self.retry.attempts.saturating_sub(1) as usize)
            .with_jitter();
        let attempt = || async {
            match tokio::time::timeout(
                self.timeout,
                call(self.channel.clone(), self.bearer.clone()),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    self.timeout
                ))),
            }
        };
        let result = attempt
            .retry(backoff)
            .when(|s: &tonic::Status| is_transient(s.code()))
            .notify(|s: &tonic::Status, wait: Duration| {
                tracing::debug!(partner = self.name, call = what, code = ?s.code(), error = %s.message(), ?wait, "call failed, retrying");
            })
            .await;
        match result {
            Ok(answer) => Ok(answer),
            Err(s) if is_transient(s.code()) => {
                *self.paused_until.lock().expect("pause lock") =
                    Some(Instant::now() + self.retry.pause);
                tracing::warn!(partner = self.name, call = what, code = ?s.code(), error = %s.message(), attempts = self.retry.attempts, "partner unavailable; the mail will be delivered again later");
                Err(CallError::Unavailable(format!(
                    "{:?}: {}",
                    s.code(),
                    s.message()
                )))
            }
            Err(s) => Err(CallError::Refused {
                code: s.code(),
                message: s.message().to_owned(),
            }),
        }
    }
}

/// The client of a parts supplier.
pub struct SupplierLink(pub Link);

impl SupplierLink {
    /// Places an order (with retries).
    pub async fn place_order(
        &self,
        request: PlaceOrderRequest,
    ) -> Result<PlaceOrderResponse, CallError> {
        self.0
            .call("PlaceOrder", |channel, bearer| {
                let request = request.clone();
                async move {
                    let mut client =
                        PartsSupplierClient::new(InterceptedService::new(channel, bearer));
                    Ok(client.place_order(request).await?.into_inner())
                }
            })
            .await
    }
}

impl SupplierLink {
    /// The order a key placed (with retries); NOT_FOUND comes back as
    /// [`CallError::Refused`].
    pub async fn get_order(&self, tenant: &str, key: &str) -> Result<SupplierOrder, CallError> {
        let request = GetOrderRequest {
            tenant: tenant.to_owned(),
            idempotency_key: key.to_owned(),
        };
        self.0
            .call("GetOrder", |channel, bearer| {
                let request = request.clone();
                async move {
                    let mut client =
                        PartsSupplierClient::new(InterceptedService::new(channel, bearer));
                    Ok(client.get_order(request).await?.into_inner())
                }
            })
            .await
    }
}

/// The client of a field-service scheduler.
pub struct FieldServiceLink(pub Link);

impl FieldServiceLink {
    /// Books an appointment (with retries).
    pub async fn book(
        &self,
        request: BookFieldAppointmentRequest,
    ) -> Result<BookFieldAppointmentResponse, CallError> {
        self.0
            .call("BookAppointment", |channel, bearer| {
                let request = request.clone();
                async move {
                    let mut client =
                        FieldServiceClient::new(InterceptedService::new(channel, bearer));
                    Ok(client.book_appointment(request).await?.into_inner())
                }
            })
            .await
    }
}

impl FieldServiceLink {
    /// Cancels the appointment a key booked (with retries).
    pub async fn cancel(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<CancelFieldAppointmentResponse, CallError> {
        let request = CancelFieldAppointmentRequest {
            tenant: tenant.to_owned(),
            idempotency_key: key.to_owned(),
        };
        self.0
            .call("CancelAppointment", |channel, bearer| {
                let request = request.clone();
                async move {
                    let mut client =
                        FieldServiceClient::new(InterceptedService::new(channel, bearer));
                    Ok(client.cancel_appointment(request).await?.into_inner())
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_retried_and_refusals_are_not() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            assert!(is_transient(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::NotFound,
        ] {
            assert!(!is_transient(code), "{code:?}");
        }
    }

    #[tokio::test]
    async fn a_dead_partner_is_given_up_on_then_paused() {
        // A port nothing listens on: every try is refused at once.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        let retry = RetryConfig {
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
            attempts: 3,
            pause: Duration::from_secs(3600),
        };
        let link = SupplierLink(Link::loopback("supplier", addr, &retry).unwrap());
        let err = link.place_order(PlaceOrderRequest::default()).await;
        assert!(matches!(err, Err(CallError::Unavailable(_))), "{err:?}");
        let err = link.place_order(PlaceOrderRequest::default()).await;
        match err {
            Err(CallError::Unavailable(why)) => assert!(why.contains("paused"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn remote_endpoints_are_checked() {
        let remote = |endpoint: &str, ca: Option<&str>| RemoteService {
            endpoint: endpoint.into(),
            ca: ca.map(Into::into),
            token: Some("secret".into()),
            timeout: Duration::from_secs(1),
        };
        let retry = RetryConfig::default();
        for (endpoint, ca, want) in [
            ("http://10.1.2.3:7000", None, "not loopback"),
            ("https://supplier.example:443", None, "no ca"),
            ("ftp://127.0.0.1:1", None, "https://"),
            (
                "https://supplier.example:443",
                Some("/nope/ca.pem"),
                "cannot read",
            ),
        ] {
            let err = Link::remote("supplier", &remote(endpoint, ca), &retry)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(want), "{endpoint}: {err}");
        }
        Link::remote("supplier", &remote("http://[::1]:7000", None), &retry).unwrap();
        Link::remote("supplier", &remote("http://localhost:7000", None), &retry).unwrap();
        assert!(
            !format!("{:?}", remote("http://localhost:1", None)).contains("secret"),
            "tokens stay out of logs"
        );
    }
}
