//! docs/benchmarks.png: every dataplane relative to host-gw (the upper bound), per
//! measure, offloads on and off. Higher is better everywhere: latencies are inverted.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::prelude::*;

use super::{
    report::Leg,
    results::Measure,
    setup::{KernelBackend, Setup},
};

/// Debian's fonts-dejavu-core (installed by `deps::ensure_vm`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 4] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Pixels of a panel's width per measure: its longest label's, at the labels' size.
const PER_MEASURE: u32 = 130;

fn short(m: Measure) -> &'static str {
    match m {
        Measure::TcpStream => "TCP 1 stream",
        Measure::TcpMulti => "TCP 4 streams",
        Measure::RrP50 => "RR p50 (inv.)",
        Measure::RrP99 => "RR p99 (inv.)",
        Measure::RrRate => "RR rate",
        Measure::ConnRate => "conn rate",
        Measure::UdpRate => "UDP pkt rate",
        Measure::SnatConnRate => "SNAT conn rate",
        Measure::SvcRrP50 => "Svc RR p50 (inv.)",
        Measure::SvcRrP99 => "Svc RR p99 (inv.)",
        Measure::SvcRrRate => "Svc RR rate",
        Measure::SvcConnRate => "Svc conn rate",
    }
}

/// One row of panels per leg (kernel), offloads on and off side by side.
pub(super) fn draw(legs: &[Leg], path: &Path) -> Result<()> {
    let font: &'static [u8] = Box::leak(
        std::fs::read(FONT)
            .with_context(|| format!("reading {FONT}"))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a font plotters can use"))?;
    let measures = Measure::PLANES;
    // Two panels side by side, room in each for every measure's label.
    let width = 2 * (PER_MEASURE * measures.len() as u32 + 120);
    let root =
        BitMapBackend::new(path, (width, 500 * legs.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((legs.len().max(1), 2));
    let host_gw = Setup::Kernel(KernelBackend::HostGw);
    let cases = legs.iter().flat_map(|l| [(l, true), (l, false)]);
    for (panel, (leg, offloads)) in panels.iter().zip(cases) {
        let results = &leg.results;
        // Relative to host-gw; inverted for latencies so that higher is better.
        let rel = |s: Setup, m: Measure| -> Option<f64> {
            let r = results.ratio(s, host_gw, m, offloads)?;
            Some(if m.lower_is_better() { 1.0 / r } else { r })
        };
        // Room above the tallest bar for the legend (four entries in the upper right,
        // about a quarter of the panel's height).
        let ymax = measures
            .iter()
            .flat_map(|m| Setup::PLANES.iter().filter_map(move |s| rel(*s, *m)))
            .fold(1.2_f64, f64::max)
            * 1.4;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{}{}, offloads {} — relative to host-gw (= 1)",
                    results.machine.kernel,
                    if leg.place.starts_with("a VM") {
                        " (VM, emulated)"
                    } else {
                        ""
                    },
                    super::setup::on_off(offloads)
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..measures.len() as f64, 0f64..ymax)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(measures.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < measures.len() {
                    short(measures[i]).to_owned()
                } else {
                    String::new()
                }
            })
            .y_desc("× host-gw")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let width = 0.8 / Setup::PLANES.len() as f64;
        for (j, setup) in Setup::PLANES.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            let bars: Vec<Rectangle<(f64, f64)>> = measures
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    let v = rel(*setup, *m)?;
                    let x0 = i as f64 + 0.1 + j as f64 * width;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + width * 0.9, v)],
                        color.filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(|e| anyhow!("{e}"))?
                .label(setup.name())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, 1.0), (measures.len() as f64, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
