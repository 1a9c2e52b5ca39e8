//! `beneficiaries.create` and `beneficiaries.import`: adding payees
//! (name, IBAN, email, country), one at a time or by the thousand.
//!
//! One validation, [`Beneficiary::problems`], serves both: submitted alone,
//! a bad beneficiary is a 422 before anything is queued; inside an import
//! it becomes that item's error, with the same code and message, while the
//! valid ones are created.

use crate::{FieldError, Input, ItemOutcome, Task, TaskContext, TaskError, ValidationErrors};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

/// Items recorded (and progress reported) per round trip.
const CHUNK: usize = 500;
/// Largest import accepted in one task; split bigger files.
pub const MAX_IMPORT: usize = 100_000;

/// A payee. `beneficiaries.create` refuses a bad field with a 422; inside
/// `beneficiaries.import` a bad field is that item's error.
// Its schema gives the shape only, for the import's sake: the rules are
// in `problems`, which the two tasks apply at different times.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Beneficiary {
    /// 1 to 200 characters, not all spaces.
    pub name: String,
    /// Spaces and lower case allowed; the checksum is checked.
    pub iban: String,
    /// name@domain.tld
    pub email: String,
    /// ISO 3166-1 alpha-2, e.g. `DE`.
    pub country: String,
}

impl Beneficiary {
    /// Everything wrong with this beneficiary, fields named relative to it.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            out.push(FieldError::new(
                "name",
                "invalid_name",
                "must be 1 to 200 characters",
            ));
        }
        if let Err((code, message)) = check_iban(&self.iban) {
            out.push(FieldError::new("iban", code, message));
        }
        if !is_email(&self.email) {
            out.push(FieldError::new(
                "email",
                "invalid_email",
                "is not an email address (name@domain.tld)",
            ));
        }
        if !(self.country.len() == 2 && self.country.bytes().all(|b| b.is_ascii_uppercase())) {
            out.push(FieldError::new(
                "country",
                "invalid_country",
                "must be an ISO 3166-1 alpha-2 code in capitals, e.g. DE",
            ));
        }
        out
    }

    /// The IBAN as stored: no spaces, capitals.
    pub fn normalized_iban(&self) -> String {
        normalize_iban(&self.iban)
    }
}

fn normalize_iban(iban: &str) -> String {
    iban.chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// IBAN lengths by country (ISO 13616 registry, the common ones); other
/// countries are held to the general 15–34.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("CH", 21),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("EE", 20),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NL", 18),
    ("NO", 15),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("XK", 20),
];

/// ISO 13616: two letters, two check digits, up to 30 alphanumerics; the
/// rearranged number modulo 97 must be 1.
fn check_iban(raw: &str) -> Result<(), (&'static str, String)> {
    let iban = normalize_iban(raw);
    let bytes = iban.as_bytes();
    if !(15..=34).contains(&bytes.len())
        || !bytes[..2].iter().all(u8::is_ascii_uppercase)
        || !bytes[2..4].iter().all(u8::is_ascii_digit)
        || !bytes.iter().all(u8::is_ascii_alphanumeric)
    {
        return Err((
            "invalid_iban",
            "is not an IBAN (country code, check digits, account number)".into(),
        ));
    }
    if let Some((country, len)) = IBAN_LENGTHS
        .iter()
        .find(|(c, _)| c.as_bytes() == &bytes[..2])
        && bytes.len() != *len
    {
        return Err((
            "invalid_iban",
            format!(
                "a {country} IBAN has {len} characters, this one {}",
                bytes.len()
            ),
        ));
    }
    let mut remainder: u32 = 0;
    for &b in bytes[4..].iter().chain(&bytes[..4]) {
        let value = if b.is_ascii_digit() {
            u32::from(b - b'0')
        } else {
            u32::from(b - b'A') + 10
        };
        remainder = if value < 10 {
            (remainder * 10 + value) % 97
        } else {
            (remainder * 100 + value) % 97
        };
    }
    if remainder != 1 {
        return Err((
            "invalid_iban",
            "check digits do not match: a typo in the IBAN".into(),
        ));
    }
    Ok(())
}

/// The shape of an address, not its existence: one `@`, a dotted domain,
/// no spaces, RFC 5321 lengths.
fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    let plain = |p: &str| !p.is_empty() && !p.chars().any(|c| c.is_whitespace() || c == '@');
    s.len() <= 254
        && local.len() <= 64
        && plain(local)
        && plain(domain)
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
}

/// What creating a beneficiary yields.
#[derive(Debug, Serialize)]
pub struct Created {
    pub beneficiary_id: Uuid,
    pub iban: String,
}

fn create(b: &Beneficiary) -> Created {
    Created {
        beneficiary_id: Uuid::now_v7(),
        iban: b.normalized_iban(),
    }
}

/// `beneficiaries.create`: one beneficiary, validated synchronously.
pub struct CreateBeneficiary;

impl Input for Beneficiary {
    fn validate(&self) -> Result<(), ValidationErrors> {
        ValidationErrors::check(self.problems())
    }
}

impl Task for CreateBeneficiary {
    const NAME: &'static str = "beneficiaries.create";
    type Input = Beneficiary;
    type Output = Created;

    async fn run(&self, input: Beneficiary, _: TaskContext) -> Result<Created, TaskError> {
        Ok(create(&input))
    }
}

