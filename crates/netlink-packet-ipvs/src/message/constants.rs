//! Numbers from the kernel's `include/uapi/linux/ip_vs.h`.

/// The generic-netlink family name.
pub const IPVS_GENL_NAME: &str = "IPVS";
/// The generic-netlink family version the kernel speaks.
pub const IPVS_GENL_VERSION: u8 = 1;

/// Longest scheduler name, including the terminating NUL.
pub const IP_VS_SCHEDNAME_MAXLEN: usize = 16;
/// Longest persistence engine name, including the terminating NUL.
pub const IP_VS_PENAME_MAXLEN: usize = 16;

/// Top-level attributes (`IPVS_CMD_ATTR_*`).
pub mod cmd_attr {
    /// Nested service attributes.
    pub const SERVICE: u16 = 1;
    /// Nested destination attributes.
    pub const DEST: u16 = 2;
    /// Nested sync daemon attributes.
    pub const DAEMON: u16 = 3;
    /// TCP established timeout, seconds.
    pub const TIMEOUT_TCP: u16 = 4;
    /// TCP FIN_WAIT timeout, seconds.
    pub const TIMEOUT_TCP_FIN: u16 = 5;
    /// UDP timeout, seconds.
    pub const TIMEOUT_UDP: u16 = 6;
}

/// Attributes of the `GET_INFO` reply (`IPVS_INFO_ATTR_*`).
pub mod info_attr {
    /// IPVS version, `0x010201` for 1.2.1.
    pub const VERSION: u16 = 1;
    /// Size of the connection hash table.
    pub const CONN_TAB_SIZE: u16 = 2;
}

/// Service attributes (`IPVS_SVC_ATTR_*`).
pub mod svc_attr {
    /// Address family, u16.
    pub const AF: u16 = 1;
    /// IP protocol, u16.
    pub const PROTOCOL: u16 = 2;
    /// Virtual address, up to 16 bytes.
    pub const ADDR: u16 = 3;
    /// Virtual port, big-endian u16.
    pub const PORT: u16 = 4;
    /// Firewall mark, u32.
    pub const FWMARK: u16 = 5;
    /// Scheduler name, NUL-terminated.
    pub const SCHED_NAME: u16 = 6;
    /// `struct ip_vs_flags { u32 flags; u32 mask; }`.
    pub const FLAGS: u16 = 7;
    /// Persistence timeout, seconds.
    pub const TIMEOUT: u16 = 8;
    /// Persistence netmask: a big-endian mask for IPv4, a prefix length for IPv6.
    pub const NETMASK: u16 = 9;
    /// Nested 32-bit statistics.
    pub const STATS: u16 = 10;
    /// Persistence engine name, NUL-terminated.
    pub const PE_NAME: u16 = 11;
    /// Nested 64-bit statistics.
    pub const STATS64: u16 = 12;
}

/// Destination attributes (`IPVS_DEST_ATTR_*`).
pub mod dest_attr {
    /// Real server address, up to 16 bytes.
    pub const ADDR: u16 = 1;
    /// Real server port, big-endian u16.
    pub const PORT: u16 = 2;
    /// Forwarding method, u32.
    pub const FWD_METHOD: u16 = 3;
    /// Weight, u32.
    pub const WEIGHT: u16 = 4;
    /// Upper connection threshold, u32.
    pub const U_THRESH: u16 = 5;
    /// Lower connection threshold, u32.
    pub const L_THRESH: u16 = 6;
    /// Active connections, u32 (output only).
    pub const ACTIVE_CONNS: u16 = 7;
    /// Inactive connections, u32 (output only).
    pub const INACT_CONNS: u16 = 8;
    /// Persistent connection templates, u32 (output only).
    pub const PERSIST_CONNS: u16 = 9;
    /// Nested 32-bit statistics.
    pub const STATS: u16 = 10;
    /// Address family of the destination, u16.
    pub const ADDR_FAMILY: u16 = 11;
    /// Nested 64-bit statistics.
    pub const STATS64: u16 = 12;
    /// Tunnel type, u8.
    pub const TUN_TYPE: u16 = 13;
    /// Tunnel port, big-endian u16.
    pub const TUN_PORT: u16 = 14;
    /// Tunnel flags, u16.
    pub const TUN_FLAGS: u16 = 15;
}

/// Statistics attributes (`IPVS_STATS_ATTR_*`).
pub mod stats_attr {
    /// Connections scheduled.
    pub const CONNS: u16 = 1;
    /// Incoming packets.
    pub const INPKTS: u16 = 2;
    /// Outgoing packets.
    pub const OUTPKTS: u16 = 3;
    /// Incoming bytes.
    pub const INBYTES: u16 = 4;
    /// Outgoing bytes.
    pub const OUTBYTES: u16 = 5;
    /// Connections per second.
    pub const CPS: u16 = 6;
    /// Incoming packets per second.
    pub const INPPS: u16 = 7;
    /// Outgoing packets per second.
    pub const OUTPPS: u16 = 8;
    /// Incoming bytes per second.
    pub const INBPS: u16 = 9;
    /// Outgoing bytes per second.
    pub const OUTBPS: u16 = 10;
    /// Padding for 64-bit alignment.
    pub const PAD: u16 = 11;
}

/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u16 = 17;
/// `IPPROTO_SCTP`.
pub const IPPROTO_SCTP: u16 = 132;
