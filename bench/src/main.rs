//! `shopkv-bench`: run one workload against one system and append its result line,
//! render a results file as the side-by-side table, or measure the disk's fsync.
//! `bench/run.sh` drives it; see `bench/README.md`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shopkv_bench::client::{self, System};
use shopkv_bench::report::{self, Row};
use shopkv_bench::runner::RunSpec;
use shopkv_bench::workloads::{self, KeySpace};

#[derive(Parser)]
#[command(
    name = "shopkv-bench",
    about = "Side-by-side load generator: shopkv vs etcd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one workload closed-loop and append one JSON result line to --out.
    Run(RunArgs),
    /// Print the side-by-side table and RESULT lines of a results file.
    Report {
        results: PathBuf,
        /// Also append the tables as Markdown to this file, under --heading.
        #[arg(long)]
        markdown: Option<PathBuf>,
        #[arg(long, default_value = "bench run")]
        heading: String,
        /// Lines written under the heading (command, machine, commit ...).
        #[arg(long)]
        note: Vec<String>,
    },
    /// Time `count` small write+fdatasync calls in DIR: the floor both systems sit on.
    FsyncProbe {
        dir: PathBuf,
        #[arg(long, default_value_t = 200)]
        count: u32,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum)]
    system: System,
    /// Client endpoints, comma separated (host:port).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// One of: put, get-lin, get-ser, order, flash.
    #[arg(long)]
    workload: String,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// shopkv only: send each request to its shard's leader, or to any node.
    #[arg(long, value_enum, default_value = "leader")]
    route: client::Routing,
    /// shopkv only: one unary call per KV request, or every client's KV requests
    /// on its connection's `Kv.Batch` stream.
    #[arg(long, value_enum, default_value = "unary")]
    kv_api: client::KvApi,
    /// HTTP/2 connections (default: min(clients, 16)).
    #[arg(long)]
    conns: Option<usize>,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Keys (put, get), SKUs (order), or units on sale (flash).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Recorded with the result: cluster size and shard count.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// "compare" pairs the row with the other system's; anything else is an extra row.
    #[arg(long, default_value = report::COMPARE)]
    label: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Server process ids, comma separated: their CPU time per operation is
    /// reported with the result.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    #[arg(long)]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Report {
            results,
            markdown,
            heading,
            note,
        } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("reading {}", results.display()))?;
            let rows: Vec<Row> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .context("parsing results")?;
            print!("{}", report::render_text(&rows));
            if let Some(path) = markdown {
                let mut md = format!("\n## {heading}\n\n");
                for line in &note {
                    md.push_str(&format!("- {line}\n"));
                }
                md.push('\n');
                md.push_str(&report::render_markdown(&rows));
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                f.write_all(md.as_bytes())?;
            }
            Ok(())
        }
        Command::FsyncProbe { dir, count } => fsync_probe(&dir, count),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.keys > 0,
        "--clients and --keys must be positive"
    );
    anyhow::ensure!(
        args.duration_secs > 0.0 && args.warmup_secs >= 0.0,
        "bad duration"
    );
    let space = KeySpace {
        keys: args.keys,
        value_bytes: args.value_bytes,
    };
    let workload = workloads::build(&args.workload, space)?;
    let conns = args.conns.unwrap_or(args.clients.min(16)).max(1);
    let connections =
        client::connect(args.system, &args.endpoints, conns, args.route, args.kv_api).await?;
    // A flash sale runs from the first order until sold out: no warm-up (it
    // would sell stock unmeasured), --duration-secs only caps it.
    let flash = args.workload == "flash";
    let spec = RunSpec {
        clients: args.clients,
        warmup: if flash {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(args.warmup_secs)
        },
        duration: Duration::from_secs_f64(args.duration_secs),
        progress: true,
        seed: args.seed,
        server_pids: args.server_pids.clone(),
    };
    eprintln!(
        "{} {} clients={} conns={} for {}s (+{}s warm-up)",
        args.system.as_str(),
        args.workload,
        args.clients,
        conns,
        args.duration_secs,
        spec.warmup.as_secs_f64()
    );
    let report = workload.setup_and_run(&connections, &spec).await?;
    let s = &report.summary;
    anyhow::ensure!(
        !flash || s.ops == args.keys,
        "flash sale: {} orders acknowledged, {} units were on sale (sold out within --duration-secs?)",
        s.ops,
        args.keys
    );
    let cpu = match report.cpu {
        Some(c) => format!(
            " cpu_us/op: servers={:.0} load_generator={:.0}",
            c.servers_us, c.bench_us
        ),
        None => String::new(),
    };
    eprintln!(
        "  => {:.0} ops/s p50={:.2}ms p99={:.2}ms p999={:.2}ms errors={} retries={}{cpu}",
        s.ops_per_s, s.p50_ms, s.p99_ms, s.p999_ms, s.errors, s.retries
    );
    let row = Row {
        system: args.system,
        workload: args.workload,
        clients: args.clients,
        nodes: args.nodes,
        shards: args.shards,
        label: args.label,
        // The flash sale's measured window is the time it took to sell out.
        duration_s: if flash && s.ops_per_s > 0.0 {
            s.ops as f64 / s.ops_per_s
        } else {
            args.duration_secs
        },
        summary: report.summary,
        server_cpu_us_per_op: report.cpu.map(|c| c.servers_us),
        bench_cpu_us_per_op: report.cpu.map(|c| c.bench_us),
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    writeln!(f, "{}", serde_json::to_string(&row)?)?;
    Ok(())
}

fn fsync_probe(dir: &std::path::Path, count: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let mut samples_us = Vec::with_capacity(count as usize);
    let block = [7u8; 256];
    for _ in 0..count.max(1) {
        let t0 = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        samples_us.push(t0.elapsed().as_micros() as u64);
    }
    std::fs::remove_file(&path)?;
    samples_us.sort_unstable();
    let q = |p: f64| samples_us[((samples_us.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "FSYNC count={} p50_ms={:.2} p99_ms={:.2}",
        samples_us.len(),
        q(0.5),
        q(0.99)
    );
    Ok(())
}
