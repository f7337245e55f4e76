//! Data-plane RBAC: Key Vault's built-in roles
//! (https://learn.microsoft.com/azure/key-vault/general/rbac-guide), Managed HSM's local RBAC
//! roles (https://learn.microsoft.com/azure/key-vault/managed-hsm/built-in-roles) and the
//! Storage Blob Data roles, by their real names; the data actions each grants; and scopes (a
//! vault, or one key or secret in it; an HSM, its keys, or one key; a storage account or one
//! container).

use crate::config::RoleAssignment;
use crate::server::Service;

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
    KeySign,
    KeyVerify,
    /// Reading deleted keys (listing them, getting one).
    KeyReadDeleted,
    KeyRecover,
    KeyPurge,
    SecretGet,
    /// Listing secrets and their versions, reading deleted secrets (`readMetadata`).
    SecretRead,
    SecretSet,
    SecretDelete,
    SecretRecover,
    SecretPurge,
}

impl Action {
    /// The Azure data action string, as RBAC errors name it.
    pub fn data_action(self) -> &'static str {
        self.data_action_in(Service::KeyVault)
    }

    /// The data action string of `service`.
    pub fn data_action_in(self, service: Service) -> &'static str {
        use Action::*;
        if service == Service::ManagedHsm {
            return match self {
                KeyRead => "Microsoft.KeyVault/managedHsm/keys/read/action",
                KeyCreate => "Microsoft.KeyVault/managedHsm/keys/create",
                KeyUpdate => "Microsoft.KeyVault/managedHsm/keys/write/action",
                KeyDelete => "Microsoft.KeyVault/managedHsm/keys/delete",
                KeyRotate => "Microsoft.KeyVault/managedHsm/keys/rotate/action",
                KeyWrap => "Microsoft.KeyVault/managedHsm/keys/wrap/action",
                KeyUnwrap => "Microsoft.KeyVault/managedHsm/keys/unwrap/action",
                KeyEncrypt => "Microsoft.KeyVault/managedHsm/keys/encrypt/action",
                KeyDecrypt => "Microsoft.KeyVault/managedHsm/keys/decrypt/action",
                KeySign => "Microsoft.KeyVault/managedHsm/keys/sign/action",
                KeyVerify => "Microsoft.KeyVault/managedHsm/keys/verify/action",
                KeyReadDeleted => "Microsoft.KeyVault/managedHsm/keys/deletedKeys/read/action",
                KeyRecover => "Microsoft.KeyVault/managedHsm/keys/deletedKeys/recover/action",
                KeyPurge => "Microsoft.KeyVault/managedHsm/keys/deletedKeys/delete",
                _ => "Microsoft.KeyVault/managedHsm/secrets",
            };
        }
        match self {
            KeyRead | KeyReadDeleted => "Microsoft.KeyVault/vaults/keys/read",
            KeyCreate => "Microsoft.KeyVault/vaults/keys/create/action",
            KeyUpdate => "Microsoft.KeyVault/vaults/keys/update/action",
            KeyDelete => "Microsoft.KeyVault/vaults/keys/delete",
            KeyRotate => "Microsoft.KeyVault/vaults/keys/rotate/action",
            KeyWrap => "Microsoft.KeyVault/vaults/keys/wrap/action",
            KeyUnwrap => "Microsoft.KeyVault/vaults/keys/unwrap/action",
            KeyEncrypt => "Microsoft.KeyVault/vaults/keys/encrypt/action",
            KeyDecrypt => "Microsoft.KeyVault/vaults/keys/decrypt/action",
            KeySign => "Microsoft.KeyVault/vaults/keys/sign/action",
            KeyVerify => "Microsoft.KeyVault/vaults/keys/verify/action",
            KeyRecover => "Microsoft.KeyVault/vaults/keys/recover/action",
            KeyPurge => "Microsoft.KeyVault/vaults/keys/purge/action",
            SecretGet => "Microsoft.KeyVault/vaults/secrets/getSecret/action",
            SecretRead => "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
            SecretSet => "Microsoft.KeyVault/vaults/secrets/setSecret/action",
            SecretDelete => "Microsoft.KeyVault/vaults/secrets/delete",
            SecretRecover => "Microsoft.KeyVault/vaults/secrets/recover/action",
            SecretPurge => "Microsoft.KeyVault/vaults/secrets/purge/action",
        }
    }

    fn is_key(self) -> bool {
        !matches!(
            self,
            Action::SecretGet
                | Action::SecretRead
                | Action::SecretSet
                | Action::SecretDelete
                | Action::SecretRecover
                | Action::SecretPurge
        )
    }

    fn is_key_crypto(self) -> bool {
        use Action::*;
        matches!(
            self,
            KeyWrap | KeyUnwrap | KeyEncrypt | KeyDecrypt | KeySign | KeyVerify
        )
    }
}

