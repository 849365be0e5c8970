//! The run's SVG plots: memory moved per second against the raw link, and downtime.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{sym, Row};

pub(super) fn plot(rows: &[Row], base: &Path) -> Result<()> {
    use plotters::prelude::*;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} s{} {}{}{}{}",
                sym(r.cell.profile),
                r.cell.rate_label(),
                r.cell.link_label(),
                r.cell.streams,
                r.cell.codec_label(),
                if r.cold { " cold" } else { "" },
                if r.cell.zero_copy { "" } else { " nozc" },
                if r.cell.encrypt { "" } else { " plain" }
            )
        })
        .collect();
    let bars =
        |file: PathBuf, title: &str, values: Vec<f64>, reference: Option<f64>| -> Result<()> {
            let max = values
                .iter()
                .copied()
                .chain(reference)
                .fold(0.0f64, f64::max)
                .max(1e-9)
                * 1.15;
            let root =
                SVGBackend::new(&file, (160 + 70 * values.len() as u32, 480)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(120)
                .y_label_area_size(60)
                .build_cartesian_2d(0..values.len(), 0.0..max)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(values.len())
                .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
                .x_label_style(
                    ("sans-serif", 11)
                        .into_font()
                        .transform(FontTransform::Rotate90),
                )
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .draw_series(
                    values.iter().enumerate().map(|(i, v)| {
                        Rectangle::new([(i, 0.0), (i + 1, *v)], BLUE.mix(0.6).filled())
                    }),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(r) = reference {
                chart
                    .draw_series(LineSeries::new(
                        [(0, r), (values.len(), r)],
                        RED.stroke_width(2),
                    ))
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .label("raw link")
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));
                chart
                    .configure_series_labels()
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
        };
    let link = rows.iter().map(|r| r.link_gb_s).fold(0.0, f64::max);
    bars(
        PathBuf::from(format!("{}-rate.svg", base.display())),
        "guest memory moved per second (GB/s) vs the raw link",
        rows.iter()
            .map(|r| r.memory_gib_s * (1u64 << 30) as f64 / 1e9)
            .collect(),
        Some(link),
    )?;
    bars(
        PathBuf::from(format!("{}-downtime.svg", base.display())),
        "downtime (ms)",
        rows.iter().map(|r| r.downtime_ms).collect(),
        None,
    )?;
    Ok(())
}
