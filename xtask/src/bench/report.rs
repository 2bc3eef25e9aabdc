//! Results: the records every measurement produces, min/median/max over
//! repetitions, ratios per repetition, and a hand-written SVG bar chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One measured value.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub metric: String,
    pub variant: String,
    pub size: u32,
    pub rep: u32,
    pub value: f64,
}

impl Record {
    /// Parses an `lb-bench` line `RESULT metric=.. variant=.. size=.. rep=.. value=..`.
    pub fn parse(line: &str) -> Option<Record> {
        let rest = line.strip_prefix("RESULT ")?;
        let mut fields = BTreeMap::new();
        for part in rest.split_whitespace() {
            let (key, value) = part.split_once('=')?;
            fields.insert(key, value);
        }
        Some(Record {
            metric: fields.get("metric")?.to_string(),
            variant: fields.get("variant")?.to_string(),
            size: fields.get("size")?.parse().ok()?,
            rep: fields.get("rep")?.parse().ok()?,
            value: fields.get("value")?.parse().ok()?,
        })
    }
}

/// min, median, max of a non-empty list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Spread {
            min: sorted[0],
            median,
            max: sorted[n - 1],
            n,
        })
    }

    /// Every figure multiplied by `factor` (a change of unit).
    pub fn scaled(&self, factor: f64) -> Spread {
        Spread {
            min: self.min * factor,
            median: self.median * factor,
            max: self.max * factor,
            n: self.n,
        }
    }

    /// `median (min-max)` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if self.n == 1 {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}-{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

#[derive(Debug, Default)]
pub struct Results {
    pub records: Vec<Record>,
}

impl Results {
    pub fn push(&mut self, metric: &str, variant: &str, size: u32, rep: u32, value: f64) {
        self.records.push(Record {
            metric: metric.into(),
            variant: variant.into(),
            size,
            rep,
            value,
        });
    }

    /// Values per repetition of one (metric, variant, size).
    pub fn per_rep(&self, metric: &str, variant: &str, size: u32) -> BTreeMap<u32, f64> {
        self.records
            .iter()
            .filter(|r| r.metric == metric && r.variant == variant && r.size == size)
            .map(|r| (r.rep, r.value))
            .collect()
    }

    pub fn spread(&self, metric: &str, variant: &str, size: u32) -> Option<Spread> {
        let values: Vec<f64> = self.per_rep(metric, variant, size).into_values().collect();
        Spread::of(&values)
    }

    /// `a / b` computed within each repetition (the two measured side by
    /// side), then min/median/max over repetitions.
    pub fn ratio(&self, a: (&str, &str, u32), b: (&str, &str, u32)) -> Option<Spread> {
        let numerators = self.per_rep(a.0, a.1, a.2);
        let denominators = self.per_rep(b.0, b.1, b.2);
        let ratios: Vec<f64> = numerators
            .iter()
            .filter_map(|(rep, n)| denominators.get(rep).map(|d| n / d))
            .collect();
        Spread::of(&ratios)
    }
}

/// Groups of bars: one group per label, one bar per series.
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<String>,
    pub series: Vec<String>,
    /// `values[group][series]`; NaN for a missing bar.
    pub values: Vec<Vec<f64>>,
    pub log_scale: bool,
}

const COLORS: [&str; 6] = [
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2",
];

impl BarChart {
    pub fn svg(&self) -> String {
        let (width, height) = (760.0_f64, 360.0_f64);
        let (left, right, top, bottom) = (70.0, 150.0, 40.0, 50.0);
        let plot_w = width - left - right;
        let plot_h = height - top - bottom;
        let finite: Vec<f64> = self
            .values
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let max = finite.iter().copied().fold(0.0, f64::max).max(1e-9);
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let (lo, hi) = if self.log_scale {
            (
                10f64.powf(min.min(max).log10().floor()),
                10f64.powf(max.log10().ceil()),
            )
        } else {
            (0.0, max * 1.1)
        };
        let scale = |v: f64| -> f64 {
            if self.log_scale {
                let (l, h) = (lo.log10(), hi.log10().max(lo.log10() + 1.0));
                ((v.max(lo).log10() - l) / (h - l)) * plot_h
            } else {
                (v / hi) * plot_h
            }
        };
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            width / 2.0,
            escape(&self.title)
        );
        // Axis with ticks.
        let ticks: Vec<f64> = if self.log_scale {
            let mut t = Vec::new();
            let mut v = lo;
            while v <= hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            (0..=5).map(|k| hi * f64::from(k) / 5.0).collect()
        };
        for tick in ticks {
            let y = top + plot_h - scale(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                y + 4.0,
                short(tick)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            escape(&self.y_label)
        );
        let group_w = plot_w / self.groups.len().max(1) as f64;
        let bar_w = (group_w * 0.8) / self.series.len().max(1) as f64;
        for (g, label) in self.groups.iter().enumerate() {
            let x0 = left + g as f64 * group_w + group_w * 0.1;
            for (s, _) in self.series.iter().enumerate() {
                let value = self.values[g].get(s).copied().unwrap_or(f64::NAN);
                if !value.is_finite() || value <= 0.0 {
                    continue;
                }
                let h = scale(value);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}</title></rect>"#,
                    x0 + s as f64 * bar_w,
                    top + plot_h - h,
                    bar_w * 0.92,
                    COLORS[s % COLORS.len()],
                    short(value)
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x0 + group_w * 0.4,
                top + plot_h + 18.0,
                escape(label)
            );
        }
        let _ = writeln!(
            svg,
            r#"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
            top + plot_h,
            left + plot_w,
            top + plot_h
        );
        for (s, name) in self.series.iter().enumerate() {
            let y = top + 10.0 + s as f64 * 20.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                left + plot_w + 15.0,
                y,
                COLORS[s % COLORS.len()],
                left + plot_w + 32.0,
                y + 10.0,
                escape(name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lb_bench_lines_and_spreads() {
        let r =
            Record::parse("RESULT metric=pkt_ns variant=xdp size=100 rep=2 value=41.500").unwrap();
        assert_eq!((r.size, r.rep, r.value), (100, 2, 41.5));
        assert!(Record::parse("lb-bench: hello").is_none());
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let mut results = Results::default();
        for rep in 0..3 {
            results.push("m", "a", 1, rep, 2.0 * f64::from(rep + 1));
            results.push("m", "b", 1, rep, f64::from(rep + 1));
        }
        let ratio = results.ratio(("m", "a", 1), ("m", "b", 1)).unwrap();
        assert_eq!((ratio.min, ratio.max), (2.0, 2.0));
        let chart = BarChart {
            title: "t".into(),
            y_label: "y".into(),
            groups: vec!["1k".into()],
            series: vec!["a".into(), "b".into()],
            values: vec![vec![1.0, f64::NAN]],
            log_scale: true,
        };
        assert!(chart.svg().contains("<rect x="));
    }
}
