//! Integrator authentication and authorization: bearer tokens that carry a tenant and
//! scopes.
//!
//! A token is an opaque random string (`ct_` and 43 characters of base64url, 256 bits)
//! that the integrator sends as `authorization: Bearer <token>`. The node never stores
//! tokens, only their SHA-256 (a tokens file can be read by an operator without handing
//! out credentials): `caretwin-cluster token --tenant t1 --scope cases:read …` mints one and
//! prints the line to add to the file.
//!
//! Every call is authenticated by the interceptor ([`Tokens::interceptor`]), which puts the
//! caller's [`Principal`] in the request's extensions; every handler then asks for the
//! scope its method needs ([`Principal::require`]). Ids name their tenant (`t1:alice`); a
//! principal may only see ids of its own tenant, and another tenant's id is reported as
//! not found, so a caller cannot even learn that it exists.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use tonic::{Request, Status};

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Read twins, query and watch them.
    #[serde(rename = "twins:read")]
    TwinsRead,
    /// Set twins' desired state.
    #[serde(rename = "twins:write")]
    TwinsWrite,
    /// Read customers (without contact points).
    #[serde(rename = "customers:read")]
    CustomersRead,
    /// Read customers' contact points.
    #[serde(rename = "customers:pii")]
    CustomersPii,
    /// Change preferences and consent.
    #[serde(rename = "customers:write")]
    CustomersWrite,
    /// Export everything held about a customer.
    #[serde(rename = "customers:export")]
    CustomersExport,
    /// Erase a customer.
    #[serde(rename = "customers:erase")]
    CustomersErase,
    /// Read cases and subscribe to the handoff stream.
    #[serde(rename = "cases:read")]
    CasesRead,
    /// Acknowledge, accept, annotate and resolve cases.
    #[serde(rename = "cases:handle")]
    CasesHandle,
    /// Read work orders, appointments, part orders, technicians.
    #[serde(rename = "work:read")]
    WorkRead,
    /// Create and change work.
    #[serde(rename = "work:write")]
    WorkWrite,
    /// Suppliers: report part order progress.
    #[serde(rename = "parts:write")]
    PartsWrite,
    /// Read commands.
    #[serde(rename = "commands:read")]
    CommandsRead,
    /// Send and cancel commands.
    #[serde(rename = "commands:write")]
    CommandsWrite,
    /// Read the catalogue.
    #[serde(rename = "catalogue:read")]
    CatalogueRead,
    /// Deliver notifications.
    #[serde(rename = "notifications:gateway")]
    NotificationsGateway,
    /// Every scope.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 17] = [
        Scope::TwinsRead,
        Scope::TwinsWrite,
        Scope::CustomersRead,
        Scope::CustomersPii,
        Scope::CustomersWrite,
        Scope::CustomersExport,
        Scope::CustomersErase,
        Scope::CasesRead,
        Scope::CasesHandle,
        Scope::WorkRead,
        Scope::WorkWrite,
        Scope::PartsWrite,
        Scope::CommandsRead,
        Scope::CommandsWrite,
        Scope::CatalogueRead,
        Scope::NotificationsGateway,
        Scope::Admin,
    ];

    /// The scope's name, as in tokens files and the protos' comments.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::TwinsRead => "twins:read",
            Scope::TwinsWrite => "twins:write",
            Scope::CustomersRead => "customers:read",
            Scope::CustomersPii => "customers:pii",
            Scope::CustomersWrite => "customers:write",
            Scope::CustomersExport => "customers:export",
            Scope::CustomersErase => "customers:erase",
            Scope::CasesRead => "cases:read",
            Scope::CasesHandle => "cases:handle",
            Scope::WorkRead => "work:read",
            Scope::WorkWrite => "work:write",
            Scope::PartsWrite => "parts:write",
            Scope::CommandsRead => "commands:read",
            Scope::CommandsWrite => "commands:write",
            Scope::CatalogueRead => "catalogue:read",
            Scope::NotificationsGateway => "notifications:gateway",
            Scope::Admin => "admin",
        }
    }

    /// The scope named `name`.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling: an integrator of one tenant, with what its token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name, for logs.
    pub name: String,
    /// The tenant whose data the caller may see.
    pub tenant: String,
    /// What the caller may do.
    pub scopes: BTreeSet<Scope>,
}

impl Principal {
    /// The principal the interceptor put on `req`.
    pub fn of<T>(req: &Request<T>) -> Result<&Principal, Status> {
        req.extensions()
            .get::<Principal>()
            .ok_or_else(|| Status::unauthenticated("no credentials"))
    }

    /// Whether the caller has `scope` (or `admin`).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// `Ok` when the caller has `scope`, PERMISSION_DENIED naming it otherwise.
    pub fn require(&self, scope: Scope) -> Result<(), Status> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "token {:?} lacks scope {scope}",
                self.name
            )))
        }
    }

    /// `id` when it is of the caller's tenant (`tenant:rest`); NOT_FOUND otherwise, saying
    /// nothing about whether it exists elsewhere. `what` names the kind of id.
    pub fn own<'a>(&self, what: &str, id: &'a str) -> Result<&'a str, Status> {
        match id.split_once(':') {
            Some((tenant, rest)) if tenant == self.tenant && !rest.is_empty() => Ok(id),
            _ => Err(Status::not_found(format!("{what} {id:?} not found"))),
        }
    }
}

/// One token in a tokens file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// A name for logs (the integrator: `crm-eu`, `agent-desk`).
    pub name: String,
    /// SHA-256 of the token, lowercase hex.
    pub sha256: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// A tokens file: `[[token]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// The tokens.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("tokens file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// An entry is invalid.
    #[error("token {name:?}: {message}")]
    Entry {
        /// The entry's name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The tokens a node accepts, by hash.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Principal>,
}

