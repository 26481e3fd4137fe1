//! Customers' personal data, kept so that it can be erased: crypto-shredding.
//!
//! The store's logs are append-only (a case's events, notes included, stay in
//! `cases/<tenant>` for good) and an LSM store keeps overwritten values in its journal
//! and tables until compaction. So personal data is never written in clear: every
//! personal field is sealed (AES-256-GCM, the customer id as associated data) with a
//! **data key of its own customer**, kept in one deletable record. Erasing the customer
//! deletes that key; every sealed byte anywhere — old snapshot versions, log entries,
//! journal segments — is then unreadable, and readers show such a field as
//! [`ERASED`].
//!
//! # Records (twin-snapshot namespace of the store)
//! - `pii-key/<tenant:customer>` — the customer's 256-bit data key.
//! - `pii/<tenant:customer>` — the [`PersonalRecord`] (name, CRM reference, contact
//!   points, locale, consent history), sealed.
//! - `customer-index/<tenant>` — the tenant's customers (ids and times, nothing personal),
//!   so they can be listed without a scan of the store.
//! - `erasure/<tenant:customer>` (idempotency record) — the erasure report; its presence
//!   is the tombstone that stops personal data being written for the customer again.

use crate::{Error, Result};
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caretwin_actors::model::ConsentScope;
use caretwin_actors::store::{IdempotencyMode, Key, Op, Store, WriteBatch};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What a reader shows for a sealed field whose key was destroyed.
pub const ERASED: &str = "[erased]";
/// The prefix of a sealed text.
const SEALED: &str = "ct-sealed:v1:";
/// Consent changes kept per customer.
const MAX_CONSENT_HISTORY: usize = 256;
/// Compare-and-set attempts before giving up on a record under contention.
const CAS_ATTEMPTS: usize = 16;

/// An address at which the customer can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The channel (`email`, `sms`, `push`, `voice`, `in_app`).
    pub channel: String,
    /// The address on that channel.
    pub address: String,
    /// Whether the customer confirmed they own it.
    #[serde(default)]
    pub verified: bool,
}

/// One change of one consent scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentChange {
    /// When, Unix ms.
    pub at_ms: u64,
    /// The scope.
    pub scope: ConsentScope,
    /// Granted (true) or withdrawn.
    pub granted: bool,
    /// Who changed it (`customer`, `agent`, `import`).
    pub source: String,
    /// Reference to the proof of the customer's instruction.
    #[serde(default)]
    pub evidence: String,
}

/// Everything personal about a customer that the twins do not need to decide: it lives
/// only here, sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonalRecord {
    /// Name to address the customer by.
    #[serde(default)]
    pub display_name: String,
    /// The customer's id in the tenant's CRM.
    #[serde(default)]
    pub external_ref: String,
    /// Addresses on each channel.
    #[serde(default)]
    pub contact_points: Vec<Contact>,
    /// Language and region for messages (BCP 47).
    #[serde(default)]
    pub locale: String,
    /// Consent changes, oldest first (bounded).
    #[serde(default)]
    pub consent_history: Vec<ConsentChange>,
}

impl PersonalRecord {
    /// Records a consent change, keeping the newest 256.
    pub fn record_consent(&mut self, change: ConsentChange) {
        self.consent_history.push(change);
        let over = self
            .consent_history
            .len()
            .saturating_sub(MAX_CONSENT_HISTORY);
        self.consent_history.drain(..over);
    }
}

/// A customer in the tenant's index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// When the customer was created, Unix ms.
    pub created_at_ms: u64,
    /// When last changed through the node (profile, preferences, consent), Unix ms.
    pub updated_at_ms: u64,
}

/// A tenant's customers, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerIndex {
    /// Customer id → times.
    pub customers: BTreeMap<String, IndexEntry>,
}

/// What [`Vault::erase`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shredded {
    /// The personal record was deleted.
    pub personal_record: bool,
    /// The data key was deleted (every sealed field is unreadable from now on).
    pub data_key: bool,
    /// The customer was taken off the tenant's index.
    pub indexed: bool,
}

fn key_key(customer: &str) -> Key {
    Key::new(format!("pii-key/{customer}"))
}

fn record_key(customer: &str) -> Key {
    Key::new(format!("pii/{customer}"))
}

