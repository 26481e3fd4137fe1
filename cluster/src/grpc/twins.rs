//! `TwinService`: device twins as integrators read them and set what devices should be.

use super::auth::{Principal, Scope};
use caretwin_actors::system::System;
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply, DeviceTwin};
use caretwin_proto::v1::{self, twin_service_server::TwinService};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC face of the device twins.
#[derive(Clone)]
pub struct TwinApi {
    system: Arc<System>,
    sites_online: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
}

impl TwinApi {
    /// Twins of `system`; `sites_online` says which sites have a sync session now.
    pub fn new(
        system: Arc<System>,
        sites_online: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    ) -> Self {
        Self {
            system,
            sites_online,
        }
    }

    /// The twin of `device` as the contract shows it; `None` when it is not provisioned.
    async fn twin(&self, device: &str, full: bool) -> Result<Option<v1::Twin>, Status> {
        let online = (self.sites_online)();
        let tenant = device.split(':').next().unwrap_or_default().to_owned();
        self.system
            .devices()
            .inspect(device, move |t| {
                t.filter(|t| t.model().is_some())
                    .map(|t| to_twin(t, &tenant, &online, full))
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))
    }
}

fn text(v: &str) -> v1::SignalValue {
    v1::SignalValue {
        value: Some(v1::signal_value::Value::Text(v.to_owned())),
    }
}

/// The contract's twin (without its id, which the caller sets: the twin does not keep it
/// in a form the closure can borrow cheaply).
pub(crate) fn to_twin(t: &DeviceTwin, tenant: &str, online: &[String], full: bool) -> v1::Twin {
    let site = t.site().unwrap_or_default().to_owned();
    let mut twin = v1::Twin {
        device_id: String::new(),
        tenant_id: tenant.to_owned(),
        site_online: online.contains(&site),
        site_id: site,
        customer_id: t.customer().unwrap_or_default().to_owned(),
        model_id: t.model().unwrap_or_default().to_owned(),
        health_index: t.health(),
        health: health(t.health()) as i32,
        last_seen_at_ms: t.last_seen_ms() as i64,
        applied_seq: t.high_water(),
        version: t.high_water(),
        ..Default::default()
    };
    if full {
        twin.reported = t
            .reported_fields()
            .iter()
            .map(|(f, r)| {
                (
                    f.clone(),
                    v1::ReportedValue {
                        value: Some(text(&r.value)),
                        device_time_ms: r.ts_ms as i64,
                        seq: r.seq,
                    },
                )
            })
            .collect();
        twin.desired = t
            .desired()
            .iter()
            .map(|(f, d)| {
                (
                    f.clone(),
                    v1::DesiredValue {
                        value: Some(text(&d.value)),
                        version: d.version,
                        set_at_ms: 0,
                    },
                )
            })
            .collect();
        twin.delta = t
            .delta()
            .into_iter()
            .map(|(f, _, _)| {
                let desired = twin.desired.get(f).cloned();
                let reported = twin.reported.get(f).cloned();
                (f.to_owned(), v1::DeltaField { desired, reported })
            })
            .collect();
    }
    twin
}

/// The contract's health states from the health index.
fn health(index: f64) -> v1::Health {
    if index >= 0.8 {
        v1::Health::Ok
    } else if index >= 0.5 {
        v1::Health::Degraded
    } else if index > 0.0 {
        v1::Health::AtRisk
    } else {
        v1::Health::Failed
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::TwinUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl TwinService for TwinApi {
    type WatchTwinsStream = UpdateStream;

    async fn get_twin(
        &self,
        req: Request<v1::GetTwinRequest>,
    ) -> Result<Response<v1::Twin>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::TwinsRead)?;
        let r = req.into_inner();
        let device = p.own("device", &r.device_id)?;
        if device.len() > 256 {
            return Err(Status::invalid_argument("device_id is over 256 bytes"));
        }
        let full = r.view != v1::TwinView::Summary as i32;
        let mut twin = self
            .twin(device, full)
            .await?
            .ok_or_else(|| Status::not_found(format!("device {device:?} not found")))?;
        twin.device_id = device.to_owned();
        Ok(Response::new(twin))
    }

    async fn query_twins(
        &self,
        req: Request<v1::QueryTwinsRequest>,
    ) -> Result<Response<v1::QueryTwinsResponse>, Status> {
        Principal::of(&req)?.require(Scope::TwinsRead)?;
        Err(Status::unimplemented("QueryTwins is not implemented yet"))
    }

    async fn watch_twins(
        &self,
        req: Request<v1::WatchTwinsRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        Principal::of(&req)?.require(Scope::TwinsRead)?;
        Err(Status::unimplemented("WatchTwins is not implemented yet"))
    }

    async fn set_desired(
        &self,
        req: Request<v1::SetDesiredRequest>,
    ) -> Result<Response<v1::SetDesiredResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::TwinsWrite)?;
        let r = req.into_inner();
        let device = p.own("device", &r.device_id)?.to_owned();
        if r.fields.is_empty() || r.fields.len() > 256 {
            return Err(Status::invalid_argument("1 to 256 fields must be set"));
        }
        if self.twin(&device, false).await?.is_none() {
            return Err(Status::not_found(format!("device {device:?} not found")));
        }
        let mut versions = std::collections::BTreeMap::new();
        // The contract is all or nothing; the twin sets one field per message, so a call
        // with several fields is only accepted when none of them carries a condition that
        // could fail halfway.
        if r.fields.len() > 1 && r.fields.values().any(|c| c.expected_version.is_some()) {
            return Err(Status::invalid_argument(
                "expected_version is supported with one field per call",
            ));
        }
        for (field, change) in r.fields {
            if change.clear {
                return Err(Status::unimplemented("clearing a desired field"));
            }
            let value = match change.value.and_then(|v| v.value) {
                Some(v1::signal_value::Value::Text(t)) => t,
                Some(v1::signal_value::Value::Number(n)) if n.is_finite() => n.to_string(),
                Some(v1::signal_value::Value::Number(n)) => {
                    return Err(Status::invalid_argument(format!(
                        "field {field:?}: {n} is not a finite number"
                    )));
                }
                Some(v1::signal_value::Value::Integer(i)) => i.to_string(),
                Some(v1::signal_value::Value::Flag(b)) => b.to_string(),
                None => {
                    return Err(Status::invalid_argument(format!(
                        "field {field:?} has no value"
                    )));
                }
            };
            let msg = DeviceMsg::SetDesired {
                field: field.clone(),
                value,
                expected_version: change.expected_version,
            };
            match self.system.devices().call(&device, msg).await {
                Ok(DeviceReply::Version(v)) => {
                    versions.insert(field, v);
                }
                Ok(DeviceReply::Rejected(why)) => {
                    return Err(if why.contains("version") {
                        Status::failed_precondition(why)
                    } else {
                        Status::invalid_argument(why)
                    });
                }
                Ok(other) => return Err(Status::internal(format!("unexpected reply {other:?}"))),
                Err(e) => return Err(Status::internal(e.to_string())),
            }
        }
        let mut twin = self.twin(&device, true).await?.unwrap_or_default();
        twin.device_id = device;
        Ok(Response::new(v1::SetDesiredResponse {
            versions: versions.into_iter().collect(),
            twin: Some(twin),
        }))
    }
}