/// Key Vault's built-in data-plane roles.
pub const ROLES: &[&str] = &[
    "Key Vault Administrator",
    "Key Vault Crypto Officer",
    "Key Vault Crypto User",
    "Key Vault Crypto Service Encryption User",
    "Key Vault Secrets Officer",
    "Key Vault Secrets User",
    "Key Vault Reader",
];

/// Managed HSM's built-in local RBAC roles the emulator knows.
pub const HSM_ROLES: &[&str] = &[
    "Managed HSM Administrator",
    "Managed HSM Crypto Officer",
    "Managed HSM Crypto User",
    "Managed HSM Crypto Service Encryption User",
    "Managed HSM Crypto Auditor",
];

/// The Storage Blob Data roles
/// (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/storage).
pub const STORAGE_ROLES: &[&str] = &[
    "Storage Blob Data Reader",
    "Storage Blob Data Contributor",
    "Storage Blob Data Owner",
];

/// Whether built-in Key Vault or Managed HSM `role` grants `action`.
pub fn grants(role: &str, action: Action) -> bool {
    use Action::*;
    match role {
        "Key Vault Administrator" => true,
        "Key Vault Crypto Officer" => action.is_key(),
        "Key Vault Crypto User" => {
            matches!(action, KeyRead | KeyReadDeleted | KeyUpdate) || action.is_key_crypto()
        }
        "Key Vault Crypto Service Encryption User" => {
            matches!(action, KeyRead | KeyReadDeleted | KeyWrap | KeyUnwrap)
        }
        "Key Vault Secrets Officer" => !action.is_key(),
        "Key Vault Secrets User" => matches!(action, SecretGet | SecretRead),
        "Key Vault Reader" => matches!(action, KeyRead | KeyReadDeleted | SecretRead),
        // Managed HSM: key management and crypto, but not deleted keys or purge.
        "Managed HSM Crypto User" => {
            matches!(
                action,
                KeyRead | KeyCreate | KeyUpdate | KeyDelete | KeyRotate
            ) || action.is_key_crypto()
        }
        // Deleted keys (read, recover, purge) and role management; no key use.
        "Managed HSM Crypto Officer" => {
            matches!(action, KeyReadDeleted | KeyRecover | KeyPurge)
        }
        "Managed HSM Crypto Service Encryption User" => {
            matches!(action, KeyRead | KeyWrap | KeyUnwrap)
        }
        "Managed HSM Crypto Auditor" => action == KeyRead,
        // Security domain, backup and roles only: no key operation.
        "Managed HSM Administrator" => false,
        _ => false,
    }
}

