//! Reads result JSON lines (as written by the implementation binaries) and prints tables:
//! implementations as rows, workloads as columns. With `--svg DIR`, also writes one bar chart
//! per workload (`DIR/<workload>.svg`, every implementation side by side).
//!
//! usage: meshbench-report [--svg DIR] FILE.jsonl [FILE.jsonl ...]

use std::collections::BTreeMap;

#[derive(Clone, Debug)]
enum V {
    S(String),
    N(f64),
    B(bool),
    Null,
}

type Obj = BTreeMap<String, V>;

/// Parser for the flat JSON objects the runner writes (strings, numbers, bools, null).
fn parse_line(line: &str) -> Option<Obj> {
    let mut it = line.trim().chars().peekable();
    let mut out = Obj::new();
    if it.next()? != '{' {
        return None;
    }
    fn ws(it: &mut std::iter::Peekable<std::str::Chars>) {
        while matches!(it.peek(), Some(c) if c.is_whitespace()) {
            it.next();
        }
    }
    fn string(it: &mut std::iter::Peekable<std::str::Chars>) -> Option<String> {
        if it.next()? != '"' {
            return None;
        }
        let mut s = String::new();
        loop {
            match it.next()? {
                '"' => return Some(s),
                '\\' => match it.next()? {
                    'n' => s.push('\n'),
                    't' => s.push('\t'),
                    'r' => s.push('\r'),
                    'u' => {
                        let h: String = (0..4).filter_map(|_| it.next()).collect();
                        s.push(char::from_u32(u32::from_str_radix(&h, 16).ok()?)?);
                    }
                    c => s.push(c),
                },
                c => s.push(c),
            }
        }
    }
    loop {
        ws(&mut it);
        match it.peek()? {
            '}' => return Some(out),
            ',' => {
                it.next();
                continue;
            }
            _ => {}
        }
        let k = string(&mut it)?;
        ws(&mut it);
        if it.next()? != ':' {
            return None;
        }
        ws(&mut it);
        let v = match it.peek()? {
            '"' => V::S(string(&mut it)?),
            't' | 'f' | 'n' => {
                let w: String =
                    std::iter::from_fn(|| it.next_if(|c| c.is_ascii_alphabetic())).collect();
                match w.as_str() {
                    "true" => V::B(true),
                    "false" => V::B(false),
                    _ => V::Null,
                }
            }
            _ => {
                let w: String = std::iter::from_fn(|| {
                    it.next_if(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
                })
                .collect();
                V::N(w.parse().ok()?)
            }
        };
        out.insert(k, v);
    }
}

fn num(o: &Obj, k: &str) -> Option<f64> {
    match o.get(k) {
        Some(V::N(n)) => Some(*n),
        _ => None,
    }
}

fn st<'a>(o: &'a Obj, k: &str) -> Option<&'a str> {
    match o.get(k) {
        Some(V::S(s)) => Some(s),
        _ => None,
    }
}

fn flag(o: &Obj, k: &str) -> bool {
    matches!(o.get(k), Some(V::B(true)))
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else if n >= 100.0 {
        format!("{n:.0}")
    } else if n >= 10.0 {
        format!("{n:.1}")
    } else {
        format!("{n:.2}")
    }
}

fn lat(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}")
    }
}

fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{:<w$}", c, w = widths[i])
                } else {
                    format!("{:>w$}", c, w = widths[i])
                }
            })
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    let sep: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                "-".repeat(w + 2)
            } else {
                format!("{}:", "-".repeat(w + 1))
            }
        })
        .collect();
    println!("|{}|", sep.join("|"));
    for r in rows {
        line(r.clone());
    }
}

/// One chart: a title, the unit, whether higher is better, and the series (label, value
/// from a result) drawn per implementation.
struct Chart {
    workload: &'static str,
    title: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    series: &'static [(&'static str, &'static str)],
}

