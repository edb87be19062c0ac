//! `/v1/me`, `/v1/subjects`, `/v1/audit`, `/v1/keys` and `/v1/tokens` routes.

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use swarm_storage::{AuditEntry, VerifyReport};

use super::extract::{ApiPath, ApiQuery, json_body};
use super::{AppState, AuditCtx, Class, blocking, now_ms, now_s};
use crate::auth::{ApiKeyRecord, MAX_KEY_CHAIN, MAX_KEYS_PER_OWNER, Principal};
use crate::error::AppError;
use crate::policy::Owner;

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
        let id2 = id.clone();
        let st2 = st.clone();
        let existed = blocking(move || {
            let existed = st2.storage.memory.erase_subject(&id2, now_ms())?;
            st2.commit_blocking(&ctx, 200)?;
            Ok(existed)
        })
        .await?;
        // Every replica destroys its key too; one that is down gets it from anti-entropy.
        if let Some(r) = &st.replicator {
            r.push_erasure(vec![id.clone()]);
        }
        Ok(Json(
            json!({"subject": id, "erased": true, "key_existed": existed}),
        ))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub(super) struct AuditPage {
    entries: Vec<AuditEntry>,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    name: String,
    /// Defaults to the caller's role; only admins may issue another role.
    #[serde(default)]
    role: Option<String>,
    /// Lifetime, e.g. `"30d"`; default 90 days, capped by `auth.max_token_ttl`.
    #[serde(default)]
    ttl: Option<swarm_config::HumanDuration>,
}

#[derive(Debug, Serialize)]
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

/// Push a change of the authentication state to every live peer at once (anti-entropy repairs
/// what a push misses).
async fn replicate(s: &AppState, delta: &swarm_storage::Delta) {
    if let Some(r) = &s.replicator
        && let Err(e) = r.push(delta, false).await
    {
        tracing::warn!(error = %e, "authentication change not pushed; anti-entropy will carry it");
    }
}

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
    let (rec, key, delta) = blocking(move || {
        let parents = st.auth.chain_of(&who)?;
        if parents.len() >= MAX_KEY_CHAIN {
            return Err(AppError::Forbidden(format!(
                "creating a key with a key that descends from {MAX_KEY_CHAIN} credentials"
            )));
        }
        let Some(out) = st.auth.create_api_key(
            &b.name,
            &role,
            &owner,
            parents,
            now,
            now.saturating_add(ttl_s),
        )?
        else {
            return Err(AppError::Conflict(format!(
                "`{owner}` holds {MAX_KEYS_PER_OWNER} usable API keys already; revoke one first"
            )));
        };
        ctx.set_action("keys.manage", &format!("keys/{}", out.0.id));
        st.commit_blocking(&ctx, 200)?;
        Ok(out)
    })
    .await?;
    replicate(&s, &delta).await;
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
    let delta = blocking(move || {
        let delta = st
            .auth
            .revoke(&rec.credential(), rec.expires_at, now_ms())?;
        if delta.is_some() {
            st.commit_blocking(&ctx, 200)?;
        }
        Ok(delta)
    })
    .await?;
    if let Some(delta) = delta {
        replicate(&s, &delta).await;
    }
    Ok(Json(json!({"id": id, "revoked": true})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeToken {
    /// The token itself; its `jti` is revoked.
    #[serde(default)]
    token: Option<String>,
    /// Or the token id directly (as shown by `/v1/me`).
    #[serde(default)]
    jti: Option<String>,
}

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
    let delta = blocking(move || {
        let delta = st.auth.revoke(&credential, exp, now_ms())?;
        if delta.is_some() {
            st.commit_blocking(&ctx, 200)?;
        }
        Ok(delta)
    })
    .await?;
    if let Some(delta) = delta {
        replicate(&s, &delta).await;
    }
    Ok(Json(json!({"jti": jti, "revoked": true})))
}
