//! The `shopkv` binary: `serve` runs a node; every other subcommand is a client.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shopkv::cli::commerce::{self, CartCmd, OrderCmd, ProductCmd, StockCmd};
use shopkv::cli::lock::LockCmd;
use shopkv::cli::session::SessionCmd;
use shopkv::cli::watch::WatchArgs;
use shopkv::cli::{self, ClusterCmd, GlobalArgs, KvCmd};
use shopkv::config::{Config, ServeArgs};
use shopkv::node::Node;
use tokio::net::TcpListener;

/// shopkv: a replicated store for catalog, inventory, carts and orders.
#[derive(Parser, Debug)]
#[command(name = "shopkv", version)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node.
    Serve(ServeArgs),
    /// Cluster administration.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Key-value commands.
    #[command(subcommand)]
    Kv(KvCmd),
    /// Catalog: products by SKU.
    #[command(subcommand)]
    Product(ProductCmd),
    /// Inventory: on-hand and reserved stock per SKU.
    #[command(subcommand)]
    Stock(StockCmd),
    /// Shopping carts by customer.
    #[command(subcommand)]
    Cart(CartCmd),
    /// Orders: place, pay, ship, deliver, cancel.
    #[command(subcommand)]
    Order(OrderCmd),
    /// Sessions: leases that keep locks alive.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Fair locks with fencing tokens.
    #[command(subcommand)]
    Lock(LockCmd),
    /// Stream changes to KV keys under a prefix, an order, a SKU's stock or a lock.
    Watch(WatchArgs),
    /// Demo data.
    #[command(subcommand)]
    Demo(DemoCmd),
}

#[derive(Subcommand, Debug)]
enum DemoCmd {
    /// Load a demo catalog: products DEMO-00001.. with stock, over every shard.
    Seed {
        /// How many products.
        #[arg(long, default_value_t = 1000)]
        products: u32,
    },
}

/// jemalloc (TiKV's allocator) instead of glibc's: glibc malloc/free were
/// ~8 % of a node's CPU under load, with many threads handing buffers to
/// each other; jemalloc placed 8 % more orders and 4 % more puts in A/B runs
/// (bench/RESULTS.md, 2026-11-26). Only the server: the load generator keeps
/// the system allocator for both systems it drives.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Serve(args) => return serve(args).await,
        Cmd::Cluster(c) => cli::cluster(&cli.global, c).await,
        Cmd::Kv(c) => cli::kv(&cli.global, c).await,
        Cmd::Product(c) => commerce::product(&cli.global, c).await,
        Cmd::Stock(c) => commerce::stock(&cli.global, c).await,
        Cmd::Cart(c) => commerce::cart(&cli.global, c).await,
        Cmd::Order(c) => commerce::order(&cli.global, c).await,
        Cmd::Session(c) => cli::session::session(&cli.global, c).await,
        Cmd::Lock(c) => cli::lock::lock(&cli.global, c).await,
        Cmd::Watch(a) => cli::watch::watch(&cli.global, a).await,
        Cmd::Demo(DemoCmd::Seed { products }) => cli::demo::seed(&cli.global, products).await,
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    // Crash tests set FAILPOINTS (e.g. `txn-after-begin=return`) on builds with the feature.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOPKV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error")),
        )
        .with_ansi(false)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    // Bind first: a port in use is a startup error naming the address.
    let peer = TcpListener::bind(&config.peer_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on peer address {}: {e}", config.peer_addr))?;
    let client = TcpListener::bind(&config.client_addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on client address {}: {e}",
            config.client_addr
        )
    })?;
    let node = Node::start(config.clone()).await?;
    tracing::info!(id = node.id, peer = %config.peer_addr, client = %config.client_addr, "node started");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Acknowledged writes are already synced: stopping needs no flush.
    tokio::select! {
        res = shopkv::server::serve(node, peer, client) => res?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
    }
    Ok(())
}
