//! Who may name a task's owner on the broker path.
//!
//! Anyone who can publish to Warren's exchange can set any header, so the
//! `warren_owner` header alone proves nothing. A Warren publisher (the API,
//! the relay) signs the owner it names: `x-warren-signature` is an
//! HMAC-SHA256, keyed by `amqp.signing_key` (one secret that the API and
//! every worker share), over the task id, the task type, the owner and the
//! body. A worker believes an owner only when that signature verifies;
//! any other message belongs to `worker.default_owner`.
//!
//! The body is signed too, so a captured message cannot be replayed with
//! other arguments under its owner. Headers that only describe (retries,
//! ETA, time limits) are not: they change no owner's data, and each is
//! bounded by the envelope's own checks.

use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use uuid::Uuid;

/// The header a signed message carries.
pub const SIGNATURE_HEADER: &str = "x-warren-signature";
/// Shorter keys are refused at startup: they can be guessed.
pub const MIN_KEY_LEN: usize = 32;
/// Bumped if what is signed ever changes, so old and new never mix up.
const CONTEXT: &[u8] = b"warren-owner-v1";
/// Reply tokens are a different statement from owner signatures: one can
/// never stand for the other.
const REPLY_CONTEXT: &[u8] = b"warren-reply-v1";

/// Signs and verifies owners with the deployment's key. Cheap to clone.
#[derive(Clone)]
pub struct Signer {
    /// Keyed once; each signature starts from a copy.
    keyed: Hmac<Sha256>,
}

#[derive(Debug, thiserror::Error)]
#[error("amqp.signing_key must be at least {MIN_KEY_LEN} characters")]
pub struct KeyTooShort;

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub fn new(key: &SecretString) -> Result<Self, KeyTooShort> {
        let key = key.expose_secret().as_bytes();
        if key.len() < MIN_KEY_LEN {
            return Err(KeyTooShort);
        }
        // HMAC takes a key of any length: this fails for none.
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| KeyTooShort)?;
        Ok(Self { keyed })
    }

    fn mac(&self, id: Uuid, task: &str, owner: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        // Lengths first, so no two different tuples sign the same bytes.
        for part in [CONTEXT, id.as_bytes(), task.as_bytes(), owner.as_bytes()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.update(body);
        mac
    }

    /// The signature header's value for this owner and body.
    pub fn sign(&self, id: Uuid, task: &str, owner: &str, body: &[u8]) -> String {
        let tag = self.mac(id, task, owner, body).finalize().into_bytes();
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(tag)
    }

    /// Whether `signature` is this key's signature of exactly these
    /// values. Compared in constant time.
    pub fn verify(&self, id: Uuid, task: &str, owner: &str, body: &[u8], signature: &str) -> bool {
        let Ok(tag) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(signature) else {
            return false;
        };
        self.mac(id, task, owner, body).verify_slice(&tag).is_ok()
    }

    fn reply_mac(&self, id: Uuid, task: &str, owner: &str) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        for part in [
            REPLY_CONTEXT,
            id.as_bytes(),
            task.as_bytes(),
            owner.as_bytes(),
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The correlation id of a message Warren hands to a Celery worker
    /// (`runner = "celery"`). Celery's rpc backend sends it back on every
    /// result, so a result is believed only for the task whose message it
    /// answers: a reply naming any other task id does not verify.
    pub fn reply_token(&self, id: Uuid, task: &str, owner: &str) -> String {
        let tag = self.reply_mac(id, task, owner).finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
    }

    /// Whether `token` is [`Signer::reply_token`] of exactly these values,
    /// compared in constant time.
    pub fn verify_reply_token(&self, id: Uuid, task: &str, owner: &str, token: &str) -> bool {
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token) else {
            return false;
        };
        self.reply_mac(id, task, owner).verify_slice(&tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(key: &str) -> Signer {
        Signer::new(&SecretString::from(key.to_owned())).unwrap()
    }

    #[test]
    fn a_signature_verifies_only_for_what_was_signed() {
        let s = signer("0123456789abcdef0123456789abcdef");
        let id = Uuid::now_v7();
        let sig = s.sign(id, "multiply", "billing", b"[[],{},{}]");
        assert!(s.verify(id, "multiply", "billing", b"[[],{},{}]", &sig));
        assert!(!s.verify(id, "multiply", "other", b"[[],{},{}]", &sig));
        assert!(!s.verify(id, "noop", "billing", b"[[],{},{}]", &sig));
        assert!(!s.verify(Uuid::now_v7(), "multiply", "billing", b"[[],{},{}]", &sig));
        assert!(!s.verify(id, "multiply", "billing", b"[[1],{},{}]", &sig));
        assert!(!s.verify(id, "multiply", "billing", b"[[],{},{}]", "garbage!"));
        let other = signer("another key of thirty-two chars!!");
        assert!(!other.verify(id, "multiply", "billing", b"[[],{},{}]", &sig));
    }

    #[test]
    fn a_reply_token_stands_for_one_task_of_one_owner() {
        let s = signer("0123456789abcdef0123456789abcdef");
        let id = Uuid::now_v7();
        let token = s.reply_token(id, "reports.wordcount", "billing");
        assert!(s.verify_reply_token(id, "reports.wordcount", "billing", &token));
        assert!(!s.verify_reply_token(Uuid::now_v7(), "reports.wordcount", "billing", &token));
        assert!(!s.verify_reply_token(id, "reports.wordcount", "other", &token));
        assert!(!s.verify_reply_token(id, "multiply", "billing", &token));
        assert!(!s.verify_reply_token(id, "reports.wordcount", "billing", &id.to_string()));
        // An owner signature is not a reply token, and the other way round.
        let sig = s.sign(id, "reports.wordcount", "billing", b"");
        assert!(!s.verify_reply_token(id, "reports.wordcount", "billing", &sig));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Signer::new(&SecretString::from("short".to_owned())).is_err());
    }

    #[test]
    fn moving_bytes_between_fields_breaks_the_signature() {
        let s = signer("0123456789abcdef0123456789abcdef");
        let id = Uuid::now_v7();
        let sig = s.sign(id, "ab", "c", b"");
        assert!(!s.verify(id, "a", "bc", b"", &sig));
    }
}
