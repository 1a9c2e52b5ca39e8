//! Charts as inline SVG, drawn on the server: no charting library, nothing
//! to load, readable without script. Colours come from CSS classes.

use maud::{Markup, html};

/// One line of a chart: its label, CSS class and values (oldest first).
pub(crate) struct Series<'a> {
    pub(crate) label: &'a str,
    pub(crate) class: &'a str,
    pub(crate) values: Vec<f64>,
}

// About the width of the page on a laptop, so text is drawn near its size.
const W: f64 = 1200.0;
const H: f64 = 240.0;
const PAD_LEFT: f64 = 44.0;
const PAD_BOTTOM: f64 = 22.0;

fn points(values: &[f64], max: f64, width: f64, height: f64, left: f64) -> String {
    let n = values.len().max(2) - 1;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = left + width * i as f64 / n as f64;
            let y = height - height * (v / max).clamp(0.0, 1.0);
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A line chart with a y-axis maximum, the first and last x labels and a legend.
pub(crate) fn lines(title: &str, series: &[Series<'_>], first: &str, last: &str) -> Markup {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let plot_h = H - PAD_BOTTOM;
    let plot_w = W - PAD_LEFT;
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) {
                title { (title) }
                line.axis x1=(PAD_LEFT) y1="0" x2=(PAD_LEFT) y2=(plot_h) {}
                line.axis x1=(PAD_LEFT) y1=(plot_h) x2=(W) y2=(plot_h) {}
                line.grid x1=(PAD_LEFT) y1=(plot_h / 2.0) x2=(W) y2=(plot_h / 2.0) {}
                text.tick x="2" y="14" { (format_count(max)) }
                text.tick x="2" y=(plot_h / 2.0 + 4.0) { (format_count(max / 2.0)) }
                text.tick x=(PAD_LEFT) y=(H - 5.0) { (first) }
                text.tick x=(W - 2.0) y=(H - 5.0) text-anchor="end" { (last) }
                @for s in series {
                    polyline class=(format!("line {}", s.class))
                        points=(points(&s.values, max, plot_w, plot_h, PAD_LEFT)) {}
                }
            }
            figcaption {
                @for s in series {
                    span class=(format!("key {}", s.class)) { (s.label) }
                }
            }
        }
    }
}

/// A small line of recent values, scaled to its own maximum.
pub(crate) fn sparkline(label: &str, values: &[f64]) -> Markup {
    let max = values.iter().copied().fold(0.0_f64, f64::max).max(1.0);
    html! {
        svg.spark viewBox="0 0 120 24" role="img" aria-label=(label) {
            title { (label) }
            @if values.len() > 1 {
                polyline.line.depth points=(points(values, max, 120.0, 22.0, 0.0)) {}
            }
        }
    }
}

/// A horizontal bar: `value` of `max`.
pub(crate) fn bar(value: f64, max: f64, class: &str) -> Markup {
    let w = if max > 0.0 {
        (100.0 * value / max).clamp(0.0, 100.0)
    } else {
        0.0
    };
    html! {
        svg.bar viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true" {
            rect.track x="0" y="0" width="100" height="8" {}
            rect class=(class) x="0" y="0" width=(format!("{w:.1}")) height="8" {}
        }
    }
}

fn format_count(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_span_the_plot_and_clamp_to_it() {
        assert_eq!(
            points(&[0.0, 5.0, 10.0], 10.0, 100.0, 50.0, 0.0),
            "0.0,50.0 50.0,25.0 100.0,0.0"
        );
        // A value past the maximum stays inside the plot.
        assert_eq!(points(&[20.0], 10.0, 100.0, 50.0, 0.0), "0.0,0.0");
    }

    #[test]
    fn a_chart_draws_one_line_per_series() {
        let svg = lines(
            "t",
            &[
                Series {
                    label: "a",
                    class: "ok",
                    values: vec![1.0, 2.0],
                },
                Series {
                    label: "b",
                    class: "bad",
                    values: vec![0.0, 1.0],
                },
            ],
            "-60 min",
            "now",
        )
        .into_string();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(
            !svg.contains("style="),
            "inline styles would break the CSP: {svg}"
        );
    }
}
