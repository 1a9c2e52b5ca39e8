//! `labels.generate`: shipping labels for a list of shipments, rendered as
//! one PDF with one A6 label per page, each with the reference as text and
//! as a QR code. Progress is reported per label; the PDF is stored as the
//! task's artifact `labels.pdf`.
//!
//! Rendering is CPU work: it runs on a blocking thread so the worker's
//! async threads keep serving other tasks.

use crate::{FieldError, Input, NewArtifact, Task, TaskContext, TaskError, ValidationErrors};
use pdf_writer::{Content, Filter, Finish, Name, Pdf, Rect, Ref, Str};
use qrcode::{Color, QrCode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const MAX_SHIPMENTS: usize = 10_000;
pub const ARTIFACT: &str = "labels.pdf";

/// A6 portrait, in points (1/72 inch).
const PAGE_W: f32 = 297.64;
const PAGE_H: f32 = 419.53;
const MARGIN: f32 = 18.0;
const QR_SIDE: f32 = 120.0;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// 1 to 100 characters, not all spaces (as are street, postal code
    /// and city).
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    #[schemars(length(min = 1, max = 100))]
    pub street: String,
    #[schemars(length(min = 1, max = 100))]
    pub postal_code: String,
    #[schemars(length(min = 1, max = 100))]
    pub city: String,
    /// ISO 3166-1 alpha-2.
    #[schemars(regex(pattern = COUNTRY))]
    pub country: String,
}

/// Two capitals, as [`Shipment::problems`] checks a country.
const COUNTRY: &str = "^[A-Z]{2}$";

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Shipment {
    /// The carrier reference, printed and encoded in the QR code.
    #[schemars(regex(pattern = "^[A-Za-z0-9_-]{1,64}$"))]
    pub reference: String,
    /// More than 0, at most 1000.
    #[schemars(range(max = 1000.0), extend("exclusiveMinimum" = 0))]
    pub weight_kg: f64,
    pub address: Address,
}

impl Shipment {
    fn problems(&self, prefix: &str) -> Vec<FieldError> {
        let mut out = Vec::new();
        let field = |f: &str| format!("{prefix}{f}");
        let r = &self.reference;
        if r.is_empty()
            || r.len() > 64
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            out.push(FieldError::new(
                field("reference"),
                "invalid_reference",
                "must be 1 to 64 letters, digits, '-' or '_'",
            ));
        }
        if !(self.weight_kg > 0.0 && self.weight_kg <= 1000.0) {
            out.push(FieldError::new(
                field("weight_kg"),
                "out_of_range",
                "must be more than 0 and at most 1000",
            ));
        }
        let a = &self.address;
        for (name, value) in [
            ("name", &a.name),
            ("street", &a.street),
            ("postal_code", &a.postal_code),
            ("city", &a.city),
        ] {
            if value.trim().is_empty() || value.chars().count() > 100 {
                out.push(FieldError::new(
                    field(&format!("address.{name}")),
                    "invalid_length",
                    "must be 1 to 100 characters",
                ));
            }
        }
        if !(a.country.len() == 2 && a.country.bytes().all(|b| b.is_ascii_uppercase())) {
            out.push(FieldError::new(
                field("address.country"),
                "invalid_country",
                "must be an ISO 3166-1 alpha-2 code in capitals, e.g. DE",
            ));
        }
        out
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelsInput {
    #[schemars(length(min = 1, max = MAX_SHIPMENTS))]
    pub shipments: Vec<Shipment>,
}

impl Input for LabelsInput {
    /// Every shipment must be printable: a label job is all or nothing.
    fn validate(&self) -> Result<(), ValidationErrors> {
        let n = self.shipments.len();
        if n == 0 || n > MAX_SHIPMENTS {
            return Err(ValidationErrors::single(
                "shipments",
                "invalid_length",
                format!("must hold 1 to {MAX_SHIPMENTS} shipments, got {n}"),
            ));
        }
        let problems = self
            .shipments
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.problems(&format!("shipments[{i}].")))
            .collect();
        ValidationErrors::check(problems)
    }
}

#[derive(Debug, Serialize)]
pub struct LabelsOutput {
    pub labels: usize,
    pub artifact: String,
    pub size_bytes: usize,
}

pub struct GenerateLabels;

impl Task for GenerateLabels {
    const NAME: &'static str = "labels.generate";
    type Input = LabelsInput;
    type Output = LabelsOutput;

    async fn run(&self, input: LabelsInput, ctx: TaskContext) -> Result<LabelsOutput, TaskError> {
        let labels = input.shipments.len();
        let render_ctx = ctx.clone();
        let pdf = tokio::task::spawn_blocking(move || render(&input.shipments, &render_ctx))
            .await
            .map_err(|e| TaskError::Retryable(format!("rendering thread failed: {e}")))??;
        let size_bytes = pdf.len();
        ctx.put_artifact(NewArtifact {
            name: ARTIFACT.into(),
            content_type: "application/pdf".into(),
            data: pdf,
        })
        .await?;
        Ok(LabelsOutput {
            labels,
            artifact: ARTIFACT.into(),
            size_bytes,
        })
    }
}

