//! The interfaces of this network namespace, read from /sys/class/net.

use std::fs;
use std::path::Path;

/// ARPHRD types whose frames start with an Ethernet header.
const ARPHRD_ETHER: u32 = 1;
const ARPHRD_LOOPBACK: u32 = 772;
const IFF_LOOPBACK: u32 = 0x8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    /// The device has no link-layer header (tun, wireguard, ipip, ...).
    pub l3: bool,
    pub loopback: bool,
}

fn read_num(path: &Path) -> Option<u32> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x") {
        u32::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Every interface of the current network namespace, sorted by ifindex.
/// An interface that vanishes while it is being read is skipped.
pub fn list() -> std::io::Result<Vec<Interface>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/class/net")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let (Some(ifindex), Some(kind), Some(flags)) = (
            read_num(&dir.join("ifindex")),
            read_num(&dir.join("type")),
            read_num(&dir.join("flags")),
        ) else {
            continue;
        };
        out.push(Interface {
            name,
            ifindex,
            l3: kind != ARPHRD_ETHER && kind != ARPHRD_LOOPBACK,
            loopback: kind == ARPHRD_LOOPBACK || flags & IFF_LOOPBACK != 0,
        });
    }
    out.sort_by_key(|i| i.ifindex);
    Ok(out)
}

/// Which interfaces to attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every non-loopback interface, including ones that appear later.
    All,
    /// These names (attached whenever they exist).
    Names(Vec<String>),
}

impl Selection {
    pub fn wants(&self, iface: &Interface) -> bool {
        match self {
            Selection::All => !iface.loopback,
            Selection::Names(names) => names.iter().any(|n| n == &iface.name),
        }
    }

    /// Checks that every named interface exists now; the error lists the
    /// interfaces that do.
    pub fn check_exists(&self, present: &[Interface]) -> Result<(), String> {
        let Selection::Names(names) = self else {
            return Ok(());
        };
        let missing: Vec<&str> = names
            .iter()
            .filter(|n| !present.iter().any(|i| &i.name == *n))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let existing: Vec<&str> = present.iter().map(|i| i.name.as_str()).collect();
        Err(format!(
            "interface_name: no interface named {} on this host; interfaces that exist: {}",
            missing
                .iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            existing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, idx: u32, lo: bool) -> Interface {
        Interface {
            name: name.into(),
            ifindex: idx,
            l3: false,
            loopback: lo,
        }
    }

    #[test]
    fn all_skips_loopback_only() {
        assert!(!Selection::All.wants(&iface("lo", 1, true)));
        assert!(Selection::All.wants(&iface("eth0", 2, false)));
    }

    #[test]
    fn unknown_name_lists_existing() {
        let present = vec![iface("lo", 1, true), iface("eth0", 2, false)];
        let sel = Selection::Names(vec!["eth0".into(), "wg9".into()]);
        assert_eq!(
            sel.check_exists(&present).unwrap_err(),
            "interface_name: no interface named \"wg9\" on this host; interfaces that exist: lo, eth0"
        );
        assert_eq!(
            Selection::Names(vec!["eth0".into()]).check_exists(&present),
            Ok(())
        );
    }

    #[test]
    fn lists_loopback_of_this_namespace() {
        let all = list().unwrap();
        let lo = all.iter().find(|i| i.name == "lo").expect("lo exists");
        assert!(lo.loopback);
        assert!(!lo.l3);
    }
}
