//! Results: one JSON line per run ([`Row`]), and the side-by-side rendering of a
//! set of them — a table, one machine-readable `RESULT` line per compared row, and
//! the same as Markdown for `bench/RESULTS.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::client::System;
use crate::stats::Summary;

/// Rows with this label are paired etcd vs shopkv; others are shopkv-only extras.
pub const COMPARE: &str = "compare";

/// One run's result as stored in the results file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub system: System,
    pub workload: String,
    pub clients: usize,
    pub nodes: usize,
    /// Data shards (shopkv); 1 for etcd.
    pub shards: usize,
    /// [`COMPARE`] for the side-by-side table, anything else for an extra row.
    pub label: String,
    pub duration_s: f64,
    #[serde(flatten)]
    pub summary: Summary,
    /// CPU µs per operation of the cluster's server processes together (absent
    /// in rows of older runs, or when the processes were not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_op: Option<f64>,
    /// CPU µs per operation of the load generator itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench_cpu_us_per_op: Option<f64>,
}

/// The rounds of one row (same system, workload, clients, cluster and label) merged:
/// means of rate, latencies and CPU per operation, sums of counts, and the spread
/// of the rate.
pub struct Merged {
    pub row: Row,
    pub rounds: usize,
    pub min_ops_per_s: f64,
    pub max_ops_per_s: f64,
}

/// Merges repeated rounds of each row, in the order rows first appear.
pub fn merge_rounds(rows: &[Row]) -> Vec<Merged> {
    let mut out: Vec<Merged> = Vec::new();
    // CPU figures of each merged row's rounds (server, load generator), averaged
    // at the end over the rounds that measured them.
    let mut cpu: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    for r in rows {
        let key = |k: &Row| {
            (
                k.system,
                k.workload.clone(),
                k.clients,
                k.nodes,
                k.shards,
                k.label.clone(),
            )
        };
        let at = match out.iter().position(|m| key(&m.row) == key(r)) {
            None => {
                out.push(Merged {
                    row: r.clone(),
                    rounds: 1,
                    min_ops_per_s: r.summary.ops_per_s,
                    max_ops_per_s: r.summary.ops_per_s,
                });
                cpu.push((Vec::new(), Vec::new()));
                out.len() - 1
            }
            Some(at) => {
                let m = &mut out[at];
                let n = m.rounds as f64;
                let mean = |a: f64, b: f64| (a * n + b) / (n + 1.0);
                let (a, b) = (&mut m.row.summary, &r.summary);
                a.ops_per_s = mean(a.ops_per_s, b.ops_per_s);
                a.p50_ms = mean(a.p50_ms, b.p50_ms);
                a.p99_ms = mean(a.p99_ms, b.p99_ms);
                a.p999_ms = mean(a.p999_ms, b.p999_ms);
                a.max_ms = a.max_ms.max(b.max_ms);
                a.ops += b.ops;
                a.errors += b.errors;
                a.retries += b.retries;
                m.rounds += 1;
                m.min_ops_per_s = m.min_ops_per_s.min(b.ops_per_s);
                m.max_ops_per_s = m.max_ops_per_s.max(b.ops_per_s);
                at
            }
        };
        cpu[at].0.extend(r.server_cpu_us_per_op);
        cpu[at].1.extend(r.bench_cpu_us_per_op);
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    for (m, (servers, bench)) in out.iter_mut().zip(&cpu) {
        m.row.server_cpu_us_per_op = mean(servers);
        m.row.bench_cpu_us_per_op = mean(bench);
    }
    out
}

/// An extra row's rate over etcd's compared row of the same workload and
/// clients, measured in the same run ("-" if there is none).
fn vs_etcd(merged: &[Merged], r: &Row) -> String {
    merged
        .iter()
        .map(|m| &m.row)
        .find(|e| {
            e.system == System::Etcd
                && e.label == COMPARE
                && e.workload == r.workload
                && e.clients == r.clients
                && e.summary.ops_per_s > 0.0
        })
        .map_or("-".into(), |e| {
            format!("{:.2}", r.summary.ops_per_s / e.summary.ops_per_s)
        })
}

/// etcd and shopkv results of one (workload, clients) pair.
struct Pair<'a> {
    workload: &'a str,
    clients: usize,
    etcd: Option<&'a Row>,
    shopkv: Option<&'a Row>,
}

