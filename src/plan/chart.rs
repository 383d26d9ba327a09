//! One SVG chart per trunk and per pool: calls offered and admitted per second over the trace,
//! for a trunk the same calls paced instead, and the configured rate.

use std::path::Path;

use plotters::prelude::*;

/// The per-second figures of one trunk or pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// "trunk" or "pool".
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Its configured rate.
    pub rate: f64,
    /// Seconds per point of `offered` and `admitted` (1 for traces up to 2048 s; longer ones
    /// keep the busiest second of each bin).
    pub bin_secs: u64,
    /// Attempts per second.
    pub offered: Vec<u32>,
    /// Admitted per second, as configured.
    pub admitted: Vec<u32>,
    /// Seconds per point of `paced`.
    pub paced_bin_secs: u64,
    /// Sent per second with pacing instead (trunks; empty for a pool).
    pub paced: Vec<u32>,
}

/// A file name for the chart of `kind` `name` that no earlier chart in `used` has.
pub fn file_name(kind: &str, name: &str, used: &[String]) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut file = format!("{kind}-{clean}.svg");
    let mut n = 2;
    while used.contains(&file) {
        file = format!("{kind}-{clean}-{n}.svg");
        n += 1;
    }
    file
}

fn clock(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("+{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("+{}:{:02}", s / 60, s % 60)
    }
}

/// Draw `s` as an SVG at `path`.
pub fn draw(s: &Series, path: &Path) -> Result<(), String> {
    draw_inner(s, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn draw_inner(s: &Series, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let offered_c = RGBColor(140, 140, 140);
    let admitted_c = RGBColor(31, 119, 180);
    let paced_c = RGBColor(44, 160, 44);
    let limit_c = RGBColor(214, 39, 40);
    let span = (s.offered.len() as u64 * s.bin_secs)
        .max(s.paced.len() as u64 * s.paced_bin_secs)
        .max(1) as f64;
    let top = s
        .offered
        .iter()
        .chain(&s.admitted)
        .chain(&s.paced)
        .copied()
        .max()
        .unwrap_or(0) as f64;
    let y_max = (top.max(s.rate) * 1.15).max(1.0).ceil();
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} {}: calls per second, offered and admitted (limit {} cps)",
                s.kind, s.name, s.rate
            ),
            ("sans-serif", 22),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..span, 0f64..y_max)?;
    let x_desc = if s.bin_secs == 1 {
        "time from the first attempt".to_owned()
    } else {
        format!(
            "time from the first attempt (each point: the busiest second of {} s)",
            s.bin_secs
        )
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("calls per second")
        .x_label_formatter(&|x| clock(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    let points = |v: &[u32], bin: u64| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, c)| ((i as u64 * bin) as f64, f64::from(*c)))
            .collect()
    };
    let legend = |c: RGBColor| {
        move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
    };
    chart
        .draw_series(LineSeries::new(
            points(&s.offered, s.bin_secs),
            offered_c.stroke_width(1),
        ))?
        .label("offered (attempts)")
        .legend(legend(offered_c));
    chart
        .draw_series(LineSeries::new(
            points(&s.admitted, s.bin_secs),
            admitted_c.stroke_width(2),
        ))?
        .label("admitted as configured")
        .legend(legend(admitted_c));
    if !s.paced.is_empty() {
        chart
            .draw_series(LineSeries::new(
                points(&s.paced, s.paced_bin_secs),
                paced_c.stroke_width(2),
            ))?
            .label("sent if paced instead")
            .legend(legend(paced_c));
    }
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, s.rate), (span, s.rate)],
            8,
            6,
            limit_c.stroke_width(2),
        ))?
        .label("configured rate")
        .legend(legend(limit_c));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    root.present()?;
    Ok(())
}
