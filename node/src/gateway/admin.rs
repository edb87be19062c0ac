//! `/v1/me`, `/v1/subjects`, `/v1/audit`, `/v1/keys` and `/v1/tokens` routes.

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use swarm_storage::{AuditEntry, VerifyReport};

use super::extract::{ApiPath, ApiQuery, json_body};
use super::memory::memory_error;
use super::{AppState, AuditCtx, Class, blocking, now_ms, now_s};
use crate::auth::{ApiKeyRecord, MAX_KEY_CHAIN, MAX_KEYS_PER_OWNER, Principal, RecordWrite};
use crate::error::AppError;
use crate::policy::Owner;

/// The caller: subject, role, and the credential it used.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "auth",
    responses((status = 200, description = "The caller", body = super::openapi::schemas::Me)),
    extensions(("x-permission" = json!("any")))
)]
pub(super) async fn me(
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Json<Value> {
    ctx.set_action("me.read", "me");
    Json(json!({
        "subject": who.subject,
        "role": who.role,
        "auth_type": who.auth_type,
        "credential_id": who.credential_id,
        "expires_at": who.expires_at,
    }))
}

/// Crypto-shred a data subject: its data key is destroyed here and on every replica.
#[utoipa::path(
    post,
    path = "/v1/subjects/{id}/erase",
    tag = "admin",
    params(super::openapi::schemas::SubjectPath),
    responses((status = 200, description = "Erased", body = super::openapi::schemas::Erased)),
    extensions(("x-permission" = json!("subjects.erase")))
)]
pub(super) async fn erase_subject(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, AppError> {
    s.authorize(
        &ctx,
        &who,
        "subjects.erase",
        &format!("subjects/{id}"),
        None,
    )?;
    let _permit = s.permit(Class::Security, &who)?;
    let st = s.clone();
    s.timed(Class::Security, async move {
        // Every replica destroys its key too; one that is down gets it from anti-entropy.
        let (memory, caller) = st.memory_for(&ctx);
        let existed = memory
            .erase_subject(caller, id.clone())
            .await
            .map_err(|e| memory_error(&e))?;
        Ok(Json(
            json!({"subject": id, "erased": true, "key_existed": existed}),
        ))
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    /// Entries with a sequence number above this one.
    #[serde(default)]
    after: u64,
    /// Entries per page: 100 by default, at most `limits.max_list`.
    #[serde(default)]
    #[param(minimum = 1)]
    limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AuditPage {
    #[schema(value_type = Vec<super::openapi::schemas::AuditEntry>)]
    entries: Vec<AuditEntry>,
}

/// Audit entries, oldest first.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "admin",
    params(AuditQuery),
    responses((status = 200, description = "One page of entries", body = AuditPage)),
    extensions(("x-permission" = json!("audit.read")))
)]
pub(super) async fn audit_list(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, AppError> {
    s.authorize(&ctx, &who, "audit.read", "audit", None)?;
    let _permit = s.permit(Class::Security, &who)?;
    let limit = s.list_limit(q.limit)?;
    let st = s.clone();
    s.timed(Class::Security, async move {
        let entries = blocking(move || Ok(st.storage.audit.list(q.after, limit)?)).await?;
        Ok(Json(AuditPage { entries }))
    })
    .await
}

/// Verify the audit hash chain.
#[utoipa::path(
    get,
    path = "/v1/audit/verify",
    tag = "admin",
    responses((status = 200, description = "The verdict", body = super::openapi::schemas::VerifyReport)),
    extensions(("x-permission" = json!("audit.read")))
)]
pub(super) async fn audit_verify(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Result<Json<VerifyReport>, AppError> {
    s.authorize(&ctx, &who, "audit.read", "audit", None)?;
    let _permit = s.permit(Class::Security, &who)?;
    let st = s.clone();
    s.timed(Class::Security, async move {
        Ok(Json(
            blocking(move || Ok(st.storage.audit.verify()?)).await?,
        ))
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    name: String,
    /// Defaults to the caller's role; only admins may issue another role.
    #[serde(default)]
    role: Option<String>,
    /// Lifetime, e.g. `"30d"`; default 90 days, capped by `auth.max_token_ttl`.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "30d")]
    ttl: Option<swarm_config::HumanDuration>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct KeyView {
    id: String,
    name: String,
    role: String,
    owner: String,
    created_at: u64,
    expires_at: u64,
    revoked: bool,
}

impl KeyView {
    fn new(r: ApiKeyRecord, revoked: bool) -> Self {
        KeyView {
            id: r.id,
            name: r.name,
            role: r.role,
            owner: r.owner,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked,
        }
    }
}

/// Write a signed record of the authentication state through the memory service: durable and
/// audited here, then pushed to every live peer at once (anti-entropy repairs what a push
/// misses).
async fn write_record(s: &AppState, ctx: &AuditCtx, record: RecordWrite) -> Result<(), AppError> {
    let (memory, caller) = s.memory_for(ctx);
    memory
        .put_record(
            caller,
            record.namespace.to_string(),
            record.key,
            record.request,
        )
        .await
        .map_err(|e| memory_error(&e))?;
    Ok(())
}

/// Create an API key (shown once).
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "auth",
    request_body = CreateKey,
    responses((status = 200, description = "The key, shown this once", body = super::openapi::schemas::KeyCreated)),
    extensions(("x-permission" = json!("keys.manage")))
)]
pub(super) async fn create_key(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    body: Body,
) -> Result<Json<Value>, AppError> {
    s.authorize(&ctx, &who, "keys.manage", "keys", None)?;
    // The body first, within its deadline: a stalled upload holds no permit.
    let b: CreateKey = json_body(body, s.body_limit, s.body_deadline(Class::Security)).await?;
    let _permit = s.permit(Class::Security, &who)?;
    if b.name.is_empty() || b.name.len() > 64 {
        return Err(AppError::invalid_field("name", "1 to 64 characters"));
    }
    let role = b.role.unwrap_or_else(|| who.role.clone());
    if !s.policy.has_role(&role) {
        return Err(AppError::invalid_field(
            "role",
            format!("unknown role `{role}`"),
        ));
    }
    if !s.policy.role_within(&role, &who.role) {
        return Err(AppError::Forbidden(format!("issuing role `{role}`")));
    }
    // A key never outlives the credential that makes it (nor exceeds its rights, above), and
    // revoking that credential revokes the key (its chain of parents is checked on every use).
    let now = now_s();
    let parent_left = who.expires_at.saturating_sub(now);
    let ttl_s = match b.ttl.map(|d| d.0.as_secs()) {
        Some(t) if t == 0 || t > s.max_token_ttl_s => {
            return Err(AppError::invalid_field(
                "ttl",
                format!("must be between 1s and {}s", s.max_token_ttl_s),
            ));
        }
        Some(t) if t > parent_left => {
            return Err(AppError::invalid_field(
                "ttl",
                format!(
                    "a key may not outlive the credential that creates it (that one expires in {parent_left}s)"
                ),
            ));
        }
        Some(t) => t,
        None => (90 * 86_400).min(s.max_token_ttl_s).min(parent_left),
    };
    let st = s.clone();
    let owner = who.subject.clone();
    let (rec, key, record) = blocking(move || {
        let parents = st.auth.chain_of(&who)?;
        if parents.len() >= MAX_KEY_CHAIN {
            return Err(AppError::Forbidden(format!(
                "creating a key with a key that descends from {MAX_KEY_CHAIN} credentials"
            )));
        }
        st.auth
            .new_api_key(
                &b.name,
                &role,
                &owner,
                parents,
                now,
                now.saturating_add(ttl_s),
            )?
            .ok_or_else(|| {
                AppError::Conflict(format!(
                    "`{owner}` holds {MAX_KEYS_PER_OWNER} usable API keys already; revoke one first"
                ))
            })
    })
    .await?;
    ctx.set_action("keys.manage", &format!("keys/{}", rec.id));
    write_record(&s, &ctx, record).await?;
    Ok(Json(json!({
        "key": key,
        "note": "store this key now: it is shown once and kept only as a hash",
        "id": rec.id,
        "name": rec.name,
        "role": rec.role,
        "owner": rec.owner,
        "expires_at": rec.expires_at,
    })))
}

/// List API keys: the caller's own, or all of them for admins.
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "auth",
    responses((status = 200, description = "The keys (never the secrets)", body = super::openapi::schemas::KeyList)),
    extensions(("x-permission" = json!("keys.manage")))
)]
pub(super) async fn list_keys(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Result<Json<Value>, AppError> {
    s.authorize(&ctx, &who, "keys.manage", "keys", None)?;
    let _permit = s.permit(Class::Security, &who)?;
    let admin = s.policy.is_admin(&who.role);
    let st = s.clone();
    let keys = blocking(move || {
        let mut keys = Vec::new();
        let owner = (!admin).then_some(who.subject.as_str());
        for k in st.auth.list_api_keys(owner, st.limits.max_list)? {
            if admin || k.owner == who.subject {
                let revoked = st.auth.key_revoked(&k)?;
                keys.push(KeyView::new(k, revoked));
            }
        }
        Ok(keys)
    })
    .await?;
    Ok(Json(json!({ "keys": keys })))
}

/// Revoke an API key (its owner or an admin), on every node.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "auth",
    params(super::openapi::schemas::KeyPath),
    responses((status = 200, description = "Revoked", body = super::openapi::schemas::KeyRevoked)),
    extensions(("x-permission" = json!("keys.manage")))
)]
pub(super) async fn revoke_key(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, AppError> {
    let resource = format!("keys/{id}");
    let _permit = s.permit(Class::Security, &who)?;
    let Some(rec) = s.auth.get_api_key(&id)? else {
        s.authorize(&ctx, &who, "keys.manage", &resource, None)?;
        return Err(AppError::NotFound(resource));
    };
    s.authorize(
        &ctx,
        &who,
        "keys.manage",
        &resource,
        Some(Owner(&rec.owner)),
    )?;
    let st = s.clone();
    // Revoking what is revoked already writes (and pushes) nothing again.
    let record = blocking(move || {
        Ok(st
            .auth
            .revocation(&rec.credential(), rec.expires_at, now_ms())?)
    })
    .await?;
    if let Some(record) = record {
        write_record(&s, &ctx, record).await?;
    }
    Ok(Json(json!({"id": id, "revoked": true})))
}

/// Exactly one of `token` or `jti`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeToken {
    /// The token itself; its `jti` is revoked.
    #[serde(default)]
    token: Option<String>,
    /// Or the token id directly (as shown by `/v1/me`).
    #[serde(default)]
    jti: Option<String>,
}