/// `beneficiaries.import`: many beneficiaries; each valid one is created,
/// each invalid one becomes an item error.
pub struct ImportBeneficiaries;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportInput {
    #[schemars(length(min = 1, max = MAX_IMPORT))]
    pub beneficiaries: Vec<Beneficiary>,
}

impl Input for ImportInput {
    /// Only the shape is checked at submission (serde did that); bad items
    /// are the import's business, reported per item.
    fn validate(&self) -> Result<(), ValidationErrors> {
        let n = self.beneficiaries.len();
        if n == 0 || n > MAX_IMPORT {
            return Err(ValidationErrors::single(
                "beneficiaries",
                "invalid_length",
                format!("must hold 1 to {MAX_IMPORT} beneficiaries, got {n}"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct ImportSummary {
    pub total: usize,
    pub created: usize,
    pub failed: usize,
}

impl Task for ImportBeneficiaries {
    const NAME: &'static str = "beneficiaries.import";
    type Input = ImportInput;
    type Output = ImportSummary;

    async fn run(&self, input: ImportInput, ctx: TaskContext) -> Result<ImportSummary, TaskError> {
        let total = input.beneficiaries.len();
        let (mut created, mut failed) = (0, 0);
        for (chunk_no, chunk) in input.beneficiaries.chunks(CHUNK).enumerate() {
            if ctx.is_cancelled() {
                return Err(TaskError::Cancelled);
            }
            let first = chunk_no * CHUNK;
            let outcomes: Vec<ItemOutcome> = chunk
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let index = u32::try_from(first + i).unwrap_or(u32::MAX);
                    let outcome = match b.problems().into_iter().next() {
                        // The first problem, by field order, names the item's error.
                        Some(problem) => {
                            failed += 1;
                            Err(problem)
                        }
                        None => {
                            created += 1;
                            Ok(json!(create(b)))
                        }
                    };
                    ItemOutcome { index, outcome }
                })
                .collect();
            ctx.record_items(outcomes).await?;
            let done = first + chunk.len();
            ctx.set_progress(
                done as u64,
                total as u64,
                Some(format!("{done} of {total} checked")),
            );
        }
        Ok(ImportSummary {
            total,
            created,
            failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Recorder;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    pub(crate) fn valid() -> Beneficiary {
        Beneficiary {
            name: "Ada Lovelace".into(),
            iban: "DE89 3704 0044 0532 0130 00".into(),
            email: "ada@example.org".into(),
            country: "DE".into(),
        }
    }

    #[test]
    fn known_good_ibans_pass() {
        for iban in [
            "DE89370400440532013000",
            "GB82 WEST 1234 5698 7654 32",
            "FR1420041010050500013M02606",
            "NL91ABNA0417164300",
        ] {
            assert_eq!(check_iban(iban), Ok(()), "{iban}");
        }
    }

    #[test]
    fn typos_and_shapes_fail_with_a_stable_code() {
        for iban in [
            "DE89370400440532013001",
            "DE8937040044053201300",
            "XX",
            "DE89-3704-0044",
            "",
        ] {
            let (code, _) = check_iban(iban).unwrap_err();
            assert_eq!(code, "invalid_iban", "{iban}");
        }
    }

    #[test]
    fn emails_are_checked_for_shape() {
        for good in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(is_email(good), "{good}");
        }
        for bad in [
            "", "plain", "a@b", "a@@b.co", "a b@c.de", "@b.co", "a@.co", "a@b.",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let b = Beneficiary {
            name: " ".into(),
            iban: "DE00".into(),
            email: "nope".into(),
            country: "de".into(),
        };
        let fields: Vec<_> = b.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(fields, ["name", "iban", "email", "country"]);
        assert!(valid().problems().is_empty());
    }

    #[tokio::test]
    async fn an_import_creates_the_valid_and_reports_the_invalid() {
        let mut items: Vec<Beneficiary> = (0..1200).map(|_| valid()).collect();
        items[7].iban = "DE89370400440532013001".into();
        items[900].email = "broken".into();
        let recorder = Arc::new(Recorder::default());
        let ctx = TaskContext::new(Uuid::nil(), 1, CancellationToken::new(), recorder.clone());
        let out = ImportBeneficiaries
            .run(
                ImportInput {
                    beneficiaries: items,
                },
                ctx,
            )
            .await
            .unwrap();
        assert_eq!((out.total, out.created, out.failed), (1200, 1198, 2));

        let outcomes = Recorder::take(&recorder.items);
        assert_eq!(outcomes.len(), 1200);
        let errors: Vec<_> = outcomes
            .iter()
            .filter_map(|o| o.outcome.as_ref().err().map(|e| (o.index, e.code)))
            .collect();
        assert_eq!(errors, [(7, "invalid_iban"), (900, "invalid_email")]);
        // The same error the synchronous validation gives for that item alone.
        let mut alone = valid();
        alone.iban = "DE89370400440532013001".into();
        let sync = alone.validate().unwrap_err();
        let item = outcomes[7].outcome.as_ref().unwrap_err();
        assert_eq!(
            (sync.errors()[0].code, &sync.errors()[0].message),
            (item.code, &item.message)
        );

        let progress = Recorder::take(&recorder.progress);
        assert_eq!(
            progress.last().map(|p| (p.done, p.total)),
            Some((1200, 1200))
        );
        assert_eq!(progress.len(), 3, "one report per chunk of 500");
    }
}
