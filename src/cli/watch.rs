//! `shopkv watch PREFIX` (like `etcdctl watch --prefix`), and `--order`,
//! `--sku`, `--lock` for one record: one line per change until interrupted,
//! resumable with `--rev GROUP:REVISION`.

use std::collections::HashMap;

use clap::Args;
use serde_json::json;

use super::{CliError, Format, GlobalArgs, connect, lossy};
use crate::proto;
use crate::proto::watch_client::WatchClient;
use crate::proto::watch_event::Record;
use crate::proto::watch_request::Target;

/// `shopkv watch ...`
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// KV key prefix ("" for every key).
    #[arg(required_unless_present_any = ["order", "sku", "lock"], conflicts_with_all = ["order", "sku", "lock"])]
    pub prefix: Option<String>,
    /// Follow one order's status instead.
    #[arg(long, conflicts_with_all = ["sku", "lock"])]
    pub order: Option<String>,
    /// Follow one SKU's stock level instead.
    #[arg(long, conflicts_with = "lock")]
    pub sku: Option<String>,
    /// Follow one lock's holders and waiters instead.
    #[arg(long)]
    pub lock: Option<String>,
    /// Start GROUP at REVISION (repeatable; one past the last revision seen
    /// resumes without a gap). Groups not named start at the current state.
    #[arg(long = "rev", value_parser = parse_group_rev)]
    pub revs: Vec<(u64, u64)>,
    /// Exit after this many changes.
    #[arg(long)]
    pub limit: Option<u64>,
}

fn parse_group_rev(s: &str) -> Result<(u64, u64), String> {
    let (g, r) = s
        .split_once(':')
        .ok_or_else(|| format!("expected GROUP:REVISION, got {s:?}"))?;
    let g = g.parse().map_err(|e| format!("bad group in {s:?}: {e}"))?;
    let r = r
        .parse()
        .map_err(|e| format!("bad revision in {s:?}: {e}"))?;
    Ok((g, r))
}

fn kind_name(kind: i32) -> &'static str {
    if kind == proto::EventKind::Delete as i32 {
        "DELETE"
    } else {
        "PUT"
    }
}

fn entries(es: &[proto::LockEntry]) -> String {
    let v: Vec<String> = es
        .iter()
        .map(|e| format!("{}@{}", e.session_id, e.fencing_token))
        .collect();
    v.join(",")
}

/// One event as a table line and as JSON.
fn render(e: &proto::WatchEvent) -> (String, serde_json::Value) {
    let kind = kind_name(e.kind);
    let head = format!("{kind} {}:{}", e.group, e.revision);
    let base = json!({"kind": kind, "group": e.group, "revision": e.revision});
    let (line, mut doc) = match &e.record {
        Some(Record::Kv(r)) => (
            format!("{head} {} {}", lossy(&r.key), lossy(&r.value)),
            json!({"key": lossy(&r.key), "value": lossy(&r.value), "version": r.version}),
        ),
        Some(Record::Order(o)) => (
            format!("{head} order {} {}", o.order_id, o.status_name),
            json!({"order_id": o.order_id, "status": o.status_name, "version": o.version}),
        ),
        Some(Record::Stock(s)) => (
            format!(
                "{head} stock {} on_hand={} reserved={} available={}",
                s.sku, s.on_hand, s.reserved, s.available
            ),
            json!({"sku": s.sku, "on_hand": s.on_hand, "reserved": s.reserved, "available": s.available, "version": s.version}),
        ),
        Some(Record::Lock(l)) => (
            format!(
                "{head} lock {} holders={} waiters={} last_token={}",
                l.name,
                entries(&l.holders),
                entries(&l.waiters),
                l.last_token
            ),
            json!({"lock": l.name, "holders": entries(&l.holders), "waiters": entries(&l.waiters), "last_token": l.last_token}),
        ),
        None => (head, json!({})),
    };
    if let (Some(d), Some(b)) = (doc.as_object_mut(), base.as_object()) {
        for (k, v) in b {
            d.insert(k.clone(), v.clone());
        }
    }
    (line, doc)
}

/// Runs `shopkv watch ...`.
pub async fn watch(g: &GlobalArgs, a: WatchArgs) -> Result<(), CliError> {
    let target = match (a.prefix, a.order, a.sku, a.lock) {
        (_, Some(o), _, _) => Target::OrderId(o),
        (_, _, Some(s), _) => Target::Sku(s),
        (_, _, _, Some(l)) => Target::LockName(l),
        (Some(p), ..) => Target::KvPrefix(p.into_bytes()),
        (None, None, None, None) => return Err(CliError("nothing to watch".into())),
    };
    let start: HashMap<u64, u64> = a.revs.into_iter().collect();
    let mut stream = WatchClient::new(connect(g).await?)
        .watch(proto::WatchRequest {
            target: Some(target),
            start_revisions: start,
            groups: Vec::new(),
        })
        .await?
        .into_inner();
    let mut seen = 0u64;
    while let Some(resp) = stream.message().await? {
        for e in &resp.events {
            let (line, doc) = render(e);
            match g.write_out {
                Format::Table => println!("{line}"),
                Format::Json => println!("{doc}"),
            }
            seen += 1;
            if a.limit.is_some_and(|l| seen >= l) {
                return Ok(());
            }
        }
    }
    Err(CliError("the watch stream ended".into()))
}
