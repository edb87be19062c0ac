//! RBAC: roles map to permission patterns; `*` matches one segment (a trailing `*` matches the
//! rest). A plain decision function, no IO.

use std::collections::BTreeMap;

use crate::auth::Principal;

/// The built-in roles. Each lists its permissions explicitly (no `*.read`-style wildcard outside
/// admin), so a permission added later is granted to nobody but admin until a role names it.
///
/// - `admin`: everything.
/// - `user`: works with the cluster (memory, tasks, inference, agents, events, its own API keys)
///   and sees its health (`cluster.read`, `stats.read`, `metrics.read`). Not the audit trail.
/// - `viewer`: a read-only `user`: every permission of viewer is also a permission of user
///   (tested). No writes, no inference (it spends GPU time), no keys, no audit.
/// - `auditor`: reads and verifies the audit trail (`audit.read`) and, to put entries in context,
///   the cluster's membership, stats and metrics. It reads no memory values, tasks or agents: the
///   audit trail says who did what, an auditor need not see the data itself.
///
/// `[roles]` in the node config may add roles; one with a built-in name replaces it (the config
/// validator refuses redefining admin, user and viewer).
pub const BUILTIN_ROLES: &[(&str, &[&str])] = &[
    ("admin", &["*"]),
    (
        "user",
        &[
            "memory.*",
            "tasks.*",
            "inference.*",
            "agents.read",
            "agents.query",
            "events.read",
            "keys.manage",
            "cluster.read",
            "stats.read",
            "metrics.read",
        ],
    ),
    (
        "viewer",
        &[
            "memory.read",
            "tasks.read",
            "agents.read",
            "events.read",
            "cluster.read",
            "stats.read",
            "metrics.read",
        ],
    ),
    (
        "auditor",
        &["audit.read", "cluster.read", "stats.read", "metrics.read"],
    ),
];

/// Role → permission patterns.
#[derive(Debug, Clone)]
pub struct Policy {
    roles: BTreeMap<String, Vec<String>>,
}

/// Owned resources: only the owner or an admin may touch them.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a>(pub &'a str);

impl Policy {
    /// Built-in roles plus those from config.
    pub fn new(extra: &BTreeMap<String, Vec<String>>) -> Self {
        let mut roles: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, perms) in BUILTIN_ROLES {
            roles.insert(
                name.to_string(),
                perms.iter().map(|p| p.to_string()).collect(),
            );
        }
        for (k, v) in extra {
            roles.insert(k.clone(), v.clone());
        }
        Self { roles }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// The permission patterns of `role` (empty for an unknown role).
    pub fn permissions(&self, role: &str) -> &[String] {
        self.roles.get(role).map_or(&[], Vec::as_slice)
    }

    /// Whether `role` grants `action`.
    pub fn allows(&self, role: &str, action: &str) -> bool {
        self.roles
            .get(role)
            .is_some_and(|perms| perms.iter().any(|p| matches(p, action)))
    }

    /// Permission check, with owner-or-admin on owned resources.
    pub fn check(
        &self,
        who: &Principal,
        action: &str,
        owner: Option<Owner<'_>>,
    ) -> Result<(), String> {
        if !self.allows(&who.role, action) {
            return Err(action.to_string());
        }
        if let Some(Owner(o)) = owner
            && o != who.subject
            && !self.is_admin(&who.role)
        {
            return Err(format!("{action} (owner or admin)"));
        }
        Ok(())
    }

    /// A role that holds `*`.
    pub fn is_admin(&self, role: &str) -> bool {
        self.roles
            .get(role)
            .is_some_and(|p| p.iter().any(|x| x == "*"))
    }

    /// Whether every permission of `role` is also granted to `by` (no privilege escalation).
    pub fn role_within(&self, role: &str, by: &str) -> bool {
        if self.is_admin(by) {
            return true;
        }
        role == by
    }
}

