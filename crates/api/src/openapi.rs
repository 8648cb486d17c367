//! `/api/openapi.json`: the OpenAPI 3.1 document, generated from the handlers and types.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::devices::admin as devices;
use crate::{admin, audit, calls, events, export, problem, provision_link, provisioning};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "careflow-sip provisioning API",
        description = "SIP credentials and devices for CareFlow users (bearer: a CareFlow JWT), \
                       and administration (bearer: an API key from `careflow-sip apikey create`). \
                       Errors are RFC 9457 problem+json.",
    ),
    paths(
        provisioning::register,
        provisioning::credentials,
        provisioning::rotate,
        provisioning::revoke,
        provisioning::status,
        provisioning::deregister,
        provision_link::create,
        admin::subscribers,
        admin::disable,
        admin::enable,
        admin::bindings,
        admin::remove_binding,
        admin::security,
        calls::list,
        audit::list,
        events::mine,
        events::all,
        export::calls,
        export::audit,
        calls::mine,
        devices::list,
        devices::add,
        devices::get,
        devices::update,
        devices::remove,
        devices::rotate,
        devices::provisioning_password,
    ),
    components(schemas(
        problem::Problem,
        provisioning::SipConfig,
        provisioning::NewCredentials,
        provisioning::Credentials,
        provisioning::Device,
        provisioning::Status,
        provisioning::DeregisterRequest,
        provisioning::Removed,
        provision_link::ProvisioningRequest,
        provision_link::ProvisioningLink,
        admin::AdminSubscriber,
        admin::AdminBinding,
        admin::SecurityReport,
        admin::BanView,
        admin::AuthFailureView,
        calls::CallPage,
        calls::CallView,
        calls::CallDevice,
        calls::DispositionFilter,
        audit::AuditPage,
        audit::AuditView,
        events::StreamEvent,
        export::Format,
        devices::DeviceView,
        devices::DeviceCredentials,
        devices::AddDevice,
        devices::UpdateDevice,
        devices::BlfUser,
        devices::RotatedDevice,
    )),
    modifiers(&Bearer),
    tags(
        (name = "sip", description = "The calling CareFlow user's SIP account"),
        (name = "admin", description = "Operators"),
    )
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or API key")
                    .build(),
            ),
        );
    }
}

/// The document as JSON (also what `/api/openapi.json` serves).
pub fn json() -> String {
    ApiDoc::openapi()
        .to_json()
        .unwrap_or_else(|_| "{}".to_string())
}

pub(crate) async fn document() -> impl IntoResponse {
    // Built once: it depends on the code only.
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(json).as_str(),
    )
}