fn pairs(merged: &[Merged]) -> Vec<Pair<'_>> {
    // Keep the order in which workloads first appear; clients ascending inside one.
    let mut order: Vec<&str> = Vec::new();
    let mut by_key: BTreeMap<(usize, usize), Pair<'_>> = BTreeMap::new();
    for m in merged.iter().filter(|m| m.row.label == COMPARE) {
        let row = &m.row;
        let w = match order.iter().position(|w| *w == row.workload) {
            Some(p) => p,
            None => {
                order.push(&row.workload);
                order.len() - 1
            }
        };
        let pair = by_key.entry((w, row.clients)).or_insert(Pair {
            workload: &row.workload,
            clients: row.clients,
            etcd: None,
            shopkv: None,
        });
        match row.system {
            System::Etcd => pair.etcd = Some(row),
            System::Shopkv => pair.shopkv = Some(row),
        }
    }
    by_key.into_values().collect()
}

/// Names of the `RESULT` line's fields, in the order of [`Pair::cells`]; other
/// programs parse these lines, so the names and order are fixed.
const RESULT_KEYS: [&str; 7] = [
    "workload",
    "clients",
    "etcd_ops",
    "shopkv_ops",
    "ratio",
    "etcd_p99_ms",
    "shopkv_p99_ms",
];

impl Pair<'_> {
    /// workload, clients, etcd ops/s, shopkv ops/s, ratio, etcd p99, shopkv p99.
    fn cells(&self) -> [String; 7] {
        [
            self.workload.to_string(),
            self.clients.to_string(),
            ops(self.etcd),
            ops(self.shopkv),
            ratio_text(self),
            p99(self.etcd),
            p99(self.shopkv),
        ]
    }
}

fn ops(row: Option<&Row>) -> String {
    row.map_or("-".into(), |r| format!("{:.0}", r.summary.ops_per_s))
}

fn p99(row: Option<&Row>) -> String {
    row.map_or("-".into(), |r| format!("{:.2}", r.summary.p99_ms))
}

fn ratio(pair: &Pair<'_>) -> Option<f64> {
    let (e, s) = (pair.etcd?, pair.shopkv?);
    (e.summary.ops_per_s > 0.0).then(|| s.summary.ops_per_s / e.summary.ops_per_s)
}

fn ratio_text(pair: &Pair<'_>) -> String {
    ratio(pair).map_or("-".into(), |r| format!("{r:.2}"))
}

/// `etcd / shopkv` of a CPU figure (µs per operation), `-` where not measured.
fn cpu_pair(pair: &Pair<'_>, f: impl Fn(&Row) -> Option<f64>) -> String {
    let one = |r: Option<&Row>| cpu_one(r.and_then(&f));
    format!("{} / {}", one(pair.etcd), one(pair.shopkv))
}