/// Whether a role assignment is well formed: a known role at a scope of its own service.
pub fn validate(ra: &RoleAssignment) -> Result<(), String> {
    let segs: Vec<&str> = ra.scope.trim_start_matches('/').split('/').collect();
    let (roles, ok): (&[&str], bool) = match segs.as_slice() {
        ["vaults", v] | ["vaults", v, "keys" | "secrets", _] => (ROLES, !v.is_empty()),
        ["hsms", h] | ["hsms", h, ""] | ["hsms", h, "keys"] | ["hsms", h, "keys", _] => {
            (HSM_ROLES, !h.is_empty())
        }
        ["storageAccounts", a] | ["storageAccounts", a, "containers", _] => {
            (STORAGE_ROLES, !a.is_empty())
        }
        _ => (&[], false),
    };
    if !ok {
        return Err(format!(
            "scope {:?} is not /vaults/V[/keys/K|/secrets/S], /hsms/H[/keys[/K]] or /storageAccounts/A[/containers/C]",
            ra.scope
        ));
    }
    if !roles.contains(&ra.role.as_str()) {
        return Err(format!(
            "unknown role {:?} for scope {}; built-in roles there: {}",
            ra.role,
            ra.scope,
            roles.join(", ")
        ));
    }
    Ok(())
}

/// Whether `principal` may do `action` on `object` (`keys/NAME` or `secrets/NAME`) in `vault`.
pub fn allowed(
    assignments: &[RoleAssignment],
    principal: &str,
    vault: &str,
    object: &str,
    action: Action,
) -> bool {
    allowed_in(
        assignments,
        principal,
        Service::KeyVault,
        vault,
        object,
        action,
    )
}

/// Whether `principal` may do `action` on `object` (`keys/NAME`, `secrets/NAME`, or `keys`
/// for the collection) in vault or Managed HSM `name`.
pub fn allowed_in(
    assignments: &[RoleAssignment],
    principal: &str,
    service: Service,
    name: &str,
    object: &str,
    action: Action,
) -> bool {
    let scopes: Vec<String> = match service {
        Service::KeyVault => vec![
            format!("/vaults/{name}"),
            format!("/vaults/{name}/{object}"),
        ],
        Service::ManagedHsm => vec![
            format!("/hsms/{name}"),
            format!("/hsms/{name}/"),
            format!("/hsms/{name}/keys"),
            format!("/hsms/{name}/{object}"),
        ],
    };
    assignments
        .iter()
        .any(|a| a.principal == principal && scopes.contains(&a.scope) && grants(&a.role, action))
}

/// What a Blob request does, as the Storage Blob Data roles tell requests apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobAccess {
    /// Reading blobs, block lists, properties, listings.
    Read,
    /// Writing blobs (blocks, block lists, metadata), creating containers.
    Write,
    /// Deleting blobs or containers.
    Delete,
}

/// Whether Storage Blob Data `role` grants `access`: Reader reads; Contributor and Owner
/// (Owner adds only ADLS POSIX ACLs) read, write and delete.
pub fn blob_grants(role: &str, access: BlobAccess) -> bool {
    match role {
        "Storage Blob Data Owner" | "Storage Blob Data Contributor" => true,
        "Storage Blob Data Reader" => access == BlobAccess::Read,
        _ => false,
    }
}