/// The whole document: a catalog, a page tree, one font (Helvetica, one
/// of the 14 fonts every reader has, so nothing is embedded), and per label
/// a page with its content stream.
fn render(shipments: &[Shipment], ctx: &TaskContext) -> Result<Vec<u8>, TaskError> {
    let mut pdf = Pdf::new();
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let font = Ref::new(3);
    let font_name = Name(b"F1");
    pdf.catalog(catalog).pages(tree);
    pdf.type1_font(font)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));

    let total = shipments.len();
    let mut pages = Vec::with_capacity(total);
    for (i, shipment) in shipments.iter().enumerate() {
        if ctx.is_cancelled() {
            return Err(TaskError::Cancelled);
        }
        let n = i32::try_from(i).map_err(|_| TaskError::Permanent("too many labels".into()))?;
        let page_id = Ref::new(4 + 2 * n);
        let content_id = Ref::new(5 + 2 * n);
        pages.push(page_id);

        let mut page = pdf.page(page_id);
        page.media_box(Rect::new(0.0, 0.0, PAGE_W, PAGE_H));
        page.parent(tree);
        page.contents(content_id);
        page.resources().fonts().pair(font_name, font);
        page.finish();

        let content = label(shipment, font_name, i + 1, total)?;
        pdf.stream(content_id, &content)
            .filter(Filter::FlateDecode)
            .finish();
        ctx.set_progress((i + 1) as u64, total as u64, None);
    }
    let count = i32::try_from(total).map_err(|_| TaskError::Permanent("too many labels".into()))?;
    pdf.pages(tree).kids(pages).count(count);
    Ok(pdf.finish())
}

/// One label's drawing commands, deflated.
fn label(s: &Shipment, font: Name<'_>, number: usize, total: usize) -> Result<Vec<u8>, TaskError> {
    let mut c = Content::new();
    // Frame.
    c.set_line_width(1.5);
    c.rect(MARGIN / 2.0, MARGIN / 2.0, PAGE_W - MARGIN, PAGE_H - MARGIN);
    c.stroke();

    let a = &s.address;
    let lines: [(f32, String); 8] = [
        (9.0, "SHIP TO".into()),
        (15.0, a.name.clone()),
        (13.0, a.street.clone()),
        (13.0, format!("{} {}", a.postal_code, a.city)),
        (13.0, a.country.clone()),
        (11.0, format!("Weight: {:.2} kg", s.weight_kg)),
        (11.0, format!("Ref: {}", s.reference)),
        (8.0, format!("Label {number} of {total}")),
    ];
    let mut y = PAGE_H - MARGIN - 14.0;
    for (i, (size, text)) in lines.iter().enumerate() {
        if i == 5 {
            // A gap between the address and the parcel's details.
            y -= 8.0;
        }
        c.begin_text();
        c.set_font(font, *size);
        c.next_line(MARGIN, y);
        c.show(Str(&win_ansi(text)));
        c.end_text();
        y -= size + 6.0;
    }

    // The reference as a QR code, one filled square per dark module.
    let code = QrCode::new(s.reference.as_bytes()).map_err(|e| {
        TaskError::Permanent(format!(
            "reference {}: cannot encode as QR: {e}",
            s.reference
        ))
    })?;
    let modules = code.width();
    let cell = QR_SIDE / modules as f32;
    let (x0, y0) = (MARGIN, MARGIN);
    for (k, color) in code.to_colors().into_iter().enumerate() {
        if color == Color::Dark {
            let (col, row) = ((k % modules) as f32, (k / modules) as f32);
            c.rect(
                x0 + col * cell,
                y0 + QR_SIDE - (row + 1.0) * cell,
                cell,
                cell,
            );
        }
    }
    c.fill_nonzero();
    Ok(deflate(&c.finish()))
}

/// Helvetica with WinAnsiEncoding covers Latin-1; anything else prints as '?'.
fn win_ansi(text: &str) -> Vec<u8> {
    text.chars()
        .map(|ch| match u32::from(ch) {
            c @ (0x20..=0x7e | 0xa0..=0xff) => u8::try_from(c).unwrap_or(b'?'),
            _ => b'?',
        })
        .collect()
}

/// Content streams are mostly QR rectangles: deflate shrinks them ~5×.
fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Recorder;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    pub(crate) fn shipment(i: usize) -> Shipment {
        Shipment {
            reference: format!("WRN-{i:06}"),
            weight_kg: 1.25,
            address: Address {
                name: "Grace Hopper".into(),
                street: "1 Navy Way".into(),
                postal_code: "10115".into(),
                city: "Berlin".into(),
                country: "DE".into(),
            },
        }
    }

    #[tokio::test]
    async fn renders_one_page_per_label() {
        let recorder = Arc::new(Recorder::default());
        let ctx = TaskContext::new(
            uuid::Uuid::nil(),
            1,
            CancellationToken::new(),
            recorder.clone(),
        );
        let input = LabelsInput {
            shipments: (0..5).map(shipment).collect(),
        };
        let out = GenerateLabels.run(input, ctx).await.unwrap();
        assert_eq!(out.labels, 5);
        let artifacts = Recorder::take(&recorder.artifacts);
        assert_eq!(artifacts.len(), 1);
        let pdf = lopdf::Document::load_mem(&artifacts[0].data).expect("a valid PDF");
        assert_eq!(pdf.get_pages().len(), 5);
        let progress = Recorder::take(&recorder.progress);
        assert_eq!(
            progress.iter().map(|p| p.done).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn every_bad_field_is_named_with_its_shipment() {
        let mut bad = shipment(0);
        bad.reference = "has space".into();
        bad.weight_kg = 0.0;
        bad.address.country = "Germany".into();
        let input = LabelsInput {
            shipments: vec![shipment(1), bad],
        };
        let err = input.validate().unwrap_err();
        let fields: Vec<_> = err.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "shipments[1].reference",
                "shipments[1].weight_kg",
                "shipments[1].address.country"
            ]
        );
    }

    #[test]
    fn non_latin_text_does_not_break_the_pdf() {
        assert_eq!(win_ansi("Zoë 東京"), b"Zo\xeb ??".to_vec());
    }
}