impl Tokens {
    /// Tokens from a file's text (`path` only names it in errors).
    pub fn from_toml(text: &str, path: &str) -> Result<Self, TokensError> {
        let file: TokensFile = toml::from_str(text).map_err(|e| TokensError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_entries(file.tokens)
    }

    /// Tokens from a file.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Tokens from entries, each checked.
    pub fn from_entries(entries: Vec<TokenEntry>) -> Result<Self, TokensError> {
        let mut by_hash = HashMap::new();
        for e in entries {
            let fail = |message: String| TokensError::Entry {
                name: e.name.clone(),
                message,
            };
            let hash = parse_hex32(&e.sha256)
                .ok_or_else(|| fail("sha256 must be 64 lowercase hex digits".into()))?;
            if e.tenant.is_empty() || e.tenant.contains(':') || e.tenant.len() > 64 {
                return Err(fail(format!("invalid tenant {:?}", e.tenant)));
            }
            if e.scopes.is_empty() {
                return Err(fail("no scopes".into()));
            }
            let principal = Principal {
                name: e.name.clone(),
                tenant: e.tenant.clone(),
                scopes: e.scopes.iter().copied().collect(),
            };
            if by_hash.insert(hash, principal).is_some() {
                return Err(fail("the same token appears twice".into()));
            }
        }
        Ok(Self { by_hash })
    }

    /// How many tokens.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are none (then every call is refused).
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The principal of a presented token.
    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        self.by_hash.get(&sha256(token.as_bytes()))
    }

    /// The interceptor of every service: reads `authorization: Bearer <token>`, refuses
    /// the call with UNAUTHENTICATED when it is missing or unknown, and otherwise puts the
    /// caller's [`Principal`] in the request's extensions.
    pub fn interceptor(
        self: std::sync::Arc<Self>,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
        move |mut req: Request<()>| {
            let header = req
                .metadata()
                .get("authorization")
                .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
            let token = header
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("authorization must be: Bearer <token>"))?;
            let principal = self
                .authenticate(token.trim())
                .ok_or_else(|| Status::unauthenticated("unknown token"))?
                .clone();
            req.extensions_mut().insert(principal);
            Ok(req)
        }
    }
}

/// A new random token and the entry that admits it.
pub fn mint(name: &str, tenant: &str, scopes: Vec<Scope>) -> (String, TokenEntry) {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut raw)
        .expect("the system's random source works");
    let token = format!("ct_{}", base64url(&raw));
    let entry = TokenEntry {
        name: name.to_owned(),
        sha256: hex(&sha256(token.as_bytes())),
        tenant: tenant.to_owned(),
        scopes,
    };
    (token, entry)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> (String, String, Tokens) {
        let (reader, e1) = mint("desk", "t1", vec![Scope::CasesRead]);
        let (admin, e2) = mint("ops", "t2", vec![Scope::Admin]);
        (reader, admin, Tokens::from_entries(vec![e1, e2]).unwrap())
    }

    #[test]
    fn minted_tokens_authenticate_as_their_tenant_and_scopes() {
        let (reader, admin, tokens) = tokens();
        assert!(reader.starts_with("ct_") && reader.len() == 46, "{reader}");
        let p = tokens.authenticate(&reader).unwrap();
        assert_eq!((p.name.as_str(), p.tenant.as_str()), ("desk", "t1"));
        assert!(p.has(Scope::CasesRead));
        assert!(!p.has(Scope::CasesHandle));
        assert_eq!(
            p.require(Scope::TwinsRead).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let a = tokens.authenticate(&admin).unwrap();
        assert!(
            Scope::ALL.iter().all(|s| a.has(*s)),
            "admin grants every scope"
        );
        assert!(tokens.authenticate("ct_guess").is_none());
        assert!(tokens.authenticate(&reader[..45]).is_none());
    }

    #[test]
    fn ids_of_another_tenant_are_not_found() {
        let (reader, _, tokens) = tokens();
        let p = tokens.authenticate(&reader).unwrap();
        assert_eq!(p.own("device", "t1:coffee-1").unwrap(), "t1:coffee-1");
        for id in ["t2:coffee-1", "coffee-1", "t1:", "", "t10:x"] {
            let e = p.own("device", id).unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound, "{id}");
        }
    }

    #[test]
    fn the_interceptor_refuses_missing_malformed_and_unknown_tokens() {
        let (reader, _, tokens) = tokens();
        let check = std::sync::Arc::new(tokens).interceptor();
        let with = |value: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("authorization", value.parse().unwrap());
            r
        };
        assert_eq!(
            check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            check(with(&reader)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            check(with("Bearer ct_nope")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let ok = check(with(&format!("Bearer {reader}"))).unwrap();
        assert_eq!(Principal::of(&ok).unwrap().tenant, "t1");
    }

    #[test]
    fn tokens_files_are_checked() {
        let (_, entry) = mint("desk", "t1", vec![Scope::CasesRead, Scope::CasesHandle]);
        let text = toml::to_string(&TokensFile {
            tokens: vec![entry.clone()],
        })
        .unwrap();
        assert!(text.contains("cases:handle"), "{text}");
        assert_eq!(Tokens::from_toml(&text, "t.toml").unwrap().len(), 1);
        let bad = [
            text.replace(&entry.sha256, "abc"),
            text.replace("\"t1\"", "\"t1:x\""),
            text.replace("\"cases:read\", \"cases:handle\"", ""),
            text.replace("cases:read", "cases:everything"),
            format!("{text}\n{text}"),
        ];
        for b in bad {
            assert!(Tokens::from_toml(&b, "t.toml").is_err(), "{b}");
        }
    }
}
