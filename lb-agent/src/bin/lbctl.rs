//! `lbctl`: reads the pinned maps directly, so it works while the agent is down.

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::datapath::KernelTables;
use lb_common::{
    PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    backend::{FLAG_LOCAL, FLAG_TERMINATING, Lb4Backend},
    conntrack::DIR_FORWARD,
    service::{KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT},
    slot::Lb4SlotKey,
};
use serde_json::{Value, json};

/// Inspect the load balancer's pinned BPF maps.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The agent's pin directory (its --bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/lb", global = true)]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One row per frontend, with its backends.
    Services,
    /// Every backend.
    Backends,
    /// Tracked flows (forward direction).
    Conntrack {
        /// At most this many rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Packets and bytes per verdict and drop reason.
    Stats,
}

fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_CLUSTER_IP => "ClusterIP",
        KIND_NODE_PORT => "NodePort",
        KIND_LOAD_BALANCER => "LoadBalancer",
        KIND_EXTERNAL_IP => "ExternalIP",
        _ => "unknown",
    }
}

fn backend_json(id: u32, b: &Lb4Backend) -> Value {
    let state = if b.flags & FLAG_TERMINATING != 0 {
        "terminating"
    } else {
        "active"
    };
    json!({
        "id": id,
        "address": format!("{}:{}", Ipv4Addr::from(b.addr), b.port),
        "protocol": proto_name(b.proto),
        "state": state,
        "local": b.flags & FLAG_LOCAL != 0,
    })
}

fn services(tables: &KernelTables) -> anyhow::Result<Vec<Value>> {
    let slots = tables.dump_slots()?;
    let backends = tables.dump_backends()?;
    let mut services = tables.dump_services()?;
    services.sort_by_key(|(k, _)| *k);
    Ok(services
        .iter()
        .map(|(key, svc)| {
            let members: Vec<Value> = (0..svc.backend_count)
                .map(|slot| {
                    let slot_key = Lb4SlotKey { service_id: svc.service_id, revision: svc.revision, slot };
                    match slots.get(&slot_key).and_then(|s| backends.get(&s.backend_id).map(|b| (s.backend_id, b))) {
                        Some((id, b)) => backend_json(id, b),
                        None => json!({ "slot": slot, "state": "missing" }),
                    }
                })
                .collect();
            json!({
                "frontend": format!("{}:{}/{}", Ipv4Addr::from(key.addr), key.port, proto_name(key.proto)),
                "type": kind_name(svc.kind),
                "service_id": svc.service_id,
                "revision": svc.revision,
                "affinity_timeout": svc.affinity_timeout,
                "backends": members,
            })
        })
        .collect())
}

fn run(args: &Args) -> anyhow::Result<()> {
    let tables = KernelTables::open(&args.bpffs)?;
    let rows: Vec<Value> = match &args.command {
        Command::Services => services(&tables)?,
        Command::Backends => tables
            .dump_backends()?
            .iter()
            .map(|(id, b)| backend_json(*id, b))
            .collect(),
        Command::Conntrack { limit } => {
            let mut flows: Vec<_> = tables
                .dump_conntrack()?
                .into_iter()
                .filter(|(_, e)| e.direction == DIR_FORWARD)
                .collect();
            flows.sort_by_key(|(k, _)| *k);
            flows
                .iter()
                .take(limit.unwrap_or(usize::MAX))
                .map(|(k, e)| {
                    json!({
                        "client": format!("{}:{}", Ipv4Addr::from(k.src_addr), k.src_port),
                        "frontend": format!("{}:{}", Ipv4Addr::from(k.dst_addr), k.dst_port),
                        "backend": format!("{}:{}", Ipv4Addr::from(e.dst_addr), e.dst_port),
                        "snat": (e.rewrite & lb_common::conntrack::REWRITE_SRC != 0)
                            .then(|| format!("{}:{}", Ipv4Addr::from(e.src_addr), e.src_port)),
                        "protocol": proto_name(k.proto),
                        "packets": e.packets,
                        "bytes": e.bytes,
                    })
                })
                .collect()
        }
        Command::Stats => tables
            .stats
            .all()?
            .iter()
            .map(|(reason, c)| {
                json!({
                    "reason": reason.name(),
                    "verdict": if reason.is_drop() { "drop" } else { "pass" },
                    "packets": c.packets,
                    "bytes": c.bytes,
                })
            })
            .collect(),
    };
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => print_table(&args.command, &rows),
    }
    Ok(())
}

fn print_table(command: &Command, rows: &[Value]) {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match command {
        Command::Services => {
            println!(
                "{:<24} {:<12} {:<8} BACKENDS",
                "FRONTEND", "TYPE", "AFFINITY"
            );
            for row in rows {
                let backends: Vec<String> = row["backends"]
                    .as_array()
                    .map(|bs| {
                        bs.iter()
                            .map(|b| format!("{} ({})", text(&b["address"]), text(&b["state"])))
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "{:<24} {:<12} {:<8} {}",
                    text(&row["frontend"]),
                    text(&row["type"]),
                    text(&row["affinity_timeout"]),
                    backends.join(", ")
                );
            }
        }
        _ => {
            let columns: &[&str] = match command {
                Command::Backends => &["id", "address", "protocol", "state", "local"],
                Command::Conntrack { .. } => &[
                    "client", "frontend", "backend", "protocol", "packets", "bytes",
                ],
                _ => &["reason", "verdict", "packets", "bytes"],
            };
            if rows.is_empty() {
                println!("(none)");
                return;
            }
            let line =
                |cells: Vec<String>| cells.iter().map(|c| format!("{c:<22}")).collect::<String>();
            println!(
                "{}",
                line(columns.iter().map(|c| c.to_uppercase()).collect()).trim_end()
            );
            for row in rows {
                println!(
                    "{}",
                    line(columns.iter().map(|c| text(&row[*c])).collect()).trim_end()
                );
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
