//! Figures as the benchmark reports them: the median of several runs with
//! their range, in a table that reads the same in a terminal and in the
//! README (Markdown), and in JSON for anything that compares runs.

use serde::Serialize;

/// The median of a set of runs, with the smallest and largest.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Figure {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Figure {
    /// `None` for no runs (or a NaN among them: nothing to report).
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v = values.to_vec();
        if v.is_empty() || v.iter().any(|x| x.is_nan()) {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
            runs: v.len(),
        })
    }

    /// [`Figure::of`] the runs if every run has a value, else `None`: a
    /// figure some runs could not measure is not reported at all.
    pub fn of_every(values: impl IntoIterator<Item = Option<f64>>) -> Option<Self> {
        let values: Option<Vec<f64>> = values.into_iter().collect();
        Self::of(&values?)
    }

    /// The same runs in another unit (a ratio as a percentage).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            median: self.median * factor,
            min: self.min * factor,
            max: self.max * factor,
            runs: self.runs,
        }
    }

    /// [`Figure::display`], or `-` for a figure not measured.
    pub fn display_optional(figure: Option<&Self>, decimals: usize) -> String {
        figure.map_or("-".into(), |f| f.display(decimals))
    }

    /// `12.5 (12.1–13.0)`, or just `12.5` for a single run.
    pub fn display(&self, decimals: usize) -> String {
        if self.runs == 1 {
            format!("{:.decimals$}", self.median)
        } else {
            format!(
                "{:.decimals$} ({:.decimals$}–{:.decimals$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// A Markdown table with columns padded to line up in a terminal.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .chain([headers[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..headers.len()).map(width).collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let odd = Figure::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max, odd.runs), (2.0, 1.0, 3.0, 3));
        let even = Figure::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert_eq!(Figure::of(&[]), None);
        assert_eq!(Figure::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn a_figure_of_every_run_is_none_when_one_run_has_no_value() {
        let all = Figure::of_every([Some(3.0), Some(1.0), Some(2.0)]).unwrap();
        assert_eq!((all.median, all.runs), (2.0, 3));
        assert_eq!(Figure::of_every([Some(3.0), None, Some(2.0)]), None);
        assert_eq!(Figure::display_optional(Some(&all), 0), "2 (1–3)");
        assert_eq!(Figure::display_optional(None, 0), "-");
    }

    #[test]
    fn display_shows_the_range_only_for_several_runs() {
        assert_eq!(
            Figure::of(&[1.0, 2.0, 4.0]).unwrap().display(1),
            "2.0 (1.0–4.0)"
        );
        assert_eq!(Figure::of(&[12.345]).unwrap().display(2), "12.35");
    }

    #[test]
    fn scaling_keeps_the_order_and_the_runs() {
        let pct = Figure::of(&[0.41, 0.45, 0.5]).unwrap().scaled(100.0);
        assert_eq!(pct.display(0), "45 (41–50)");
        assert_eq!(pct.runs, 3);
    }

    #[test]
    fn table_columns_line_up() {
        let t = table(
            &["a", "long header"],
            &[vec!["wide cell".into(), "1".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| a         | long header |");
        assert_eq!(lines[1], "| --------- | ----------- |");
        assert_eq!(lines[2], "| wide cell | 1           |");
    }
}
