//! `shopkv session create|keepalive|get|close`.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use tokio_stream::StreamExt;

use super::{CliError, Format, GlobalArgs, connect};
use crate::proto;
use crate::proto::session_client::SessionClient;

/// `shopkv session ...`
#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    /// Grant a session; prints its id.
    Create {
        /// Time to live without keep-alives, in ms.
        #[arg(long, default_value_t = 10_000)]
        ttl_ms: u64,
    },
    /// Keep a session alive until interrupted (or until it is gone: exit 1).
    Keepalive {
        /// Session id.
        id: u64,
    },
    /// Show a session's TTL and remaining time.
    Get {
        /// Session id.
        id: u64,
    },
    /// End a session now.
    Close {
        /// Session id.
        id: u64,
    },
}

/// Runs `shopkv session ...`.
pub async fn session(g: &GlobalArgs, cmd: SessionCmd) -> Result<(), CliError> {
    let mut c = SessionClient::new(connect(g).await?);
    match cmd {
        SessionCmd::Create { ttl_ms } => {
            let s = c
                .create(proto::CreateSessionRequest { ttl_ms })
                .await?
                .into_inner();
            match g.write_out {
                Format::Json => println!(
                    "{}",
                    json!({"session_id": s.session_id, "ttl_ms": s.ttl_ms})
                ),
                Format::Table => println!("{}", s.session_id),
            }
        }
        SessionCmd::Get { id } => {
            let s = c
                .get(proto::GetSessionRequest { session_id: id })
                .await?
                .into_inner();
            match g.write_out {
                Format::Json => println!(
                    "{}",
                    json!({"session_id": s.session_id, "ttl_ms": s.ttl_ms, "remaining_ms": s.remaining_ms})
                ),
                Format::Table => println!(
                    "session {} ttl={}ms remaining={}ms",
                    s.session_id, s.ttl_ms, s.remaining_ms
                ),
            }
        }
        SessionCmd::Close { id } => {
            c.close(proto::CloseSessionRequest { session_id: id })
                .await?;
            if g.write_out == Format::Table {
                println!("OK closed {id}");
            } else {
                println!("{}", json!({"session_id": id, "closed": true}));
            }
        }
        SessionCmd::Keepalive { id } => keepalive(g, id).await?,
    }
    Ok(())
}

/// Renews `id` every TTL/3 over a KeepAlive stream, reconnecting after an
/// interruption, until the session is gone.
async fn keepalive(g: &GlobalArgs, id: u64) -> Result<(), CliError> {
    let mut interval = Duration::from_millis(500);
    loop {
        let mut c = match connect(g).await {
            Ok(c) => SessionClient::new(c),
            Err(e) => {
                eprintln!("keepalive: {e}; retrying");
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        // One request now, then one per interval (the TTL/3 the first answer tells).
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let _ = tx.try_send(proto::KeepAliveRequest { session_id: id });
        let mut replies = match c.keep_alive(requests).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Err(s.into()),
            Err(s) => {
                eprintln!("keepalive: {}; retrying", s.message());
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        loop {
            match replies.next().await {
                Some(Ok(r)) => {
                    interval = Duration::from_millis((r.ttl_ms / 3).max(100));
                    match g.write_out {
                        Format::Json => {
                            println!("{}", json!({"session_id": id, "ttl_ms": r.ttl_ms}))
                        }
                        Format::Table => println!("session {id} kept alive, ttl={}ms", r.ttl_ms),
                    }
                    tokio::time::sleep(interval).await;
                    if tx
                        .send(proto::KeepAliveRequest { session_id: id })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Some(Err(s)) if s.code() == tonic::Code::NotFound => return Err(s.into()),
                Some(Err(s)) => {
                    eprintln!("keepalive: {}; reconnecting", s.message());
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
