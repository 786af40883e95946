//! The cluster's API server: the `fake-apiserver` binary as a process of its own, and the
//! writes the test makes to it as the kubelet and the EndpointSlice controller would.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fake_apiserver::Resource;
use serde_json::Value;

/// The `fake-apiserver` executable: `FAKE_APISERVER_BIN`, else the one cargo built next to
/// the tests or programs (`cargo xtask vmtest` builds it).
pub fn binary() -> PathBuf {
    crate::built_executable("FAKE_APISERVER_BIN", "fake-apiserver", "cargo build -p fake-apiserver")
}

/// The API server process; killed on drop.
pub struct ApiServer {
    child: Child,
    /// Where it listens.
    pub address: SocketAddr,
}

impl ApiServer {
    /// Starts it on `address`, in the network namespace `netns` (the caller's when `None`),
    /// and waits until it listens.
    pub fn start(netns: Option<&str>, address: SocketAddr) -> Self {
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        let mut child = command
            .args(["--listen", &address.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("fake-apiserver starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("fake-apiserver says where it listens");
        assert!(line.starts_with("listening on"), "fake-apiserver said {line:?}");
        Self { child, address }
    }

    /// A kubeconfig for it.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: kube-ipvs\n  user: {{}}\ncontexts:\n- name: cluster\n  context: {{cluster: cluster, user: kube-ipvs}}\ncurrent-context: cluster\n",
            self.address
        )
    }

    fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        let fail = |e: std::io::Error| format!("{method} {path}: {e}");
        let mut stream =
            TcpStream::connect_timeout(&self.address, Duration::from_secs(5)).map_err(fail)?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(fail)?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(fail)?;
        let mut text = String::new();
        stream.read_to_string(&mut text).map_err(fail)?;
        let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
    }

    /// Creates or replaces `object` (`PUT` at its path).
    ///
    /// # Panics
    /// If the server refuses it.
    pub fn put(&self, object: &Value) {
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = Resource::of_kind(kind).unwrap_or_else(|| panic!("kind {kind:?}"));
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = object["metadata"]["name"].as_str().expect("a name");
        let path = resource.object_path(namespace, name);
        match self.request("PUT", &path, &object.to_string()) {
            Ok((200, _)) => {}
            other => panic!("PUT {path}: {other:?}"),
        }
    }

    /// Deletes an object; whether it was there.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let path = resource.object_path(namespace, name);
        match self.request("DELETE", &path, "") {
            Ok((200, _)) => true,
            Ok((404, _)) => false,
            other => panic!("DELETE {path}: {other:?}"),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