fn matches(pattern: &str, action: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let a: Vec<&str> = action.split('.').collect();
    for (i, seg) in p.iter().enumerate() {
        let last = i == p.len() - 1;
        match a.get(i) {
            None => return false,
            Some(_) if *seg == "*" && last => return true,
            Some(x) if *seg == "*" || seg == x => {}
            Some(_) => return false,
        }
    }
    p.len() == a.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthType;

    fn who(sub: &str, role: &str) -> Principal {
        Principal {
            subject: sub.into(),
            role: role.into(),
            auth_type: AuthType::Jwt,
            credential_id: "j".into(),
            expires_at: 0,
        }
    }

    #[test]
    fn pattern_matching() {
        assert!(matches("*", "anything.at.all"));
        assert!(matches("memory.*", "memory.read"));
        assert!(matches("memory.*", "memory.write"));
        assert!(!matches("memory.*", "memory"));
        assert!(!matches("memory.*", "tasks.read"));
        assert!(matches("*.read", "audit.read"));
        assert!(!matches("*.read", "audit.write"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*", "a.b.c"));
    }

    #[test]
    fn builtin_roles() {
        let p = Policy::new(&BTreeMap::new());
        assert!(p.allows("admin", "subjects.erase"));
        assert!(p.allows("user", "memory.write"));
        assert!(!p.allows("user", "audit.read"));
        assert!(!p.allows("user", "subjects.erase"));
        assert!(!p.allows("viewer", "audit.read"));
        assert!(p.allows("viewer", "memory.read"));
        assert!(!p.allows("viewer", "memory.write"));
        assert!(!p.allows("viewer", "inference.use"));
        assert!(!p.allows("viewer", "keys.manage"));
        assert!(p.allows("auditor", "audit.read"));
        assert!(!p.allows("auditor", "memory.read"));
        assert!(!p.allows("auditor", "audit.write"));
        assert!(!p.allows("nobody", "memory.read"));
        assert!(p.permissions("nobody").is_empty());
    }

    /// Regression (issue 13 item 9): `viewer` had `*.read` and so read the whole audit trail,
    /// which `user` cannot. Now viewer is strictly less than user, and audit is admin/auditor's.
    #[test]
    fn viewer_is_strictly_less_than_user() {
        let p = Policy::new(&BTreeMap::new());
        let viewer = p.permissions("viewer");
        assert!(!viewer.is_empty());
        for perm in viewer {
            assert!(!perm.contains('*'), "viewer has a wildcard: {perm}");
            assert!(p.allows("user", perm), "viewer has {perm}, user does not");
        }
        assert!(
            p.permissions("user")
                .iter()
                .any(|perm| !p.allows("viewer", perm)),
            "user must have something viewer lacks"
        );
        for action in ["audit.read", "metrics.write", "x.read", "subjects.read"] {
            assert!(!p.allows("viewer", action), "viewer allows {action}");
        }
        let readers: Vec<&str> = BUILTIN_ROLES
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| p.allows(name, "audit.read"))
            .collect();
        assert_eq!(readers, ["admin", "auditor"]);
    }

    #[test]
    fn config_roles_still_add_and_override() {
        let mut extra = BTreeMap::new();
        extra.insert("ops".to_string(), vec!["cluster.*".to_string()]);
        extra.insert("auditor".to_string(), vec!["audit.*".to_string()]);
        let p = Policy::new(&extra);
        assert!(p.allows("ops", "cluster.admin"));
        assert!(p.allows("auditor", "audit.verify"));
        assert!(
            !p.allows("auditor", "stats.read"),
            "config replaces the built-in"
        );
        assert!(!p.allows("viewer", "audit.read"));
    }

    #[test]
    fn custom_roles_and_ownership() {
        let mut extra = BTreeMap::new();
        extra.insert("auditor".to_string(), vec!["audit.*".to_string()]);
        let p = Policy::new(&extra);
        assert!(p.check(&who("a", "auditor"), "audit.read", None).is_ok());
        assert!(p.check(&who("a", "auditor"), "memory.read", None).is_err());
        assert!(
            p.check(&who("a", "user"), "keys.manage", Some(Owner("a")))
                .is_ok()
        );
        assert!(
            p.check(&who("a", "user"), "keys.manage", Some(Owner("b")))
                .is_err()
        );
        assert!(
            p.check(&who("root", "admin"), "keys.manage", Some(Owner("b")))
                .is_ok()
        );
        assert!(p.role_within("user", "user"));
        assert!(!p.role_within("admin", "user"));
        assert!(p.role_within("viewer", "admin"));
    }
}
