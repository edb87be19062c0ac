//! The route table and `/openapi.json`, generated from it.
//!
//! Every route is registered through utoipa-axum's [`OpenApiRouter`] with the handler's
//! `#[utoipa::path]` attribute (method, path, parameters, request and response types,
//! `x-permission`), so a route cannot exist without its description nor a description without
//! its route. What every operation shares is added once, by [`finish`]: the error responses
//! (any route can answer them: the middleware alone gives 401, 408, 413 and 429) and the
//! security requirement, which follows from the operation's `x-permission` (`public`: none).
//! Types of other crates and the bodies handlers build with `json!` are described by the
//! schema-only types of [`schemas`].

#[expect(dead_code, reason = "schema-only types: nothing builds or reads them")]
pub(super) mod schemas;
#[cfg(test)]
mod tests;

use std::sync::LazyLock;

use axum::Json;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
use utoipa::openapi::security::{SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Components, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppState, admin, cluster, memory, openai, system, tasks};

/// The statuses every operation may answer with the [`schemas::Error`] body.
const ERROR_STATUSES: [&str; 9] = [
    "400", "401", "403", "404", "408", "409", "413", "429", "503",
];

/// What the generated paths do not say: the title and the schemas that only [`finish`] uses.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "swarm gateway",
        description = "The HTTP API of a swarm node. Every operation names the permission it \
                       needs in `x-permission`; errors are `{\"error\": {\"code\", \"message\", \
                       \"field\"?}}` with a stable `code`."
    ),
    components(schemas(schemas::Error))
)]
struct ApiDoc;

/// Every route of the gateway, each with its description.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::health))
        .routes(routes!(system::metrics))
        .routes(routes!(openapi))
        .routes(routes!(admin::me))
        .routes(routes!(
            memory::get_value,
            memory::put_value,
            memory::delete_value
        ))
        .routes(routes!(memory::list_values))
        .routes(routes!(admin::erase_subject))
        .routes(routes!(admin::audit_list))
        .routes(routes!(admin::audit_verify))
        .routes(routes!(admin::create_key, admin::list_keys))
        .routes(routes!(admin::revoke_key))
        .routes(routes!(admin::revoke_token))
        .routes(routes!(openai::models))
        .routes(routes!(openai::chat_completions))
        .routes(routes!(openai::completions))
        .routes(routes!(cluster::members))
        .routes(routes!(cluster::leave))
        .routes(routes!(cluster::ping))
        .routes(routes!(tasks::create_task, tasks::list_tasks))
        .routes(routes!(tasks::get_task, tasks::cancel_task))
        .routes(routes!(tasks::task_results))
        .routes(routes!(tasks::requeue_task))
        .routes(routes!(tasks::agents))
        .routes(routes!(tasks::query_agent))
        .routes(routes!(tasks::stats))
        .routes(routes!(tasks::events::subscribe))
}

/// The document, built once (it depends on the code only).
pub(super) fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> =
        LazyLock::new(|| finish(routes().into_openapi()));
    &DOC
}

/// Add what every operation shares: the security schemes and each operation's requirement
/// (none when its `x-permission` is `public`), and the error responses it does not list itself.
fn finish(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let components = doc.components.get_or_insert_with(Components::new);
    let mut bearer = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT (EdDSA)")
        .build();
    bearer.description = Some("A token from `swarm token` or `swarm init`.".into());
    components
        .security_schemes
        .insert("bearer".into(), SecurityScheme::Http(bearer));
    components.security_schemes.insert(
        "apiKey".into(),
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "X-API-Key",
            "A key from `POST /v1/keys`.",
        ))),
    );
    let error = ResponseBuilder::new()
        .description("Error: a stable `code`, a safe `message`, and `field` when one is at fault")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Error")))
                .build(),
        )
        .build();
    components.responses.insert("Error".into(), RefOr::T(error));
    for item in doc.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let public = op
                .extensions
                .as_ref()
                .and_then(|e| e.get("x-permission"))
                .is_some_and(|p| p == "public");
            op.security = Some(if public {
                Vec::new()
            } else {
                vec![
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                    SecurityRequirement::new("apiKey", Vec::<String>::new()),
                ]
            });
            for status in ERROR_STATUSES {
                op.responses
                    .responses
                    .entry(status.into())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name("Error")));
            }
        }
    }
    doc
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "system",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = serde_json::Value)),
    extensions(("x-permission" = json!("public")))
)]
pub(super) async fn openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}
