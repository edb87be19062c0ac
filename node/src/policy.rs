//! RBAC: roles map to permission patterns; `*` matches one segment (a trailing `*` matches the
//! rest). A plain decision function, no IO.

use std::collections::BTreeMap;

use crate::auth::Principal;

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
        roles.insert("admin".into(), vec!["*".into()]);
        roles.insert(
            "user".into(),
            [
                "memory.*",
                "tasks.*",
                "inference.*",
                "agents.read",
                "agents.query",
                "events.read",
                "keys.manage",
                "cluster.read",
                "stats.read",
            ]
            .map(String::from)
            .to_vec(),
        );
        roles.insert("viewer".into(), vec!["*.read".into()]);
        for (k, v) in extra {
            roles.insert(k.clone(), v.clone());
        }
        Self { roles }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains_key(role)
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
        assert!(p.allows("viewer", "audit.read"));
        assert!(!p.allows("viewer", "memory.write"));
        assert!(!p.allows("nobody", "memory.read"));
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
