//! Key Vault's data-plane RBAC: the built-in roles by their real names, the data actions each
//! grants, and scopes (a vault, or one key or secret in it).

use crate::config::RoleAssignment;

/// The data actions the emulated routes need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    KeyRead,
    KeyCreate,
    KeyUpdate,
    KeyDelete,
    KeyRotate,
    KeyWrap,
    KeyUnwrap,
    KeyEncrypt,
    KeyDecrypt,
    SecretGet,
    SecretSet,
    SecretDelete,
}

impl Action {
    /// The Azure data action string, as RBAC errors name it.
    pub fn data_action(self) -> &'static str {
        match self {
            Action::KeyRead => "Microsoft.KeyVault/vaults/keys/read",
            Action::KeyCreate => "Microsoft.KeyVault/vaults/keys/create/action",
            Action::KeyUpdate => "Microsoft.KeyVault/vaults/keys/update/action",
            Action::KeyDelete => "Microsoft.KeyVault/vaults/keys/delete",
            Action::KeyRotate => "Microsoft.KeyVault/vaults/keys/rotate/action",
            Action::KeyWrap => "Microsoft.KeyVault/vaults/keys/wrap/action",
            Action::KeyUnwrap => "Microsoft.KeyVault/vaults/keys/unwrap/action",
            Action::KeyEncrypt => "Microsoft.KeyVault/vaults/keys/encrypt/action",
            Action::KeyDecrypt => "Microsoft.KeyVault/vaults/keys/decrypt/action",
            Action::SecretGet => "Microsoft.KeyVault/vaults/secrets/getSecret/action",
            Action::SecretSet => "Microsoft.KeyVault/vaults/secrets/setSecret/action",
            Action::SecretDelete => "Microsoft.KeyVault/vaults/secrets/delete",
        }
    }

    fn is_key(self) -> bool {
        !matches!(
            self,
            Action::SecretGet | Action::SecretSet | Action::SecretDelete
        )
    }
}

pub const ROLES: &[&str] = &[
    "Key Vault Administrator",
    "Key Vault Crypto Officer",
    "Key Vault Crypto User",
    "Key Vault Crypto Service Encryption User",
    "Key Vault Secrets Officer",
    "Key Vault Secrets User",
    "Key Vault Reader",
];

/// Whether built-in `role` grants `action`.
pub fn grants(role: &str, action: Action) -> bool {
    use Action::*;
    match role {
        "Key Vault Administrator" => true,
        "Key Vault Crypto Officer" => action.is_key(),
        "Key Vault Crypto User" => matches!(
            action,
            KeyRead | KeyUpdate | KeyWrap | KeyUnwrap | KeyEncrypt | KeyDecrypt
        ),
        "Key Vault Crypto Service Encryption User" => {
            matches!(action, KeyRead | KeyWrap | KeyUnwrap)
        }
        "Key Vault Secrets Officer" => !action.is_key(),
        "Key Vault Secrets User" => action == SecretGet,
        "Key Vault Reader" => action == KeyRead,
        _ => false,
    }
}

/// Whether `principal` may do `action` on `object` (`keys/NAME` or `secrets/NAME`) in `vault`.
pub fn allowed(
    assignments: &[RoleAssignment],
    principal: &str,
    vault: &str,
    object: &str,
    action: Action,
) -> bool {
    let vault_scope = format!("/vaults/{vault}");
    let object_scope = format!("/vaults/{vault}/{object}");
    assignments.iter().any(|a| {
        a.principal == principal
            && (a.scope == vault_scope || a.scope == object_scope)
            && grants(&a.role, action)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ra(role: &str, scope: &str) -> RoleAssignment {
        RoleAssignment {
            principal: "oid".into(),
            role: role.into(),
            scope: scope.into(),
        }
    }

    #[test]
    fn service_encryption_user_on_one_key() {
        let a = [ra(
            "Key Vault Crypto Service Encryption User",
            "/vaults/v/keys/kek",
        )];
        assert!(allowed(&a, "oid", "v", "keys/kek", Action::KeyUnwrap));
        assert!(allowed(&a, "oid", "v", "keys/kek", Action::KeyWrap));
        assert!(!allowed(&a, "oid", "v", "keys/other", Action::KeyUnwrap));
        assert!(!allowed(&a, "oid", "v", "keys/kek", Action::KeyDecrypt));
        assert!(!allowed(
            &a,
            "someone-else",
            "v",
            "keys/kek",
            Action::KeyUnwrap
        ));
        assert!(!allowed(&a, "oid", "w", "keys/kek", Action::KeyUnwrap));
    }

    #[test]
    fn roles_grant_what_azure_documents() {
        assert!(grants("Key Vault Secrets User", Action::SecretGet));
        assert!(!grants("Key Vault Secrets User", Action::SecretSet));
        assert!(!grants("Key Vault Reader", Action::SecretGet));
        assert!(grants("Key Vault Crypto Officer", Action::KeyCreate));
        assert!(!grants("Key Vault Crypto Officer", Action::SecretGet));
        assert!(!grants("Key Vault Crypto User", Action::KeyCreate));
        assert!(grants("Key Vault Administrator", Action::SecretDelete));
        assert!(!grants("Owner", Action::KeyRead));
    }
}