const CHARTS: &[Chart] = &[
    Chart {
        workload: "w1_64",
        title: "W1 one-way 64 B, each acknowledged (raw: not acknowledged)",
        unit: "messages/s",
        higher_is_better: true,
        series: &[("msg/s", "msgs_per_s")],
    },
    Chart {
        workload: "w1_1k",
        title: "W1 one-way 1 KiB",
        unit: "messages/s",
        higher_is_better: true,
        series: &[("msg/s", "msgs_per_s")],
    },
    Chart {
        workload: "w2",
        title: "W2 64 B request/reply latency",
        unit: "µs",
        higher_is_better: false,
        series: &[("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")],
    },
    Chart {
        workload: "w3",
        title: "W3 256 MiB bulk",
        unit: "MB/s",
        higher_is_better: true,
        series: &[("MB/s", "mb_per_s")],
    },
    Chart {
        workload: "w4",
        title: "W4 new mTLS connection + one confirmed message",
        unit: "connections/s",
        higher_is_better: true,
        series: &[("conn/s", "conns_per_s")],
    },
    Chart {
        workload: "w5",
        title: "W5 64 peers fan-in, 64 B",
        unit: "messages/s",
        higher_is_better: true,
        series: &[("msg/s", "msgs_per_s")],
    },
    Chart {
        workload: "w6",
        title: "W6 64 B round trips during a bulk transfer to the same peer",
        unit: "µs",
        higher_is_better: false,
        series: &[
            ("idle p99", "idle_p99_us"),
            ("loaded p50", "p50_us"),
            ("loaded p99", "p99_us"),
        ],
    },
    Chart {
        workload: "w7",
        title: "W7 fan-out, 1 publisher to 16 subscribers, 64 B, each copy acknowledged (raw: not)",
        unit: "publishes/s",
        higher_is_better: true,
        series: &[("publishes/s", "publishes_per_s")],
    },
];

/// The colour of each implementation's bars (stable across charts).
fn colour(i: usize) -> &'static str {
    [
        "#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
    ][i % 6]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A grouped horizontal bar chart: one group per series (with its label above it), one bar
/// per implementation. The scale is logarithmic when the values span more than 20x (an
/// implementation 1000x slower would otherwise flatten every other bar), and says so.
fn svg_chart(
    chart: &Chart,
    impls: &[String],
    res: &BTreeMap<(String, String), Obj>,
) -> Option<String> {
    let value = |i: &str, key: &str| -> Option<f64> {
        let o = res.get(&(i.to_string(), chart.workload.to_string()))?;
        if !flag(o, "ok") || flag(o, "skipped") {
            return None;
        }
        num(o, key).filter(|v| *v > 0.0)
    };
    let all: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|(_, k)| impls.iter().filter_map(move |i| value(i, k)))
        .collect();
    let max = all.iter().copied().fold(0.0f64, f64::max);
    let min = all.iter().copied().fold(f64::INFINITY, f64::min);
    if max <= 0.0 || !min.is_finite() {
        return None;
    }
    let log = max / min > 20.0;
    let floor = (min / 2.0).log10();
    let scale = |v: f64| -> f64 {
        if log {
            (v.log10() - floor) / (max.log10() - floor)
        } else {
            v / max
        }
    };
    let (left, right, bar, top) = (150.0, 130.0, 18.0, 50.0);
    let label_h = if chart.series.len() > 1 { 18.0 } else { 0.0 };
    let gap = 10.0;
    let width = 760.0;
    let plot = width - left - right;
    let group_h = label_h + impls.len() as f64 * bar + gap;
    let height = top + chart.series.len() as f64 * group_h + 10.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>\n<text x=\"10\" y=\"38\" fill=\"#555\">{}, {} is better{}</text>\n",
        esc(chart.title),
        esc(chart.unit),
        if chart.higher_is_better { "higher" } else { "lower" },
        if log { " (logarithmic scale)" } else { "" }
    );
    for (g, (label, key)) in chart.series.iter().enumerate() {
        let y0 = top + g as f64 * group_h;
        if label_h > 0.0 {
            out.push_str(&format!(
                "<text x=\"{left}\" y=\"{:.1}\" font-weight=\"bold\">{}</text>\n",
                y0 + 13.0,
                esc(label)
            ));
        }
        for (n, i) in impls.iter().enumerate() {
            let y = y0 + label_h + n as f64 * bar;
            out.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                left - 6.0,
                y + bar * 0.72,
                esc(i)
            ));
            match value(i, key) {
                Some(v) => {
                    let w = (scale(v) * plot).max(1.0);
                    out.push_str(&format!(
                        "<rect x=\"{left}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                        y + 2.0,
                        bar - 4.0,
                        colour(n),
                        left + w + 4.0,
                        y + bar * 0.72,
                        esc(&human(v))
                    ));
                }
                None => out.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#999\">n/a</text>\n",
                    left + 4.0,
                    y + bar * 0.72
                )),
            }
        }
    }
    out.push_str("</svg>\n");
    Some(out)
}