fn cpu_one(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn errors(pair: &Pair<'_>) -> String {
    let e = |r: Option<&Row>| r.map_or(0, |r| r.summary.errors);
    format!("{}/{}", e(pair.etcd), e(pair.shopkv))
}

/// The compared table, the shopkv-only extras and the `RESULT` lines, as plain text.
pub fn render_text(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:>7} {:>11} {:>12} {:>6} {:>11} {:>13} {:>9} {:>19}",
        "workload",
        "clients",
        "etcd ops/s",
        "shopkv ops/s",
        "ratio",
        "etcd p99 ms",
        "shopkv p99 ms",
        "errors",
        "server cpu us/op"
    );
    let merged = merge_rounds(rows);
    let pairs = pairs(&merged);
    for p in &pairs {
        let c = p.cells();
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:>11} {:>12} {:>6} {:>11} {:>13} {:>9} {:>19}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6],
            errors(p),
            cpu_pair(p, |r| r.server_cpu_us_per_op)
        );
    }
    let extras: Vec<&Row> = merged
        .iter()
        .map(|m| &m.row)
        .filter(|r| r.label != COMPARE)
        .collect();
    if !extras.is_empty() {
        let _ = writeln!(out, "\nshopkv alone:");
        let _ = writeln!(
            out,
            "{:<18} {:>5} {:>6} {:<10} {:>7} {:>10} {:>8} {:>8} {:>6} {:>16} {:>8}",
            "setup",
            "nodes",
            "shards",
            "workload",
            "clients",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "server cpu us/op",
            "vs etcd"
        );
        for r in extras {
            let _ = writeln!(
                out,
                "{:<18} {:>5} {:>6} {:<10} {:>7} {:>10.0} {:>8.2} {:>8.2} {:>6} {:>16} {:>8}",
                r.label,
                r.nodes,
                r.shards,
                r.workload,
                r.clients,
                r.summary.ops_per_s,
                r.summary.p50_ms,
                r.summary.p99_ms,
                r.summary.errors,
                cpu_one(r.server_cpu_us_per_op),
                vs_etcd(&merged, r)
            );
        }
    }
    out.push('\n');
    for p in &pairs {
        let fields: Vec<String> = RESULT_KEYS
            .iter()
            .zip(p.cells())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "RESULT {}", fields.join(" "));
    }
    out
}