/// Revoke a JWT by the token itself (anyone, their own) or by its `jti` (`tokens.admin`).
#[utoipa::path(
    post,
    path = "/v1/tokens/revoke",
    tag = "auth",
    request_body = RevokeToken,
    responses((status = 200, description = "Revoked", body = super::openapi::schemas::TokenRevoked)),
    extensions(("x-permission" = json!("tokens.admin or own token")))
)]
pub(super) async fn revoke_token(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    body: Body,
) -> Result<Json<Value>, AppError> {
    let b: RevokeToken = json_body(body, s.body_limit, s.body_deadline(Class::Security)).await?;
    let (jti, exp, owner) = match (b.token, b.jti) {
        (Some(t), None) => {
            let c = s
                .auth
                .verify_token(&t, now_s())
                .map_err(|e| AppError::invalid_field("token", e.to_string()))?;
            (c.jti, c.exp, Some(c.sub))
        }
        (None, Some(j)) if !j.is_empty() && j.len() <= 128 => (j, u64::MAX, None),
        _ => {
            return Err(AppError::invalid_field(
                "body",
                "give exactly one of `token` or `jti`",
            ));
        }
    };
    // Anyone may revoke their own token; revoking another's (or a bare jti) takes an admin.
    let resource = format!("tokens/{jti}");
    match owner {
        Some(o) if o == who.subject => ctx.set_action("tokens.revoke", &resource),
        _ => s.authorize(&ctx, &who, "tokens.admin", &resource, None)?,
    }
    let _permit = s.permit(Class::Security, &who)?;
    let st = s.clone();
    let credential = format!("jwt:{jti}");
    // Revoking what is revoked already writes (and pushes) nothing again.
    let record = blocking(move || Ok(st.auth.revocation(&credential, exp, now_ms())?)).await?;
    if let Some(record) = record {
        write_record(&s, &ctx, record).await?;
    }
    Ok(Json(json!({"jti": jti, "revoked": true})))
}