/// The soak's RSS curve: `rss_trace_mib` ("0s:9.8 1s:10.2 ...") as a line, the first
/// minute's peak (the warmed-up level of a curve that swings with the churn) and the +16 MiB
/// bound above it as dashed lines.
fn svg_soak(imp: &str, o: &Obj) -> Option<String> {
    let points: Vec<(f64, f64)> = st(o, "rss_trace_mib")?
        .split_whitespace()
        .filter_map(|p| {
            let (t, mib) = p.split_once("s:")?;
            Some((t.parse().ok()?, mib.parse().ok()?))
        })
        .collect();
    let (&(t_end, _), base_at) = (points.last()?, num(o, "base_at_s").unwrap_or(60.0));
    let base = num(o, "rss_first_minute_peak_kib").or_else(|| num(o, "rss_base_kib"))? / 1024.0;
    let bound = base + 16.0;
    let y_max = points.iter().map(|p| p.1).fold(bound, f64::max) * 1.1;
    let (w, h, left, top, plot_w, plot_h) = (760.0, 360.0, 60.0, 40.0, 670.0, 270.0);
    let x = |t: f64| left + plot_w * t / t_end.max(1.0);
    let y = |m: f64| top + plot_h * (1.0 - m / y_max);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"14\">{imp} soak: RSS of the whole process, MiB, over {t_end:.0} s of churn</text>\n"
    );
    for k in 0..=4 {
        let m = y_max * f64::from(k) / 4.0;
        out.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{m:.0}</text>\n",
            left + plot_w,
            y(m),
            y(m),
            left - 6.0,
            y(m) + 4.0
        ));
    }
    for (m, label, colour) in [
        (base, "peak of the first {base_at:.0} s", "#888"),
        (bound, "that + 16 MiB", "#c33"),
    ] {
        let label = label.replace("{base_at:.0}", &format!("{base_at:.0}"));
        out.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\" text-anchor=\"end\">{label}</text>\n",
            left + plot_w,
            y(m),
            y(m),
            left + plot_w,
            y(m) - 4.0
        ));
    }
    let path: Vec<String> = points
        .iter()
        .map(|&(t, m)| format!("{:.1},{:.1}", x(t), y(m)))
        .collect();
    out.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#2a6\" stroke-width=\"1.5\" points=\"{}\"/>\n",
        path.join(" ")
    ));
    for k in 0..=5 {
        let t = t_end * f64::from(k) / 5.0;
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.0} s</text>\n",
            x(t),
            top + plot_h + 18.0
        ));
    }
    out.push_str("</svg>\n");
    Some(out)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut svg_dir = None;
    if let Some(at) = args.iter().position(|a| a == "--svg") {
        if at + 1 >= args.len() {
            eprintln!("--svg needs a directory");
            std::process::exit(2);
        }
        svg_dir = Some(args.remove(at + 1));
        args.remove(at);
    }
    let files = args;
    if files.is_empty() {
        eprintln!("usage: meshbench-report [--svg DIR] FILE.jsonl [...]");
        std::process::exit(2);
    }
    // (impl, workload) -> last result
    let mut res: BTreeMap<(String, String), Obj> = BTreeMap::new();
    let mut impl_order: Vec<String> = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            let Some(o) = parse_line(line) else {
                eprintln!("skipping unparsable line: {line}");
                continue;
            };
            let (Some(i), Some(w)) = (st(&o, "impl"), st(&o, "workload")) else {
                continue;
            };
            if !impl_order.iter().any(|x| x == i) {
                impl_order.push(i.to_string());
            }
            res.insert((i.to_string(), w.to_string()), o);
        }
    }

    if let Some(dir) = &svg_dir {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        for chart in CHARTS {
            if let Some(svg) = svg_chart(chart, &impl_order, &res) {
                let path = format!("{dir}/{}.svg", chart.workload);
                std::fs::write(&path, svg).unwrap_or_else(|e| panic!("{path}: {e}"));
                eprintln!("wrote {path}");
            }
        }
        for i in &impl_order {
            if let Some(svg) = res
                .get(&(i.clone(), "soak".to_string()))
                .and_then(|o| svg_soak(i, o))
            {
                let path = format!("{dir}/soak.svg");
                std::fs::write(&path, svg).unwrap_or_else(|e| panic!("{path}: {e}"));
                eprintln!("wrote {path}");
            }
        }
    }

    let cell = |i: &str, w: &str, f: &dyn Fn(&Obj) -> Option<String>| -> String {
        match res.get(&(i.to_string(), w.to_string())) {
            None => "-".into(),
            Some(o) if !flag(o, "ok") => "FAIL".into(),
            Some(o) if flag(o, "skipped") => "n/a".into(),
            Some(o) => {
                let mut s = f(o).unwrap_or_else(|| "?".into());
                if flag(o, "capped") {
                    s.push('*');
                }
                if num(o, "lost").unwrap_or(0.0) > 0.0 {
                    s.push('!');
                }
                s
            }
        }
    };

    let mut rows = Vec::new();
    for i in &impl_order {
        rows.push(vec![
            i.clone(),
            cell(i, "w1_64", &|o| {
                Some(format!(
                    "{} ({} MB/s)",
                    human(num(o, "msgs_per_s")?),
                    human(num(o, "mb_per_s")?)
                ))
            }),
            cell(i, "w1_1k", &|o| {
                Some(format!(
                    "{} ({} MB/s)",
                    human(num(o, "msgs_per_s")?),
                    human(num(o, "mb_per_s")?)
                ))
            }),
            cell(i, "w2", &|o| {
                Some(format!(
                    "{} / {} / {}",
                    lat(num(o, "p50_us")?),
                    lat(num(o, "p99_us")?),
                    lat(num(o, "p999_us")?)
                ))
            }),
            cell(i, "w3", &|o| num(o, "mb_per_s").map(human)),
            cell(i, "w4", &|o| num(o, "conns_per_s").map(human)),
            cell(i, "w5", &|o| num(o, "msgs_per_s").map(human)),
            cell(i, "w5", &|o| {
                num(o, "peak_rss_kib").map(|k| format!("{:.1}", k / 1024.0))
            }),
        ]);
    }
    print_table(
        "Results (higher is better except W2 latency and RSS)",
        &[
            "impl",
            "W1 64B msg/s",
            "W1 1KiB msg/s",
            "W2 p50/p99/p99.9 us",
            "W3 MB/s",
            "W4 conn/s",
            "W5 msg/s",
            "W5 peak RSS MiB",
        ],
        &rows,
    );

    if res.keys().any(|(_, w)| w == "w6") {
        let mut rows = Vec::new();
        for i in &impl_order {
            if !res.contains_key(&(i.clone(), "w6".to_string())) {
                continue;
            }
            rows.push(vec![
                i.clone(),
                cell(i, "w6", &|o| {
                    Some(format!(
                        "{} / {}",
                        lat(num(o, "idle_p50_us")?),
                        lat(num(o, "idle_p99_us")?)
                    ))
                }),
                cell(i, "w6", &|o| {
                    Some(format!(
                        "{} / {} / {}",
                        lat(num(o, "p50_us")?),
                        lat(num(o, "p99_us")?),
                        lat(num(o, "p999_us")?)
                    ))
                }),
                cell(i, "w6", &|o| {
                    num(o, "p99_loaded_over_idle").map(|v| format!("{v:.2}"))
                }),
                cell(i, "w6", &|o| {
                    Some(format!(
                        "{} ({} x {} MiB)",
                        human(num(o, "bulk_mb_per_s")?),
                        num(o, "bulks")?,
                        num(o, "bulk_bytes_each")? / 1048576.0
                    ))
                }),
                cell(i, "w6", &|o| num(o, "iters").map(human)),
            ]);
        }
        print_table(
            "W6: 64 B round trips while a bulk transfer to the same peer runs (idle = same process, same connection, just before)",
            &[
                "impl",
                "idle p50/p99 us",
                "loaded p50/p99/p99.9 us",
                "p99 loaded/idle",
                "bulk MB/s during",
                "loaded samples",
            ],
            &rows,
        );
    }

    if res.keys().any(|(_, w)| w == "w7") {
        let mut rows = Vec::new();
        for i in &impl_order {
            if !res.contains_key(&(i.clone(), "w7".to_string())) {
                continue;
            }
            rows.push(vec![
                i.clone(),
                cell(i, "w7", &|o| {
                    num(o, "subscribers").map(|v| format!("{v:.0}"))
                }),
                cell(i, "w7", &|o| num(o, "publishes_per_s").map(human)),
                cell(i, "w7", &|o| num(o, "copies_per_s").map(human)),
                cell(i, "w7", &|o| {
                    num(o, "cpu_us_per_publish").map(|v| format!("{v:.1}"))
                }),
                cell(i, "w7", &|o| num(o, "cpu_s").map(|v| format!("{v:.2}"))),
                cell(i, "w7", &|o| {
                    num(o, "peak_rss_kib").map(|k| format!("{:.1}", k / 1024.0))
                }),
            ]);
        }
        print_table(
            "W7: fan-out, one publisher to N subscribers, every copy acknowledged by its subscriber (raw: counted per batch)",
            &[
                "impl",
                "subscribers",
                "publishes/s",
                "copies/s",
                "CPU us/publish",
                "cpu_s",
                "peak RSS MiB",
            ],
            &rows,
        );
    }

    let wl = ["w1_64", "w1_1k", "w2", "w3", "w4", "w5"];
    let mut rows = Vec::new();
    for i in &impl_order {
        let mut r = vec![i.clone()];
        for w in wl {
            r.push(cell(i, w, &|o| {
                num(o, "peak_rss_kib").map(|k| format!("{:.1}", k / 1024.0))
            }));
        }
        rows.push(r);
    }
    print_table(
        "Peak RSS per run, MiB (VmHWM of the whole process: both peers, setup + warm-up + run)",
        &["impl", "W1 64B", "W1 1KiB", "W2", "W3", "W4", "W5"],
        &rows,
    );

    let mut rows = Vec::new();
    for i in &impl_order {
        rows.push(vec![
            i.clone(),
            cell(i, "w1_64", &|o| {
                num(o, "cpu_us_per_msg").map(|v| format!("{v:.1}"))
            }),
            cell(i, "w1_1k", &|o| {
                num(o, "cpu_us_per_msg").map(|v| format!("{v:.1}"))
            }),
            cell(i, "w2", &|o| {
                num(o, "cpu_us_per_rt").map(|v| format!("{v:.1}"))
            }),
            cell(i, "w3", &|o| {
                num(o, "cpu_s_per_gb").map(|v| format!("{v:.2}"))
            }),
            cell(i, "w4", &|o| {
                Some(format!(
                    "{:.2}",
                    num(o, "cpu_s")? * 1000.0 / num(o, "conns")?
                ))
            }),
            cell(i, "w5", &|o| {
                num(o, "cpu_us_per_msg").map(|v| format!("{v:.1}"))
            }),
        ]);
    }
    print_table(
        "Process CPU (both peers, all threads) per unit of work",
        &[
            "impl",
            "W1 64B us/msg",
            "W1 1KiB us/msg",
            "W2 us/rt",
            "W3 cpu-s/GB",
            "W4 cpu-ms/conn",
            "W5 us/msg",
        ],
        &rows,
    );

    let memory = ["m1", "m2", "alloc", "soak"];
    if res.keys().any(|(_, w)| memory.contains(&w.as_str())) {
        let mut rows = Vec::new();
        for i in &impl_order {
            rows.push(vec![
                i.clone(),
                cell(i, "m1", &|o| {
                    let rss = num(o, "kib_per_idle_peer")?;
                    Some(match num(o, "heap_kib_per_idle_peer") {
                        Some(h) => format!("{rss:.1} (heap {h:.1})"),
                        None => format!("{rss:.1}"),
                    })
                }),
                cell(i, "m2", &|o| {
                    num(o, "bytes_per_waiting_send_beyond_payload").map(|v| format!("{v:.0}"))
                }),
                cell(i, "alloc", &|o| {
                    Some(format!(
                        "{:.2} ({:.0} B)",
                        num(o, "w1_allocs_per_msg")?,
                        num(o, "w1_bytes_per_msg")?
                    ))
                }),
                cell(i, "alloc", &|o| {
                    Some(format!(
                        "{:.2} ({:.0} B)",
                        num(o, "w2_allocs_per_rt")?,
                        num(o, "w2_bytes_per_rt")?
                    ))
                }),
                cell(i, "soak", &|o| {
                    Some(format!(
                        "+{:.1} (at {:.0} s: {:.1})",
                        num(o, "growth_after_base_kib")? / 1024.0,
                        num(o, "base_at_s")?,
                        num(o, "rss_base_kib")? / 1024.0
                    ))
                }),
            ]);
        }
        print_table(
            "Memory: RSS KiB per connected idle peer (both ends; M1), bytes per waiting send beyond its payload (M2), heap allocations per message (W1 64 B) and per round trip (W2), soak RSS growth MiB after its base",
            &[
                "impl",
                "M1 KiB/idle peer",
                "M2 B/waiting send",
                "allocs/msg W1",
                "allocs/rt W2",
                "soak growth MiB",
            ],
            &rows,
        );
    }

    // vicus against each baseline, from the same run: > 1 means vicus is better (for
    // latencies and CPU the baseline's figure is divided by vicus's).
    if impl_order.iter().any(|i| i == "vicus") {
        let get = |i: &str, w: &str, k: &str| -> Option<f64> {
            let o = res.get(&(i.to_string(), w.to_string()))?;
            (flag(o, "ok") && !flag(o, "skipped"))
                .then(|| num(o, k))
                .flatten()
        };
        let metrics: &[(&str, &str, &str, bool)] = &[
            ("W1 64B msg/s", "w1_64", "msgs_per_s", true),
            ("W1 64B CPU/msg", "w1_64", "cpu_us_per_msg", false),
            ("W1 1KiB msg/s", "w1_1k", "msgs_per_s", true),
            ("W2 p50", "w2", "p50_us", false),
            ("W2 p99", "w2", "p99_us", false),
            ("W3 MB/s", "w3", "mb_per_s", true),
            ("W4 conn/s", "w4", "conns_per_s", true),
            ("W5 msg/s", "w5", "msgs_per_s", true),
            ("W5 peak RSS", "w5", "peak_rss_kib", false),
            ("W6 loaded p99", "w6", "p99_us", false),
            ("W7 publishes/s", "w7", "publishes_per_s", true),
            ("W7 CPU/publish", "w7", "cpu_us_per_publish", false),
            ("W7 peak RSS", "w7", "peak_rss_kib", false),
            ("M1 KiB/idle peer", "m1", "kib_per_idle_peer", false),
            ("allocs/msg W1", "alloc", "w1_allocs_per_msg", false),
            ("allocs/rt W2", "alloc", "w2_allocs_per_rt", false),
        ];
        let baselines: Vec<&String> = impl_order.iter().filter(|i| *i != "vicus").collect();
        let mut rows = Vec::new();
        for (label, w, k, higher) in metrics {
            let mut r = vec![label.to_string()];
            for b in &baselines {
                r.push(match (get("vicus", w, k), get(b, w, k)) {
                    (Some(v), Some(x)) if v > 0.0 && x > 0.0 => {
                        let ratio = if *higher { v / x } else { x / v };
                        format!("{ratio:.2}")
                    }
                    _ => "-".into(),
                });
            }
            rows.push(r);
        }
        let mut header = vec!["metric".to_string()];
        header.extend(baselines.iter().map(|b| format!("vicus vs {b}")));
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        print_table(
            "vicus against each baseline in this run (> 1: vicus is better; latency, CPU and RSS as baseline / vicus)",
            &header,
            &rows,
        );
    }

    println!("\n'*' = capped by MB_MAX_SECS (fewer messages/iterations/bytes than requested; see JSON 'requested').");
    println!("'!' = some messages not acknowledged (see JSON 'lost' / 'diag').");
    let mut notes = Vec::new();
    for ((i, w), o) in &res {
        if flag(o, "skipped") {
            continue;
        }
        if !flag(o, "ok") {
            notes.push(format!(
                "FAIL {i} {w}: {}",
                st(o, "error").unwrap_or("(no error text)")
            ));
        } else {
            if flag(o, "capped") {
                let done = num(o, "msgs")
                    .or(num(o, "publishes"))
                    .or(num(o, "iters"))
                    .or(num(o, "bytes"))
                    .or(num(o, "conns"))
                    .unwrap_or(0.0);
                let req = num(o, "requested")
                    .or(num(o, "requested_per_client")
                        .map(|r| r * num(o, "clients").unwrap_or(1.0)))
                    .unwrap_or(0.0);
                notes.push(format!(
                    "capped {i} {w}: ran {} of {} requested",
                    human(done),
                    human(req)
                ));
            }
            if let Some(d) = st(o, "diag") {
                notes.push(format!("diag {i} {w}: {d}"));
            }
        }
    }
    for n in notes {
        println!("{n}");
    }
    println!("\nConfigurations (from the W1 64B result notes):");
    for i in &impl_order {
        if let Some(n) = res
            .get(&(i.clone(), "w1_64".to_string()))
            .and_then(|o| st(o, "notes"))
        {
            println!("  {i}: {n}");
        }
    }
}
