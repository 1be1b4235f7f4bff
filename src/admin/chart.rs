//! The status page's pictures: the traffic chart (inline SVG, so the page needs no script)
//! and the colour each target has everywhere on the page.

use std::fmt::Write as _;

use crate::traffic::{MINUTES, PerTarget};

/// The colour of the `i`-th target on the status page (chart lines and bars alike).
pub fn color(i: usize) -> &'static str {
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    COLORS[i % COLORS.len()]
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A small line chart of recipients per minute per target, as inline SVG. `targets`
/// gives the order, and so the colours ([`color`]), that the rest of the page uses.
pub fn svg(mut per_target: PerTarget, targets: &[&str]) -> String {
    const W: f64 = 600.0;
    const H: f64 = 160.0;
    // Every target in the legend, in the page's order, with or without traffic.
    let mut ordered: Vec<(String, Vec<u64>)> = targets
        .iter()
        .map(|t| {
            let series = per_target.remove(*t).unwrap_or_else(|| vec![0; MINUTES]);
            ((*t).to_string(), series)
        })
        .collect();
    ordered.extend(per_target);
    let per_target = ordered;
    let max = per_target
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" role=\"img\" \
         aria-label=\"recipients per minute per target\">\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ccc\"/>\
         <text x=\"4\" y=\"12\" font-size=\"11\">{max}/min</text>\
         <text x=\"4\" y=\"{}\" font-size=\"11\">-{MINUTES} min</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\">now</text>",
        H + 30.0,
        H + 14.0,
        W - 28.0,
        H + 14.0
    );
    for (i, (target, series)) in per_target.iter().enumerate() {
        let color = color(i);
        let points: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(x, v)| {
                let px = x as f64 * W / (MINUTES - 1) as f64;
                let py = H - (*v as f64) * (H - 16.0) / max as f64;
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{color}\">{}</text>",
            points.join(" "),
            80 + i * 90,
            H + 28.0,
            esc(target)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Protocol;

    #[test]
    fn chart_has_a_line_per_target() {
        let t = crate::traffic::Traffic::default();
        t.record(&t.meter(Protocol::Smtp, "new", "paris"));
        let svg = svg(t.snapshot(Protocol::Smtp).0, &["old", "new"]);
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains(">new<"));
        assert!(svg.contains(">old<"));
    }
}