/// The same tables as Markdown (for `bench/RESULTS.md`).
pub fn render_markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| workload | clients | etcd ops/s | shopkv ops/s | ratio | etcd p50/p99/p999 ms | shopkv p50/p99/p999 ms | errors etcd/shopkv | server CPU µs/op etcd / shopkv | load generator CPU µs/op etcd / shopkv |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let lat = |r: Option<&Row>| {
        r.map_or("-".into(), |r| {
            format!(
                "{:.2} / {:.2} / {:.2}",
                r.summary.p50_ms, r.summary.p99_ms, r.summary.p999_ms
            )
        })
    };
    let merged = merge_rounds(rows);
    let spread = |r: Option<&Row>| {
        let m = r.and_then(|r| merged.iter().find(|m| std::ptr::eq(&m.row, r)));
        match m {
            Some(m) if m.rounds > 1 => {
                format!("{} ({:.0}–{:.0})", ops(r), m.min_ops_per_s, m.max_ops_per_s)
            }
            _ => ops(r),
        }
    };
    for p in pairs(&merged) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.workload,
            p.clients,
            spread(p.etcd),
            spread(p.shopkv),
            ratio_text(&p),
            lat(p.etcd),
            lat(p.shopkv),
            errors(&p),
            cpu_pair(&p, |r| r.server_cpu_us_per_op),
            cpu_pair(&p, |r| r.bench_cpu_us_per_op)
        );
    }
    let extras: Vec<&Row> = merged
        .iter()
        .map(|m| &m.row)
        .filter(|r| r.label != COMPARE)
        .collect();
    if !extras.is_empty() {
        out.push_str("\nshopkv alone:\n\n| setup | nodes | shards | workload | clients | ops/s | p50/p99/p999 ms | errors | server CPU µs/op | vs etcd's compared row |\n");
        out.push_str("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|\n");
        for r in extras {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
                r.label,
                r.nodes,
                r.shards,
                r.workload,
                r.clients,
                r.summary.ops_per_s,
                lat(Some(r)),
                r.summary.errors,
                cpu_one(r.server_cpu_us_per_op),
                vs_etcd(&merged, r)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: System, workload: &str, clients: usize, ops_per_s: f64, label: &str) -> Row {
        Row {
            system,
            workload: workload.into(),
            clients,
            nodes: 3,
            shards: 8,
            label: label.into(),
            duration_s: 10.0,
            summary: Summary {
                ops: (ops_per_s * 10.0) as u64,
                ops_per_s,
                p99_ms: 12.5,
                ..Summary::default()
            },
            server_cpu_us_per_op: None,
            bench_cpu_us_per_op: None,
        }
    }

    #[test]
    fn rows_pair_up_by_workload_and_clients_with_the_ratio() {
        let rows = vec![
            row(System::Etcd, "put", 64, 2000.0, COMPARE),
            row(System::Etcd, "put", 1, 500.0, COMPARE),
            row(System::Shopkv, "put", 64, 5000.0, COMPARE),
            row(System::Shopkv, "put", 1, 400.0, COMPARE),
            row(System::Shopkv, "put", 64, 6000.0, "5-nodes"),
        ];
        let text = render_text(&rows);
        let results: Vec<&str> = text.lines().filter(|l| l.starts_with("RESULT ")).collect();
        assert_eq!(
            results,
            [
                "RESULT workload=put clients=1 etcd_ops=500 shopkv_ops=400 ratio=0.80 etcd_p99_ms=12.50 shopkv_p99_ms=12.50",
                "RESULT workload=put clients=64 etcd_ops=2000 shopkv_ops=5000 ratio=2.50 etcd_p99_ms=12.50 shopkv_p99_ms=12.50",
            ]
        );
        assert!(text.contains("5-nodes"), "{text}");
        let md = render_markdown(&rows);
        assert!(md.contains("| put | 64 | 2000 | 5000 | 2.50 |"), "{md}");
        // An extra row is set against etcd's compared row of its workload and clients.
        assert!(
            md.contains("| 5-nodes | 3 | 8 | put | 64 | 6000 |") && md.contains("| 3.00 |"),
            "{md}"
        );
    }

    #[test]
    fn repeated_rounds_are_averaged_with_their_spread() {
        let rows = vec![
            row(System::Etcd, "put", 64, 2000.0, COMPARE),
            row(System::Shopkv, "put", 64, 4000.0, COMPARE),
            row(System::Etcd, "put", 64, 3000.0, COMPARE),
            row(System::Shopkv, "put", 64, 5000.0, COMPARE),
        ];
        let merged = merge_rounds(&rows);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].rounds, 2);
        assert_eq!(merged[0].row.summary.ops_per_s, 2500.0);
        assert_eq!(
            (merged[1].min_ops_per_s, merged[1].max_ops_per_s),
            (4000.0, 5000.0)
        );
        let text = render_text(&rows);
        assert!(
            text.contains(
                "RESULT workload=put clients=64 etcd_ops=2500 shopkv_ops=4500 ratio=1.80"
            ),
            "{text}"
        );
        let md = render_markdown(&rows);
        assert!(
            md.contains("| put | 64 | 2500 (2000–3000) | 4500 (4000–5000) | 1.80 |"),
            "{md}"
        );
    }

    #[test]
    fn cpu_per_op_is_averaged_over_the_rounds_that_measured_it() {
        let with_cpu = |system, ops, servers: Option<f64>| Row {
            server_cpu_us_per_op: servers,
            bench_cpu_us_per_op: servers.map(|s| s / 4.0),
            ..row(system, "order", 64, ops, COMPARE)
        };
        let rows = vec![
            with_cpu(System::Etcd, 1000.0, Some(700.0)),
            with_cpu(System::Shopkv, 1500.0, Some(500.0)),
            with_cpu(System::Etcd, 1000.0, Some(800.0)),
            // A round of an older run, without CPU figures: not averaged in.
            with_cpu(System::Shopkv, 1500.0, None),
            row(System::Shopkv, "put", 64, 9000.0, "5-nodes"),
        ];
        let merged = merge_rounds(&rows);
        assert_eq!(merged[0].row.server_cpu_us_per_op, Some(750.0));
        assert_eq!(merged[1].row.server_cpu_us_per_op, Some(500.0));
        assert_eq!(merged[1].row.bench_cpu_us_per_op, Some(125.0));
        let md = render_markdown(&rows);
        assert!(md.contains("| 0/0 | 750 / 500 | 188 / 125 |"), "{md}");
        assert!(md.contains("| 0 | - |"), "an extra row without CPU: {md}");
        let text = render_text(&rows);
        assert!(text.contains("750 / 500"), "{text}");
    }

    #[test]
    fn a_row_without_its_partner_has_no_ratio() {
        let rows = vec![row(System::Shopkv, "get-lin", 64, 9000.0, COMPARE)];
        let text = render_text(&rows);
        assert!(
            text.contains("RESULT workload=get-lin clients=64 etcd_ops=- shopkv_ops=9000 ratio=-"),
            "{text}"
        );
    }
}
