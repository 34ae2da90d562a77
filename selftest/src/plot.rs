//! The SVG plot of `lnet-selftest sweep`: bandwidth and median latency
//! against size, one line per transport, logarithmic axes.
//!
//! ```
//! let svg = lnet_selftest::plot::line_chart("t", "x", "y", &[("lo".into(), vec![(8.0, 1.0), (1024.0, 10.0)])], true);
//! assert!(svg.starts_with("<svg") && svg.contains("polyline"));
//! ```

use std::fmt::Write as _;

use crate::run::Measurement;

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const W: f64 = 520.0;
const H: f64 = 340.0;
const L: f64 = 70.0;
const R: f64 = 20.0;
const T: f64 = 30.0;
const B: f64 = 50.0;

fn log_range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for x in v.filter(|x| *x > 0.0) {
        lo = lo.min(x.log10());
        hi = hi.max(x.log10());
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    let (lo, hi) = (lo.floor(), hi.ceil());
    if hi - lo < 1.0 {
        (lo, lo + 1.0)
    } else {
        (lo, hi)
    }
}

/// One chart (an `<svg>` of its own): `series` of `(x, y)` points, both
/// axes logarithmic (y linear when `log_y` is false).
pub fn line_chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_y: bool,
) -> String {
    let (x0, x1) = log_range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
    let (y0, y1) = if log_y {
        log_range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)))
    } else {
        let m = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        (0.0, if m > 0.0 { m * 1.1 } else { 1.0 })
    };
    let fx = |x: f64| L + (x.max(1e-300).log10() - x0) / (x1 - x0) * (W - L - R);
    let fy = |y: f64| {
        let v = if log_y { y.max(1e-300).log10() } else { y };
        H - B - (v - y0) / (y1 - y0) * (H - T - B)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="13">{title}</text>"#,
        W / 2.0
    );
    // Axes and grid.
    let _ = writeln!(
        s,
        r#"<path d="M{L},{T} V{} H{}" stroke="black" fill="none"/>"#,
        H - B,
        W - R
    );
    let mut e = x0;
    while e <= x1 + 1e-9 {
        let x = fx(10f64.powf(e));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - B,
            H - B + 14.0,
            human(10f64.powf(e))
        );
        e += 1.0;
    }
    let steps = if log_y { (y1 - y0).round() as usize } else { 5 };
    for i in 0..=steps {
        let v = y0 + (y1 - y0) * i as f64 / steps.max(1) as f64;
        let val = if log_y { 10f64.powf(v) } else { v };
        let y = fy(val);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - R,
            L - 4.0,
            y + 4.0,
            human(val)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>"#,
        (L + W - R) / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{ylabel}</text>"#,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: String = pts
            .iter()
            .filter(|p| p.0 > 0.0 && (!log_y || p.1 > 0.0))
            .map(|p| format!("{:.1},{:.1} ", fx(p.0), fy(p.1)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>"#
        );
        let ly = T + 14.0 * (i as f64 + 1.0);
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            L + 10.0,
            L + 30.0,
            L + 34.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.0}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.0}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The sweep's plot: bandwidth (MiB/s) and median latency (µs) against
/// size (bytes), side by side in one SVG.
pub fn sweep_svg(mode: &str, series: &[(String, Vec<(u32, Measurement)>)]) -> String {
    let bw: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.iter().map(|(s, m)| (f64::from(*s), m.mib_s())).collect(),
            )
        })
        .collect();
    let lat: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.iter()
                    .map(|(s, m)| (f64::from(*s), m.lat_us[0]))
                    .collect(),
            )
        })
        .collect();
    let a = line_chart(
        &format!("{mode} bandwidth"),
        "bytes per RPC",
        "MiB/s",
        &bw,
        true,
    );
    let b = line_chart(
        &format!("{mode} latency (p50)"),
        "bytes per RPC",
        "microseconds",
        &lat,
        true,
    );
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{H}\">\n<g>{a}</g>\n<g transform=\"translate({W},0)\">{b}</g>\n</svg>\n",
        2.0 * W
    )
}
