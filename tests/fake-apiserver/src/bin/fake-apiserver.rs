//! The fake API server as a process of its own, for tests where several daemons watch one
//! server over the network (the VM cluster): `fake-apiserver --listen ADDRESS`.
//!
//! It prints `listening on ADDRESS` once it accepts connections. Objects are written with
//! `PUT` and `DELETE` at their paths, as on a real API server. On SIGTERM it shuts down as a
//! kube-apiserver does: its own address leaves the `kubernetes` Service's endpoints, watches
//! are closed, and after `--shutdown-delay` (a real one takes about a minute) it exits.

use std::{net::SocketAddr, time::Duration};

use fake_apiserver::FakeApiServer;

const USAGE: &str = "usage: fake-apiserver [--listen ADDRESS] [--shutdown-delay SECONDS]";

fn parse() -> Result<(SocketAddr, Duration), String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 6443));
    let mut delay = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--listen" => {
                let text = value()?;
                listen = text.parse().map_err(|e| format!("--listen {text}: {e}"))?;
            }
            "--shutdown-delay" => {
                let text = value()?;
                let seconds: f64 =
                    text.parse().map_err(|e| format!("--shutdown-delay {text}: {e}"))?;
                delay = Duration::from_secs_f64(seconds);
            }
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    Ok((listen, delay))
}

#[tokio::main]
async fn main() {
    let (listen, delay) = parse().unwrap_or_else(|err| {
        eprintln!("fake-apiserver: {err}");
        std::process::exit(2);
    });
    let server = FakeApiServer::start_on(listen).await.unwrap_or_else(|err| {
        eprintln!("fake-apiserver: cannot listen on {listen}: {err}");
        std::process::exit(1);
    });
    println!("listening on {}", server.address());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    server.shut_down().await;
    tokio::time::sleep(delay).await;
}
