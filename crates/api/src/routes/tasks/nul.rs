//! NUL characters in a request body, found before the body becomes a JSON
//! value, and in the free-text query parameters that reach PostgreSQL.
//! PostgreSQL's jsonb cannot store `\u0000`; a body of 16 MiB of them is
//! a million tiny strings, and as a `serde_json::Value` well over a
//! hundred megabytes just to say "no". The walk here holds only the path
//! it is at and the first [`MAX_REPORTED_ERRORS`] findings.

use super::MAX_REPORTED_ERRORS;
use crate::error::ApiError;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;
use warren_tasks::FieldError;

/// Where the NULs in `body` are (`x[3]`, `tasks[0].name`); empty if none,
/// or if the body is not JSON (the caller's parse says so).
pub(super) fn scan(body: &[u8]) -> Vec<FieldError> {
    if !may_hold_nul(body) {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let walk = Walk {
        path: String::new(),
        found: &mut found,
    };
    match walk.deserialize(&mut de) {
        Ok(()) => found,
        Err(_) => Vec::new(),
    }
}

/// A free-text query parameter that reaches PostgreSQL as text, which
/// cannot hold NUL: refused by name (`?q=%00` was a 500 from the
/// database, found by Schemathesis).
pub(crate) fn text_parameter(name: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::invalid_parameter(
            name,
            format!("{name} must not contain NUL (%00) characters"),
        ));
    }
    Ok(())
}

/// JSON spells NUL only as the escape `\u0000`: no escape, no walk.
fn may_hold_nul(body: &[u8]) -> bool {
    body.windows(6).any(|w| w == br"\u0000")
}

struct Walk<'a> {
    path: String,
    found: &'a mut Vec<FieldError>,
}

impl Walk<'_> {
    fn full(&self) -> bool {
        self.found.len() >= MAX_REPORTED_ERRORS
    }

    fn report(&mut self, message: &'static str) {
        if !self.full() {
            let field = warren_shared::codes::bounded(self.path.as_str());
            self.found
                .push(FieldError::new(field, "invalid_value", message));
        }
    }

    fn child(&mut self, part: &str) -> Walk<'_> {
        Walk {
            path: format!("{}{part}", self.path),
            found: &mut *self.found,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(mut self, v: &str) -> Result<(), E> {
        if v.contains('\0') {
            self.report("text must not contain NUL (\\u0000) characters");
        }
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            // Once enough is found, the rest is only read past.
            let more = if self.full() {
                seq.next_element::<IgnoredAny>()?.is_some()
            } else {
                seq.next_element_seed(self.child(&format!("[{i}]")))?
                    .is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.full() {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let part = if self.path.is_empty() {
                key.to_string()
            } else {
                format!(".{key}")
            };
            let mut child = self.child(&part);
            if key.contains('\0') {
                child.report("keys must not contain NUL characters");
            }
            map.next_value_seed(child)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: &str) -> Vec<String> {
        scan(body.as_bytes()).into_iter().map(|f| f.field).collect()
    }

    #[test]
    fn finds_nuls_with_their_paths() {
        assert_eq!(
            fields(r#"{"x": ["a", "\u0000"], "y": {"z": "b\u0000"}}"#),
            ["x[1]", "y.z"]
        );
        assert_eq!(
            fields(r#"{"tasks": [{"n": 1}, {"n": "\u0000"}]}"#),
            ["tasks[1].n"]
        );
        assert!(
            fields(r#"{"x": "a\\u0000"}"#).is_empty(),
            "an escaped backslash, not a NUL"
        );
        assert!(
            fields(r#"{"x": "\u0000"#).is_empty(),
            "not JSON: the parse reports it"
        );
    }

    #[test]
    fn stops_at_the_reporting_limit() {
        let body = format!(
            "[{}]",
            vec![r#""\u0000""#; MAX_REPORTED_ERRORS + 50].join(",")
        );
        assert_eq!(scan(body.as_bytes()).len(), MAX_REPORTED_ERRORS);
    }
}
