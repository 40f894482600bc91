//! A client's DPoP key (RFC 9449), made once and shared through the store.
//!
//! Tokens are bound to the key that signed the proof of their token request,
//! so every process that sends a client's tokens must sign with the same key:
//! a restarted sidecar, and every replica sharing a Redis store. The key is
//! one record beside the client's token record, sealed like it with the store
//! key: `CLIENT:IDENTITY:dpop-ALG` in the state file, `PREFIX:{CLIENT:IDENTITY}:dpop-ALG`
//! in Redis (the alg in lower case; another alg is another key). It is written
//! once, at generation 1, by the fenced write every record uses: of two
//! processes that find no key and both make one, one write lands and the
//! other is refused as stale, and its process reads and uses the stored key.
//! The memory store keeps it in the process, for as long as the store lives.

use serde::{Deserialize, Serialize};

use super::seal::{self, Sealer};
use super::{Backend, ClientStore, Envelope, Read, Saved, StoreError, FORMAT_2};
use crate::secret::Secret;

/// The generation of a key record: it is written once.
const KEY_GENERATION: u64 = 1;

/// The sealed content of a key record.
#[derive(Serialize, Deserialize)]
struct KeyPlain {
    /// The PKCS#8 document, standard base64.
    pkcs8: String,
}

impl ClientStore {
    /// The client's DPoP key for `alg` (`ES256`, `EdDSA`) as a PKCS#8 document
    /// in base64: the stored one, else `make()`'s, stored unless another
    /// process stored one first, whose key is then returned instead.
    pub async fn dpop_key(
        &self,
        alg: &str,
        make: impl FnOnce() -> Result<Secret, String>,
    ) -> Result<Secret, StoreError> {
        let what = format!("dpop-{}", alg.to_ascii_lowercase());
        let name = format!("{}:{what}", self.key);
        let Some(sealer) = &self.store.sealer else {
            let mut keys = self
                .store
                .dpop_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(key) = keys.get(&name) {
                return Ok(key.clone());
            }
            let made = make().map_err(StoreError::Io)?;
            keys.insert(name, made.clone());
            return Ok(made);
        };
        if let Some(found) = self.read_key(&name, &what, sealer).await? {
            return Ok(found);
        }
        let made = make().map_err(StoreError::Io)?;
        let plain = serde_json::to_vec(&KeyPlain {
            pkcs8: made.expose().to_owned(),
        })
        .map_err(|e| StoreError::Io(format!("cannot encode the DPoP key: {e}")))?;
        let aad = seal::associated_data(&self.store.scope, &name, KEY_GENERATION);
        let envelope = Envelope {
            generation: KEY_GENERATION,
            binding: self.identity.binding.clone(),
            // No account: the record is no token chain of the client's account.
            account: String::new(),
            data: format!("{FORMAT_2}{}", sealer.seal(&aad, &plain)),
        };
        let saved = match &*self.store.backend {
            Backend::Memory => Ok(Saved::Written),
            Backend::File(f) => f.save(&name, envelope, None).await,
            // Acknowledged by replicas: a failover must not lose a key that
            // tokens are already bound to.
            Backend::Redis(r) => r.save_at(&self.key, &what, &envelope, None, true).await,
        }?;
        match saved {
            Saved::Written => Ok(made),
            Saved::Stale { .. } => self.read_key(&name, &what, sealer).await?.ok_or_else(|| {
                StoreError::Io(format!(
                    "the DPoP key record {name} was stored by another process, then could not be read"
                ))
            }),
        }
    }

