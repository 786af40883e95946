//! `ipvs-netlink` against the real kernel.

use ipvs_netlink::IpvsHandle;

#[tokio::test]
async fn info_matches_proc() {
    let ipvs = IpvsHandle::new().unwrap();
    let info = ipvs.info().await.unwrap();
    let proc = std::fs::read_to_string("/proc/net/ip_vs").unwrap();
    let expected = format!(
        "IP Virtual Server version {} (size={})",
        info.version_string(),
        info.connection_table_size
    );
    assert_eq!(proc.lines().next().unwrap(), expected);
}