fn index_key(tenant: &str) -> Key {
    Key::new(format!("customer-index/{tenant}"))
}

fn erasure_key(customer: &str) -> Key {
    Key::new(format!("erasure/{customer}"))
}

fn tenant_of(customer: &str) -> &str {
    caretwin_actors::mail::tenant_of(customer)
}

fn crypto(what: &str, customer: &str) -> Error {
    Error::Config(format!("cannot {what} personal data of {customer}"))
}

/// Whether `text` is a sealed field.
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(SEALED)
}

/// The customers' personal data, their data keys, the tenants' customer indexes and the
/// erasure tombstones. Cheap to share behind an `Arc`.
pub struct Vault {
    store: Arc<dyn Store>,
    /// Data keys read or made so far, by customer (evicted on erasure).
    keys: std::sync::Mutex<HashMap<String, Arc<RandomizedNonceKey>>>,
    /// Serialises key creation with erasure, so no key is made for a customer while (or
    /// after) they are erased.
    writes: tokio::sync::Mutex<()>,
}

impl Vault {
    /// The vault over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            keys: Default::default(),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// The erasure report of `customer`, if they were erased.
    pub async fn erasure(&self, customer: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.store.idempotency(&erasure_key(customer)).await?)
    }

    /// Whether `customer` was erased.
    pub async fn is_erased(&self, customer: &str) -> Result<bool> {
        Ok(self.erasure(customer).await?.is_some())
    }

    async fn stored_key(&self, customer: &str) -> Result<Option<Arc<RandomizedNonceKey>>> {
        if let Some(k) = self.keys.lock().expect("keys lock").get(customer) {
            return Ok(Some(k.clone()));
        }
        let Some(raw) = self.store.snapshot(&key_key(customer)).await? else {
            return Ok(None);
        };
        let key = Arc::new(
            RandomizedNonceKey::new(&AES_256_GCM, &raw.value)
                .map_err(|_| crypto("load the key for", customer))?,
        );
        self.keys
            .lock()
            .expect("keys lock")
            .insert(customer.to_owned(), key.clone());
        Ok(Some(key))
    }

    /// The customer's data key, made on first use. `None` once they are erased.
    async fn key_for_writing(&self, customer: &str) -> Result<Option<Arc<RandomizedNonceKey>>> {
        if let Some(k) = self.stored_key(customer).await? {
            return Ok(Some(k));
        }
        let _one = self.writes.lock().await;
        if self.is_erased(customer).await? {
            return Ok(None);
        }
        if let Some(k) = self.stored_key(customer).await? {
            return Ok(Some(k));
        }
        use aws_lc_rs::rand::SecureRandom as _;
        let mut raw = [0u8; 32];
        aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| crypto("make a key for", customer))?;
        let put = Op::PutSnapshot {
            key: key_key(customer),
            expected_version: 0,
            value: raw.to_vec(),
        };
        self.store.commit(WriteBatch::new().with(put)).await?;
        tracing::info!(customer, "data key made");
        self.stored_key(customer).await
    }

    /// Seals `text` with `customer`'s key; `None` when the customer is erased (nothing
    /// personal may be written for them any more).
    pub async fn seal(&self, customer: &str, text: &str) -> Result<Option<String>> {
        let Some(key) = self.key_for_writing(customer).await? else {
            return Ok(None);
        };
        let mut buf = text.as_bytes().to_vec();
        let nonce = key
            .seal_in_place_append_tag(Aad::from(customer.as_bytes()), &mut buf)
            .map_err(|_| crypto("seal", customer))?;
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&buf);
        Ok(Some(format!("{SEALED}{}", URL_SAFE_NO_PAD.encode(out))))
    }

    /// The clear text of a field: `text` itself when it is not sealed, [`ERASED`] when
    /// `customer`'s key is gone (or the field is not theirs).
    pub async fn reveal(&self, customer: &str, text: &str) -> Result<String> {
        let Some(b64) = text.strip_prefix(SEALED) else {
            return Ok(text.to_owned());
        };
        let Some(key) = self.stored_key(customer).await? else {
            return Ok(ERASED.to_owned());
        };
        Ok(open(&key, customer, b64).unwrap_or_else(|| ERASED.to_owned()))
    }

    /// The customer's personal record (`None` if none was ever written, or erased).
    pub async fn personal(&self, customer: &str) -> Result<Option<PersonalRecord>> {
        Ok(self.personal_versioned(customer).await?.map(|(_, r)| r))
    }

    async fn personal_versioned(&self, customer: &str) -> Result<Option<(u64, PersonalRecord)>> {
        let Some(stored) = self.store.snapshot(&record_key(customer)).await? else {
            return Ok(None);
        };
        let text = String::from_utf8(stored.value).map_err(|_| crypto("read", customer))?;
        let clear = self.reveal(customer, &text).await?;
        if clear == ERASED {
            return Ok(None);
        }
        let record = serde_json::from_str(&clear).map_err(|_| crypto("decode", customer))?;
        Ok(Some((stored.version, record)))
    }

    /// Changes the customer's personal record with `f` (from an empty one if none),
    /// sealed, by compare-and-set. `false` when the customer is erased.
    pub async fn update_personal(
        &self,
        customer: &str,
        f: impl Fn(&mut PersonalRecord),
    ) -> Result<bool> {
        for _ in 0..CAS_ATTEMPTS {
            let (version, mut record) =
                self.personal_versioned(customer).await?.unwrap_or_default();
            f(&mut record);
            let json = serde_json::to_string(&record).expect("plain data always serialises");
            let Some(sealed) = self.seal(customer, &json).await? else {
                return Ok(false);
            };
            let put = Op::PutSnapshot {
                key: record_key(customer),
                expected_version: version,
                value: sealed.into_bytes(),
            };
            match self.store.commit(WriteBatch::new().with(put)).await {
                Ok(_) => return Ok(true),
                Err(caretwin_actors::Error::VersionConflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Config(format!(
            "personal record of {customer} is under contention"
        )))
    }

    /// The tenant's customer index.
    pub async fn index(&self, tenant: &str) -> Result<CustomerIndex> {
        Ok(self.index_versioned(tenant).await?.1)
    }

    async fn index_versioned(&self, tenant: &str) -> Result<(u64, CustomerIndex)> {
        match self.store.snapshot(&index_key(tenant)).await? {
            None => Ok((0, CustomerIndex::default())),
            Some(v) => Ok((
                v.version,
                serde_json::from_slice(&v.value)
                    .map_err(|e| Error::Config(format!("customer index of {tenant}: {e}")))?,
            )),
        }
    }

    /// Changes the tenant's index with `f` (which says whether it changed anything), by
    /// compare-and-set.
    async fn update_index(
        &self,
        tenant: &str,
        f: impl Fn(&mut CustomerIndex) -> bool,
    ) -> Result<bool> {
        for _ in 0..CAS_ATTEMPTS {
            let (version, mut index) = self.index_versioned(tenant).await?;
            if !f(&mut index) {
                return Ok(false);
            }
            let op = Op::PutSnapshot {
                key: index_key(tenant),
                expected_version: version,
                value: serde_json::to_vec(&index).expect("plain data always serialises"),
            };
            match self.store.commit(WriteBatch::new().with(op)).await {
                Ok(_) => return Ok(true),
                Err(caretwin_actors::Error::VersionConflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Config(format!(
            "customer index of {tenant} is under contention"
        )))
    }

    /// Adds `customer` to their tenant's index (if not there yet); `false` when they are
    /// erased (then they are never added again) or already indexed.
    pub async fn index_customer(&self, customer: &str, now_ms: u64) -> Result<bool> {
        if self.is_erased(customer).await? {
            return Ok(false);
        }
        self.update_index(tenant_of(customer), |ix| {
            if ix.customers.contains_key(customer) {
                return false;
            }
            ix.customers.insert(
                customer.to_owned(),
                IndexEntry {
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                },
            );
            true
        })
        .await
    }

    /// Marks an indexed customer as changed at `now_ms`.
    pub async fn touch(&self, customer: &str, now_ms: u64) -> Result<()> {
        self.update_index(tenant_of(customer), |ix| {
            match ix.customers.get_mut(customer) {
                Some(e) if e.updated_at_ms < now_ms => {
                    e.updated_at_ms = now_ms;
                    true
                }
                _ => false,
            }
        })
        .await
        .map(drop)
    }

    /// Erases `customer`'s personal data: deletes the personal record and the data key
    /// and writes the tombstone `report`, in one atomic batch, then takes them off the
    /// index. Idempotent: a second call finds nothing and keeps the first report.
    pub async fn erase(&self, customer: &str, report: Vec<u8>) -> Result<Shredded> {
        let _one = self.writes.lock().await;
        let mut done = Shredded::default();
        let mut batch = WriteBatch::new();
        if let Some(r) = self.store.snapshot(&record_key(customer)).await? {
            batch.push(Op::DeleteSnapshot {
                key: record_key(customer),
                expected_version: r.version,
            });
            done.personal_record = true;
        }
        if let Some(k) = self.store.snapshot(&key_key(customer)).await? {
            batch.push(Op::DeleteSnapshot {
                key: key_key(customer),
                expected_version: k.version,
            });
            done.data_key = true;
        }
        batch.push(Op::PutIdempotency {
            key: erasure_key(customer),
            value: report,
            mode: IdempotencyMode::CreateOnly,
        });
        match self.store.commit(batch).await {
            Ok(_) => {}
            // Erased before: nothing of theirs was left to delete.
            Err(caretwin_actors::Error::IdempotencyExists { .. }) => {
                return Ok(Shredded::default());
            }
            Err(e) => return Err(e.into()),
        }
        self.keys.lock().expect("keys lock").remove(customer);
        done.indexed = self
            .update_index(tenant_of(customer), |ix| {
                ix.customers.remove(customer).is_some()
            })
            .await?;
        tracing::info!(customer, "personal data shredded");
        Ok(done)
    }
}

fn open(key: &RandomizedNonceKey, customer: &str, b64: &str) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(b64).ok()?;
    if raw.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = sealed.to_vec();
    let clear = key
        .open_in_place(nonce, Aad::from(customer.as_bytes()), &mut buf)
        .ok()?;
    String::from_utf8(clear.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedConfig, EmbeddedStore};

    fn vault(dir: &tempfile::TempDir) -> Vault {
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path().join("db"))).unwrap());
        Vault::new(store)
    }

    #[tokio::test]
    async fn sealed_fields_read_back_until_the_key_is_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(&dir);
        let sealed = v.seal("t1:ann", "Ann Zyxwell").await.unwrap().unwrap();
        assert!(
            is_sealed(&sealed) && !sealed.contains("Zyxwell"),
            "{sealed}"
        );
        assert_eq!(v.reveal("t1:ann", &sealed).await.unwrap(), "Ann Zyxwell");
        // Another customer's key cannot open it, and plain text passes through.
        v.seal("t1:bob", "x").await.unwrap();
        assert_eq!(v.reveal("t1:bob", &sealed).await.unwrap(), ERASED);
        assert_eq!(v.reveal("t1:ann", "plain").await.unwrap(), "plain");

        assert!(
            v.update_personal("t1:ann", |r| r.display_name = "Ann".into())
                .await
                .unwrap()
        );
        assert!(v.index_customer("t1:ann", 5).await.unwrap());
        assert!(!v.index_customer("t1:ann", 6).await.unwrap(), "once");
        let done = v.erase("t1:ann", b"report".to_vec()).await.unwrap();
        assert_eq!(
            done,
            Shredded {
                personal_record: true,
                data_key: true,
                indexed: true
            }
        );
        assert_eq!(v.reveal("t1:ann", &sealed).await.unwrap(), ERASED);
        assert_eq!(v.personal("t1:ann").await.unwrap(), None);
        assert!(v.index("t1").await.unwrap().customers.is_empty());
        // Erased for good: nothing is sealed, recorded or indexed for them again, and the
        // first report stays.
        assert_eq!(v.seal("t1:ann", "again").await.unwrap(), None);
        assert!(!v.update_personal("t1:ann", |_| {}).await.unwrap());
        assert!(!v.index_customer("t1:ann", 7).await.unwrap());
        let again = v.erase("t1:ann", b"second".to_vec()).await.unwrap();
        assert_eq!(again, Shredded::default());
        assert_eq!(
            v.erasure("t1:ann").await.unwrap().as_deref(),
            Some(&b"report"[..])
        );
    }
}
