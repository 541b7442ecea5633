//! `shopkv lock acquire NAME -- COMMAND` (like `etcdctl lock`) and
//! `shopkv lock inspect NAME`.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::{CliError, Format, GlobalArgs, connect};
use crate::proto;
use crate::proto::lock_client::LockClient;
use crate::proto::session_client::SessionClient;

/// `shopkv lock ...`
#[derive(Subcommand, Debug)]
pub enum LockCmd {
    /// Hold NAME while COMMAND runs (a session is created and kept alive for
    /// it); COMMAND gets the fencing token in SHOPKV_FENCING_TOKEN. Exits with
    /// COMMAND's exit code.
    Acquire {
        /// Lock name.
        name: String,
        /// Session TTL in seconds (etcdctl's `--ttl`): if this process dies,
        /// the lock passes on after it. Default 10.
        #[arg(long, conflicts_with = "ttl_ms")]
        ttl: Option<u64>,
        /// Session TTL in ms, for TTLs that are not whole seconds.
        #[arg(long, default_value_t = 10_000)]
        ttl_ms: u64,
        /// Take it shared (read lock) instead of exclusive.
        #[arg(long)]
        shared: bool,
        /// Give up after waiting this long (ms).
        #[arg(long, default_value_t = 600_000)]
        wait_ms: u64,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show holders, waiters and the last token.
    Inspect {
        /// Lock name.
        name: String,
    },
}

/// Runs `shopkv lock ...`.
pub async fn lock(g: &GlobalArgs, cmd: LockCmd) -> Result<(), CliError> {
    let channel = connect(g).await?;
    match cmd {
        LockCmd::Inspect { name } => {
            let s = LockClient::new(channel)
                .inspect(proto::InspectRequest { name })
                .await?
                .into_inner();
            let entry = |e: &proto::LockEntry| json!({"session_id": e.session_id, "mode": if e.mode == proto::LockMode::Shared as i32 { "shared" } else { "exclusive" }, "fencing_token": e.fencing_token});
            match g.write_out {
                Format::Json => println!(
                    "{}",
                    json!({"name": s.name, "last_token": s.last_token,
                           "holders": s.holders.iter().map(entry).collect::<Vec<_>>(),
                           "waiters": s.waiters.iter().map(entry).collect::<Vec<_>>()})
                ),
                Format::Table => {
                    println!("lock {} last_token={}", s.name, s.last_token);
                    for h in &s.holders {
                        println!("holder session={} token={}", h.session_id, h.fencing_token);
                    }
                    for w in &s.waiters {
                        println!("waiter session={}", w.session_id);
                    }
                }
            }
            Ok(())
        }
        LockCmd::Acquire {
            name,
            ttl,
            ttl_ms,
            shared,
            wait_ms,
            command,
        } => {
            let ttl_ms = ttl.map_or(ttl_ms, |secs| secs.saturating_mul(1000));
            let mut sessions = SessionClient::new(channel.clone());
            let session_id = sessions
                .create(proto::CreateSessionRequest { ttl_ms })
                .await?
                .into_inner()
                .session_id;
            // Keep the session alive every TTL/3 until the command ends.
            let keeper = {
                let mut sessions = sessions.clone();
                tokio::spawn(async move {
                    let every = Duration::from_millis((ttl_ms / 3).max(100));
                    loop {
                        tokio::time::sleep(every).await;
                        let req = tokio_stream::iter(vec![proto::KeepAliveRequest { session_id }]);
                        let ok = match sessions.keep_alive(req).await {
                            Ok(r) => r.into_inner().message().await.ok().flatten().is_some(),
                            Err(_) => false,
                        };
                        if !ok {
                            eprintln!("lock: keep-alive of session {session_id} failed; retrying");
                        }
                    }
                })
            };
            let mut locks = LockClient::new(channel);
            let mode = if shared {
                proto::LockMode::Shared
            } else {
                proto::LockMode::Exclusive
            };
            let acquired = locks
                .acquire(proto::AcquireRequest {
                    name: name.clone(),
                    session_id,
                    mode: mode as i32,
                    wait_timeout_ms: wait_ms,
                })
                .await;
            let token = match acquired {
                Ok(r) => r.into_inner().fencing_token,
                Err(s) => {
                    keeper.abort();
                    let _ = sessions
                        .close(proto::CloseSessionRequest { session_id })
                        .await;
                    return Err(s.into());
                }
            };
            let status = tokio::process::Command::new(&command[0])
                .args(&command[1..])
                .env("SHOPKV_FENCING_TOKEN", token.to_string())
                .env("SHOPKV_SESSION_ID", session_id.to_string())
                .env("SHOPKV_LOCK_NAME", &name)
                .status()
                .await;
            keeper.abort();
            // Closing the session releases the lock in the same apply.
            let _ = sessions
                .close(proto::CloseSessionRequest { session_id })
                .await;
            match status {
                Ok(s) => std::process::exit(s.code().unwrap_or(1)),
                Err(e) => Err(CliError(format!("cannot run {}: {e}", command[0]))),
            }
        }
    }
}