    /// The key stored as `name` (`what` beside the token record in Redis);
    /// `Err` when there is a record that does not open: it may be the key
    /// other processes sign with, so it is never replaced here.
    async fn read_key(
        &self,
        name: &str,
        what: &str,
        sealer: &Sealer,
    ) -> Result<Option<Secret>, StoreError> {
        let read: Option<Read> = match &*self.store.backend {
            Backend::Memory => None,
            Backend::File(f) => f.load(name).await?,
            Backend::Redis(r) => r.load_at(&self.key, what).await?,
        };
        let Some(read) = read else { return Ok(None) };
        let refused = |problem: &str| {
            StoreError::Io(format!(
                "the stored DPoP key {name} cannot be used: {problem}; restore the store key that sealed it, or delete the record to make a new key (tokens bound to the old one are then refused)"
            ))
        };
        let envelope = read.envelope.map_err(|p| refused(&p))?;
        if envelope.binding != self.identity.binding || envelope.generation != KEY_GENERATION {
            return Err(refused("it was written for another record"));
        }
        let sealed = envelope
            .data
            .strip_prefix(FORMAT_2)
            .ok_or_else(|| refused("its data is not sealed data"))?;
        let aad = seal::associated_data(&self.store.scope, name, KEY_GENERATION);
        let opened = sealer.open(&aad, sealed).map_err(|_| {
            refused("it does not open with the configured store key or any previous key")
        })?;
        let plain: KeyPlain = serde_json::from_slice(&opened.plain)
            .map_err(|_| refused("it opens, but holds no key this version reads"))?;
        Ok(Some(Secret::new(plain.pkcs8)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::{from_str, MapEnv};
    use crate::store::Store;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn config(store: &str) -> crate::config::Config {
        let text = format!(
            "{store}\n[clients.payments]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\
             [clients.payments.token]\nurl = \"https://auth.example/token\"\nclient_id = \"a\"\nclient_secret = \"s\"\n\
             [clients.payments.dpop]\n"
        );
        match from_str(&text, None, &MapEnv::new()) {
            Ok(c) => c,
            Err(e) => panic!("config should be valid, got: {e}"),
        }
    }

    fn file_store(path: &std::path::Path) -> crate::config::Config {
        config(&format!(
            "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{KEY}\"",
            path.display()
        ))
    }

    fn temp_path() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tokenproxy-dpop-key-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("tokens.json")
    }

    #[tokio::test]
    async fn a_key_is_made_once_and_read_back_by_the_next_process() {
        let path = temp_path();
        let c = file_store(&path);
        let made = AtomicUsize::new(0);
        let make = |value: &'static str| {
            let made = &made;
            move || {
                made.fetch_add(1, Ordering::SeqCst);
                Ok(Secret::new(value))
            }
        };
        let first = Store::open(&c.store).expect("store").client(&c.clients[0]);
        let key = first
            .dpop_key("ES256", make("key-one"))
            .await
            .expect("made");
        assert_eq!(key.expose(), "key-one");
        // A restart: a new store on the same file finds the key.
        let second = Store::open(&c.store).expect("store").client(&c.clients[0]);
        let again = second
            .dpop_key("ES256", make("key-two"))
            .await
            .expect("read");
        assert_eq!(again.expose(), "key-one", "the stored key, not a new one");
        assert_eq!(
            made.load(Ordering::SeqCst),
            1,
            "the next process reads the key and makes none"
        );
        let text = std::fs::read_to_string(&path).expect("state file");
        assert!(!text.contains("key-one"), "the key is sealed: {text}");
        assert!(text.contains(":dpop-es256"), "{text}");
        let other_alg = second
            .dpop_key("EdDSA", make("ed-key"))
            .await
            .expect("made");
        assert_eq!(other_alg.expose(), "ed-key", "another alg is another key");
        std::fs::remove_dir_all(path.parent().expect("dir")).expect("cleanup");
    }

    #[tokio::test]
    async fn a_key_stored_meanwhile_by_another_process_wins() {
        let path = temp_path();
        let c = file_store(&path);
        let ours = Store::open(&c.store).expect("store").client(&c.clients[0]);
        let theirs = Store::open(&c.store).expect("store").client(&c.clients[0]);
        // Theirs is stored between our read (nothing) and our write.
        let key = ours
            .dpop_key("ES256", || {
                let stored =
                    block_on_elsewhere(theirs.dpop_key("ES256", || Ok(Secret::new("theirs"))));
                assert_eq!(
                    stored.map(|s| s.expose().to_owned()).ok().as_deref(),
                    Some("theirs")
                );
                Ok(Secret::new("ours"))
            })
            .await
            .expect("a key");
        assert_eq!(
            key.expose(),
            "theirs",
            "the stored key is used, ours dropped"
        );
        std::fs::remove_dir_all(path.parent().expect("dir")).expect("cleanup");
    }

    /// Runs `f` to completion on a runtime of its own (the test's is busy
    /// inside the call being tested).
    fn block_on_elsewhere<F: std::future::Future + Send>(f: F) -> F::Output
    where
        F::Output: Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime")
                    .block_on(f)
            })
            .join()
            .expect("thread")
        })
    }

    #[tokio::test]
    async fn a_key_sealed_with_another_store_key_is_an_error_never_replaced() {
        let path = temp_path();
        let c = file_store(&path);
        let first = Store::open(&c.store).expect("store").client(&c.clients[0]);
        first
            .dpop_key("ES256", || Ok(Secret::new("sealed-key")))
            .await
            .expect("made");
        let other_key = "AQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let text = std::fs::read_to_string(&path).expect("file");
        let other = config(&format!(
            "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{other_key}\"",
            path.display()
        ));
        let stranger = Store::open(&other.store)
            .expect("store")
            .client(&other.clients[0]);
        let err = stranger
            .dpop_key("ES256", || Ok(Secret::new("new-key")))
            .await
            .expect_err("not opened");
        let shown = err.to_string();
        assert!(
            shown.contains("does not open") && shown.contains("delete the record"),
            "{shown}"
        );
        assert!(
            !shown.contains("sealed-key"),
            "no key in the error: {shown}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("file"),
            text,
            "left as it is"
        );
        std::fs::remove_dir_all(path.parent().expect("dir")).expect("cleanup");
    }

    #[tokio::test]
    async fn the_memory_store_keeps_the_key_for_the_store_s_lifetime() {
        let c = config("");
        let store = Store::open(&c.store).expect("memory");
        let a = store.client(&c.clients[0]);
        let key = a
            .dpop_key("ES256", || Ok(Secret::new("m1")))
            .await
            .expect("made");
        let reloaded = store.client(&c.clients[0]);
        let again = reloaded
            .dpop_key("ES256", || Ok(Secret::new("m2")))
            .await
            .expect("kept");
        assert_eq!((key.expose(), again.expose()), ("m1", "m1"));
        let fresh = Store::open(&c.store).expect("memory").client(&c.clients[0]);
        let other = fresh
            .dpop_key("ES256", || Ok(Secret::new("m3")))
            .await
            .expect("made");
        assert_eq!(other.expose(), "m3", "a new process has a new key");
        let failed = Store::open(&c.store)
            .expect("memory")
            .client(&c.clients[0])
            .dpop_key("ES256", || Err("no randomness".to_owned()))
            .await;
        assert!(matches!(failed, Err(StoreError::Io(m)) if m == "no randomness"));
    }
}
