//! Fork identifiers: 128-bit values accepted as UUID or ULID text.
//!
//! Invariant protected: *one namespace per value*. The two text forms of one
//! 128-bit value are the same fork, so identity (`Eq`, `Hash`, `Ord`) is the value
//! alone; the text form a fork was first bootstrapped with is kept beside it only
//! to build the object-store path (`catalog/forks/{text}/id_allocator.json`).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Which text form a fork id was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdForm {
    /// `0190b6f2-7c1e-7a4b-9c3d-5e6f70819203` (lowercase, hyphenated).
    Uuid,
    /// `01J2VF4Z0Y8Q3R5S7T9V1W3X5Z` (26 Crockford base32 characters, uppercase).
    Ulid,
}

/// A fork id: the 128-bit value plus the text form it was written in.
///
/// Equality and hashing use the value only, never the form.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ForkId {
    value: u128,
    form: IdForm,
}

/// Why a fork id's text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed fork id {text:?}: expected a UUID (8-4-4-4-12 hex digits) or a ULID (26 Crockford base32 characters)")]
pub struct ParseForkIdError {
    text: String,
}

impl ForkId {
    /// A new fork id, a UUIDv7 (time-ordered), in UUID form.
    pub fn generate() -> Self {
        ForkId {
            value: Uuid::now_v7().as_u128(),
            form: IdForm::Uuid,
        }
    }

    /// Parse either text form. Surrounding whitespace is not accepted: a fork id in a
    /// script with a stray space is more likely a bug than an intention.
    pub fn parse(text: &str) -> Result<Self, ParseForkIdError> {
        let err = || ParseForkIdError {
            text: text.chars().take(64).collect(),
        };
        if text.len() == 26 && !text.contains('-') {
            // 26 base32 characters hold 130 bits; a first character above 7 would
            // not fit in 128 and must not silently wrap to another fork's value.
            if !matches!(text.as_bytes()[0], b'0'..=b'7') {
                return Err(err());
            }
            let ulid = ulid::Ulid::from_string(text).map_err(|_| err())?;
            return Ok(ForkId {
                value: ulid.0,
                form: IdForm::Ulid,
            });
        }
        // Only the hyphenated 36-character form: braces, URNs and bare hex would each
        // become a second spelling of the same path-visible name.
        if text.len() != 36 {
            return Err(err());
        }
        let uuid = Uuid::try_parse(text).map_err(|_| err())?;
        Ok(ForkId {
            value: uuid.as_u128(),
            form: IdForm::Uuid,
        })
    }

    /// The 128-bit value: the fork's identity.
    pub fn value(&self) -> u128 {
        self.value
    }

    /// The text form this id was written in.
    pub fn form(&self) -> IdForm {
        self.form
    }

    /// The same value written in the other form.
    pub fn with_form(self, form: IdForm) -> Self {
        ForkId { form, ..self }
    }

    /// Canonical text in this id's form (lowercase UUID, uppercase ULID).
    pub fn text(&self) -> String {
        match self.form {
            IdForm::Uuid => Uuid::from_u128(self.value).hyphenated().to_string(),
            IdForm::Ulid => ulid::Ulid(self.value).to_string(),
        }
    }
}

impl PartialEq for ForkId {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}
impl Eq for ForkId {}
impl Hash for ForkId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.value.hash(state)
    }
}
impl PartialOrd for ForkId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ForkId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

impl fmt::Display for ForkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl FromStr for ForkId {
    type Err = ParseForkIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ForkId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_of_one_value_are_one_fork() {
        let u = ForkId::parse("0190b6f2-7c1e-7a4b-9c3d-5e6f70819203").unwrap();
        let l = u.with_form(IdForm::Ulid);
        let l2 = ForkId::parse(&l.text()).unwrap();
        assert_eq!(u, l2);
        assert_eq!(l2.form(), IdForm::Ulid);
        assert_eq!(l2.text().len(), 26);
        assert_eq!(ForkId::parse(&l2.text().to_lowercase()).unwrap(), u);
    }

    #[test]
    fn canonical_text_round_trips() {
        let g = ForkId::generate();
        assert_eq!(ForkId::parse(&g.text()).unwrap(), g);
        assert_eq!(Uuid::from_u128(g.value()).get_version_num(), 7);
    }

    #[test]
    fn garbage_is_rejected_with_the_text() {
        for bad in [
            "",
            "main",
            "../../etc",
            "0190b6f2-7c1e-7a4b-9c3d-5e6f7081920",
            "{0190b6f2-7c1e-7a4b-9c3d-5e6f70819203}",
            "8ZZZZZZZZZZZZZZZZZZZZZZZZZ",
            " 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z",
        ] {
            let e = ForkId::parse(bad).unwrap_err();
            assert!(e.to_string().contains("malformed fork id"), "{e}");
        }
    }
}