/// Whether `principal` may `access` blobs in `container` of storage `account` by its Storage
/// Blob Data role assignments, at the account's scope or the container's. `container` None is
/// the account itself (listing or creating containers): account-wide assignments only.
pub fn blob_allowed(
    assignments: &[RoleAssignment],
    principal: &str,
    account: &str,
    container: Option<&str>,
    access: BlobAccess,
) -> bool {
    let account_scope = format!("/storageAccounts/{account}");
    let container_scope = container.map(|c| format!("{account_scope}/containers/{c}"));
    assignments.iter().any(|a| {
        a.principal == principal
            && (a.scope == account_scope || Some(&a.scope) == container_scope.as_ref())
            && blob_grants(&a.role, access)
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
        assert!(grants("Key Vault Crypto Officer", Action::KeyPurge));
        assert!(!grants("Key Vault Crypto Officer", Action::SecretGet));
        assert!(!grants("Key Vault Crypto User", Action::KeyCreate));
        assert!(grants("Key Vault Administrator", Action::SecretDelete));
        assert!(!grants("Owner", Action::KeyRead));
    }

    #[test]
    fn managed_hsm_local_rbac() {
        let a = [
            ra(
                "Managed HSM Crypto Service Encryption User",
                "/hsms/h/keys/k",
            ),
            ra("Managed HSM Crypto User", "/hsms/g/keys"),
        ];
        let hsm = Service::ManagedHsm;
        assert!(allowed_in(&a, "oid", hsm, "h", "keys/k", Action::KeyUnwrap));
        assert!(!allowed_in(
            &a,
            "oid",
            hsm,
            "h",
            "keys/j",
            Action::KeyUnwrap
        ));
        assert!(!allowed_in(
            &a,
            "oid",
            hsm,
            "h",
            "keys/k",
            Action::KeyDecrypt
        ));
        assert!(allowed_in(
            &a,
            "oid",
            hsm,
            "g",
            "keys/any",
            Action::KeyDecrypt
        ));
        assert!(!allowed_in(
            &a,
            "oid",
            hsm,
            "g",
            "keys/any",
            Action::KeyPurge
        ));
        // An HSM scope never opens a vault of the same name, nor the reverse.
        assert!(!allowed_in(
            &a,
            "oid",
            Service::KeyVault,
            "h",
            "keys/k",
            Action::KeyUnwrap
        ));
        assert!(grants("Managed HSM Crypto Officer", Action::KeyPurge));
        assert!(!grants("Managed HSM Crypto Officer", Action::KeyUnwrap));
        assert!(!grants("Managed HSM Administrator", Action::KeyRead));
    }

    #[test]
    fn assignments_are_validated() {
        assert!(validate(&ra("Key Vault Reader", "/vaults/v")).is_ok());
        assert!(validate(&ra("Managed HSM Crypto User", "/hsms/h/keys/k")).is_ok());
        assert!(
            validate(&ra(
                "Storage Blob Data Reader",
                "/storageAccounts/a/containers/c"
            ))
            .is_ok()
        );
        assert!(validate(&ra("Key Vault Reader", "/hsms/h")).is_err());
        assert!(validate(&ra("Managed HSM Crypto User", "/vaults/v")).is_err());
        assert!(validate(&ra("Owner", "/vaults/v")).is_err());
        assert!(validate(&ra("Key Vault Reader", "/subscriptions/x")).is_err());
    }

    #[test]
    fn blob_roles() {
        use BlobAccess::*;
        let a = [
            ra("Storage Blob Data Reader", "/storageAccounts/acct"),
            ra(
                "Storage Blob Data Contributor",
                "/storageAccounts/acct/containers/backups",
            ),
        ];
        assert!(blob_allowed(&a, "oid", "acct", Some("c"), Read));
        assert!(blob_allowed(&a, "oid", "acct", None, Read));
        assert!(!blob_allowed(&a, "oid", "acct", Some("c"), Write));
        assert!(!blob_allowed(&a, "oid", "acct", Some("c"), Delete));
        assert!(!blob_allowed(&a, "oid", "other", Some("c"), Read));
        // The container-scoped Contributor writes and deletes in that container only, and
        // cannot create or delete containers (the account's scope).
        assert!(blob_allowed(&a, "oid", "acct", Some("backups"), Write));
        assert!(blob_allowed(&a, "oid", "acct", Some("backups"), Delete));
        assert!(!blob_allowed(&a, "oid", "acct", None, Write));
        assert!(!blob_allowed(&a, "oid", "other", Some("backups"), Write));
        assert!(!blob_allowed(&a, "someone-else", "acct", Some("c"), Read));
        assert!(blob_grants("Storage Blob Data Owner", Delete));
        assert!(!blob_grants("Key Vault Administrator", Read));
    }
}
