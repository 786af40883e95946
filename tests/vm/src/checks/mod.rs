//! Assertions about what a node serves, shared by the VM end-to-end tests and the kind
//! end-to-end run (`cargo xtask e2e`): they take what was observed, however it was observed.

use std::collections::BTreeSet;

pub mod cluster;

/// Exactly the backends `expected` answered (every connection succeeded).
pub fn spread(
    what: &str,
    answers: impl IntoIterator<Item = Result<String, String>>,
    expected: &BTreeSet<String>,
) -> Result<(), String> {
    let seen: BTreeSet<String> = answers.into_iter().collect::<Result<_, _>>()?;
    if &seen == expected {
        Ok(())
    } else {
        Err(format!("{what} answered by {seen:?}, not {expected:?}"))
    }
}

/// One backend answered every connection (session affinity); returns it.
pub fn sticky(
    what: &str,
    answers: impl IntoIterator<Item = Result<String, String>>,
) -> Result<String, String> {
    let seen: BTreeSet<String> = answers.into_iter().collect::<Result<_, _>>()?;
    match seen.len() {
        1 => Ok(seen.into_iter().next().expect("one")),
        _ => Err(format!("{what} answered by {seen:?}, not by one backend")),
    }
}

/// `kube-ipvs ls` is `ipvsadm -Ln` line for line once the `  # …` notes are taken off, and
/// every virtual server has a note.
pub fn ls_matches_ipvsadm(ls: &str, ipvsadm: &str) -> Result<(), String> {
    let plain: Vec<&str> =
        ls.lines().map(|l| l.split_once("  # ").map_or(l, |(line, _)| line)).collect();
    let expected: Vec<&str> = ipvsadm.lines().collect();
    if plain != expected {
        return Err(format!("kube-ipvs ls:\n{ls}\nis not ipvsadm -Ln:\n{ipvsadm}"));
    }
    let server = |l: &str| ["TCP ", "UDP ", "SCTP ", "FWM "].iter().any(|p| l.starts_with(p));
    let servers = expected.iter().filter(|l| server(l)).count();
    let named = ls.lines().filter(|l| server(l) && l.contains("  # ")).count();
    if named != servers {
        return Err(format!("{named} of {servers} virtual servers named:\n{ls}"));
    }
    Ok(())
}

/// An `ipvsadm -Ln` listing (or `kube-ipvs ls`) without the destinations' connection
/// counts, which move while requests run.
pub fn without_connection_counts(listing: &str) -> String {
    let mut out = String::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("  -> ") && fields.len() == 6 && fields[1] != "RemoteAddress:Port" {
            out.push_str(&format!("  -> {:<28} {:<7} {}", fields[1], fields[2], fields[3]));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_say_what_they_saw() {
        let ok = |s: &str| Ok(s.to_owned());
        let both: BTreeSet<String> = ["a".into(), "b".into()].into();
        assert!(spread("web", [ok("a"), ok("b"), ok("a")], &both).is_ok());
        assert_eq!(
            spread("web", [ok("a")], &both).unwrap_err(),
            "web answered by {\"a\"}, not {\"a\", \"b\"}"
        );
        assert!(spread("web", [ok("a"), Err("refused".into()), ok("b")], &both).is_err());
        assert_eq!(sticky("s", [ok("b"), ok("b")]), Ok("b".into()));
        assert!(sticky("s", [ok("a"), ok("b")]).is_err());
        let ipvsadm = "IP Virtual Server version 1.2.1 (size=4096)\nProt LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\nTCP  10.96.0.10:80 rr\n  -> 10.244.0.2:8080              Masq    1      0          0         \n";
        let ls = ipvsadm
            .replace("TCP  10.96.0.10:80 rr\n", "TCP  10.96.0.10:80 rr  # ns/web:http ClusterIP\n");
        assert_eq!(ls_matches_ipvsadm(&ls, ipvsadm), Ok(()));
        assert!(ls_matches_ipvsadm(ipvsadm, ipvsadm).is_err(), "names missing");
        assert!(ls_matches_ipvsadm(&ls.replace(" 1 ", " 2 "), ipvsadm).is_err());
        let busier = ipvsadm.replace("1      0          0", "1      3          41");
        assert_ne!(busier, ipvsadm);
        assert_eq!(without_connection_counts(&busier), without_connection_counts(ipvsadm));
        assert!(without_connection_counts(ipvsadm).contains("  -> 10.244.0.2:8080"));
    }
}
