//! healthCheckNodePort servers: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its `healthCheckNodePort` that tells the
//! load balancer whether this node has endpoints of it, answering as kube-proxy does.

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::health::ProxyHealth;

/// What one healthCheckNodePort reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Ready endpoints of it on this node.
    pub local_endpoints: usize,
}

/// kube-proxy's answer: 200 when this node has endpoints and the proxy is healthy, else 503;
/// the body in kube-proxy's layout.
pub fn answer(target: &Target, proxy_healthy: bool) -> (StatusCode, String) {
    let status = if target.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        target.namespace, target.name, target.local_endpoints, proxy_healthy
    );
    (status, body)
}

struct Server {
    target: Arc<Mutex<Target>>,
    task: JoinHandle<()>,
}

/// The running servers, by port.
pub struct ServiceHealth {
    health: Arc<ProxyHealth>,
    servers: BTreeMap<u16, Server>,
}

impl std::fmt::Debug for ServiceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHealth").field("ports", &self.servers.keys()).finish()
    }
}

/// A listener on `port` of every address of the node, IPv6 and IPv4 alike (one dual-stack
/// socket, as Go's listeners are, so dual-stack load balancers can check over either), or of
/// every IPv4 address where the node has no IPv6.
fn listen(port: u16) -> io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let bind = |domain: Domain, address: SocketAddr| -> io::Result<Socket> {
        let socket = Socket::new(domain, Type::STREAM, None)?;
        if domain == Domain::IPV6 {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        Ok(socket)
    };
    let socket = match bind(Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(socket) => socket,
        // No IPv6 on this node (disabled, or the module absent).
        Err(err) if no_ipv6(&err) => {
            bind(Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?
        }
        Err(err) => return Err(err),
    };
    tokio::net::TcpListener::from_std(socket.into())
}

fn no_ipv6(err: &io::Error) -> bool {
    use nix::errno::Errno;
    [Errno::EAFNOSUPPORT, Errno::EADDRNOTAVAIL]
        .iter()
        .any(|e| err.raw_os_error() == Some(*e as i32))
}

fn current(target: &Mutex<Target>) -> Target {
    target.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

impl ServiceHealth {
    /// No servers yet; answers report the proxy's own health too.
    pub fn new(health: Arc<ProxyHealth>) -> Self {
        Self { health, servers: BTreeMap::new() }
    }

    /// The ports served.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().copied()
    }

    /// Serves exactly these ports: starts the new ones, stops those no longer wanted, and
    /// updates the counts of the others. A port that cannot be bound is reported and tried
    /// again on the next call.
    pub async fn sync(&mut self, wanted: BTreeMap<u16, Target>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                info!(port, "healthCheckNodePort server stopped");
            }
            keep
        });
        for (port, target) in wanted {
            if let Some(server) = self.servers.get(&port) {
                *server.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = target;
                continue;
            }
            let listener = match listen(port) {
                Ok(listener) => listener,
                Err(err) => {
                    warn!(port, service = %format!("{}/{}", target.namespace, target.name), %err,
                        "cannot serve the healthCheckNodePort");
                    continue;
                }
            };
            let shared = Arc::new(Mutex::new(target));
            let (state, health) = (shared.clone(), self.health.clone());
            let router = Router::new().fallback(move || {
                let target = current(&state);
                let healthy = health.answer(false).healthy;
                async move {
                    let (status, body) = answer(&target, healthy);
                    let mut response: Response = (status, body).into_response();
                    let headers = response.headers_mut();
                    headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    headers.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
                    response
                }
            });
            let task = tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, router).await {
                    warn!(port, %err, "healthCheckNodePort server failed");
                }
            });
            info!(port, "healthCheckNodePort server started");
            self.servers.insert(port, Server { target: shared, task });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy() {
        let target = Target { namespace: "ns".into(), name: "web".into(), local_endpoints: 2 };
        let (status, body) = answer(&target, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["localEndpoints"], 2);
        assert_eq!(answer(&target, false).0, StatusCode::SERVICE_UNAVAILABLE);
        let none = Target { local_endpoints: 0, ..target };
        assert_eq!(answer(&none, true).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn servers_follow_the_wanted_ports() {
        let health = Arc::new(ProxyHealth::new(std::time::Duration::from_secs(30)));
        let mut servers = ServiceHealth::new(health);
        let port = {
            let probe = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let target = Target { namespace: "ns".into(), name: "web".into(), local_endpoints: 1 };
        servers.sync([(port, target.clone())].into()).await;
        let get = move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            let mut text = String::new();
            // Over IPv6 too, where the host has it: one dual-stack socket.
            if let Ok(mut v6) = std::net::TcpStream::connect(("::1", port)) {
                v6.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                v6.read_to_string(&mut text)?;
                assert!(text.contains("\"localEndpoints\""), "{text}");
                text.clear();
            }
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            s.read_to_string(&mut text)?;
            Ok::<_, std::io::Error>(text)
        };
        let text = tokio::task::spawn_blocking(get).await.unwrap().unwrap();
        assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("\"localEndpoints\": 1"), "{text}");
        servers.sync([(port, Target { local_endpoints: 0, ..target })].into()).await;
        let text = tokio::task::spawn_blocking(get).await.unwrap().unwrap();
        assert!(text.contains(" 503 "), "{text}");
        servers.sync(BTreeMap::new()).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(tokio::task::spawn_blocking(get).await.unwrap().is_err(), "stopped");
    }
}
